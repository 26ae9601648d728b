"""The arena that holds the weights our kernels stream (llama/kernels/huge_pages.py):
copies equal to their originals, where the kernels expect them, in one
buffer advised for huge pages; and left alone where that does not pay.
No timing here: the speed is in huge_pages.py's docstring and the README."""

import sys

import pytest
import torch

from llama import Llama
from llama.kernels import huge_pages, native
from llama.kernels.linear import NativeMatmul


def test_copies_equal_their_originals_in_one_aligned_buffer():
    tensors = [torch.randn(300, 64), torch.randint(-127, 128, (7, 96), dtype=torch.int8), torch.randn(5).bfloat16()]
    arena = huge_pages.HugePageArena(sum(huge_pages.padded(t.numel() * t.element_size()) for t in tensors))
    copies = [arena.copy(t) for t in tensors]
    for t, c in zip(tensors, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and torch.equal(c, t) and c.is_contiguous()
        assert c.data_ptr() % huge_pages.ALIGN == 0
        assert c.untyped_storage().data_ptr() == arena.buffer.untyped_storage().data_ptr()
    assert copies[0].data_ptr() % huge_pages.HUGE_PAGE == 0
    assert copies[1].data_ptr() == copies[0].data_ptr() + 300 * 64 * 4
    with pytest.raises(ValueError, match="bytes left"):
        arena.copy(torch.zeros(1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_HUGEPAGE) is Linux's")
def test_linux_takes_the_advice_on_whole_huge_pages():
    arena = huge_pages.HugePageArena(3 * huge_pages.HUGE_PAGE)
    assert arena.huge
    assert not huge_pages.advise_huge_pages(arena.buffer.data_ptr(), 0)


def test_weights_stay_put_where_huge_pages_are_off_or_memory_is_short(tmp_path, monkeypatch, caplog):
    setting = tmp_path / "enabled"
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    setting.write_text("always madvise [never]\n")
    assert "off" in huge_pages.why_not(1 << 20)
    setting.write_text("always [madvise] never\n")
    if sys.platform.startswith("linux"):
        assert huge_pages.why_not(1 << 20) is None
        assert "memory available" in huge_pages.why_not(1 << 60)
    with caplog.at_level("INFO", logger="llama"):
        assert huge_pages.gather([torch.zeros(1 << 20)] * (1 << 20)) is None  # 4 PB
    assert "stay in their own pages" in caplog.text
    setting.unlink()
    assert huge_pages.why_not(1 << 20) == "no transparent huge pages here"
    assert huge_pages.gather([]) is None


@pytest.mark.skipif(native.library() is None, reason=f"no native kernels here: {native.status()}")
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_a_built_model_streams_its_weights_from_one_arena_in_decoding_order(make_ckpt, monkeypatch, quantize):
    ckpt = make_ckpt("llama3")
    build = lambda: Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64,  # noqa: E731
                                max_batch_size=1, device="cpu", dtype="float32", quantize=quantize)
    gen = build()
    held = [t for m in gen.model.modules() if isinstance(m, NativeMatmul)
            for t in (m.weight, m.scales) if t is not None]
    storages = {t.untyped_storage().data_ptr() for t in held}
    total = sum(huge_pages.padded(t.numel() * t.element_size()) for t in held)
    if huge_pages.why_not(total) is None:
        assert len(storages) == 1
        ptrs = [t.data_ptr() for t in held]
        assert ptrs == sorted(ptrs)  # the order decoding reads them: layer 0's wqkv first, the output last
    else:  # this machine has huge pages off: nothing moved
        assert len(storages) == len(held)
    monkeypatch.setattr(huge_pages, "why_not", lambda nbytes: "off for this test")
    apart = build()
    assert len({m.weight.untyped_storage().data_ptr() for m in apart.model.modules() if isinstance(m, NativeMatmul)}) > 1
    tokens = torch.tensor([[128000, 1000, 2000, 3000]])
    for model in (gen.model, apart.model):  # prefill (PyTorch's GEMM), then decoding steps (ours)
        model.forward(tokens, 0)
    steps = [[model.forward(tokens[:, i:i + 1], 4 + i) for i in range(3)] for model in (gen.model, apart.model)]
    for a, b in zip(*steps):
        assert torch.equal(a, b)  # the same kernels on the same weights, wherever they lie

"""Metrics arithmetic and the printed block, with a fake clock; and the
metrics every generate call attaches."""

import json

import pytest

from llama import Llama
from llama.engine.metrics import GenerationMetrics, MetricsRecorder, write_json


class FakeClock:
    def __init__(self, times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def test_recorder_arithmetic():
    # start at 10 s, first token at 12 s, three more steps, end at 21.22 s
    clock = FakeClock([10.0, 12.0, 21.22])
    syncs = []
    rec = MetricsRecorder(batch_size=2, prompt_tokens=30, weight_bytes=2_000_000_000, clock=clock,
                          synchronize=lambda: syncs.append(1), peak_memory=lambda: 3_500_000_000)
    for _ in range(4):
        rec.step()
    m = rec.finish(generated_tokens=7)  # row 0: 4 tokens, row 1 stopped after 3
    assert len(syncs) == 2  # first token and end, never per step
    assert (m.decode_steps, m.generated_tokens, m.batch_size) == (4, 7, 2)
    assert m.seconds == pytest.approx(11.22) and m.first_token_seconds == pytest.approx(2.0)
    assert m.per_token_latency == pytest.approx(11.22 / 4)
    assert m.throughput == pytest.approx(7 / 11.22)  # = B*L/T only if no row stops early
    assert m.decode_tokens_per_s == pytest.approx((7 - 2) / 9.22)
    assert m.bandwidth_bytes_per_s == pytest.approx(2e9 * 3 / 9.22)


def test_report_block_format():
    m = GenerationMetrics(batch_size=1, prompt_tokens=10, generated_tokens=64, decode_steps=64, seconds=21.22,
                          first_token_seconds=0.5, weight_bytes=13_000_000_000, peak_memory_bytes=14_100_000_000)
    assert m.report().splitlines() == [
        "------ Inference metrics ------",
        "Generated tokens: 64",
        "Latency: 21.22 (s).",
        "Per-token latency: 0.33 (s/token)",
        "Throughput: 3.02 (tokens/s)",
        "Time to first token: 0.50 (s)",
        "Decode throughput: 3.04 (tokens/s)",
        "Peak memory: 14.10 (GB)",
        "Bandwidth achieved: 39.53 (GB/s)",  # 13 GB x 63 steps / 20.72 s
        "-------------------------------",
    ]


def test_first_token_is_the_first_step_that_gives_tokens():
    # A pipeline lane's first turns only launch passes: the first token comes at step 3.
    rec = MetricsRecorder(1, 5, 100, clock=FakeClock([0.0, 3.0, 5.0]), peak_memory=lambda: 0)
    for gave in (False, False, True, True):
        rec.step(gave_tokens=gave)
    m = rec.finish(2)
    assert m.first_token_seconds == 3.0 and m.decode_steps == 4 and m.seconds == 5.0


def test_single_step_has_no_decode_rate():
    m = MetricsRecorder(1, 5, 100, clock=FakeClock([0.0, 1.0, 1.0]), peak_memory=lambda: 0)
    m.step()
    result = m.finish(1)
    assert result.decode_steps == 1 and result.decode_tokens_per_s != result.decode_tokens_per_s  # nan


def test_write_json(tmp_path):
    m = GenerationMetrics(1, 2, 3, 3, 1.5, 0.5, 10, 20)
    write_json([m, m], tmp_path / "m.json")
    data = json.loads((tmp_path / "m.json").read_text())
    assert len(data) == 2 and data[0]["throughput_tokens_per_s"] == 2.0 and data[0]["decode_steps"] == 3


@pytest.fixture(scope="module")
def gen(make_ckpt):
    ckpt = make_ckpt("llama3")
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=2,
                       device="cpu", dtype="float32")


def test_generate_attaches_metrics(gen, caplog):
    gen.tokenizer.stop_tokens, old = frozenset(), gen.tokenizer.stop_tokens
    try:
        with caplog.at_level("INFO", logger="llama"):
            result = gen.generate([[1, 2, 3], [4, 5, 6, 7, 8]], max_gen_len=6, temperature=0)
    finally:
        gen.tokenizer.stop_tokens = old
    tokens, _ = result  # still Meta's (tokens, logprobs) pair
    m = result.metrics
    assert m is gen.last_metrics and [len(t) for t in tokens] == [6, 6]
    assert m.generated_tokens == 12 and m.prompt_tokens == 8 and m.batch_size == 2
    # Both prompts are prefilled in the first step (which gives each its first token), then 5 more.
    assert m.decode_steps == 6
    assert m.weight_bytes == gen.weight_bytes_per_step > 0
    assert 0 < m.first_token_seconds < m.seconds and m.peak_memory_bytes > 0
    assert "------ Inference metrics ------" in caplog.text and "Generated tokens: 12" in caplog.text


def test_rows_that_stop_early_stop_being_counted(gen):
    prompt = [gen.tokenizer.encode("A llama", bos=True, eos=False)]
    (free,), _ = gen.generate(prompt, 8, temperature=0)
    old = gen.tokenizer.stop_tokens
    gen.tokenizer.stop_tokens = frozenset({free[2]})
    try:
        result = gen.generate(prompt * 2, 8, temperature=0)
    finally:
        gen.tokenizer.stop_tokens = old
    assert result.metrics.generated_tokens == 2 * 3  # two tokens and the stop token, per row
    assert result.metrics.decode_steps == 3  # all rows done: the loop ends


def test_write_json_to_a_directory_or_a_missing_folder_is_a_clear_error(tmp_path):
    from llama.engine.metrics import write_json

    class M:
        def to_dict(self):
            return {"tokens": 1}

    with pytest.raises(ValueError, match=r"--metrics_json .* is a directory; give a file name, e.g. .*metrics.json"):
        write_json([M()], tmp_path)
    with pytest.raises(ValueError, match=r"--metrics_json .*: cannot write in .*nowhere \(No such file or directory\)"):
        write_json([M()], tmp_path / "nowhere" / "m.json")
    write_json([M()], tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == [{"tokens": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]

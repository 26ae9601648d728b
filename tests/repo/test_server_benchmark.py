"""benchmarks/server_benchmark.py and server_client.py: SSE parsing, the
statistics and tables, the conversation builder, and a smoke run of each
server on a tiny model (llama.cpp's only where llama-cpp-python is installed)."""

import asyncio
import json
import math
from pathlib import Path

import httpx
import pytest

from benchmarks import server_benchmark as sb
from benchmarks import server_client as sc
from conftest import CACHE


def test_parse_sse_keeps_data_payloads_only():
    lines = ["data: {\"a\": 1}\r", "", ": ping - 2026-12-06 11:00:00", "event: message", "data:{\"b\": 2}",
             "id: 3", "data: [DONE]"]
    assert list(sc.parse_sse(lines)) == [{"a": 1}, {"b": 2}, "[DONE]"]
    with pytest.raises(json.JSONDecodeError):
        list(sc.parse_sse(["data: {not json"]))


def chunk(text=None, finish=None, role=None):
    delta = {k: v for k, v in (("content", text), ("role", role)) if v is not None}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_stream_records_text_pieces_and_their_times():
    s = sc.Stream(sent=10.0)
    for t, payload in [(10.5, chunk(role="assistant")), (10.6, chunk("Hel")), (10.7, chunk("")),
                       (10.9, chunk("lo")), (11.4, chunk(" you")), (11.5, chunk(finish="length")),
                       (11.6, {"choices": [], "usage": {"completion_tokens": 3}}), (11.7, "[DONE]")]:
        sc.feed(s, payload, t)
    assert s.text == "Hello you" and s.finish_reason == "length" and s.error is None
    assert s.ttft == pytest.approx(0.6) and s.done == pytest.approx(11.4)
    assert [round(g, 6) for _, g in s.gaps()] == [0.3, 0.5]
    s.tokens = 3
    assert s.decode_tokens_per_s() == pytest.approx(2 / 0.8)
    bad = sc.Stream(sent=0.0)
    sc.feed(bad, {"error": {"message": "prompt too long"}}, 1.0)
    assert "prompt too long" in bad.error
    with pytest.raises(RuntimeError, match="1 request.*prompt too long"):
        sc.check([s, bad], "round")


def test_percentile_interpolates_like_numpy():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert sc.percentile(xs, 50) == 3.0 == sc.median(xs)
    assert sc.percentile(xs, 0) == 1.0 and sc.percentile(xs, 100) == 5.0
    assert sc.percentile(xs, 99) == pytest.approx(4.96)
    assert sc.percentile([7.0], 99) == 7.0
    assert math.isnan(sc.percentile([], 50))
    with pytest.raises(ValueError, match="0..100"):
        sc.percentile(xs, 101)


def test_markdown_table():
    text = sc.markdown_table(["a", "b", "c"], [[1, 0.123456, None], ["x", 12345.6, float("nan")]])
    assert text.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1 | 0.123 | - |", "| x | 12346 | - |"]
    with pytest.raises(ValueError, match="2 cells for 3 headers"):
        sc.markdown_table(["a", "b", "c"], [[1, 2]])


def test_has_flag_reads_argparse_help():
    help_text = "usage: llama serve [--speculate {ngram,off}] [--speculate_tokens K]\n  --prefill_chunk N  ..."
    assert sc.has_flag(help_text, "--speculate") and sc.has_flag(help_text, "--prefill_chunk")
    assert not sc.has_flag(help_text, "--spec")


def test_commands_pass_the_same_threads():
    ours = sc.ours_command(Path("ck"), 8001, 2, 512, 4, extra=["--speculate", "ngram"])
    assert ours[ours.index("--threads") + 1] == "2" and ours[-2:] == ["--speculate", "ngram"]
    cpp = sc.llamacpp_command(Path("m.gguf"), 8002, 2, 512, draft=10)
    assert cpp[cpp.index("--n_threads") + 1] == "2" == cpp[cpp.index("--n_threads_batch") + 1]
    assert cpp[cpp.index("--interrupt_requests") + 1] == "False"
    assert cpp[cpp.index("--draft_model") + 1] == "prompt-lookup-decoding"
    assert "-c" in sc.llamacpp_command(Path("m.gguf"), 1, 1, 64, extra_buffers=False)


@pytest.fixture(scope="module")
def smollm2_tokenizer(request):
    from llama.text.tokenizer import Tokenizer

    path = CACHE / "SmolLM2-135M-Instruct" / "tokenizer.model"
    if not path.is_file():  # converted from the GGUF (fetched once per cache)
        path = request.getfixturevalue("smollm2_ckpt") / "tokenizer.model"
    return Tokenizer.from_file(path)


def test_conversation_grows_to_about_1500_tokens(smollm2_tokenizer):
    from llama.text.chat_format import ChatFormat

    tok = smollm2_tokenizer
    count = lambda s: len(tok.encode(s, bos=False, eos=False))  # noqa: E731
    fmt = ChatFormat.for_tokenizer(tok)
    conv = sb.conversation(count, turns=10, target_tokens=1500)
    sizes = [len(fmt.encode_dialog_prompt(sb.turn_messages(conv, k))) for k in range(10)]
    assert all(a < b for a, b in zip(sizes, sizes[1:]))
    assert 1350 <= sizes[-1] <= 1650, sizes
    assert sizes[0] < 250
    other = sb.conversation(count, turns=10, target_tokens=1500, tag=1)
    assert other["system"] != conv["system"] and other["turns"][0][0] != conv["turns"][0][0]
    last = sb.turn_messages(conv, 9)
    assert [m["role"] for m in last[:4]] == ["system", "user", "assistant", "user"] and len(last) == 20
    with pytest.raises(ValueError, match="too small"):
        sb.conversation(count, turns=10, target_tokens=200)
    text = sb.text_of_tokens(count, 2000)
    assert 1900 <= count(text) <= 2000


def stream(sent, times, tokens=0):
    s = sc.Stream(sent=sent, times=list(times), pieces=["x"] * len(times))
    s.tokens = tokens or len(times)
    return s


def test_concurrent_figures_take_the_gaps_that_overlap_the_admission():
    running = [stream(0.0, [1.0, 1.1, 1.2, 2.2, 2.3]), stream(0.0, [1.05, 1.15, 1.25, 1.35])]
    document = stream(1.5, [2.1, 2.2])  # admitted from 1.5 to 2.1
    assert sorted(sb.window_gaps(running, 1.5, 2.1)) == pytest.approx([1.0])  # 1.2 -> 2.2 spans it
    f = sb.concurrent_figures(running, document)
    assert f["tokens"] == 11 and f["tokens_per_s"] == pytest.approx(11 / 2.3)
    assert f["document_ttft_s"] == pytest.approx(0.6) and f["admission_gaps"] == 1
    assert f["itl_median_s"] == pytest.approx(0.1) and f["p99_over_median"] == pytest.approx(10.0)
    assert sb.medians_of([{"a": 1.0}, {"a": 3.0}, {"a": 2.0}]) == {"a": 2.0}


def test_bad_arguments_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sb.parse_args(["multiturn", "--ckpt_dir", str(tmp_path)])
    assert "has no params.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sb.parse_args(["concurrent", "--clients", "4", "--shared_clients", "4"])
    assert "--shared_clients" in capsys.readouterr().err


def test_multiturn_smoke_on_our_server(make_ckpt, tmp_path, capsys):
    """The whole multiturn part against our server on a tiny random checkpoint."""
    ckpt = make_ckpt("llama3")
    res = sb.main(["multiturn", "--servers", "ours", "--ckpt_dir", str(ckpt), "--turns", "2", "--target_tokens",
                   "150", "--rounds", "1", "--reply_tokens", "3", "--threads", "1", "--logs", str(tmp_path),
                   "--json", str(tmp_path / "out.json")])
    ttft = res["multiturn"]["ttft_s"]["ours"]
    assert len(ttft) == 2 and all(t > 0 for t in ttft)
    assert json.loads((tmp_path / "out.json").read_text())["multiturn"]["prompt_tokens"] == \
        res["multiturn"]["prompt_tokens"]
    assert "| turn N / turn 1 |" in capsys.readouterr().out


def test_llamacpp_server_streams(tiny_gguf, tmp_path):
    """llama-cpp-python's server starts with the flags the benchmark gives it and streams."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[bench]')")
    port = sc.free_port()
    with sc.running(sc.llamacpp_command(tiny_gguf[0], port, 1, 128), port, tmp_path / "log") as url:
        async def one():
            async with httpx.AsyncClient(timeout=60) as client:
                return await sc.stream_chat(client, url, [{"role": "user", "content": "Hi"}], 4)

        s = asyncio.run(one())
    assert s.error is None and s.times and s.ttft > 0

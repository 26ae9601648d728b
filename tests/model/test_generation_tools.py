"""chat_completion with Llama 3.1 tool calls: stop reasons and parsed calls.

A random-weight model never writes a tool call, so these tests script the
sampler (`Engine._sample`): everything else, prompt encoding, the decoding
engine, the stop tokens and message decoding, is the real code.
"""

import pytest
import torch

from llama import CallSyntax, Llama, StopReason
from llama.engine.engine import Engine

TAG, EOM, EOT = 128010, 128008, 128009


@pytest.fixture(scope="module")
def llama3(make_ckpt):
    ckpt = make_ckpt("llama3")
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=2,
                       device="cpu", dtype="float32")


@pytest.fixture
def script(monkeypatch):
    """script(rows) makes the sampler write rows[i] for the i-th request submitted, one token per step."""
    def use(rows):
        order = {}  # request id -> script row, in submission order

        def sample(self, seqs, logits):
            return torch.tensor([rows[order.setdefault(s.id, len(order))][len(s.tokens)] for s in seqs])
        monkeypatch.setattr(Engine, "_sample", sample)
    return use


def test_eom_is_a_stop_token(llama3):
    assert {EOM, EOT, 128001} <= llama3.tokenizer.stop_tokens


def test_chat_completion_returns_tool_calls_and_stop_reasons(llama3, script):
    tok = llama3.tokenizer
    call = [TAG] + tok.encode('brave_search.call(query="weather in Paris")', bos=False, eos=False)
    answer = tok.encode("It is sunny.", bos=False, eos=False)
    width = max(len(call), len(answer)) + 3
    script([
        call + [EOM] + [9906] * (width - len(call) - 1),  # the tokens after the stop token are never used
        answer + [EOT] + [9906] * (width - len(answer) - 1),
    ])
    dialogs = [[{"role": "user", "content": "Weather in Paris?"}], [{"role": "user", "content": "Weather in Rome?"}]]
    first, second = (r["generation"] for r in llama3.chat_completion(dialogs, max_gen_len=width))
    assert first["stop_reason"] == StopReason.END_OF_MESSAGE and first["content"] == ""
    [tool_call] = first["tool_calls"]
    assert (tool_call.tool_name, tool_call.arguments, tool_call.syntax) == (
        "brave_search", {"query": "weather in Paris"}, CallSyntax.BUILTIN)
    assert second == {"role": "assistant", "content": "It is sunny.", "tool_calls": [],
                      "stop_reason": StopReason.END_OF_TURN}
    # The answer goes back into the dialog with a tool result, token for token as the model wrote it.
    dialog = dialogs[0] + [first, {"role": "ipython", "content": "sunny, 24 C"}]
    expected = llama3.formatter.encode_header("assistant") + call + [EOM]
    start = 1 + len(llama3.formatter.encode_message(dialog[0]))
    assert llama3.formatter.encode_dialog_prompt(dialog)[start : start + len(expected)] == expected


def test_out_of_tokens(llama3, script):
    tok = llama3.tokenizer
    partial = [TAG] + tok.encode('brave_search.call(query="weather in', bos=False, eos=False)
    script([partial])
    [result] = llama3.chat_completion([[{"role": "user", "content": "Weather?"}]], max_gen_len=len(partial))
    message = result["generation"]
    assert message["stop_reason"] == StopReason.OUT_OF_TOKENS
    assert [c.tool_name for c in message["tool_calls"]] == ["code_interpreter"]  # the cut-off text after the tag
    assert llama3.formatter.encode_message(message)[4:-1] == partial

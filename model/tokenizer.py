"""Tokenizer training and loading: HF tokenizers BPE (char or byte level) or sentencepiece.

Run it through the root script:

    python train_tokenizer.py --corpus_file data/corpus.txt --vocab_size 8192 \
        --token_type char --library hf --output_dir model_save/tokenizer

`tokenizer_dir_for(model_path, cfg)` says which tokenizer goes with a model: the
`--tokenizer_dir` the user gave, else the model's own directory when it holds a tokenizer,
else the default (model_save/tokenizer), so every stage uses the model's own vocabulary.

Whatever the library, the result is saved as a `PreTrainedTokenizerFast` directory
(tokenizer.json + tokenizer_config.json + special_tokens_map.json) that
`AutoTokenizer.from_pretrained` loads, with [PAD]=0 and [EOS]=1 as the model expects.

Char level: NFKC, then punctuation / single-digit / Metaspace pre-tokenisers, BPE over
characters, Metaspace decoder. The Metaspace prepend scheme is "never": no "▁" is added in
front of a word, so decoding gives back exactly the normalised input (the original's
settings added spaces around punctuation and needed a clean-up helper afterwards).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import Iterator

from config import MODEL_SAVE_DIR
from model.common import UserError, is_given

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_TOKENIZER_DIR = MODEL_SAVE_DIR / "tokenizer"
SPECIAL_TOKENS = ["[PAD]", "[EOS]", "[SEP]", "[BOS]", "[CLS]", "[MASK]", "[UNK]"]
EXTRA_CHARS = ["\t", "\n"]  # kept as tokens: answers contain line breaks


def iter_corpus(corpus_file: str | Path, chunk_lines: int = 1, progress: bool = True) -> Iterator[str]:
    """Stream a text corpus from disk line by line (never the whole file in memory)."""
    path = Path(corpus_file)
    size = path.stat().st_size
    bar = None
    if progress:
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn
        bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                       TimeRemainingColumn(), transient=True)
        bar.start()
        task = bar.add_task(f"reading {path.name}", total=size)
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if bar is not None:
                    bar.advance(task, len(line.encode("utf-8")))
                line = line.rstrip("\n")
                if line:
                    yield line
    finally:
        if bar is not None:
            bar.stop()


def tokenizer_dir_for(model_path: str | Path | None, cfg=None) -> Path:
    """The tokenizer to use with the model at `model_path` under settings `cfg` (any config
    with a `tokenizer_dir` field): the tokenizer_dir the user gave; else the model's own
    directory (the directory holding a weights file) when it holds a tokenizer; else the
    default tokenizer_dir (model_save/tokenizer when that is "")."""
    configured = getattr(cfg, "tokenizer_dir", "") if cfg is not None else ""
    if configured and is_given(cfg, "tokenizer_dir"):
        return Path(configured)
    if model_path:
        path = Path(model_path)
        home = path if path.is_dir() else path.parent
        if any((home / name).is_file() for name in TOKENIZER_FILES):
            return home
    return Path(configured) if configured else DEFAULT_TOKENIZER_DIR


def _check_inputs(corpus_file: str | Path, vocab_size: int) -> Path:
    path = Path(corpus_file)
    if not path.is_file():
        raise UserError(f"corpus file not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"corpus file is empty: {path}")
    minimum = len(SPECIAL_TOKENS) + len(EXTRA_CHARS) + 1
    if vocab_size < minimum:
        raise UserError(f"--vocab_size {vocab_size} is too small: it must exceed the {len(SPECIAL_TOKENS)} "
                        f"special tokens plus tab and newline (at least {minimum})")
    return path


def _wrap(tokenizer_obj):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_obj, pad_token="[PAD]", eos_token="[EOS]", sep_token="[SEP]",
        bos_token="[BOS]", cls_token="[CLS]", mask_token="[MASK]", unk_token="[UNK]",
        clean_up_tokenization_spaces=False, model_max_length=1_000_000,
    )


def _char_pipeline(tok):
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Punctuation(),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Metaspace(prepend_scheme="never"),
    ])
    tok.decoder = decoders.Metaspace(prepend_scheme="never")


def train_hf(corpus_file, vocab_size: int, token_type: str = "char"):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if token_type == "char":
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        _char_pipeline(tok)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=EXTRA_CHARS, show_progress=False,
                                      # a corpus with more distinct characters than the
                                      # vocabulary keeps the most frequent ones ([UNK] else)
                                      limit_alphabet=vocab_size - len(SPECIAL_TOKENS) - len(EXTRA_CHARS))
    elif token_type == "byte":
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    else:
        raise UserError(f"--token_type must be 'char' or 'byte', got {token_type!r}")
    tok.train_from_iterator(iter_corpus(corpus_file), trainer=trainer)
    return _wrap(tok)


def train_sentencepiece(corpus_file, vocab_size: int, token_type: str = "char"):
    """sentencepiece BPE, converted to a tokenizers BPE so the same loading code works.

    sentencepiece's own normalisation and dummy prefix are off; the HF wrapper applies NFKC
    and the same Metaspace scheme as the char-level tokenizer, so round trips are exact.
    `token_type=byte` turns on sentencepiece's byte fallback for unseen characters.
    """
    from tokenizers import Tokenizer, models

    if token_type not in ("char", "byte"):
        raise UserError(f"--token_type must be 'char' or 'byte', got {token_type!r}")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "spm")
        # Full character coverage keeps every character of the corpus (exact round trips);
        # a corpus with more distinct characters than the vocabulary falls back to the
        # usual 0.9995 for CJK, rare characters then becoming [UNK] (or bytes).
        for coverage in (1.0, 0.9995):
            try:
                _train_spm(corpus_file, prefix, vocab_size, token_type, coverage)
                break
            except RuntimeError as exc:  # sentencepiece reports bad settings as RuntimeError
                message = str(exc).splitlines()[-1]
                if coverage == 1.0 and "required_chars" in message:
                    print(f"note: more distinct characters than --vocab_size {vocab_size}; "
                          "using character_coverage 0.9995")
                    continue
                raise UserError(f"sentencepiece training failed: {message}") from None
        vocab, merges = _spm_bpe_vocab_and_merges(prefix + ".model")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]",
                               byte_fallback=token_type == "byte", fuse_unk=True))
    _char_pipeline(tok)
    if token_type == "byte":
        from tokenizers import decoders
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="never")])
    return _wrap(tok)


def _train_spm(corpus_file, prefix: str, vocab_size: int, token_type: str, coverage: float) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=(unicodedata.normalize("NFKC", s) for s in iter_corpus(corpus_file)),
        model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
        character_coverage=coverage, byte_fallback=token_type == "byte",
        pad_id=0, eos_id=1, bos_id=3, unk_id=6,
        pad_piece="[PAD]", eos_piece="[EOS]", bos_piece="[BOS]", unk_piece="[UNK]",
        user_defined_symbols=["[SEP]", "[CLS]", "[MASK]", "\t", "\n"],
        normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, hard_vocab_limit=False,
        # the default (4192 bytes) silently skips longer lines, and their characters with them
        max_sentence_length=1 << 20, minloglevel=2,
    )


def _spm_bpe_vocab_and_merges(model_file: str):
    """Vocabulary and merge list of a sentencepiece BPE model, for tokenizers' BPE.

    Written here because neither library has a stable public converter (transformers'
    SentencePieceExtractor changed its signature between releases). sentencepiece ranks
    pieces by score, i.e. by id: each piece is the merge of two shorter pieces, and merges
    apply in the order of the merged piece's id.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_file)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, pid in vocab.items():
        if len(piece) < 2 or sp.is_control(pid) or sp.is_unknown(pid) or sp.is_byte(pid):
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges.sort()
    return vocab, [(left, right) for *_ids, left, right in merges]


def train_tokenizer(corpus_file, vocab_size: int, token_type: str = "char", library: str = "hf"):
    _check_inputs(corpus_file, vocab_size)
    if library == "hf":
        tokenizer = train_hf(corpus_file, vocab_size, token_type)
    elif library == "sentencepiece":
        tokenizer = train_sentencepiece(corpus_file, vocab_size, token_type)
    else:
        raise UserError(f"--library must be 'hf' or 'sentencepiece', got {library!r}")
    for i, tok in enumerate(SPECIAL_TOKENS[:2]):
        if tokenizer.convert_tokens_to_ids(tok) != i:
            raise RuntimeError(f"special token {tok} got id {tokenizer.convert_tokens_to_ids(tok)}, expected {i}")
    return tokenizer


def save_tokenizer(tokenizer, output_dir: str | Path) -> Path:
    """Save atomically (temporary directory, then rename)."""
    from model.chat_model import replace_dir, write_tokenizer_files

    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_tokenizer_files(tokenizer, tmp)
        replace_dir(tmp, out)  # refuses to replace a directory the project did not write
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

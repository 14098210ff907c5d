"""Tokenizer training and loading: HF tokenizers BPE (char or byte level) or sentencepiece.

Run it through the root script:

    python train_tokenizer.py --corpus_file data/corpus.txt --vocab_size 8192 \
        --token_type char --library hf --output_dir model_save/tokenizer [--max_memory_mb 8192]

`tokenizer_dir_for(model_path, cfg)` says which tokenizer goes with a model: the
`--tokenizer_dir` the user gave, else the model's own directory when it holds a tokenizer,
else the default (model_save/tokenizer), so every stage uses the model's own vocabulary.

Whatever the library, the result is saved as a `PreTrainedTokenizerFast` directory
(tokenizer.json + tokenizer_config.json + special_tokens_map.json) that
`AutoTokenizer.from_pretrained` loads, with [PAD]=0 and [EOS]=1 as the model expects.

Char level: NFKC, then punctuation / single-digit / Metaspace pre-tokenisers, BPE over
characters, Metaspace decoder. The Metaspace prepend scheme is "never": no "▁" is added in
front of a word, so decoding gives back exactly the normalised input (the original's
settings added spaces around punctuation and needed a clean-up helper afterwards:
`load_tokenizer` turns that clean-up on for such tokenizers, see `model.chat_model.needs_space_cleanup`).

Memory: both libraries keep every distinct pre-tokenised word (or every sentence) in
memory, and with these settings a word is a whole clause, so training needs about 13 bytes
of RAM per byte of corpus (256 MiB of text: 3.6 GB). `train_tokenizer` therefore trains on
a uniform random sample of the corpus sized to `max_memory_mb` (see `sample_corpus`); a
corpus that fits is used whole. The sample only decides which merges are learnt: the saved
tokenizer's normaliser, pre-tokeniser, decoder and special tokens are the same either way.
"""
from __future__ import annotations

import heapq
import os
import random
import re
import shutil
import tempfile
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from config import MODEL_SAVE_DIR
from model.common import UserError, is_given

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_TOKENIZER_DIR = MODEL_SAVE_DIR / "tokenizer"
SPECIAL_TOKENS = ["[PAD]", "[EOS]", "[SEP]", "[BOS]", "[CLS]", "[MASK]", "[UNK]"]
EXTRA_CHARS = ["\t", "\n"]  # kept as tokens: answers contain line breaks

# A 16 GB machine keeps half its memory for the system and other programs.
DEFAULT_MAX_MEMORY_MB = 8192
# Training's peak RSS = what the process already uses + a fixed part + slope x bytes of text
# given to the trainer. Measured with `/usr/bin/time -v train_tokenizer.py` on the spliced
# pseudo-corpus of benchmarks/bench_tokenizer.py, vocab 29,298, no budget: hf char 8 MB ->
# 581 MB, 32 MB -> 1,180 MB, 70 MB -> 2,394 MB, and a 20 MB sample of 516 MB -> 1,027 MB
# (400 MB + 33 bytes a byte is above all four: growth is not quite linear, the trainer's hash
# maps grow by doubling, and a sample's freed small strings stay in the heap); hf byte
# 8 MB -> 937 MB, sentencepiece char / byte 8 MB -> 563 MB each. Where only one size was
# measured, the fixed part is taken as 0 and the whole peak divided by that size: a bound if
# growth were linear (not checked at larger sizes for those three).
TRAIN_FIXED_MB = {("hf", "char"): 400, ("hf", "byte"): 0, ("sentencepiece", "char"): 0,
                  ("sentencepiece", "byte"): 0}
TRAIN_BYTES_PER_TEXT_BYTE = {("hf", "char"): 33.0, ("hf", "byte"): 110.0,
                             ("sentencepiece", "char"): 63.0, ("sentencepiece", "byte"): 63.0}
# Seconds of merging per MB of sample on the idle 2-core machine (hf char: 256 MiB in 147 s
# all told, from issue 15; sentencepiece: a rough guess), only for the time-left estimate.
MERGE_SECONDS_PER_MB = {"hf": 0.5, "sentencepiece": 2.0}
MIN_SAMPLE_BYTES = 1 << 20  # less text than this cannot fill a useful vocabulary
SMALL_SAMPLE_BYTES = 8 << 20  # measured: a 4 MB sample cost 1.5% chars/token, 8 MB 0.6%


def sample_bytes_for_budget(max_memory_mb: int, library: str, token_type: str) -> int:
    """How many bytes of corpus text the trainer may hold within `max_memory_mb` of RSS.

    The budget covers the whole process: what is already in use (Python, transformers,
    the libraries) is measured and subtracted, the rest is divided by the trainer's
    measured bytes of RAM per byte of text.
    """
    import psutil

    if not isinstance(max_memory_mb, int) or isinstance(max_memory_mb, bool) or max_memory_mb <= 0:
        raise UserError(f"--max_memory_mb must be a positive whole number of megabytes, got {max_memory_mb!r} "
                        f"(default {DEFAULT_MAX_MEMORY_MB}, for a 16 GB machine)")
    in_use = psutil.Process().memory_info().rss
    fixed = TRAIN_FIXED_MB[(library, token_type)] * 2**20
    factor = TRAIN_BYTES_PER_TEXT_BYTE[(library, token_type)]
    sample = int((max_memory_mb * 2**20 - in_use - fixed) / factor)
    if sample < MIN_SAMPLE_BYTES:
        needed = (in_use + fixed + MIN_SAMPLE_BYTES * factor) / 2**20
        raise UserError(f"--max_memory_mb {max_memory_mb} is too small: this process already uses "
                        f"{in_use / 2**20:.0f} MB and {library} {token_type}-level training needs "
                        f"{fixed / 2**20:.0f} MB + {factor:.0f} MB per MB of text, at least 1 MB of text; "
                        f"use at least {int(needed) + 1}")
    return sample


@dataclass
class CorpusSample:
    """Runs of whole lines ("chunks") drawn uniformly from a corpus, at most `max_bytes` of it."""
    chunks: list[str] = field(default_factory=list)
    corpus_bytes: int = 0
    sample_bytes: int = 0
    max_bytes: int = 0
    alphabet: str = ""  # every character of the whole corpus (line breaks aside)
    is_whole_corpus: bool = True  # no chunk was left out

    def lines(self, consume: bool) -> Iterator[list[str]]:
        """The sample's non-empty lines, one list per chunk.

        A sample also gets every character of the corpus once, each on a line of its own
        (no pair, so no merge, comes from them): a character the sample missed is then
        still in the vocabulary, and round trips stay exact on the whole corpus.
        `consume=True` frees each chunk as it is handed over, so the sample's memory goes
        down while the trainer's goes up (hf trains once); sentencepiece may need a second
        pass, so it keeps them.
        """
        if consume:
            while self.chunks:
                yield [line for line in self.chunks.pop().split("\n") if line]
        else:
            for chunk in self.chunks:
                yield [line for line in chunk.split("\n") if line]
        if not self.is_whole_corpus:
            yield list(self.alphabet)


READ_BLOCK_BYTES = 4 << 20


def sample_corpus(corpus_file: str | Path, max_bytes: int, seed: int = 0, phases: "Phases | None" = None) -> CorpusSample:
    """Read the whole corpus once (checking it is UTF-8 text) and keep a uniform sample.

    Why a sample and not the whole text: the trainers' memory grows with the text they are
    given (above), and BPE merges are decided by the most frequent pairs, which a uniform
    sample of some MB already ranks much as the whole corpus does. Measured (README,
    benchmarks/bench_tokenizer.py, vocab 29,298): against training on all of a 70 MiB corpus,
    chars per token on held-out text was 0.64% lower with an 8 MB sample and 1.48% lower with
    4 MB; 17 MB samples of 516 MiB and 4.3 GB corpora gave 1.680 against the 70 MiB's 1.684.
    Why chunks of lines and not single lines: one random key per chunk keeps Python's
    per-line cost out of the reading pass and the sample's bookkeeping small; with
    thousands of chunks in a sample it is still uniform over the file. Sampling is
    "bottom-k" by a random key per chunk (the chunks with the smallest keys that fit in
    max_bytes, kept in a heap): a reservoir sample that never holds more than max_bytes.
    The corpus's characters are collected on the way (numpy over UTF-32 code points: a
    Python set of 4 GB of characters took minutes) for `CorpusSample.alphabet`.
    """
    import numpy as np

    path = Path(corpus_file)
    rng = random.Random(seed)
    chunk_chars = min(max(max_bytes // 8192, 2048), 1 << 19)
    seen = np.zeros(0x110000, dtype=bool)
    sample = CorpusSample(max_bytes=max_bytes)
    reservoir = _BottomK(sample, slack=4 * chunk_chars)
    consumed = seq = 0
    seen_text = False
    with open(path, "rb") as fh:
        for data in _whole_line_blocks(fh):
            text = _decode_block(data, path, consumed)
            consumed += len(data)
            seen[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)] = True
            if "\r" in text:  # as text mode's universal newlines did
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            seen_text = seen_text or not text.isspace()
            for piece in _chunks(text, chunk_chars):
                seq += 1
                reservoir.offer(rng.random(), seq, piece)
            if phases is not None:
                phases.advance(len(data))
    if not seen_text:
        raise UserError(f"corpus file has no text (only whitespace): {path}")
    # file order (seq): a corpus that fits is given to the trainer as it was written
    sample.chunks = [item[2] for item in sorted(reservoir.heap, key=lambda item: item[1])]
    sample.corpus_bytes = consumed
    seen[[ord("\n"), ord("\r")]] = False
    sample.alphabet = "".join(map(chr, np.flatnonzero(seen).tolist()))
    return sample


def _whole_line_blocks(fh) -> Iterator[bytes]:
    """The file's bytes in blocks of about READ_BLOCK_BYTES, each ending at a line break (the
    last one where the file ends); a line longer than a block is read on until it ends."""
    carry = b""
    while True:
        block = fh.read(READ_BLOCK_BYTES)
        if not block:
            if carry:
                yield carry
            return
        data = carry + block
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            carry = data
            continue
        yield data[:cut]
        carry = data[cut:]


def _decode_block(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"corpus file is not UTF-8 text: {path}: invalid byte 0x{data[exc.start]:02x} at "
                        f"byte offset {offset + exc.start} (convert it first, e.g. "
                        "iconv -f GBK -t UTF-8)") from None


def _chunks(text: str, chunk_chars: int) -> Iterator[str]:
    """`text` in runs of whole lines of at least `chunk_chars` characters (the last may be shorter)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + chunk_chars) + 1 or len(text)
        yield text[start:end]
        start = end


class _BottomK:
    """The chunks with the smallest random keys that fit in the sample's max_bytes, in a heap
    of (-key, seq, text, nbytes) with the largest kept key on top (see sample_corpus)."""

    def __init__(self, sample: CorpusSample, slack: int) -> None:
        self.sample, self.slack = sample, slack
        self.heap: list[tuple[float, int, str, int]] = []

    def offer(self, key: float, seq: int, piece: str) -> None:
        sample, heap = self.sample, self.heap
        if heap and key >= -heap[0][0] and sample.sample_bytes >= sample.max_bytes - self.slack:
            sample.is_whole_corpus = False  # full, and this key is larger than all kept
            return
        nbytes = len(piece.encode("utf-8"))
        if sample.sample_bytes + nbytes > sample.max_bytes and not (heap and key < -heap[0][0]):
            sample.is_whole_corpus = False
            return
        heapq.heappush(heap, (-key, seq, piece, nbytes))
        sample.sample_bytes += nbytes
        while sample.sample_bytes > sample.max_bytes:
            sample.sample_bytes -= heapq.heappop(heap)[3]
            sample.is_whole_corpus = False


class Phases:
    """The progress display on stderr: reading, counting, merging, each with the time left.

    Reading and counting advance by bytes; the libraries report nothing while merging, so
    that bar advances with the clock towards an estimate from the sample size
    (MERGE_SECONDS_PER_MB) and says so.
    """

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        # only on a terminal: redirected, rich would print the last frame, which then sits
        # in front of a one-line error in logs and tests
        self.progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                                 TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                                 TextColumn("left"), TimeRemainingColumn(), console=self.console,
                                 disable=not (enabled and self.console.is_terminal))
        self.task = None
        self._stop = threading.Event()
        self._clock: threading.Thread | None = None

    def __enter__(self) -> "Phases":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._end_clock()
        self.progress.stop()

    def start(self, description: str, total: float) -> None:
        self._end_clock()
        if self.task is not None:
            self.progress.update(self.task, completed=self.progress.tasks[-1].total)
        self.task = self.progress.add_task(description, total=max(total, 1))

    def advance(self, amount: float) -> None:
        self.progress.advance(self.task, amount)

    def start_clock(self, description: str, estimate_s: float) -> None:
        """A phase without progress reports: advance with time, never past 99% of the estimate."""
        self.start(description, estimate_s)
        task, t0 = self.task, time.monotonic()
        self._stop.clear()

        def tick() -> None:
            while not self._stop.wait(0.5):
                self.progress.update(task, completed=min(time.monotonic() - t0, 0.99 * estimate_s))

        self._clock = threading.Thread(target=tick, name="tokenizer-progress", daemon=True)
        self._clock.start()

    def _end_clock(self) -> None:
        if self._clock is not None:
            self._stop.set()
            self._clock.join()
            self._clock = None
            self.progress.update(self.task, completed=self.progress.tasks[-1].total)


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


def _feed(sample: CorpusSample, phases: Phases, consume: bool, library: str) -> Iterator[list[str]]:
    """The sample's lines for the trainer, advancing the counting bar; merging starts after."""
    phases.start("counting", sum(len(chunk) for chunk in sample.chunks))
    for lines in sample.lines(consume):
        phases.advance(sum(len(line) + 1 for line in lines))
        yield lines
    phases.start_clock("merging (time left estimated)",
                       MERGE_SECONDS_PER_MB[library] * sample.sample_bytes / 2**20)


def train_hf(sample: CorpusSample, vocab_size: int, token_type: str, phases: Phases):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if token_type == "char":
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        _char_pipeline(tok)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=EXTRA_CHARS, show_progress=False,
                                      # a corpus with more distinct characters than the
                                      # vocabulary keeps the most frequent ones ([UNK] else);
                                      # the limit counts the initial alphabet (tab, newline) too
                                      limit_alphabet=vocab_size - len(SPECIAL_TOKENS))
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
    # tokenizers counts words and pairs on every core (rayon); the sample's chunks are freed
    # as they are fed (consume=True), so its memory turns into the trainer's
    tok.train_from_iterator(_feed(sample, phases, True, "hf"), trainer=trainer)
    del trainer  # it still holds every word it counted
    if token_type == "char":
        _note_dropped_characters(tok, sample.alphabet, vocab_size)
    return _wrap(tok)


def _note_dropped_characters(tok, alphabet: str, vocab_size: int) -> int:
    """Say so when limit_alphabet left characters of the corpus out of the vocabulary (they
    become [UNK]), as the sentencepiece path does; returns how many."""
    vocab = tok.get_vocab()
    dropped = sum(1 for c in alphabet if not c.isspace()
                  and any(n not in vocab for n in tok.normalizer.normalize_str(c)))
    if dropped:
        print(f"note: more distinct characters than --vocab_size {vocab_size}: the {dropped} rarest of the "
              f"corpus's {len(alphabet)} become [UNK]")
    return dropped


def train_sentencepiece(sample: CorpusSample, vocab_size: int, token_type: str, phases: Phases):
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
                _train_spm(sample, phases, prefix, vocab_size, token_type, coverage)
                break
            except RuntimeError as exc:  # sentencepiece reports bad settings as RuntimeError
                message = str(exc).splitlines()[-1]
                if coverage == 1.0 and "required_chars" in message:
                    print(f"note: more distinct characters than --vocab_size {vocab_size}; "
                          "using character_coverage 0.9995")
                    continue
                needed = re.search(r"required_chars\. \d+ vs (\d+)", message)
                if needed:  # its own advice names a --character_coverage flag this project does not have
                    raise UserError(f"--vocab_size {vocab_size} is too small for sentencepiece on this corpus: "
                                    f"it needs at least {needed.group(1)} (the special tokens, tab, newline and "
                                    "the characters that make up 99.95% of the text)") from None
                raise UserError(f"sentencepiece training failed: {message}") from None
        vocab, merges = _spm_bpe_vocab_and_merges(prefix + ".model")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]",
                               byte_fallback=token_type == "byte", fuse_unk=True))
    _char_pipeline(tok)
    if token_type == "byte":
        from tokenizers import decoders
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="never")])
    return _wrap(tok)


def _train_spm(sample: CorpusSample, phases: Phases, prefix: str, vocab_size: int, token_type: str,
               coverage: float) -> None:
    import sentencepiece as spm

    lines = _feed(sample, phases, False, "sentencepiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=(unicodedata.normalize("NFKC", s) for batch in lines for s in batch),
        num_threads=os.cpu_count() or 1,
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


def train_tokenizer(corpus_file, vocab_size: int, token_type: str = "char", library: str = "hf",
                    max_memory_mb: int = DEFAULT_MAX_MEMORY_MB, progress: bool = True, seed: int = 0):
    """Train on `corpus_file` (UTF-8 text, one document or sentence a line) within a memory budget.

    The corpus is read once, checked and sampled to what `max_memory_mb` leaves for the
    trainer (the whole corpus when it fits), then the library trains on the sample.
    """
    path = _check_inputs(corpus_file, vocab_size)
    if library not in ("hf", "sentencepiece"):
        raise UserError(f"--library must be 'hf' or 'sentencepiece', got {library!r}")
    if token_type not in ("char", "byte"):
        raise UserError(f"--token_type must be 'char' or 'byte', got {token_type!r}")
    max_bytes = sample_bytes_for_budget(max_memory_mb, library, token_type)
    with Phases(progress) as phases:
        phases.start(f"reading {path.name}", path.stat().st_size)
        sample = sample_corpus(path, max_bytes, seed, phases)
        if not sample.is_whole_corpus:
            note = (f"the corpus ({sample.corpus_bytes / 2**20:,.0f} MB) needs more than --max_memory_mb "
                    f"{max_memory_mb} to train on whole: training on a uniform sample of "
                    f"{sample.sample_bytes / 2**20:,.0f} MB of it")
            if sample.sample_bytes < SMALL_SAMPLE_BYTES:
                note += " (under 8 MB: expect about 1% more tokens per text; a larger --max_memory_mb gives more)"
            phases.console.print(note, soft_wrap=True)
        train = train_hf if library == "hf" else train_sentencepiece
        tokenizer = train(sample, vocab_size, token_type, phases)
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

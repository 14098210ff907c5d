"""Readers of preference pairs (prompt / chosen / rejected) and of the instructions they are
built from, with malformed records reported by file and position rather than crashing.

    from model.pairs import load_pairs
    rows = load_pairs("data/my_dpo_train.json")  # [{"prompt", "chosen", "rejected"}, ...]

`load_pairs` is what DPO training and evaluation read (model/dpo.py); the preference-data
builder (utils/dpo_data_process.py, whose docstring describes the accepted formats) reads
its inputs with `read_instruction_file` and `read_preference_file` and counts what it
dropped in a `Report`. Files are read strictly as UTF-8 (model/text_files.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from model.common import UserError
from model.text_files import first_char, iter_utf8_lines, read_utf8

PAIR_FIELDS = ("prompt", "chosen", "rejected")
MAX_REPORTED = 20  # malformed records printed one by one; the rest are only counted


@dataclass
class Malformed:
    file: str
    position: str  # "line 3" (JSON lines), "item 3" (JSON array), "row 3" (parquet)
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.position}: {self.reason}"


@dataclass
class Report:
    """What a build read, kept and dropped (by reason)."""
    read: dict = field(default_factory=dict)  # file -> records read
    malformed: list = field(default_factory=list)
    dropped: dict = field(default_factory=dict)  # reason -> count
    generated: int = 0
    resumed_from: int = 0
    train_rows: int = 0
    eval_rows: int = 0

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


# --------------------------------------------------------------------------- readers

def _iter_records(path: Path, max_rows: int = -1) -> Iterator[tuple[str, object]]:
    """(position, record) of a JSON array, a JSON-lines file or a parquet file.

    A line that is not UTF-8 or not valid JSON yields the record `_BadLine(reason)`.
    """
    suffix = path.suffix.lower()
    count = 0
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path, pre_buffer=False)  # streams (see utils.parquet_io.iter_parquet_rows)
        except Exception as exc:  # pyarrow raises several types for a non-parquet file
            raise UserError(f"not a readable parquet file: {path} ({exc})") from None
        for batch in pf.iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                count += 1
                yield f"row {count}", rec
                if 0 < max_rows <= count:
                    return
        return
    if first_char(path) == "[":
        try:
            data = json.loads(read_utf8(path, "input file"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
        for i, rec in enumerate(data, start=1):
            yield f"item {i}", rec
            if 0 < max_rows <= i:
                return
        return
    for lineno, line, problem in iter_utf8_lines(path):
        if problem:
            rec = _BadLine(problem)
        elif not line.strip():
            continue
        else:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                rec = _BadLine(f"invalid JSON ({exc.msg})")
        count += 1
        yield f"line {lineno}", rec
        if 0 < max_rows <= count:
            return


class _BadLine:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _fields(rec: object, names: Iterable[str], aliases: dict | None = None) -> tuple[dict | None, str]:
    """The string fields `names` of a record, or (None, why it is malformed)."""
    if isinstance(rec, _BadLine):
        return None, rec.reason
    if not isinstance(rec, dict):
        return None, f"expected an object, got {type(rec).__name__}"
    out = {}
    for name in names:
        key = name
        if key not in rec and aliases and aliases.get(name) in rec:
            key = aliases[name]
        if key not in rec:
            return None, f"missing field '{name}'"
        value = rec[key]
        if value is None:
            return None, f"field '{key}' is null"
        if not isinstance(value, str):
            return None, f"field '{key}' is {type(value).__name__}, expected a string"
        out[name] = value
    return out, ""


def _check_input(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    if p.stat().st_size == 0:
        raise UserError(f"{what} is empty: {p}")
    if p.suffix.lower() not in (".json", ".jsonl", ".parquet"):
        raise UserError(f"{what} must be .json, .jsonl or .parquet: {p}")
    return p


def join_prompt(head: str, tail: str) -> str:
    """The one rule that makes a prompt of an instruction and its input (BELLE, alpaca) or a
    title and its description: stripped, on two lines, the tail dropped when empty or already
    inside the head. SFT data (utils.data_readers) and DPO data (read_instruction_file) both
    use it, so the same record is the same prompt in every stage."""
    head, tail = head.strip(), tail.strip()
    if not tail or tail in head:
        return head
    return f"{head}\n{tail}"


def read_instruction_file(path: str | Path, report: Report, max_rows: int = -1) -> list[dict]:
    """{'prompt', 'chosen'} rows of a prompt/response or alpaca (instruction/input/output) file."""
    p = _check_input(path, "instruction file")
    rows, n = [], 0
    for pos, rec in _iter_records(p, max_rows):
        n += 1
        if isinstance(rec, dict) and "instruction" in rec:
            got, why = _fields(rec, ("instruction", "input", "output"))
            if got is not None:
                got = {"prompt": join_prompt(got["instruction"], got["input"]), "chosen": got["output"]}
        else:
            got, why = _fields(rec, ("prompt", "response"))
            if got is not None:
                got = {"prompt": got["prompt"], "chosen": got["response"]}
        if got is None:
            report.malformed.append(Malformed(str(p), pos, why))
            continue
        rows.append(got)
    report.read[str(p)] = n
    return rows


def unescape_newlines(text: str) -> str:
    """Literal backslash-n sequences (as some preference sets store them) become line breaks."""
    return re.sub(r"\\n", "\n", text)


def read_preference_file(path: str | Path, report: Report, max_rows: int = -1,
                         unescape: bool = False) -> list[dict]:
    """prompt/chosen/rejected rows; `reject` is accepted for `rejected` (huozi_rlhf_data_json)."""
    p = _check_input(path, "preference file")
    rows, n = [], 0
    for pos, rec in _iter_records(p, max_rows):
        n += 1
        got, why = _fields(rec, PAIR_FIELDS, aliases={"rejected": "reject"})
        if got is None:
            report.malformed.append(Malformed(str(p), pos, why))
            continue
        if unescape:
            got = {k: unescape_newlines(v) for k, v in got.items()}
        rows.append(got)
    report.read[str(p)] = n
    return rows


def load_pairs(path: str | Path, max_rows: int = -1, what: str = "preference file") -> list[dict]:
    """The pairs of a preference file for training or evaluation; malformed rows are printed."""
    report = Report()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    rows = read_preference_file(p, report, max_rows)
    print_malformed(report.malformed)
    if not rows:
        raise UserError(f"{what} has no valid prompt/chosen/rejected rows: {p}")
    return rows


def print_malformed(malformed: list) -> None:
    import sys

    for m in malformed[:MAX_REPORTED]:
        print(f"warning: malformed record: {m}", file=sys.stderr)
    if len(malformed) > MAX_REPORTED:
        print(f"warning: ... and {len(malformed) - MAX_REPORTED} more malformed records", file=sys.stderr)

"""The one reader of prompt/response files, for every stage: records, row checks, joining rule.

    from model.pairs import BadRows, iter_pairs, load_preference_pairs
    bad = BadRows()
    pairs = list(iter_pairs("data/sft.jsonl", bad))  # [(prompt, response), ...]
    print(bad.report())                                 # malformed rows: count by reason, where

Files: JSON lines, a JSON array or parquet (`iter_records`), read strictly as UTF-8
(model/text_files.py). A record is a prompt/response pair in one of two shapes: `prompt` /
`response`, or BELLE / alpaca `instruction` / `input` / `output`, whose instruction and input
are joined by `join_prompt`, the one rule for every stage. A malformed record (bad JSON, not
an object, a missing / null / non-string field) is counted in `BadRows` with its file and
line, item or row, and skipped; a `BadRows(strict=...)` turns the first one into a one-line
error instead, for files that must be whole (the references of an evaluation).

Who reads what:
- `iter_pairs`: SFT's JSON files (model/hf_seq2seq.py), the cleaning stage's belle and
  prompt_response formats (utils/data_readers.py, which adds the raw corpora's formats);
- `read_instruction_file`, `read_preference_file`: the preference-data builder
  (utils/dpo_data_process.py, whose docstring describes the accepted formats), counting in
  a `Report`; `load_preference_pairs`: DPO training and evaluation (model/dpo.py);
- `read_rows`: the evaluation scripts' test and prediction files (eval/);
- `check_parquet`, `parquet_pair_batches`, `check_no_nulls`: the training parquet files
  (model/dataset.py, model/hf_seq2seq.py), whose nulls stop a run: the project wrote them.
"""
from __future__ import annotations

import itertools
import json
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import ujson

from model.common import UserError, require_file
from model.text_files import HINT, first_char, iter_utf8_lines, read_utf8

REQUIRED_COLUMNS = ("prompt", "response")
INSTRUCTION_FIELDS = ("instruction", "input", "output")
PAIR_FIELDS = ("prompt", "chosen", "rejected")
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
MAX_REPORTED = 20  # malformed records listed one by one; the rest are only counted


# --------------------------------------------------------------------------- bad rows

class BadRow(Exception):
    """One record is malformed; the message says why ("missing key: 'output'")."""


@dataclass
class Malformed:
    file: str
    position: str  # "line 3" (JSON lines), "item 3" (JSON array), "row 3" (parquet)
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.position}: {self.reason}"


@dataclass
class BadRows:
    """Malformed rows: a count by reason and the first `keep` of them with their position.

    With `strict` (what the file is, e.g. "test file") the first one is a UserError instead.
    """
    keep: int = MAX_REPORTED
    strict: str = ""
    count: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)  # [Malformed]

    def add(self, path: str | Path, where: str, reason: str) -> None:
        if self.strict:
            hint = f"; {HINT}" if reason.startswith("not UTF-8") else ""
            raise UserError(f"{self.strict} {path} {where}: {reason}{hint}")
        self.count += 1
        self.reasons[reason.split(":")[0]] += 1
        if len(self.examples) < self.keep:
            self.examples.append(Malformed(str(path), where, reason))

    def report(self) -> str:
        if not self.count:
            return "malformed rows: 0"
        lines = [f"malformed rows: {self.count} (" + ", ".join(f"{k} {v}" for k, v in self.reasons.most_common()) + ")"]
        lines += [f"  {e}" for e in self.examples]
        if self.count > len(self.examples):
            lines.append(f"  ... and {self.count - len(self.examples)} more")
        return "\n".join(lines)

    def warn(self) -> None:
        """The report on stderr, as a warning, when there is anything to report."""
        if self.count:
            print(f"warning: skipped {self.report()}", file=sys.stderr)


# --------------------------------------------------------------------------- records

def text_field(rec: object, key: str, required: bool = True) -> str:
    """The string `rec[key]`; an absent or null optional field is ""; else BadRow saying why."""
    if not isinstance(rec, dict):
        raise BadRow(f"not a JSON object: {type(rec).__name__}")
    value = rec.get(key)
    if value is None:
        if not required:
            return ""
        raise BadRow(f"missing key: '{key}'" if key not in rec else f"null value: '{key}'")
    if not isinstance(value, str):
        raise BadRow(f"not a string: '{key}' is {type(value).__name__}")
    return value


def join_prompt(head: str, tail: str) -> str:
    """The one rule that makes a prompt of an instruction and its input (BELLE, alpaca) or a
    title and its description: stripped, on two lines, the tail dropped when empty or already
    inside the head. Every reader of such records uses it (record_pair here, the raw corpora
    of utils/data_readers.py), so the same record is the same prompt in SFT, DPO and evaluation."""
    head, tail = head.strip(), tail.strip()
    if not tail or tail in head:
        return head
    return f"{head}\n{tail}"


def instruction_pair(rec: object) -> tuple[str, str]:
    """(prompt, response) of a BELLE / alpaca record: instruction + input (which may be absent,
    null or empty) joined by join_prompt, and the output."""
    return join_prompt(text_field(rec, "instruction"), text_field(rec, "input", required=False)), \
        text_field(rec, "output")


def prompt_response_pair(rec: object) -> tuple[str, str]:
    return text_field(rec, "prompt"), text_field(rec, "response")


def record_pair(rec: object) -> tuple[str, str]:
    """(prompt, response) of a record of either shape: instruction/input/output or prompt/response."""
    if isinstance(rec, dict) and "instruction" in rec:
        return instruction_pair(rec)
    return prompt_response_pair(rec)


def _parquet_columns(pf, path: Path, wanted: Sequence[str] | None) -> list[str] | None:
    """The columns to read: `wanted` (each must exist), or for a pair file the columns of its shape."""
    names = pf.schema_arrow.names
    if wanted is None and "instruction" in names:
        wanted = [c for c in INSTRUCTION_FIELDS if c in names]
    elif wanted is None:
        wanted = REQUIRED_COLUMNS
    missing = [c for c in wanted if c not in names and not (c == "rejected" and "reject" in names)]
    if missing:
        raise UserError(f"{path}: parquet file has no {' / '.join(missing)} column (columns: {', '.join(names)})")
    return [c if c in names else "reject" for c in wanted]


def iter_records(path: str | Path, max_rows: int = -1, columns: Sequence[str] | None = None
                 ) -> Iterator[tuple[tuple[str, int], object]]:
    """(position, record) of each record of a JSON-lines, JSON-array or parquet file; the
    position is ("line", 3), ("item", 3) or ("row", 3), counted from 1 (a tuple, formatted
    only for a malformed record: the cleaning stage reads millions of lines).

    A line that is not UTF-8 or not JSON yields a `BadRow` as its record. Of a parquet
    file only `columns` are read (default: those of a pair file's shape), all of which
    must exist. At most `max_rows` records when > 0. Blank lines are skipped.
    """
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        records = _parquet_records(path, columns)
    elif first_char(path) == "[":
        records = _array_records(path)
    else:
        records = _line_records(path)
    return itertools.islice(records, max_rows) if max_rows > 0 else records


def _parquet_records(path: Path, columns: Sequence[str] | None) -> Iterator[tuple[tuple[str, int], object]]:
    import pyarrow.parquet as pq

    try:
        # pre_buffer=False: one row group in memory at a time (see utils.parquet_io.iter_parquet_rows)
        pf = pq.ParquetFile(path, pre_buffer=False)
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise UserError(f"{path} is not a readable parquet file ({exc})") from None
    count = 0
    for batch in pf.iter_batches(batch_size=4096, columns=_parquet_columns(pf, path, columns)):
        for rec in batch.to_pylist():
            count += 1
            yield ("row", count), rec


def _array_records(path: Path) -> Iterator[tuple[tuple[str, int], object]]:
    try:
        # json, not ujson: its error says where (line, column)
        items = json.loads(read_utf8(path, "input file"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a JSON array of objects or JSON lines, got a {type(items).__name__}")
    for i, rec in enumerate(items, start=1):
        yield ("item", i), rec


def _line_records(path: Path) -> Iterator[tuple[tuple[str, int], object]]:
    for lineno, line, problem in iter_utf8_lines(path):
        if problem:
            yield ("line", lineno), BadRow(problem)
        elif line.strip():
            try:
                rec = ujson.loads(line)  # ujson: 1.2x json's speed (200k BELLE lines: 1.00 vs 1.18 s)
            except ValueError as exc:
                rec = BadRow(f"bad JSON: {exc}")
            yield ("line", lineno), rec


def read_records(path: str | Path, row_fn: Callable, bad: BadRows, max_rows: int = -1,
                 columns: Sequence[str] | None = None) -> Iterator:
    """row_fn(record) for each record of `path`; a malformed one (row_fn raised BadRow) goes to `bad`."""
    for where, rec in iter_records(path, max_rows, columns):
        try:
            if isinstance(rec, BadRow):
                raise rec
            yield row_fn(rec)
        except BadRow as exc:
            bad.add(path, f"{where[0]} {where[1]}", str(exc))


def iter_pairs(path: str | Path, bad: BadRows, max_rows: int = -1) -> Iterator[tuple[str, str]]:
    """(prompt, response) of each valid record of a .json / .jsonl / .parquet file (`record_pair`)."""
    return read_records(path, record_pair, bad, max_rows)


def require_pair_file(path: str | Path, what: str) -> Path:
    """An existing, non-empty .json, .jsonl or .parquet file."""
    p = require_file(Path(path).expanduser(), what)
    if p.suffix.lower() not in FILE_SUFFIXES:
        raise UserError(f"{what} must be .json, .jsonl or .parquet: {p}")
    return p


def pair_table(pairs: Iterable[tuple[str, str]], chunk_rows: int = 10_000):
    """A pyarrow table of string `prompt` / `response` columns, built `chunk_rows` pairs at a
    time, so that memory holds the UTF-8 text once rather than as Python strings."""
    import pyarrow as pa

    schema = pa.schema([(c, pa.string()) for c in REQUIRED_COLUMNS])
    chunks, chunk = [], []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) == chunk_rows:
            chunks.append(pa.table(list(map(list, zip(*chunk))), schema=schema))
            chunk = []
    if chunk:
        chunks.append(pa.table(list(map(list, zip(*chunk))), schema=schema))
    return pa.concat_tables(chunks) if chunks else schema.empty_table()


def require_rows(n_rows: int, bad: BadRows, path: str | Path, what: str, fields: str) -> None:
    """Some valid rows were read: the malformed ones are reported on stderr; none: one line saying why."""
    if not n_rows:
        first = f" ({bad.count} malformed, first: {bad.examples[0]})" if bad.count else ""
        raise UserError(f"{what} has no valid {fields} rows: {path}{first}")
    bad.warn()


# --------------------------------------------------------------------------- preference data

@dataclass
class Report:
    """What a preference-data build read, kept and dropped (by reason)."""
    read: dict = field(default_factory=dict)  # file -> records read
    malformed: BadRows = field(default_factory=BadRows)
    dropped: dict = field(default_factory=dict)  # reason -> count
    generated: int = 0
    resumed_from: int = 0
    train_rows: int = 0
    eval_rows: int = 0

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


def _read_counted(path: Path, row_fn: Callable, report: Report, max_rows: int,
                  columns: Sequence[str] | None = None) -> list:
    before = report.malformed.count
    rows = list(read_records(path, row_fn, report.malformed, max_rows, columns))
    report.read[str(path)] = len(rows) + report.malformed.count - before  # every record, valid or not
    return rows


def read_instruction_file(path: str | Path, report: Report, max_rows: int = -1) -> list[dict]:
    """{'prompt', 'chosen'} rows of a prompt/response or alpaca (instruction/input/output) file."""
    p = require_pair_file(path, "instruction file")
    return [{"prompt": prompt, "chosen": response}
            for prompt, response in _read_counted(p, record_pair, report, max_rows)]


def unescape_newlines(text: str) -> str:
    """Literal backslash-n sequences (as some preference sets store them) become line breaks."""
    return re.sub(r"\\n", "\n", text)


def preference_record(rec: object) -> dict:
    """prompt/chosen/rejected of a record; `reject` is accepted for `rejected` (huozi_rlhf_data_json)."""
    if isinstance(rec, dict) and "rejected" not in rec and "reject" in rec:
        rec = {**rec, "rejected": rec["reject"]}
    return {k: text_field(rec, k) for k in PAIR_FIELDS}


def same_text(a: str, b: str) -> bool:
    """Equal up to surrounding space and NFKC, the tokenizer's normalisation (the model
    cannot write a full-width comma that its tokenizer turned into ',')."""
    return unicodedata.normalize("NFKC", a).strip() == unicodedata.normalize("NFKC", b).strip()


def preference_problem(row: dict) -> str | None:
    """Why a prompt/chosen/rejected pair teaches no preference, or None. An empty rejected
    answer is a real one (a model that says nothing); an empty chosen one or a rejected one
    equal to it is not."""
    if not (row["prompt"].strip() and row["chosen"].strip()):
        return "empty prompt or chosen answer"
    if same_text(row["rejected"], row["chosen"]):
        return "rejected equals chosen"
    return None


def _usable_preference(rec: object) -> dict:
    row = preference_record(rec)
    problem = preference_problem(row)
    if problem:
        raise BadRow(problem)
    return row


def read_preference_file(path: str | Path, report: Report, max_rows: int = -1,
                         unescape: bool = False) -> list[dict]:
    """prompt/chosen/rejected rows of a preference file, malformed ones counted in `report`."""
    p = require_pair_file(path, "preference file")
    rows = _read_counted(p, preference_record, report, max_rows, PAIR_FIELDS)
    if unescape:
        rows = [{k: unescape_newlines(v) for k, v in row.items()} for row in rows]
    return rows


def load_preference_pairs(path: str | Path, max_rows: int = -1, what: str = "preference file") -> list[dict]:
    """The pairs of a preference file for DPO training or evaluation; malformed rows and pairs
    that teach no preference (preference_problem) are reported and skipped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    bad = BadRows()
    rows = list(read_records(require_pair_file(p, what), _usable_preference, bad, max_rows, PAIR_FIELDS))
    require_rows(len(rows), bad, p, what, "prompt/chosen/rejected")
    return rows


# --------------------------------------------------------------------------- evaluation files

def read_rows(path: str | Path, columns: Sequence[str], what: str = "file", null_is_empty: bool = False) -> list[dict]:
    """Rows of a parquet, JSON-lines or JSON-array file, each with `columns` as strings; any
    malformed row is a one-line error, since rows pair up with another file's. A null is one
    too, except with `null_is_empty` (predictions: a model that answered nothing) where it is "".

    Parquet is the project's dataset format; JSON lines is what the evaluation scripts write
    for predictions, so either side of a comparison can be either format.
    """
    def row_fn(rec):
        for c in columns:  # absent: an error; null: an error, or "" with null_is_empty
            text_field(rec, c, required=not null_is_empty or not isinstance(rec, dict) or c not in rec)
        return {**rec, **{c: rec[c] or "" for c in columns}}

    p = require_pair_file(path, what)
    rows = list(read_records(p, row_fn, BadRows(strict=what), columns=columns))
    if not rows:
        raise UserError(f"{what} has no rows: {p}")
    return rows


# --------------------------------------------------------------------------- training parquet

def check_parquet(path: str | Path, what: str = "dataset") -> Path:
    """A parquet file that exists, has string `prompt` and `response` columns and rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file not found: {p}")
    try:
        meta = pq.ParquetFile(p)
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise UserError(f"{what} file is not a readable parquet file: {p} ({exc})") from None
    schema = meta.schema_arrow
    for col in REQUIRED_COLUMNS:
        if col not in schema.names:
            raise UserError(f"{what} file {p} has no '{col}' column (columns: {', '.join(schema.names)})")
        if not (pa.types.is_string(schema.field(col).type) or pa.types.is_large_string(schema.field(col).type)):
            raise UserError(f"{what} file {p}: column '{col}' is {schema.field(col).type}, expected string")
    if meta.metadata.num_rows == 0:
        raise UserError(f"{what} file has no rows: {p}")
    return p


def check_no_nulls(table, path: str | Path, what: str = "dataset", first_row: int = 1) -> None:
    """A pyarrow table or record batch of a training file whose prompt or response is null
    stops the run, naming the first such row (numbered from 1; `first_row` is the table's)."""
    for col in REQUIRED_COLUMNS:
        column = table.column(col)
        if column.null_count:
            first = column.is_null().to_pylist().index(True) + first_row
            raise UserError(f"{what} file {path}: {column.null_count} rows have a null '{col}' "
                            f"(first: row {first})")


def parquet_pair_batches(path: str | Path, batch_size: int = 4096, row_groups: Sequence[int] | None = None,
                         what: str = "dataset", first_row: int = 1) -> Iterator[tuple[list[str], list[str]]]:
    """(prompts, responses) of `path` (or of its `row_groups`, whose first row is `first_row`),
    `batch_size` rows at a time; a null is an error (check_no_nulls)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path, pre_buffer=False)
    for rb in pf.iter_batches(batch_size=batch_size, row_groups=row_groups, columns=list(REQUIRED_COLUMNS)):
        check_no_nulls(rb, path, what, first_row)
        first_row += rb.num_rows
        yield rb.column("prompt").to_pylist(), rb.column("response").to_pylist()

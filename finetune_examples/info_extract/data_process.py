"""Convert DuIE-style JSON lines into the prompt/response parquet the fine-tuning scripts read.

    python finetune_examples/info_extract/data_process.py \
        --input_file duie_train.json --output_file data/duie_train.parquet

Each input line is an object with `text` and `spo_list`, a list of
{"subject": ..., "predicate": ..., "object": ...}. In DuIE 2.0 `object` is a dict
({"@value": "...", ...} for the main value); in DuIE 1.0 it is a string: both are read.
Each line becomes one row in the original project's form:

    prompt   请抽取出给定句子中的所有三元组。给定句子：<text>
    response [(subject,predicate,object),(subject,predicate,object)]

Triples repeated within a sentence are written once. Lines without `spo_list` (the DuIE
test set) get an empty response `[]`. A malformed line stops the conversion with its line
number; nothing is written then. The output is written atomically. (A JSON array of the same
objects is read too.)
"""
import sys
from dataclasses import dataclass
from pathlib import Path

# Run as a file from any directory: make the project's packages (config, model, utils) importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.pairs import BadRow, BadRows, read_records  # noqa: E402
from utils.cli import UserError, parse_config, require_file, require_writable, run_cli  # noqa: E402
from utils.metrics import format_tuples, parse_tuples  # noqa: E402
from utils.parquet_io import write_pairs  # noqa: E402

PROMPT = "请抽取出给定句子中的所有三元组。给定句子："


@dataclass
class DuIEProcessConfig:
    input_file: str = ""  # DuIE JSON lines (duie_train.json, duie_dev.json, ...)
    output_file: str = ""  # parquet with prompt and response columns
    max_rows: int = -1  # > 0: stop after this many sentences


def _text(value, where: str) -> str:
    if isinstance(value, dict):  # DuIE 2.0: {"@value": main value, other slots...}
        value = value.get("@value")
    if not isinstance(value, str) or not value.strip():
        raise BadRow(f"{where}: expected non-empty text, got {value!r}")
    return value.strip()


def convert_record(record) -> dict:
    """One DuIE object -> {"prompt", "response"}; a malformed one raises BadRow saying why."""
    if not isinstance(record, dict) or "text" not in record:
        raise BadRow("expected an object with a 'text' field")
    text = _text(record["text"], "text")
    spo_list = record.get("spo_list") or []
    if not isinstance(spo_list, list):
        raise BadRow("spo_list must be a list")
    triples = []
    for i, spo in enumerate(spo_list):
        if not isinstance(spo, dict) or any(k not in spo for k in ("subject", "predicate", "object")):
            raise BadRow(f"spo_list[{i}]: expected subject, predicate and object")
        triples.append(tuple(_text(spo[k], f"spo_list[{i}].{k}") for k in ("subject", "predicate", "object")))
    return {"prompt": PROMPT + text, "response": format_tuples(list(dict.fromkeys(triples)))}


def convert_file(input_file, max_rows: int = -1) -> list[dict]:
    path = require_file(input_file, "DuIE input file")
    # strict: the first malformed line is a one-line error naming it (nothing is written)
    rows = list(read_records(path, convert_record, BadRows(strict="DuIE input file"), max_rows,
                             columns=("text", "spo_list")))
    if not rows:
        raise UserError(f"no sentences in {path}")
    return rows


def main() -> None:
    _, cfg = parse_config(DuIEProcessConfig, description=__doc__)
    if not cfg.output_file:
        raise UserError("--output_file is required (a .parquet path)")
    if Path(cfg.output_file).suffix.lower() != ".parquet":  # named .json it could even be the input
        raise UserError(f"--output_file must end in .parquet (the rows are written as parquet), got {cfg.output_file}")
    require_writable(cfg.output_file, "--output_file")
    rows = convert_file(cfg.input_file, cfg.max_rows)
    write_pairs(cfg.output_file, ((r["prompt"], r["response"]) for r in rows))
    n_triples = sum(len(parse_tuples(r["response"], 3)) for r in rows)
    print(f"wrote {len(rows)} sentences ({n_triples} triples) to {cfg.output_file}")


if __name__ == "__main__":
    run_cli(main)

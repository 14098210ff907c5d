"""Micro F1, precision and recall of generated triples against the references.

    python finetune_examples/info_extract/evaluate.py --pred_file preds.jsonl \
        --gold_file data/duie_dev.parquet [--arity 3] [--output_json metrics.json]

Both files are JSON lines with a `response` field (the triple list text, e.g.
`[(s,p,o),(s,p,o)]`) or parquet with a `response` column, row i of one matching row i of
the other: eval/eval_tasks.py writes such a predictions file. Generated text is parsed
tolerantly (full-width brackets and commas are accepted; malformed parts are skipped), a
triple repeated in one answer counts once, and counts are summed over all rows (micro
average). --arity 2 scores (entity, type) pairs the same way; 0 accepts any size >= 2.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

# Run as a file from any directory: make the project's packages (config, model, utils, eval) importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.pairs import read_rows  # noqa: E402
from utils.cli import UserError, parse_config, require_writable, run_cli  # noqa: E402
from utils.metrics import tuple_prf  # noqa: E402
from model.common import atomic_write_text, require_distinct  # noqa: E402


@dataclass
class ExtractEvalConfig:
    pred_file: str = ""
    gold_file: str = ""
    arity: int = 3  # fields per tuple: 3 for (subject, predicate, object); 0 = any
    output_json: str = ""  # default: the pred file's path with .metrics.json


def evaluate(pred_file, gold_file, arity: int = 3) -> dict:
    preds = [r["response"] for r in read_rows(pred_file, ("response",), "prediction file", null_is_empty=True)]
    golds = [r["response"] for r in read_rows(gold_file, ("response",), "reference file")]
    if len(preds) != len(golds):
        raise UserError(f"{len(preds)} predictions in {pred_file} but {len(golds)} references in {gold_file}")
    if arity < 0 or arity == 1:
        raise UserError(f"--arity must be 0 (any) or >= 2, got {arity}")
    return tuple_prf(preds, golds, arity or None)


def main() -> None:
    _, cfg = parse_config(ExtractEvalConfig, description=__doc__)
    if not cfg.pred_file or not cfg.gold_file:
        raise UserError("--pred_file and --gold_file are required")
    out = Path(cfg.output_json) if cfg.output_json else Path(cfg.pred_file).with_suffix(".metrics.json")
    require_distinct([("--output_json", out)], [("--pred_file", cfg.pred_file), ("--gold_file", cfg.gold_file)])
    require_writable(out, "--output_json")
    metrics = evaluate(cfg.pred_file, cfg.gold_file, cfg.arity)
    atomic_write_text(out, json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    print(f"F1 {metrics['f1']:.4f}  precision {metrics['precision']:.4f}  recall {metrics['recall']:.4f}  "
          f"({metrics['true_positives']} correct of {metrics['predicted']} predicted, "
          f"{metrics['reference']} reference tuples, {metrics['rows']} rows)")
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)

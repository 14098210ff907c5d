"""The run summary every trainer writes: `<output_dir>/train_summary.json`.

    from model.run_summary import RunSummary, read_summary
    RunSummary(stage="sft", trainer="Seq2SeqTrainer", steps=12, ...).write(output_dir)
    s = read_summary(output_dir / "train_summary.json")   # a UserError if damaged

One set of keys for train.py (own accelerate loop), pre_train.py / sft_train.py
(Seq2SeqTrainer) and dpo_train.py (the DPO Trainer); what only one trainer has goes in
`details`. Files of earlier versions, which had three key sets (train.py's
`global_step` / `non_padding_tokens` / `tokens_per_s`, the Seq2SeqTrainer's `steps` /
`tokens_per_sec` / `final_eval_loss`, DPO's `global_step` / `train_runtime` / `last_log`),
are still read, through the one table `_OLD_KEYS`, so the report card of a run made before
the update still shows it; what they did not record reads as None.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .common import UserError, atomic_write_text

SUMMARY_FILE = "train_summary.json"
FORMAT = 1


@dataclass
class RunSummary:
    stage: str  # "pretrain", "sft" or "dpo"
    trainer: str  # "train.py", "Seq2SeqTrainer" or "DPO"
    steps: int  # optimiser steps in all, earlier runs of a resumed one included
    steps_this_run: int
    train_tokens: int  # non-padding tokens (encoder + decoder) trained on in this run, all ranks
    train_seconds: float  # time in training steps this run: evaluation and saves excluded
    tokens_per_s: float | None  # train_tokens / train_seconds
    final_train_loss: float | None  # the last logged training loss
    eval_loss: float | None  # validation loss of the saved model (model_dir); None without evaluation
    last_eval_loss: float | None  # of the last evaluation
    eval_bleu4: float | None  # BLEU-4 of the saved model's greedy answers (None: not measured)
    model_dir: str | None  # what the next stage reads
    resumed_from: str | None
    world_size: int
    device: str | None
    precision: str | None  # "fp32", "bf16" or "fp16"
    wall_seconds: float | None  # the whole command, loading and evaluation included
    details: dict = field(default_factory=dict)  # one trainer's own figures and settings
    format: int = FORMAT

    def write(self, out_dir: str | Path) -> Path:
        return atomic_write_text(Path(out_dir) / SUMMARY_FILE,
                                 json.dumps(asdict(self), ensure_ascii=False, indent=2, default=str) + "\n")

    def to_dict(self) -> dict:
        return asdict(self)


# old key -> RunSummary field (earlier versions' three key sets); other old keys go to details
_OLD_KEYS = {"global_step": "steps", "non_padding_tokens": "train_tokens", "train_runtime_s": "train_seconds",
             "train_runtime": "train_seconds", "tokens_per_sec": "tokens_per_s", "final_eval_loss": "eval_loss",
             "best_bleu4": "eval_bleu4", "best_model_dir": "model_dir"}
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "dict": (dict,)}


def _check(data: dict, path: Path) -> RunSummary:
    for f in fields(RunSummary):
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise UserError(f"damaged run summary {path}: no '{f.name}'; rerun the stage that wrote it")
            continue
        kinds = f.type.split(" | ")
        value = data[f.name]
        ok = (value is None and "None" in kinds) or any(
            isinstance(value, _TYPES[k]) and not isinstance(value, bool) for k in kinds if k != "None")
        if not ok:
            raise UserError(f"damaged run summary {path}: '{f.name}' is {value!r}, expected {f.type}; "
                            "rerun the stage that wrote it")
    names = {f.name for f in fields(RunSummary)}
    return RunSummary(**{k: v for k, v in data.items() if k in names})


def _from_old(data: dict) -> dict:
    new = {f.name: None for f in fields(RunSummary) if f.default is MISSING}
    new.update(stage="", trainer="", steps_this_run=data.get("steps_this_run", data.get("global_step")),
               world_size=data.get("world_size", 1), details={})
    for key, value in data.items():
        target = _OLD_KEYS.get(key, key)
        if target in new and target != "details":
            new[target] = value
        else:
            new["details"][key] = value
    if new["final_train_loss"] is None:  # DPO kept its last training log whole
        new["final_train_loss"] = (data.get("last_log") or {}).get("loss")
    new["train_tokens"] = new["train_tokens"] or 0
    new["train_seconds"] = new["train_seconds"] or 0.0
    return new


def read_summary(path: str | Path) -> RunSummary:
    """The summary at `path`, checked field by field; a one-line UserError when it is missing,
    not JSON or not a run summary."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"run summary not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"damaged run summary {path}: {exc}; rerun the stage that wrote it") from None
    if not isinstance(data, dict):
        raise UserError(f"damaged run summary {path}: not a JSON object; rerun the stage that wrote it")
    if "format" not in data and ("global_step" in data or "steps" in data):
        data = _from_old(data)
    return _check(data, path)

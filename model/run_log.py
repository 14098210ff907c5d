"""The loss log every trainer writes, and its one plotter.

    from model.run_log import RunLog, plot_losses
    log = RunLog(output_dir, train_extra=("grad_norm",), eval_extra=("bleu4",))
    log.start(resume_step)               # main process, once: fresh files, or trimmed on resume
    log.train_row(step=1, epoch=0, loss=2.3, lr=1e-3)
    log.eval_row(step=8, epoch=1, valid_loss=2.1, bleu4=0.05)
    plot_losses(output_dir)              # -> <output_dir>/loss_curve.png

One format for train.py, pre_train.py / sft_train.py and dpo_train.py, under `<output_dir>`:
- `train_loss.csv`: step, epoch, loss, lr, tokens_per_s, then the trainer's own columns
  (DPO: its rewards and log-probs; the Trainer's grad_norm);
- `eval.csv`: step, epoch, valid_loss, then the trainer's own (bleu4, n_samples; DPO's
  rewards on the eval pairs);
- `loss_curve.png`: training and validation loss against the optimiser step.
A value a trainer does not have is an empty cell. The files are appended to row by row (a
killed run keeps what it logged); `start` rewrites them atomically.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from .common import UserError, atomic_write_text, temp_path

TRAIN_CSV, EVAL_CSV, PLOT_FILE = "train_loss.csv", "eval.csv", "loss_curve.png"
TRAIN_FIELDS = ("step", "epoch", "loss", "lr", "tokens_per_s")
EVAL_FIELDS = ("step", "epoch", "valid_loss")


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a log CSV; [] when there is no file. A last line without its newline is
    the torn row of a killed run (each row is appended in one write), not data."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    for n, row in enumerate(rows, start=2):
        if not (row.get("step") or "").isdigit():
            raise UserError(f"damaged loss log {path}: line {n} has step {row.get('step')!r}, expected a number; "
                            "move the file aside to start the log afresh")
    return rows


def last_value(path: str | Path, column: str) -> float | None:
    """The last logged value of `column` in a log CSV (None: never logged)."""
    rows = [r for r in read_rows(path) if r.get(column)]
    return float(rows[-1][column]) if rows else None


def _cell(value) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)  # repr: every digit of a loss


class _Csv:
    def __init__(self, path: Path, fields: tuple[str, ...]):
        self.path, self.fields = path, fields

    def start(self, upto_step: int) -> None:
        """A fresh file (upto_step 0) or, resuming, only the rows up to the checkpoint's step:
        what the interrupted run logged after its checkpoint is logged again by this run."""
        rows = [r for r in read_rows(self.path) if int(r["step"]) <= upto_step] if upto_step else []
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())

    def append(self, row: dict) -> None:
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self.fields, extrasaction="ignore").writerow(
            {k: _cell(v) for k, v in row.items()})
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            fh.write(buf.getvalue())


class RunLog:
    """train_loss.csv and eval.csv of one run (written by the main process only)."""

    def __init__(self, out_dir: str | Path, train_extra: tuple[str, ...] = (), eval_extra: tuple[str, ...] = ()):
        out = Path(out_dir)
        self.train = _Csv(out / TRAIN_CSV, TRAIN_FIELDS + tuple(train_extra))
        self.eval = _Csv(out / EVAL_CSV, EVAL_FIELDS + tuple(eval_extra))

    def start(self, resume_step: int = 0, resume_eval_step: int | None = None) -> None:
        """Fresh files, or the rows up to `resume_step` (evaluations: up to `resume_eval_step`,
        the checkpoint's last evaluation, when the checkpoint was saved before an evaluation
        of its step)."""
        self.train.path.parent.mkdir(parents=True, exist_ok=True)
        self.train.start(resume_step)
        self.eval.start(resume_step if resume_eval_step is None else resume_eval_step)

    def train_row(self, **row) -> None:
        self.train.append(row)

    def eval_row(self, **row) -> None:
        self.eval.append(row)


def _points(path: Path, column: str) -> tuple[list[int], list[float]]:
    rows = [r for r in read_rows(path) if r.get(column)]
    return [int(r["step"]) for r in rows], [float(r[column]) for r in rows]


def plot_losses(out_dir: str | Path) -> Path | None:
    """Training and validation loss of the run in `out_dir` to its loss_curve.png, atomically;
    None when nothing was logged."""
    out = Path(out_dir)
    train, valid = _points(out / TRAIN_CSV, "loss"), _points(out / EVAL_CSV, "valid_loss")
    if not train[0] and not valid[0]:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, (steps, losses), style in (("train loss", train, "-"), ("validation loss", valid, "o-")):
        if steps:
            ax.plot(steps, losses, "o-" if len(steps) < 30 else style, label=label, linewidth=1, markersize=3)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    png = out / PLOT_FILE
    tmp = temp_path(png)
    try:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        os.replace(tmp, png)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return png

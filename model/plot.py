"""Loss-curve plot of a training run's CSV (written by model/trainer.py at the end of training)."""
from __future__ import annotations

import csv
import os
from pathlib import Path


def plot_loss_curve(loss_csv: str | Path, png: str | Path, eval_csv: str | Path | None = None) -> Path | None:
    """Plot `step` vs `loss` (and the validation loss, if `eval_csv` has rows) to `png`, atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training servers
    import matplotlib.pyplot as plt

    def read(path, y):
        if path is None or not Path(path).is_file():
            return [], []
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        return [int(r["step"]) for r in rows], [float(r[y]) for r in rows]

    steps, losses = read(loss_csv, "loss")
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, losses, label="train loss", linewidth=1)
    e_steps, e_losses = read(eval_csv, "valid_loss")
    if e_steps:
        ax.plot(e_steps, e_losses, "o-", label="validation loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    png = Path(png)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, png)
    return png

"""One Adafactor step on the 0.2B model: transformers' step against model/adafactor.py's.

    .venv/bin/python benchmarks/bench_adafactor.py [--threads 2] [--steps 3]

Random gradients on every weight of a freshly built 0.2B model (model_config.json); each
optimizer takes a first step (state allocation), then the two alternate for --steps timed
steps. Prints the min and median seconds per step of each.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model_config_file", default=str(ROOT / "model_config.json"))
    args = ap.parse_args()
    import torch
    from transformers.optimization import Adafactor as Reference

    from model.adafactor import Adafactor
    from model.chat_model import build_model
    from model.trainer import adafactor_kwargs

    torch.set_num_threads(args.threads)
    params = list(build_model(args.model_config_file).parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {"transformers": Reference(params, lr=1e-4, **adafactor_kwargs("adafactor")),
            "model.adafactor": Adafactor(params, lr=1e-4, **adafactor_kwargs("adafactor"))}
    for opt in opts.values():
        opt.step()
    times = {name: [] for name in opts}
    for _ in range(args.steps):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    for name, v in times.items():
        print(f"{name:>16}: Adafactor step on {Path(args.model_config_file).name}: min {min(v):.2f} s, "
              f"median {sorted(v)[len(v) // 2]:.2f} s ({args.steps} steps, {args.threads} threads)")


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)  # a UserError (a missing model, say) is one line, not a traceback

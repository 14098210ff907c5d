"""The benchmark scripts' command lines (the benchmarks themselves are run by hand)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_trainers_resolves_a_relative_model_config(monkeypatch):
    import bench_trainers

    monkeypatch.chdir(ROOT)
    args = bench_trainers.parse_args(["--model_config_file", "model_config_tiny.json"])
    # the trainers run with a temporary cwd: the path they get must not depend on it
    assert Path(args.model_config_file).is_absolute()
    assert Path(args.model_config_file) == ROOT / "model_config_tiny.json"


def test_bench_trainers_names_a_missing_model_config(monkeypatch, capsys):
    import bench_trainers

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        bench_trainers.parse_args(["--model_config_file", "no_such_config.json"])
    assert "--model_config_file not found: no_such_config.json" in capsys.readouterr().err


def test_gpu_check_dry_run_prints_every_row():
    """benchmarks/gpu_check.py --dry_run: the whole GPU check on the CPU with the tiny config
    (fp32), so the script is known to work before a GPU is found. The compile row is skipped
    here (--no_compile: inductor takes minutes on a small CPU); the other rows really run."""
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry_run", "--no_compile",
                        "--steps", "2"], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    table = r.stdout[r.stdout.index("gpu_check: CPU dry run"):].splitlines()
    rows = {line[:22].strip(): line for line in table[2:]}
    import gpu_check

    assert list(rows) == list(gpu_check.ROW_NAMES)
    assert not [line for line in rows.values() if "FAILED" in line], table
    for name in ("train.py eager", "train.py sdpa", "HF Trainer path", "inference greedy"):
        speed = rows[name][22:43].split()[0]
        assert float(speed.replace(",", "")) > 0, rows[name]
    assert "%" in rows["train.py sdpa"] and "data wait" in rows["train.py sdpa"]
    assert "skipped" in rows["train.py sdpa+compile"]
    assert rows["fp16 overflow check"].split()[3] == "ok"


def test_bench_pretraining_gain_writes_its_results_for_a_parsed_config(tmp_path):
    """The results file is written from a config parsed off a command line (which also records
    the flags given): a full four-run benchmark once ended in a TypeError there."""
    import json

    import bench_pretraining_gain as bench

    from utils.cli import parse_config

    _, cfg = parse_config(bench.BenchConfig, ["--seeds", "1", "--output_dir", str(tmp_path)])
    row = {"seed": 1, "start": "random", "sft_wall_s": 1.0, "sentiment": {"accuracy": 0.5, "rows": 2},
           "entity": {"f1": 0.25, "precision": 0.5, "recall": 0.125, "rows": 2}}
    bench._write_results(tmp_path, cfg, ["sft_train.py"], [row], "mixed")
    saved = json.loads((tmp_path / "bench_pretraining_gain.json").read_text(encoding="utf-8"))
    assert saved["settings"]["seeds"] == "1" and saved["results"] == [row]
    assert saved["pretrain_objective"] == "mixed"
    assert "| random | 1 | 0.5000 | 0.2500 |" in (tmp_path / "bench_pretraining_gain.md").read_text(encoding="utf-8")

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

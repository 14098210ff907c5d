"""What the benchmarks share: where a run writes, and how it stops a server it started.

    from bench_common import new_run_dir, run_dir
    with run_dir(args.work_dir, "bench_data_", keep=args.keep) as work:
        ...  # everything the run writes goes under `work`, removed at the end
    work = new_run_dir(args.workdir, "bench_dpo_", "--workdir")  # kept: the results are in it

`work` is a fresh temporary directory under the directory the user named (made if missing),
or under the system's temporary directory when none was named. A rerun therefore never
mixes with an earlier run's files, and the clean-up at the end removes `work` alone: before
this module, `bench_reliability.py --work_dir ~/data` (or `bench_data_pipeline.py`) ended
with `rm -r ~/data`, whatever else was in it.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _parent(parent: str | None, what: str) -> str | None:
    """The directory named by `what` made if missing; a one-line exit where it cannot be written."""
    from model.common import UserError, require_writable

    if not parent:
        return None
    try:
        path = require_writable(Path(parent).expanduser(), what, is_dir=True)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def new_run_dir(parent: str | None, prefix: str, what: str = "--work_dir") -> Path:
    """A new, empty directory for one run under `parent` (the option `what`), made now."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_parent(parent, what))).resolve()


@contextmanager
def run_dir(parent: str | None, prefix: str, keep: bool = False, what: str = "--work_dir") -> Iterator[Path]:
    """new_run_dir as a context: the directory is removed at the end unless `keep`."""
    work = new_run_dir(parent, prefix, what)
    try:
        yield work
    finally:
        if keep:
            print(f"this run's files: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def stop_process(proc, timeout: float = 20) -> None:
    """End a server started by a benchmark or a test: SIGTERM, then SIGKILL if it lingers."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

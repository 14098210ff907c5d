"""Scratch left by killed runs of the data pipeline: found by name, removed when its owner is gone.

    from utils.scratch import remove_stale, report
    removed = remove_stale(out.parent, temp_pattern(out))   # [(path, bytes), ...]
    if removed:
        print(report(removed))

A run's scratch carries the process id of the run that made it: the de-duplication index
`.dedup-index-<pid>-<random>/` (utils/dedup.py) and the file an output is written to before
its rename, `.<output name>.tmp-<pid>` (model/common.py). A run that ends in any way
Python sees (success, error, Ctrl+C, SIGTERM) removes its own; kill -9 or a crash leaves
it (115 MB after 8 kills of a 120k-row dedup). Only entries whose name matches the exact
pattern, whose content is what the project writes there, and whose process is no longer
running are removed: the scratch of a run still going (same machine) is never touched.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (this one counts as running)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    except OverflowError:  # not a possible process id
        return False
    return True


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.stat().st_size


def remove_stale(directory: str | Path, pattern: re.Pattern, allowed_files: frozenset[str] | None = None
                 ) -> list[tuple[Path, int]]:
    """Remove the entries of `directory` named by `pattern` (with a `pid` group) whose process
    is gone; returns [(path, bytes)]. With `allowed_files` they must be directories holding
    only files of those names, else plain files. Anything else is left alone."""
    try:
        entries = sorted(Path(directory).iterdir())
    except OSError:  # no such directory (yet): nothing stale in it
        return []
    removed = []
    for path in entries:
        match = pattern.fullmatch(path.name)
        if not match or path.is_symlink() or pid_alive(int(match["pid"])):
            continue
        try:
            if allowed_files is None:
                if not path.is_file():
                    continue
                size = _size(path)
                path.unlink()
            else:
                if not path.is_dir() or any(not p.is_file() or p.name not in allowed_files for p in path.iterdir()):
                    continue
                size = _size(path)
                shutil.rmtree(path)
        except OSError:  # gone meanwhile, or not ours to remove (permissions): leave it
            continue
        removed.append((path, size))
    return removed


def report(removed: list[tuple[Path, int]], shown: int = 3) -> str:
    """One line naming what `remove_stale` removed."""
    names = ", ".join(str(path) for path, _ in removed[:shown])
    more = f" and {len(removed) - shown} more" if len(removed) > shown else ""
    total = sum(size for _, size in removed)
    return f"removed scratch left by killed earlier runs ({total / 2**20:.1f} MB): {names}{more}"

"""The ground floor of model/: what every stage needs and imports from here, not from utils/.

    from model.common import UserError, require_file, atomic_write_text

- `UserError` (defined in settings.py beside config.py, whose checks raise it too) and the
  file checks made before any work: `require_file`, `require_writable`;
- `is_given`: whether a setting was chosen by the user (`utils.cli.parse_config` records it);
- atomic file writes: `atomic_write_text`, `AtomicTextWriter`, and `temp_path` /
  `temp_pattern`, the one naming scheme of their temporary files (utils/scratch.py removes
  those of killed runs). Directories are replaced atomically by `model.chat_model.replace_dir`.

Imports run one way: root scripts -> utils/, eval/ -> model/ -> config.py, settings.py
(tests/test_layering.py); this module imports nothing of the project but settings.py.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Iterable

from settings import UserError

__all__ = ["UserError", "require_file", "require_writable", "require_distinct", "is_given", "temp_path",
           "temp_pattern", "atomic_write_text", "AtomicTextWriter"]


def require_writable(path: str | Path, what: str, is_dir: bool = False) -> Path:
    """Check before any work that `path` (a file, or with is_dir a directory) can be written:
    its nearest existing ancestor is a directory in which a file can be created. Otherwise a
    one-line UserError naming the path and why (a parent that is a file, no permission, a
    read-only or special file system such as /proc), instead of a traceback after the work.
    Nothing is created or left behind."""
    given, path = Path(path), Path(path).absolute()
    if not is_dir and path.is_dir():
        raise UserError(f"{what} is a directory, expected a file name: {path}")
    directory = path if is_dir else path.parent
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{what} {path} cannot be written: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):  # unnamed where the OS allows, removed at once
            pass
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be written: cannot create files in {existing} "
                        f"({exc.strerror or exc}); choose a directory you can write to") from None
    return given


def require_distinct(outputs: Iterable[tuple[str, str | Path]], inputs: Iterable[tuple[str, str | Path]] = ()) -> None:
    """(flag, path) pairs of a command's outputs and inputs: no output may be an input or
    another output (written over, it would be lost); inputs may coincide. A one-line UserError
    naming both flags. Empty paths (not given) are skipped."""
    seen = {Path(p).resolve(): flag for flag, p in inputs if str(p)}
    for flag, path in outputs:
        if not str(path):
            continue
        other = seen.setdefault(Path(path).resolve(), flag)
        if other != flag:
            raise UserError(f"{flag} and {other} name the same file ({path}): give each its own")


def require_file(path: str | Path, what: str) -> Path:
    """Return `path` as a Path if it is an existing, non-empty file, else a UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if p.is_dir():
        raise UserError(f"{what} is a directory, expected a file: {p}")
    if p.stat().st_size == 0:
        raise UserError(f"{what} is empty: {p}")
    return p


_GIVEN = "_fields_given_on_command_line"


def is_given(cfg, name: str) -> bool:
    """Whether setting `name` of `cfg` was chosen by the user rather than left at its default.

    Some defaults follow another setting (the tokenizer follows the model, the chat model is
    model_save/final or else model_save/ itself), but a value the user gave always wins, even
    one equal to the default: `parse_config` records the flags given. A config built in code
    counts a field as given when it differs from the dataclass default.
    """
    default = next(f.default for f in fields(cfg) if f.name == name)
    return name in getattr(cfg, _GIVEN, ()) or getattr(cfg, name) != default


def temp_path(path: Path) -> Path:
    """A unique temporary name beside `path` (same file system, so os.replace is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def temp_pattern(path: Path) -> re.Pattern:
    """The names temp_path gives `path` in any process (for utils.scratch.remove_stale)."""
    return re.compile(rf"\.{re.escape(Path(path).name)}\.tmp-(?P<pid>\d+)")


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class AtomicTextWriter:
    """A text file written line by line under a temporary name, renamed on success."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path(self.path)
        self._fh = open(self._tmp, "w", encoding="utf-8")
        self.lines = 0
        self.chars = 0

    def write_line(self, line: str) -> None:
        self._fh.write(line + "\n")
        self.lines += 1
        self.chars += len(line)

    def __enter__(self) -> "AtomicTextWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._fh.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)

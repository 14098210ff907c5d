"""User text files read as UTF-8, strictly: bytes that are not UTF-8 are located, never replaced.

    from model.text_files import iter_utf8_lines, read_utf8

Decoding with `errors="replace"` turns every byte that is not UTF-8 into U+FFFD and goes
on: a GBK or Latin-1 file (or one damaged row) silently becomes rows of U+FFFD in the
training data. Here a line that does not decode is reported with its line number and byte
offset, so a reader can count it as a malformed row, and a file that must be read whole
fails with a one-line error that says where and how to convert it. A UTF-8 byte-order
mark at the start is dropped (Windows editors write one; JSON parsers reject it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from model.common import UserError

BOM = b"\xef\xbb\xbf"
HINT = "save it as UTF-8 (e.g. iconv -f GBK -t UTF-8 in > out)"


def bad_bytes(exc: UnicodeDecodeError, offset: int = 0) -> str:
    """'byte 0xff at byte offset 57' for a decode error of a buffer starting at `offset`."""
    return f"byte 0x{exc.object[exc.start]:02x} at byte offset {offset + exc.start}"


def iter_utf8_lines(path: str | Path, stand_in: bool = False) -> Iterator[tuple[int, str | None, str]]:
    """(line number from 1, text, problem) for every line of `path`, line endings kept.

    For a line that is not valid UTF-8, problem says where ("not UTF-8: byte 0xff at byte
    offset 57") and text is None, or with `stand_in` the line with U+FFFD for the bad bytes,
    only so that a parser keeps its bearings (a CSV row may span lines): never use it as
    data. Otherwise problem is "". Lines are split at b"\\n" only (as JSON lines are;
    "\\r\\n" stays in the text).
    """
    with open(path, "rb") as fh:
        offset = 0
        for lineno, raw in enumerate(fh, 1):
            start = offset
            offset += len(raw)
            if lineno == 1 and raw.startswith(BOM):
                raw, start = raw[len(BOM):], len(BOM)
            try:
                yield lineno, raw.decode("utf-8"), ""
            except UnicodeDecodeError as exc:
                yield lineno, raw.decode("utf-8", "replace") if stand_in else None, \
                    f"not UTF-8: {bad_bytes(exc, start)}"


def read_utf8(path: str | Path, what: str = "file") -> str:
    """The whole text of `path`; a UserError naming the line and byte offset if it is not UTF-8."""
    data = Path(path).read_bytes()
    skip = len(BOM) if data.startswith(BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, skip + exc.start) + 1
        raise UserError(f"{what} {path} is not UTF-8 text: line {line}, {bad_bytes(exc, skip)}; {HINT}") from None


def first_char(path: str | Path) -> str:
    """The first character of `path` that is not white space, if ASCII (enough to tell
    JSON lines from a JSON array or XML), else ""; a byte-order mark is skipped."""
    with open(path, "rb") as fh:
        if fh.read(len(BOM)) != BOM:
            fh.seek(0)
        while chunk := fh.read(4096):
            stripped = chunk.lstrip(b" \t\r\n")
            if stripped:
                return chr(stripped[0]) if stripped[0] < 128 else ""
    return ""

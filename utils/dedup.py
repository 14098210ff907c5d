"""Exact and near-duplicate removal: exact hashes, then MinHash LSH, with the index on disk.

    with Deduplicator(threshold=0.85, num_perm=256, index_dir="data/", num_workers=2) as d:
        kept = list(d.filter(rows, text_of=pair_text))   # streams, in groups
        print(d.summary())

Used by `python -m utils.raw_data_process dedup` and by the embedded corpus builder.

The original project drops rows whose MinHash similarity to an earlier row reaches 0.85
(256 permutations). Rows are fed in groups. A row whose text hashes like an earlier
row's is an exact duplicate; the others are sketched (datasketch's MinHash, in worker
processes when there are several CPUs), cut into the b bands of r values that
datasketch's MinHashLSH chooses for the threshold, and a row sharing a band with an
earlier kept row is a near duplicate. The first row of each cluster is kept, also within
a group: each row is compared with the rows before it in its own group as well.

Memory: the input streams, and the index (one exact key per distinct row, one key per
band per kept row: 14 keys at the defaults) lives in a scratch SQLite file, not in RAM;
what stays in memory is SQLite's page cache, capped at `cache_mb`, and the two groups
in flight. Measured on 400,000 short distinct rows, one process: the old in-RAM sets
grew from 198 to 552 MiB RSS between rows 100k and 400k (1.2 KB a row); this index,
with a 16 MB cache, stayed at 111 MiB over the same rows (with the default 64 MB, 118
to 166 MiB while the cache fills, then flat). The file takes ~0.2 KB a kept row (76 MB
for those 400k rows); it is deleted when the run ends, also after an error (one left by a
killed run is removed by the next `raw_data_process dedup`, see utils/scratch.py). Each
sketching worker process adds ~85 MiB (its imports). In `raw_data_process dedup` the
parquet reader and writer add their own bounded share, up to about a row group each.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import tempfile
import weakref
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from utils.parallel import WorkerPool

_MIN_PARALLEL = 256  # fewer texts than this in a group: sketched in this process
_MASK32 = np.uint64(0xFFFFFFFF)
_MULT = np.uint64(1_000_003)


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """32-bit hashes of the character n-grams of `text` (whitespace ignored), repeats included.

    Characters, not words: Chinese has no spaces to split on. Hashing the code points
    with numpy is stable across runs and processes (unlike Python's salted hash()) and
    several times faster than hashing each n-gram string in Python. Repeated n-grams are
    not removed: a MinHash is a minimum, which a repeat cannot change, and np.unique cost
    a sixth of the sketching time.
    """
    codes = np.frombuffer("".join(text.split()).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = min(ngram, len(codes))  # a text shorter than n-gram is one shingle
    if n == 0:
        return np.zeros(1, dtype=np.uint64)
    h = np.zeros(len(codes) - n + 1, dtype=np.uint64)
    for i in range(n):
        h = ((h * _MULT) ^ codes[i:len(codes) - n + 1 + i]) & _MASK32
    return h


def _key(data: bytes) -> int:
    # 63 bits, so every key is a non-negative SQLite INTEGER (and a plain JSON number).
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def exact_key(text: str) -> int:
    return _key(text.encode("utf-8"))


def band_keys(texts: Sequence[str], ngram: int, num_perm: int, seed: int,
              bands: Sequence[tuple[int, int]]) -> np.ndarray:
    """For each text, one key per LSH band of its MinHash: an (len(texts), len(bands)) array.

    Module-level and given plain arguments so that worker processes can run it. The key
    of a band hashes the band's number with its r MinHash values, so equal keys mean
    (but for a 2^-63 accident) the same band of two sketches: MinHashLSH's candidate rule.
    blake2b, not hash(): each worker process salts hash() differently.
    """
    from datasketch import MinHash

    out = np.empty((len(texts), len(bands)), dtype=np.int64)
    # hashfunc=int: the inputs already are 32-bit hashes, MinHash only has to mix them.
    sketch = MinHash(num_perm=num_perm, seed=seed, hashfunc=int)
    prefixes = [j.to_bytes(4, "little") for j in range(len(bands))]
    size = sketch.hashvalues.itemsize
    spans = [(size * s, size * e) for s, e in bands]  # in bytes
    blake2b = hashlib.blake2b
    for i, text in enumerate(texts):
        # One sketch, cleared per text: MinHash.generator copies a fresh one per text,
        # which re-validates the permutations every time (~15% of the sketching time).
        sketch.clear()
        # Python ints (tolist): update_batch calls hashfunc once per value, and int()
        # of a numpy scalar costs several times int() of an int.
        sketch.update_batch(shingle_hashes(text, ngram).tolist())
        hv = sketch.hashvalues.tobytes()
        out[i] = [int.from_bytes(blake2b(p + hv[s:e], digest_size=8).digest(), "little") >> 1
                  for p, (s, e) in zip(prefixes, spans)]
    return out


class _DiskKeySet:
    """A set of 63-bit keys in one SQLite table, queried and filled a group at a time.

    Whole groups go through one statement each, the keys passed as one JSON array that
    SQLite's json_each unpacks in C: a Python round trip per key (executemany, or a
    query per key) cost more than the B-tree work itself.
    """

    def __init__(self, con: sqlite3.Connection, table: str, json1: bool):
        self.con, self.table, self.json1 = con, table, json1
        # WITHOUT ROWID: the key is the B-tree's only column, no separate rowid per entry.
        con.execute(f"CREATE TABLE {table} (k INTEGER PRIMARY KEY) WITHOUT ROWID")

    def found(self, keys: Sequence[int]) -> set[int]:
        """The keys that are in the set."""
        if not keys:
            return set()
        if self.json1:
            cur = self.con.execute(f"SELECT k FROM {self.table} WHERE k IN (SELECT value FROM json_each(?))",
                                   (json.dumps(keys),))
            return {k for (k,) in cur}
        out = set()
        for i in range(0, len(keys), 500):  # under SQLite's oldest 999-variable limit
            chunk = keys[i:i + 500]
            cur = self.con.execute(f"SELECT k FROM {self.table} WHERE k IN ({','.join('?' * len(chunk))})", chunk)
            out.update(k for (k,) in cur)
        return out

    def add(self, keys: Sequence[int]) -> None:
        if not keys:
            return
        try:
            if self.json1:
                self.con.execute(f"INSERT OR IGNORE INTO {self.table} SELECT value FROM json_each(?)",
                                 (json.dumps(keys),))
            else:
                self.con.executemany(f"INSERT OR IGNORE INTO {self.table} VALUES (?)", ((k,) for k in keys))
        except sqlite3.OperationalError as exc:  # "database or disk is full", mostly
            from utils.cli import UserError

            raise UserError(f"de-duplication index ({self.con.execute('PRAGMA database_list').fetchone()[2]}): "
                            f"{exc} (--index_dir puts it elsewhere)") from None


# The scratch index directory: its name carries the owner's process id, so a later run can
# remove the index of a killed run without touching a live one's (utils/scratch.py).
# mkdtemp adds 8 characters of [a-z0-9_].
INDEX_PATTERN = re.compile(r"\.dedup-index-(?P<pid>\d+)-[a-z0-9_]{8}")
INDEX_FILES = frozenset({"index.sqlite", "index.sqlite-journal"})


def _remove_index(con: sqlite3.Connection, directory: str) -> None:
    try:
        con.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class Deduplicator:
    """Decide for each text, in order, whether it repeats an earlier one.

    datasketch computes the MinHash sketches and chooses the LSH banding (b bands of r
    values) for the threshold; the band index is our own: a table of band keys on disk,
    asking only "does any kept row share a band?", the candidate rule of
    MinHashLSH.query. MinHashLSH's own storage is in RAM (~5 KB a row, measured), and
    a Python set of band keys still ~1.3 KB a row: a 2 GB input would need 4-5 GB.

    Use as a context manager (or call close()): the scratch index, a directory under
    `index_dir` (default: the system's temporary directory), is deleted on exit, also
    after an error. `num_workers` > 1 sketches in that many worker processes.
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 256, ngram: int = 3, seed: int = 1,
                 index_dir: str | Path | None = None, cache_mb: float = 64, num_workers: int = 1):
        from datasketch import MinHashLSH

        from utils.cli import UserError

        if not 0.0 < threshold <= 1.0:
            raise UserError(f"dedup threshold must be in (0, 1], got {threshold}")
        if cache_mb <= 0:
            raise UserError(f"the de-duplication index cache must be > 0 MB, got {cache_mb}")
        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        try:
            lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        except ValueError as exc:  # datasketch finds no banding of num_perm with 2+ bands for threshold
            raise UserError(f"--num_perm {num_perm} is too few for --dedup_threshold {threshold} ({exc}): "
                            "raise --num_perm (256 is the default) or lower the threshold") from None
        self.bands = [(i * lsh.r, (i + 1) * lsh.r) for i in range(lsh.b)]
        self.removed: Counter = Counter()
        self.kept = 0
        self.num_workers = max(1, int(num_workers))
        self._pool: WorkerPool | None = None

        try:
            if index_dir is not None:
                Path(index_dir).mkdir(parents=True, exist_ok=True)
            self.index_dir = Path(tempfile.mkdtemp(prefix=f".dedup-index-{os.getpid()}-", dir=index_dir))
        except OSError as exc:
            raise UserError(f"cannot create the de-duplication index under {index_dir}: {exc}") from None
        # isolation_level=None: no implicit transactions; each statement stands alone.
        con = sqlite3.connect(self.index_dir / "index.sqlite", isolation_level=None)
        self._finalizer = weakref.finalize(self, _remove_index, con, str(self.index_dir))
        self.con = con
        # The index is scratch data, rebuilt by rerunning: no rollback journal, no fsync.
        # Big pages: the keys are random, so each group of inserts touches pages all over
        # the B-tree; 64 KB pages made a group's inserts ~1.6x faster than 4 KB ones.
        con.execute("PRAGMA page_size = 65536")
        con.execute("PRAGMA journal_mode = OFF")
        con.execute("PRAGMA synchronous = OFF")
        con.execute("PRAGMA locking_mode = EXCLUSIVE")
        con.execute("PRAGMA temp_store = MEMORY")  # only a group's keys (json_each, IN lists)
        # The bound on the index's RAM: SQLite's page cache (negative = KiB). mmap stays off
        # (its default): mapped pages would count as this process's memory.
        con.execute(f"PRAGMA cache_size = {-int(cache_mb * 1024)}")
        try:
            con.execute("SELECT value FROM json_each('[1]')").fetchall()
            json1 = True
        except sqlite3.OperationalError:  # an SQLite built without JSON: slower, same result
            json1 = False
        self._exact = _DiskKeySet(con, "exact", json1)
        self._band = _DiskKeySet(con, "band", json1)

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Stop the workers and delete the scratch index (idempotent)."""
        pool, self._pool = self._pool, None
        try:
            if pool is not None:
                pool.close(wait=False)
        finally:
            self._finalizer()

    def __enter__(self) -> "Deduplicator":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def page_cache_bytes(self) -> int:
        """The fixed cap on the index's page cache, as SQLite reports it."""
        pages = self.con.execute("PRAGMA cache_size").fetchone()[0]
        if pages < 0:
            return -pages * 1024
        return pages * self.con.execute("PRAGMA page_size").fetchone()[0]

    # ---------------------------------------------------------------- the two steps

    def _exact_step(self, texts: Sequence[str]) -> tuple[list[str | None], list[int]]:
        """Verdicts ("exact" or None so far) and the indices of the rows that are not exact duplicates.

        Every such row's key is remembered, the near duplicates' too, so that a later
        copy of a near duplicate is counted as exact (it is one).
        """
        keys = [exact_key(t) for t in texts]
        earlier = self._exact.found(keys)
        verdicts: list[str | None] = [None] * len(texts)
        fresh, new_keys = [], set()
        for i, k in enumerate(keys):
            if k in earlier or k in new_keys:  # an earlier group, or earlier in this group
                verdicts[i] = "exact"
            else:
                new_keys.add(k)
                fresh.append(i)
        self._exact.add(sorted(new_keys))  # sorted: inserts walk the B-tree in order
        return verdicts, fresh

    def _submit_sketches(self, texts: Sequence[str]) -> list:
        """Start computing the band keys of `texts`; returns handles whose .get() gives arrays."""
        args = (self.ngram, self.num_perm, self.seed, self.bands)
        if self.num_workers <= 1 or len(texts) < _MIN_PARALLEL:
            # A small group (a small input, mostly) is sketched here: starting the workers
            # (~1 s, once) would cost more than it saves. Same keys either way.
            return [_Later(band_keys, texts, *args)]
        if self._pool is None:
            self._pool = WorkerPool(self.num_workers)
        # Two pieces a worker: both busy, and the pieces large enough (~0.2 s of work)
        # for the pickling of texts and keys to be noise.
        size = max(64, math.ceil(len(texts) / (2 * self.num_workers)))
        return [self._pool.submit(band_keys, texts[i:i + size], *args) for i in range(0, len(texts), size)]

    def _near_step(self, verdicts: list[str | None], fresh: list[int], handles: list) -> None:
        parts = [h.get() for h in handles]
        keys = np.concatenate(parts) if parts else np.empty((0, len(self.bands)), dtype=np.int64)
        flat = keys.ravel()
        # numpy, not a Python loop over every key: this process does the index work for
        # all workers, and at 13 keys a row a per-key loop cost as much as sketching.
        earlier = np.fromiter(self._band.found(flat.tolist()), dtype=np.int64)
        near = np.isin(keys, earlier).any(axis=1)  # shares a band with a row of an earlier group
        # Rows sharing a key with another row of this group: only they need the in-order
        # walk (is the other row before them, and kept?); every other row is decided.
        order = np.argsort(flat, kind="stable")
        same = flat[order][1:] == flat[order][:-1]
        in_group = np.zeros(flat.shape, dtype=bool)
        in_group[order[1:][same]] = in_group[order[:-1][same]] = True
        kept_keys: set[int] = set()  # bands of the rows of this group kept so far
        for j in np.flatnonzero(in_group.reshape(keys.shape).any(axis=1) & ~near):
            row = keys[j].tolist()
            if kept_keys.isdisjoint(row):
                kept_keys.update(row)
            else:
                near[j] = True
        for j in np.flatnonzero(near):
            verdicts[fresh[j]] = "near"
        # Sorted: the inserts then walk the B-tree in key order, page after page.
        self._band.add(np.sort(keys[~near].ravel()).tolist())
        for v in verdicts:
            if v is None:
                self.kept += 1
            else:
                self.removed[f"{v}_duplicate"] += 1

    # ---------------------------------------------------------------- API

    def check_group(self, texts: Sequence[str]) -> list[str | None]:
        """For each text: None (new, now remembered), "exact" or "near" (a duplicate)."""
        verdicts, fresh = self._exact_step(texts)
        self._near_step(verdicts, fresh, self._submit_sketches([texts[i] for i in fresh]))
        return verdicts

    def filter(self, items: Iterable, text_of=lambda x: x, group_size: int = 5000) -> Iterator:
        """The items whose text is not a duplicate, in order, streaming in groups of `group_size`.

        Pipelined by one group: group g's exact step runs and its sketches are handed to
        the workers before group g-1's band lookups, so the workers sketch while this
        process queries the index. The result is the same as one group after the other:
        the exact step never depends on the near step.
        """
        from utils.cli import UserError

        if group_size < 1:
            raise UserError(f"the de-duplication group size must be >= 1, got {group_size}")
        previous = None
        for group in _groups(items, group_size):
            texts = [text_of(x) for x in group]
            verdicts, fresh = self._exact_step(texts)
            handles = self._submit_sketches([texts[i] for i in fresh])
            if previous is not None:
                yield from self._finish(*previous)
            previous = (group, verdicts, fresh, handles)
        if previous is not None:
            yield from self._finish(*previous)

    def _finish(self, group, verdicts, fresh, handles):
        self._near_step(verdicts, fresh, handles)
        for item, verdict in zip(group, verdicts):
            if verdict is None:
                yield item

    def summary(self) -> str:
        removed = ", ".join(f"{k} {v}" for k, v in sorted(self.removed.items())) or "none"
        return f"kept {self.kept}; removed: {removed}"


class _Later:
    """In-process work, done when asked for, so that filter()'s pipelining order is the
    same with and without workers."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def get(self):
        return self.fn(*self.args)


def _groups(items: Iterable, size: int) -> Iterator[list]:
    group = []
    for item in items:
        group.append(item)
        if len(group) >= size:
            yield group
            group = []
    if group:
        yield group


def pair_text(pair: tuple[str, str]) -> str:
    """What two rows must share to be duplicates: prompt and response together."""
    return f"{pair[0]}\n{pair[1]}"

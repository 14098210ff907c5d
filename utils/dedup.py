"""Exact and near-duplicate removal: a hash set, then MinHash LSH from datasketch.

The original project drops rows whose MinHash similarity to an earlier row reaches 0.85
(256 permutations). Rows are fed in groups: the shingling and MinHash of a whole group
are computed together (`MinHash.generator` reuses one set of permutations), then each row
is queried against everything kept so far and inserted if new, so the first row of each
cluster is kept, also within a group.

Memory: the input streams; what grows is the index of kept rows, one 8-byte exact hash
and one band digest per LSH band per kept row (about 1.3 KB a row, measured by
benchmarks/bench_data_pipeline.py), independent of the rows' length.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Iterable, Iterator, Sequence

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)
_MULT = np.uint64(1_000_003)


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """32-bit hashes of the distinct character n-grams of `text` (whitespace ignored).

    Characters, not words: Chinese has no spaces to split on. Hashing the code points
    with numpy is stable across runs (unlike Python's salted hash()) and several times
    faster than hashing each n-gram string in Python, which dominated the run time.
    """
    codes = np.frombuffer("".join(text.split()).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = min(ngram, len(codes))  # a text shorter than n-gram is one shingle
    if n == 0:
        return np.zeros(1, dtype=np.uint64)
    h = np.zeros(len(codes) - n + 1, dtype=np.uint64)
    for i in range(n):
        h = ((h * _MULT) ^ codes[i:len(codes) - n + 1 + i]) & _MASK32
    return np.unique(h)


class Deduplicator:
    """Decide for each text, in order, whether it repeats an earlier one.

    datasketch computes the MinHash sketches and the LSH banding (b bands of r values,
    chosen by MinHashLSH for the threshold). The band index itself is a set of band
    digests per band rather than MinHashLSH's storage: that keeps a dict of sets plus a
    key table, ~5 KB per row, where de-duplication only asks "does any kept row share a
    band?" — the same candidate rule as MinHashLSH.query, in about a sixth of the memory.
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 256, ngram: int = 3, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        if not 0.0 < threshold <= 1.0:
            from utils.cli import UserError
            raise UserError(f"dedup threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        # The inputs are already 32-bit hashes (shingle_hashes); MinHash only has to mix them.
        self._minhash_kwargs = dict(num_perm=num_perm, seed=seed, hashfunc=int)
        self._MinHash = MinHash
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.bands = [(i * lsh.r, (i + 1) * lsh.r) for i in range(lsh.b)]
        self._band_sets: list[set[int]] = [set() for _ in self.bands]
        self._seen: set[bytes] = set()
        self.removed: Counter = Counter()
        self.kept = 0

    @staticmethod
    def _exact_key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()

    def check_group(self, texts: Sequence[str]) -> list[str | None]:
        """For each text: None (new, now remembered), "exact" or "near" (a duplicate)."""
        verdicts: list[str | None] = [None] * len(texts)
        fresh = []
        for i, text in enumerate(texts):
            key = self._exact_key(text)
            if key in self._seen:
                verdicts[i] = "exact"
            else:
                self._seen.add(key)
                fresh.append(i)
        sketches = self._MinHash.generator((shingle_hashes(texts[i], self.ngram) for i in fresh),
                                           **self._minhash_kwargs)
        for i, sketch in zip(fresh, sketches):
            hv = sketch.hashvalues
            # hash() of bytes is salted per process, which only changes which (astronomically
            # rare) 64-bit collisions occur, never the de-duplication rule.
            keys = [hash(hv[s:e].tobytes()) for s, e in self.bands]
            if any(k in band for k, band in zip(keys, self._band_sets)):
                verdicts[i] = "near"
            else:
                for k, band in zip(keys, self._band_sets):
                    band.add(k)
        for v in verdicts:
            if v is None:
                self.kept += 1
            else:
                self.removed[f"{v}_duplicate"] += 1
        return verdicts

    def filter(self, items: Iterable, text_of=lambda x: x, group_size: int = 5000) -> Iterator:
        """The items whose text is not a duplicate, streaming in groups of `group_size`."""
        group = []
        for item in items:
            group.append(item)
            if len(group) >= group_size:
                yield from self._emit(group, text_of)
                group = []
        if group:
            yield from self._emit(group, text_of)

    def _emit(self, group, text_of):
        verdicts = self.check_group([text_of(x) for x in group])
        for item, verdict in zip(group, verdicts):
            if verdict is None:
                yield item

    def summary(self) -> str:
        removed = ", ".join(f"{k} {v}" for k, v in sorted(self.removed.items())) or "none"
        return f"kept {self.kept}; removed: {removed}"


def pair_text(pair: tuple[str, str]) -> str:
    """What two rows must share to be duplicates: prompt and response together."""
    return f"{pair[0]}\n{pair[1]}"

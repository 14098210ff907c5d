"""Exact and near-duplicate removal: a hash set, then MinHash LSH from datasketch.

The original project drops rows whose MinHash similarity to an earlier row reaches 0.85
(256 permutations). Rows are fed in groups: the shingling and MinHash of a whole group
are computed together (`MinHash.generator` reuses one set of permutations), then each row
is queried against everything kept so far and inserted if new, so the first row of each
cluster is kept, also within a group.

Memory: the input streams, but the index keeps an 8-byte hash per kept row and the LSH
band keys (datasketch's in-memory storage), so it grows with the number of distinct rows
(see benchmarks/bench_data_pipeline.py for the measured figure), not with their length.
"""
from __future__ import annotations

import hashlib
import zlib
from collections import Counter
from typing import Iterable, Iterator, Sequence


def _crc32(shingle: str) -> int:
    # Stable across runs (Python's hash() is salted), fast, and 32-bit as MinHash expects.
    return zlib.crc32(shingle.encode("utf-8"))


def shingles(text: str, ngram: int) -> set[str]:
    """Character n-grams: Chinese has no spaces to split words on."""
    text = "".join(text.split())
    if len(text) <= ngram:
        return {text}
    return {text[i:i + ngram] for i in range(len(text) - ngram + 1)}


class Deduplicator:
    """Decide for each text, in order, whether it repeats an earlier one."""

    def __init__(self, threshold: float = 0.85, num_perm: int = 256, ngram: int = 3, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        if not 0.0 < threshold <= 1.0:
            from utils.cli import UserError
            raise UserError(f"dedup threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        self._minhash_kwargs = dict(num_perm=num_perm, seed=seed, hashfunc=_crc32)
        self._MinHash = MinHash
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._seen: set[bytes] = set()
        self._next_key = 0
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
        sketches = self._MinHash.generator((shingles(texts[i], self.ngram) for i in fresh), **self._minhash_kwargs)
        for i, sketch in zip(fresh, sketches):
            if self.lsh.query(sketch):
                verdicts[i] = "near"
            else:
                self.lsh.insert(self._next_key, sketch, check_duplication=False)
                self._next_key += 1
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

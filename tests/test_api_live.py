"""`python api_demo.py` as users run it (live uvicorn on loopback, fixture live_api in conftest):
the README's curl example, the official openai client, a bounded load test, and a client that
disconnects mid-stream."""
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import time

import httpx
import openai
import pytest

from config import PROJECT_ROOT
from conftest import stop_process


# The README's example request (the original's endpoint), run verbatim against a live server.
CURL_PREFIX = "curl -s -X POST http://127.0.0.1:8812/api/chat "


def readme_curl_example() -> str:
    """The README's curl line for /api/chat, as users copy it."""
    lines = [line.strip() for line in (PROJECT_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
             if line.strip().startswith(CURL_PREFIX)]
    assert len(lines) == 1, f"README.md must show one `{CURL_PREFIX}...` example, found {len(lines)}"
    return lines[0]


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60,
                         http_client=httpx.Client(trust_env=False, timeout=60))


def health(base: str) -> dict:
    return httpx.get(base + "/health", timeout=10, trust_env=False).json()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_example(live_api):
    base, port = live_api
    command = readme_curl_example()
    if port != 8812:  # 8812 was taken on this machine: same command, the server's port
        command = command.replace("127.0.0.1:8812", f"127.0.0.1:{port}")
    env = dict(os.environ, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert set(body) == {"response"} and isinstance(body["response"], str) and body["response"].strip()


def test_readme_shows_the_curl_example():
    assert '"input_txt"' in readme_curl_example()  # the original's request body


def test_openai_client_completion_and_stream(live_api):
    base, _ = live_api
    oa = client(base)
    assert [m.id for m in oa.models.list().data] == ["chatlm-mini-chinese"]
    messages = [{"role": "user", "content": "感冒了要怎么办"}]
    done = oa.chat.completions.create(model="chatlm-mini-chinese", messages=messages, max_tokens=8)
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant"
    text = done.choices[0].message.content
    assert text and done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 8

    pieces, finish = [], None
    stream = oa.chat.completions.create(model="chatlm-mini-chinese", messages=messages, max_tokens=8, stream=True,
                                        stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(pieces) == 8 and "".join(pieces) == text  # greedy: streamed and whole answers agree
    assert finish == "length" and usage.completion_tokens == 8

    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oa.chat.completions.create(model="x", messages=messages, max_tokens=100000)


def test_load_8_clients_x_25_requests(live_api, capsys):
    base, _ = live_api
    clients, per_client = 8, 25
    latencies, errors = [], []

    async def one_client(i: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=120, trust_env=False) as http:
            for j in range(per_client):
                stream = (i + j) % 5 == 0  # every fifth request streamed
                body = {"messages": [{"role": "user", "content": f"第{i}位用户的第{j}个问题"}],
                        "max_tokens": 2, "stream": stream}
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/chat/completions", json=body)
                    ok = r.status_code == 200 and (r.text.rstrip().endswith("data: [DONE]") if stream
                                                   else r.json()["choices"][0]["message"]["content"])
                    if not ok:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()

    async def run_all():
        await asyncio.gather(*(one_client(i) for i in range(clients)))

    asyncio.run(run_all())
    wall = time.perf_counter() - t0
    assert errors == []
    assert len(latencies) == clients * per_client
    q = statistics.quantiles(latencies, n=100)
    with capsys.disabled():
        print(f"\nload test: {clients} clients x {per_client} requests (max_tokens=2): "
              f"p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms, "
              f"{len(latencies) / wall:.1f} req/s, 0 errors")
    assert health(base)["active_requests"] == 0


def _wait_idle(base: str) -> dict:
    deadline = time.monotonic() + 30
    while health(base)["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the generation thread counts its last steps as it ends
    return health(base)


# max_tokens 4096 (the server's cap): far more than generates before the client leaves, on any machine.
LONG = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4096}


def test_disconnect_mid_stream_stops_generation(live_api):
    base, _ = live_api
    before = _wait_idle(base)["tokens_generated"]
    with httpx.Client(base_url=base, timeout=60, trust_env=False) as http:
        with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept alive: closing this iterator would close the connection
            seen = 0
            while seen < 3:
                line = next(lines)
                if '"content": "' in line and '"content": ""' not in line:
                    seen += 1
            # While it generates, the event loop still answers other requests at once.
            t0 = time.perf_counter()
            busy = health(base)
            assert time.perf_counter() - t0 < 2.0
            assert busy["active_requests"] == 1
        # leaving the block closes the connection mid-stream
    after = _wait_idle(base)
    assert after["active_requests"] == 0
    generated = after["tokens_generated"] - before
    assert 3 <= generated < 1024, f"{generated} tokens generated for a client that left after 3"


def test_client_leaving_a_whole_answer_stops_generation(live_api):
    base, _ = live_api
    before = _wait_idle(base)["tokens_generated"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(base + "/v1/chat/completions", json=LONG, timeout=0.5, trust_env=False)
    after = _wait_idle(base)
    assert after["active_requests"] == 0
    generated = after["tokens_generated"] - before
    assert generated < 1024, f"{generated} tokens generated for a client that left after 0.5 s"


# ---- other ways to start the server -----------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list, env: dict, log_path) -> tuple:
    """Start a server process on a free loopback port; wait for /health. Returns (proc, base, log)."""
    import sys

    port = _free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, *args, "--port", str(port)], cwd=str(PROJECT_ROOT), stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"server exited: {log_path.read_text()[-2000:]}"
        try:
            if httpx.get(base + "/health", timeout=2, trust_env=False).status_code == 200:
                return proc, base, log
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not answer /health within 180 s"
        time.sleep(0.3)


def _stop(proc, log) -> None:
    stop_process(proc)
    log.close()


SECRET = "k3y-in-the-environment"


def test_uvicorn_api_demo_app(chatty_model_dir, tmp_path):
    """The original documents `uvicorn api_demo:app`: settings from CHATLM_<FIELD> variables."""
    import sys

    imported = subprocess.run([sys.executable, "-c", "import api_demo, sys; print('app' in vars(api_demo), "
                               "'model.infer' in sys.modules)"], cwd=str(PROJECT_ROOT), capture_output=True,
                              text=True, timeout=120)
    assert imported.stdout.split() == ["False", "False"], imported.stderr  # importing it loads no model
    proc, base, log = _start(["-m", "uvicorn", "api_demo:app", "--log-level", "debug", "--http",
                              "utils.http_limits:LimitedH11Protocol", "--limit-concurrency", "64"],
                             {"CHATLM_MODEL_DIR": str(chatty_model_dir), "CHATLM_MAX_SEQ_LEN": "4",
                              "CHATLM_API_KEY": SECRET}, tmp_path / "uvicorn.log")
    try:
        auth = {"Authorization": f"Bearer {SECRET}"}
        r = httpx.post(base + "/api/chat", json={"input_txt": "你好"}, headers=auth, timeout=60, trust_env=False)
        assert r.status_code == 200 and len(r.json()["response"]) == 4
        assert httpx.post(base + "/api/chat", json={"input_txt": "你好"}, timeout=60,
                          trust_env=False).status_code == 401
    finally:
        _stop(proc, log)
    assert SECRET not in (tmp_path / "uvicorn.log").read_text()  # never logged, even at debug level


def test_uvicorn_api_demo_app_bad_setting_is_one_line(tmp_path):
    import sys

    out = subprocess.run([sys.executable, "-m", "uvicorn", "api_demo:app", "--port", str(_free_port())],
                         cwd=str(PROJECT_ROOT), capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CHATLM_MODEL_DIR": str(tmp_path / "nothing")})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"error: model not found: {tmp_path / 'nothing'}" in out.stderr


def test_workers_get_the_key_neither_in_argv_nor_environment(chatty_model_dir, tmp_path):
    import psutil

    proc, base, log = _start(["api_demo.py", "--model_dir", str(chatty_model_dir), "--max_seq_len", "2",
                              "--workers", "2", "--log_level", "debug"], {"CHATLM_API_KEY": SECRET},
                             tmp_path / "workers.log")
    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2
        key_files = []
        for w in workers:
            assert not any(SECRET in a for a in w.cmdline())
            environ = w.environ()
            assert not any(SECRET in v for v in environ.values()), w.cmdline()
            if "CHATLM_INFER_CONFIG" in environ:
                key_files.append(json.loads(environ["CHATLM_INFER_CONFIG"])["api_key_file"])
        assert key_files and all(f and oct(os.stat(f).st_mode & 0o777) == "0o600" for f in key_files)
        auth = {"Authorization": f"Bearer {SECRET}"}
        for _ in range(4):
            assert httpx.post(base + "/api/chat", json={"input_txt": "你好"}, headers=auth, timeout=60,
                              trust_env=False).status_code == 200
        assert httpx.post(base + "/api/chat", json={"input_txt": "你好"}, timeout=60,
                          trust_env=False).status_code == 401
    finally:
        _stop(proc, log)
    assert not any(os.path.exists(f) for f in key_files)  # removed when the server stops
    assert SECRET not in (tmp_path / "workers.log").read_text()


@pytest.mark.parametrize("args,env,expected", [
    (["--host", "0.0.0.0"], {}, "warning: serving on 0.0.0.0 without an API key"),
    (["--api_key", "a"], {"CHATLM_API_KEY": "b"}, "error: the API key is given twice (--api_key and CHATLM_API_KEY)"),
    (["--api_key_file", "/nonexistent/key"], {}, "error: cannot read api_key_file /nonexistent/key"),
    (["--max_connections", "0"], {}, "error: --max_connections must be an integer >= 1, got 0"),
])
def test_server_startup_messages(args, env, expected, tmp_path):
    import socket
    import sys

    with socket.socket() as s:  # a free port: the address is checked before the warning
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "api_demo.py", "--model_dir", str(tmp_path / "none"), "--port", str(port),
                          *args],
                         cwd=str(PROJECT_ROOT), capture_output=True, text=True, timeout=120,
                         env={**{k: v for k, v in os.environ.items() if k != "CHATLM_API_KEY"}, **env})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert expected in out.stderr, out.stderr

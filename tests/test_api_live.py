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
from utils.api_app import CURL_EXAMPLE


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60,
                         http_client=httpx.Client(trust_env=False, timeout=60))


def health(base: str) -> dict:
    return httpx.get(base + "/health", timeout=10, trust_env=False).json()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_example(live_api):
    base, port = live_api
    command = CURL_EXAMPLE
    if port != 8812:  # 8812 was taken on this machine: same command, the server's port
        command = command.replace("127.0.0.1:8812", f"127.0.0.1:{port}")
    env = dict(os.environ, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert set(body) == {"response"} and isinstance(body["response"], str) and body["response"].strip()


def test_readme_shows_the_curl_example():
    readme = PROJECT_ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("README.md is not written yet")
    assert CURL_EXAMPLE in readme.read_text(encoding="utf-8"), "README.md must show utils.api_app.CURL_EXAMPLE"


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

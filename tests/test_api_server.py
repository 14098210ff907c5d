"""The API under a real uvicorn server in this process (a thread on a loopback port, with the
settings api_demo.py uses: utils.api_app.server_settings): clients that leave /api/chat, and
slow or idle connections. Every test opens a bounded number of loopback connections."""
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from config import InferConfig
from model.infer import ChatBot
from utils.api_app import create_app, server_settings

LONG = 2000  # tokens /api/chat would generate for each request: far more than fit in 0.3 s


@pytest.fixture(scope="module")
def bot(chatty_model_dir):
    return ChatBot(InferConfig(model_dir=str(chatty_model_dir), max_seq_len=LONG))


@contextmanager
def serving(bot, **settings):
    import uvicorn

    config = InferConfig(model_dir=bot.config.model_dir, max_new_tokens_cap=4096, **settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config, bot), log_level="warning", **server_settings(config)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def wait_idle(base: str) -> int:
    """tokens_generated once no request is active (and the last generation has counted its steps)."""
    deadline = time.monotonic() + 60
    while httpx.get(base + "/health", trust_env=False).json()["active_requests"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    return httpx.get(base + "/health", trust_env=False).json()["tokens_generated"]


def test_clients_leaving_api_chat_stop_their_generations(bot):
    with serving(bot) as port:
        base = f"http://127.0.0.1:{port}"
        before = wait_idle(base)
        clients = [threading.Thread(target=lambda: pytest.raises(httpx.TimeoutException, httpx.post,
                                                                 base + "/api/chat", json={"input_txt": "你好"},
                                                                 timeout=0.3, trust_env=False))
                   for _ in range(3)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        generated = wait_idle(base) - before
        # before: each of the three ran its whole 2,000-token answer for nobody
        assert generated < LONG, f"{generated} tokens generated for three clients that left after 0.3 s"
        r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "你好"}],
                                                             "max_tokens": 2}, timeout=30, trust_env=False)
        assert r.status_code == 200


def closed_within(sock: socket.socket, seconds: float, drip: bytes = b"") -> float | None:
    """Seconds until the server closes `sock` (None if still open after `seconds`), sending
    `drip` one byte every 0.2 s meanwhile (a client sending its headers very slowly)."""
    t0 = time.monotonic()
    sock.settimeout(0.2)
    sent = 0
    while time.monotonic() - t0 < seconds:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - t0
        except socket.timeout:
            pass
        except ConnectionError:
            return time.monotonic() - t0
        if drip:
            try:
                sock.send(drip[sent % len(drip):sent % len(drip) + 1])
            except OSError:
                return time.monotonic() - t0
            sent += 1
    return None


def test_idle_and_slow_header_connections_are_closed(bot):
    with serving(bot, header_timeout=1.0) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        slow = socket.create_connection(("127.0.0.1", port))
        try:
            for s in idle:
                waited = closed_within(s, 6)
                assert waited is not None and waited < 3, "an idle connection stayed open"
            waited = closed_within(slow, 6, drip=b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 200)
            assert waited is not None and waited < 3, "a connection sending a header byte every 0.2 s stayed open"
        finally:
            for s in idle + [slow]:
                s.close()
        # a client that sends its request in time is served, and kept alive between requests
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
            assert http.get("/health").status_code == 200
            time.sleep(0.5)
            assert http.get("/health").status_code == 200


def test_connections_beyond_the_limit_are_closed(bot):
    with serving(bot, max_connections=4, header_timeout=30.0) as port:
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        try:
            time.sleep(0.5)
            closed = [s for s in socks if closed_within(s, 0.5) is not None]
            assert len(closed) == 4, f"{len(closed)} of 8 connections closed with max_connections=4"
        finally:
            for s in socks:
                s.close()
        time.sleep(0.3)
        assert httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).status_code == 200


def test_slow_body_gets_408(bot):
    with serving(bot, body_timeout=1.0) as port:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 50\r\n\r\n{\"input_txt\":")
            s.settimeout(10)
            t0 = time.monotonic()
            reply = s.recv(4096)
            answered = time.monotonic() - t0
            while chunk := s.recv(4096):  # the body may come in a later segment than the headers
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert b"body_timeout" in reply and answered < 5


def test_concurrent_requests_on_both_endpoints_share_a_batch(chatty_model_dir, monkeypatch):
    short = ChatBot(InferConfig(model_dir=str(chatty_model_dir), max_seq_len=8))
    sizes, gate = [], threading.Event()
    real = short._generate_batch

    def spy(jobs):  # the first batch waits for the gate: the requests sent meanwhile queue up
        sizes.append(len(jobs))
        if len(sizes) == 1:
            gate.wait(60)
        return real(jobs)

    monkeypatch.setattr(short, "_generate_batch", spy)
    with serving(short) as port:
        base = f"http://127.0.0.1:{port}"
        results = {}

        def ask(name, path, body):
            results[name] = httpx.post(base + path, json=body, timeout=120, trust_env=False).json()

        requests = [("first", "/v1/chat/completions", {"messages": [{"role": "user", "content": "早"}], "max_tokens": 2}),
                    ("chat1", "/api/chat", {"input_txt": "你好"}), ("chat2", "/api/chat", {"input_txt": "再见"}),
                    ("v1", "/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 5}),
                    ("v1s", "/v1/chat/completions", {"messages": [{"role": "user", "content": "再见"}],
                                                     "max_tokens": 3, "temperature": 0.8})]
        threads = [threading.Thread(target=ask, args=args) for args in requests]
        threads[0].start()
        deadline = time.monotonic() + 60
        while not sizes:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for t in threads[1:]:
            t.start()
        while len(short.batcher.queue) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        gate.set()
        for t in threads:
            t.join(120)
    assert sizes == [1, 4]
    assert results["chat1"] == {"response": short.chat("你好")}
    assert results["chat2"] == {"response": short.chat("再见")}
    assert results["v1"]["choices"][0]["message"]["content"] == short.chat("你好", max_new_tokens=5)
    assert results["v1"]["usage"]["completion_tokens"] == 5 and results["v1s"]["usage"]["completion_tokens"] == 3

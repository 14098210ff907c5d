"""The chat page (GET /) in headless Chromium against a live api_demo.py: type a question,
press Enter, and watch a streamed answer appear.

Chromium is driven through the DevTools protocol over `--remote-debugging-pipe`: JSON
messages separated by NUL bytes on file descriptors 3 (commands) and 4 (replies/events).
Chosen over a websocket debugging port because it needs no extra package, no free port and
no waiting for DevToolsActivePort, and over `--dump-dom` because the test can type and press
Enter like a user and poll the page while the answer streams in. The small client below is
hand-written for that reason (no CDP client library is installed).
"""
import fcntl
import json
import os
import shutil
import subprocess
import threading
import time

import httpx
import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-pipe"]


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools:
    """A minimal DevTools protocol client over Chromium's debugging pipe."""

    def __init__(self, binary: str, user_data_dir: str, log_file) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # Park the child's ends on high descriptors, so placing them on 3 and 4 cannot clobber each other.
        child_in = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 100)
        child_out = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 100)
        os.close(to_child_r)
        os.close(from_child_w)

        def wire_pipe():  # runs in the child before exec; dup2'ed descriptors are inherited
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                                     preexec_fn=wire_pipe, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=log_file, stderr=log_file)
        os.close(child_in)
        os.close(child_out)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            data = os.read(self._from_child, 65536)
            if not data:
                break
            buf += data
            *messages, buf = buf.split(b"\0")
            with self._cond:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        with self._cond:
            self._next_id += 1
            mid = self._next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    raise TimeoutError(f"no DevTools reply to {method}")
                self._cond.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)


class Page:
    def __init__(self, devtools: DevTools) -> None:
        self.dt = devtools
        target = devtools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = devtools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Runtime.enable")

    def send(self, method, params=None, timeout=30):
        return self.dt.send(method, params, session=self.session, timeout=timeout)

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"page never satisfied: {expression}")

    def type_and_enter(self, text: str) -> None:
        self.eval("document.getElementById('input').focus()")
        self.send("Input.insertText", {"text": text})
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                 "windowsVirtualKeyCode": 13, "text": "\r" if kind == "keyDown" else ""})


MESSAGES_JS = ("JSON.stringify([...document.querySelectorAll('#messages .msg')].map(e => ({"
               "role: e.className.replace('msg ', ''), text: e.textContent, chunks: e.dataset.chunks, "
               "done: e.dataset.done})))")


def test_page_streams_an_answer(live_api, tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary (tests/run.sh installs Debian's chromium when run as root)")
    base, _ = live_api

    def api_answer(question: str) -> str:  # greedy: the page must show exactly this answer
        r = httpx.post(base + "/v1/chat/completions", trust_env=False, timeout=60,
                       json={"messages": [{"role": "user", "content": question}]})
        return r.json()["choices"][0]["message"]["content"]

    with open(tmp_path / "chromium.log", "w") as log:
        devtools = DevTools(binary, str(tmp_path / "profile"), log)
        try:
            page = Page(devtools)
            page.send("Page.navigate", {"url": base + "/"})
            page.wait_for("document.readyState === 'complete' && !!document.getElementById('input')")

            partial_seen = False
            for turn, question in enumerate(["你好", "感冒了要怎么办"]):
                page.type_and_enter(question)
                deadline = time.monotonic() + 60
                while True:
                    messages = json.loads(page.eval(MESSAGES_JS))
                    if len(messages) == 2 * turn + 2:
                        answer = messages[-1]
                        if answer["done"] == "false" and answer["text"]:
                            partial_seen = True  # caught mid-stream (timing-dependent, not asserted)
                        if answer["done"] == "true":
                            break
                    assert time.monotonic() < deadline, f"no finished answer on the page: {messages}"
                    time.sleep(0.02)
                assert [m["role"] for m in messages] == ["user", "assistant"] * (turn + 1)
                assert messages[-2]["text"] == question
                assert answer["text"] == api_answer(question)
                # The server's max_seq_len is 24 and each token is one character: 24 separate chunks.
                assert int(answer["chunks"]) == 24
                assert page.eval("document.getElementById('input').value") == ""
            errors = [e for e in devtools.events if e.get("method") == "Runtime.exceptionThrown"]
            assert errors == [], errors
            print(f"answer caught mid-stream: {partial_seen}")
        finally:
            devtools.close()

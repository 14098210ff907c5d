"""cli_demo.py: the real script in a pseudo-terminal (live streaming, Ctrl+C), and the chat loop
in process with piped-style stdin (commands, streamed and non-streamed answers, end of input)."""
import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest
from rich.console import Console

from config import PROJECT_ROOT, InferConfig
from model.infer import ChatBot
from utils.chat_console import WELCOME, run_chat

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def cli_env() -> dict:
    # One torch thread: a tiny model is fastest that way and the test machine's cores are shared.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="200")


@pytest.fixture(scope="module")
def bot(chatty_model_dir):
    return ChatBot(InferConfig(model_dir=str(chatty_model_dir), max_seq_len=10))


def test_chat_loop_streams_and_ends_at_end_of_input(bot, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n感冒了要怎么办\n"))  # no `exit`: EOF ends it
    out = io.StringIO()
    history = run_chat(bot, stream=True, console=Console(file=out, width=200, force_terminal=False))
    assert history == [("你好", bot.chat("你好")), ("感冒了要怎么办", bot.chat("感冒了要怎么办"))]
    text = out.getvalue()
    assert text.startswith(WELCOME) and text.rstrip().endswith("再见！")
    assert bot.chat("你好") in text and bot.chat("感冒了要怎么办") in text


def test_commands_and_non_streaming_answers(bot, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n\n感冒了要怎么办\ncls\n再见\nexit\n不会被问到\n"))
    out = io.StringIO()
    history = run_chat(bot, stream=False, console=Console(file=out, width=200, force_terminal=False))
    assert [q for q, _ in history] == ["再见"]  # `cls` forgot the first two turns, `exit` came before the last
    text = out.getvalue()
    assert text.count(WELCOME) == 2  # once at start, once after `cls`
    assert text.count("请输入问题") == 1  # the empty line
    assert text.count("ChatBot：") == 3
    for question in ("你好", "感冒了要怎么办", "再见"):
        assert bot.chat(question) in text
    assert text.rstrip().endswith("再见！")


def _read_until(fd: int, buf: list, done, timeout: float) -> str:
    """Read the terminal into `buf` until done(text) holds (text: the output without ANSI codes)."""
    if isinstance(done, str):
        pattern = done
        done = lambda text: pattern in text  # noqa: E731
    deadline = time.monotonic() + timeout
    while True:
        text = ANSI.sub("", b"".join(buf).decode("utf-8", "replace"))
        if done(text):
            return text
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting; output so far:\n{text[-2000:]}")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"the program ended first; output:\n{text[-2000:]}")
            buf.append(data)


def test_pty_streams_live_and_ctrl_c_stops_cleanly(chatty_model_dir):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))

    def controlling_terminal():  # a new session whose terminal is the pty, so ^C becomes SIGINT
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    # max_seq_len 1024: the answer takes far longer than the test waits, so ^C lands mid-stream.
    proc = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "cli_demo.py"), "--model_dir", str(chatty_model_dir),
                             "--max_seq_len", "1024"], stdin=slave, stdout=slave, stderr=slave, env=cli_env(),
                            start_new_session=True, preexec_fn=controlling_terminal, cwd="/")
    os.close(slave)
    buf: list = []
    try:
        _read_until(master, buf, "用户：", timeout=180)
        os.write(master, "你好\n".encode())
        # Wait until some of the answer has been drawn live, well before it can be complete.
        text = _read_until(master, buf, lambda t: "ChatBot：" in t and len(t.split("ChatBot：", 1)[1].strip()) >= 3,
                           timeout=60)
        t0 = time.monotonic()
        os.write(master, b"\x03")  # Ctrl+C
        text = _read_until(master, buf, "再见！", timeout=30)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 30  # the 1024-token generation was stopped, not waited for
        assert "（已中断）" in text and "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)

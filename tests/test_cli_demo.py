"""cli_demo.py: the real script in a pseudo-terminal (live streaming, Ctrl+C), and the chat loop
in process with piped-style stdin (commands, streamed and non-streamed answers, end of input).

The Ctrl+C tests do not depend on the machine's speed: tests/fixtures/cli_demo_held.py holds
open the moment each Ctrl+C must land in (an answer still streaming, the gap after an answer)."""
import contextlib
import fcntl
import io
import os
import pty
import re
import select
import signal
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


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # a UTF-8 locale's stdin, and C/POSIX's
def test_a_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(bot, monkeypatch, errors):
    """Bytes that are not UTF-8 got a traceback (the tokenizer takes no surrogates; strict
    decoding raised); now that line is refused in one line and the next one is answered."""
    piped = io.TextIOWrapper(io.BytesIO(b"\xff\xfe ok\n" + "你好\n".encode()), encoding="utf-8", errors=errors)
    monkeypatch.setattr(sys, "stdin", piped)
    out = io.StringIO()
    history = run_chat(bot, stream=True, console=Console(file=out, width=200, force_terminal=False))
    assert history == [("你好", bot.chat("你好"))]
    text = out.getvalue()
    assert "输入不是有效的 UTF-8 文本（contains an unpaired surrogate (U+DCFF) at character 0" in text
    assert text.rstrip().endswith("再见！")


def test_a_question_longer_than_max_prompt_tokens_is_answered_with_a_note(chatty_model_dir, monkeypatch):
    short = ChatBot(InferConfig(model_dir=str(chatty_model_dir), max_seq_len=4, max_prompt_tokens=4))
    question = "感冒了要怎么办"
    cut = len(short.tokenizer(question, add_special_tokens=False)["input_ids"]) + 1 - 4
    assert cut > 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{question}\n你好\n"))
    out = io.StringIO()
    run_chat(short, stream=True, console=Console(file=out, width=200, force_terminal=False))
    text = out.getvalue()
    assert text.count("问题过长") == 1  # "你好" + [EOS] fits
    assert f"模型只读了前 4 个词元，末尾 {cut} 个被截去" in text


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


@contextlib.contextmanager
def chat_in_pty(mode: str, model_dir, max_seq_len: int):
    """tests/fixtures/cli_demo_held.py MODE in a pseudo-terminal that is its controlling terminal
    (so a written ^C becomes SIGINT). Yields (process, terminal fd, output buffer)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))

    def controlling_terminal():  # a new session whose terminal is the pty
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        # Ctrl+C's default action, whatever this process inherited: a shell without job
        # control starts background commands (`pytest ... &`) with SIGINT ignored, and an
        # ignored SIGINT stays ignored in every child (all three ^C tests failed so).
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "tests" / "fixtures" / "cli_demo_held.py"), mode,
                             "--model_dir", str(model_dir), "--max_seq_len", str(max_seq_len)],
                            stdin=slave, stdout=slave, stderr=slave, env=cli_env(),
                            start_new_session=True, preexec_fn=controlling_terminal, cwd="/")
    os.close(slave)
    try:
        yield proc, master, []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def _ends_cleanly(proc, master, buf) -> str:
    """After the Ctrl+C: `再见！`, exit status 0, no traceback; returns the screen text."""
    text = _read_until(master, buf, "再见！", timeout=30)
    assert proc.wait(timeout=30) == 0, text[-2000:]
    text = ANSI.sub("", b"".join(buf).decode("utf-8", "replace"))
    assert "Traceback" not in text and "interrupted" not in text
    return text


def test_pty_streams_live_and_ctrl_c_stops_the_answer(chatty_model_dir):
    # mid_answer: after 4 tokens the answer waits for its stop, so ^C comes while it streams
    # on any machine; the program only ends if ^C stopped the generation (join waits for it).
    with chat_in_pty("mid_answer", chatty_model_dir, 1024) as (proc, master, buf):
        _read_until(master, buf, "用户：", timeout=180)
        os.write(master, "你好\n".encode())
        # Some of the answer drawn live before the answer is complete.
        _read_until(master, buf, lambda t: "ChatBot：" in t and len(t.split("ChatBot：", 1)[1].strip()) >= 3,
                    timeout=60)
        os.write(master, b"\x03")  # Ctrl+C
        text = _ends_cleanly(proc, master, buf)
        assert "（已中断）" in text and text.count("用户：") == 1


@pytest.mark.parametrize("mode", ["after_answer", "other_thread"])
def test_pty_ctrl_c_between_answer_and_prompt_ends_the_chat(chatty_model_dir, tmp_path, mode):
    """A Ctrl+C right after an answer: in the gap before the prompt (held open 120 s), or at the
    prompt with the signal handled on another thread than the one blocked reading the terminal
    (what happens when it lands just before input() starts reading): both were lost or a
    traceback-less exit 130 before (issue 18)."""
    marker = tmp_path / "answer_ended"
    held = f"after_answer:{marker}" if mode == "after_answer" else mode
    with chat_in_pty(held, chatty_model_dir, 8) as (proc, master, buf):
        _read_until(master, buf, "用户：", timeout=180)
        os.write(master, "你好\n".encode())
        if mode == "after_answer":
            deadline = time.monotonic() + 60
            while not marker.exists():
                assert time.monotonic() < deadline and proc.poll() is None, "the answer did not end"
                if select.select([master], [], [], 0.05)[0]:  # keep reading: a full terminal blocks the writer
                    buf.append(os.read(master, 65536))
        else:
            _read_until(master, buf, lambda t: t.count("用户：") == 2, timeout=60)
        os.write(master, b"\x03")  # Ctrl+C
        _ends_cleanly(proc, master, buf)

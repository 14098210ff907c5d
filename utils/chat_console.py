"""The terminal chat of cli_demo.py: streamed answers rendered live with rich.

Commands: `exit` quits, `cls` clears the screen and the conversation; Ctrl+C or end of
input (Ctrl+D, or the end of piped stdin) ends the chat cleanly, stopping any answer being
generated. Turns stay on screen (rich's Live leaves each finished answer in place).

A Ctrl+C ends the chat whenever it comes: at the prompt, during an answer, or in the
moment between the two (see `TerminalReader` for why input() alone cannot promise that).
"""
from __future__ import annotations

import os
import select
import signal
import sys
import threading
from contextlib import contextmanager

from rich.console import Console
from rich.live import Live
from rich.text import Text

from utils.text_cleaning import unpaired_surrogate

WELCOME = "欢迎使用ChatBot，输入`exit`退出，输入`cls`清屏。"
USER_LABEL = "[bold yellow]用户：[/]"
BOT_LABEL = "[bold green]ChatBot：[/]"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def signals_held(signums=(signal.SIGINT, signal.SIGTERM)):
    """Hold Ctrl+C (and SIGTERM) back during a clean-up block, then deliver it.

    A KeyboardInterrupt raised inside rich's Live.stop() left its refresh thread running,
    repainting the answer over `再见！` (seen with a Ctrl+C placed there on purpose).
    """
    if not _in_main_thread():  # only the main thread may set handlers (and receives the interrupt)
        yield
        return
    caught: list[int] = []
    previous = {}
    for signum in signums:
        if signal.getsignal(signum) is not None:  # None: a handler set outside Python, left alone
            previous[signum] = signal.signal(signum, lambda n, _frame: caught.append(n))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):  # now the usual handler: KeyboardInterrupt, or SIGTERM's
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


class TerminalReader:
    """Reads the chat's input lines from a terminal so that a Ctrl+C always ends the wait.

    input() blocks in read(2). Python's SIGINT handler only notes the signal; the
    KeyboardInterrupt is raised when the main thread next runs Python code, which it does
    when read(2) fails with EINTR. A SIGINT handled just before read(2) started, or on
    another thread (torch's and tokenizers' threads can take it), interrupts nothing: the
    chat sat at its prompt, `用户：^C` on screen, until Enter (issue 18; here once in 38 tries
    with the Ctrl+C sent at a random moment near the end of an answer, main thread in read(2)).
    Here the line is read after select() on the terminal
    and on signal.set_wakeup_fd's pipe, which the signal handler writes to whenever and
    wherever it runs, so select() returns and the KeyboardInterrupt follows at once.

    The terminal stays in its normal (canonical) mode, so typing, erasing and Ctrl+D work
    as with input(), and each read(2) returns at most one line.
    """

    def __init__(self, fd: int, encoding: str = "utf-8", errors: str = "strict") -> None:
        self.fd, self.encoding, self.errors = fd, encoding, errors
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)  # set_wakeup_fd requires it
        self._previous = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    @classmethod
    def for_stdin(cls) -> "TerminalReader | None":
        """A reader of sys.stdin when it is a terminal (POSIX, main thread), else None (use input())."""
        if os.name != "posix" or not _in_main_thread():
            return None
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError):  # replaced by a StringIO, closed...
            return None
        if not os.isatty(fd):
            return None  # a pipe or file: TextIOWrapper's read-ahead would hide lines from select()
        return cls(fd, sys.stdin.encoding or "utf-8", "surrogateescape")  # see read_question

    def readline(self) -> str:
        """The next line without its newline; EOFError at end of input (Ctrl+D)."""
        data = b""
        while True:
            ready, _, _ = select.select([self.fd, self._wake_r], [], [])
            if self._wake_r in ready:  # a signal came: its handler runs as soon as this returns
                try:
                    while os.read(self._wake_r, 512):  # drain it (non-blocking)
                        pass
                except BlockingIOError:
                    pass
            if self.fd in ready:
                chunk = os.read(self.fd, 4096)
                if not chunk:  # Ctrl+D on an empty line
                    if data:
                        break
                    raise EOFError
                data += chunk
                if chunk.endswith(b"\n"):
                    break
        return data.decode(self.encoding, self.errors).removesuffix("\n")

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous)
        os.close(self._wake_r)
        os.close(self._wake_w)


def read_question(console: Console, reader: TerminalReader | None) -> str:
    """The next line; ValueError saying why when it is not text the tokenizer can take: bytes
    that are not UTF-8 arrive as surrogates (both readers decode with surrogateescape)."""
    if reader is None:
        text = console.input(USER_LABEL)
    else:
        console.print(USER_LABEL, end="")  # what console.input prints before calling input()
        text = reader.readline()
    problem = unpaired_surrogate(text)
    if problem:
        raise ValueError(f"{problem}, from bytes that are not UTF-8")
    return text


def stream_answer(bot, question: str, console: Console) -> str:
    """Show the answer piece by piece as it is generated; returns it."""
    answer = Text()
    live = Live(answer, console=console, refresh_per_second=15, transient=False)
    stream = bot.stream_chat(question)
    try:
        live.start()
        for piece in stream:
            answer.append(piece)
            live.update(answer)
    finally:
        with signals_held():
            live.stop()
            stream.stop()  # no-op when done; on Ctrl+C the generation thread ends within one step
        stream.join()
    return answer.plain


def wait_answer(bot, question: str, console: Console) -> str:
    """Generate the whole answer behind a spinner (any search type), then print it."""
    status = console.status("思考中…", spinner="dots")
    status.start()
    try:
        answer = bot.chat(question)
    finally:
        with signals_held():
            status.stop()
    console.print(Text(answer))
    return answer


def run_chat(bot, stream: bool = True, console: Console | None = None) -> list[tuple[str, str]]:
    """The read-answer loop; returns the conversation as (question, answer) pairs."""
    console = console or Console(highlight=False)
    history: list[tuple[str, str]] = []
    reader = TerminalReader.for_stdin()
    if reader is None and hasattr(sys.stdin, "reconfigure"):
        # strict decoding would drop the whole buffered chunk with a bad byte, later lines too;
        # this way only the line holding it is refused (read_question)
        sys.stdin.reconfigure(errors="surrogateescape")
    answering = False
    try:
        console.print(WELCOME, markup=False)
        while True:
            try:
                question = read_question(console, reader).strip()
            except EOFError:
                console.print()
                break
            except ValueError as exc:
                console.print(f"输入不是有效的 UTF-8 文本（{exc}），请重新输入", markup=False)
                continue
            if not question:
                console.print("请输入问题")
                continue
            if question.lower() == "exit":
                break
            if question.lower() == "cls":
                history.clear()
                console.clear()
                console.print(WELCOME, markup=False)
                continue
            cut = bot.tokens_cut(question)
            if cut:  # said, not done silently: the answer is to the question's start only
                console.print(f"（问题过长：模型只读了前 {bot.config.max_prompt_tokens} 个词元，末尾 {cut} 个被截去；"
                              "可用 --max_prompt_tokens 调整）", markup=False)
            console.print(BOT_LABEL)
            answering = True
            answer = (stream_answer if stream else wait_answer)(bot, question, console)
            answering = False
            history.append((question, answer))
            console.print()
    except KeyboardInterrupt:  # at any moment: at the prompt, during an answer or between the two
        console.print("\n（已中断）" if answering else "")
    finally:
        if reader is not None:
            reader.close()
    console.print("再见！")
    return history

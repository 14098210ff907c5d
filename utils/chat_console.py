"""The terminal chat of cli_demo.py: streamed answers rendered live with rich.

Commands: `exit` quits, `cls` clears the screen and the conversation; Ctrl+C or end of
input (Ctrl+D, or the end of piped stdin) ends the chat cleanly, stopping any answer being
generated. Turns stay on screen (rich's Live leaves each finished answer in place).
"""
from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.text import Text

WELCOME = "欢迎使用ChatBot，输入`exit`退出，输入`cls`清屏。"
USER_LABEL = "[bold yellow]用户：[/]"
BOT_LABEL = "[bold green]ChatBot：[/]"


def stream_answer(bot, question: str, console: Console) -> str:
    """Show the answer piece by piece as it is generated; returns it."""
    stream = bot.stream_chat(question)
    answer = Text()
    try:
        with Live(answer, console=console, refresh_per_second=15, transient=False) as live:
            for piece in stream:
                answer.append(piece)
                live.update(answer)
    finally:
        stream.stop()  # no-op when done; on Ctrl+C the generation thread ends within one step
        stream.join()
    return answer.plain


def wait_answer(bot, question: str, console: Console) -> str:
    """Generate the whole answer behind a spinner (any search type), then print it."""
    with console.status("思考中…", spinner="dots"):
        answer = bot.chat(question)
    console.print(Text(answer))
    return answer


def run_chat(bot, stream: bool = True, console: Console | None = None) -> list[tuple[str, str]]:
    """The read-answer loop; returns the conversation as (question, answer) pairs."""
    console = console or Console(highlight=False)
    console.print(WELCOME, markup=False)
    history: list[tuple[str, str]] = []
    while True:
        try:
            question = console.input(USER_LABEL).strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            break
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
        console.print(BOT_LABEL)
        try:
            answer = (stream_answer if stream else wait_answer)(bot, question, console)
        except KeyboardInterrupt:
            console.print("\n（已中断）")
            break
        history.append((question, answer))
        console.print()
    console.print("再见！")
    return history

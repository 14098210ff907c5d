"""The one command-line mechanism of the project.

Every root script is `main()` wrapped in `run_cli`, and reads its settings with
`parse_config(SomeConfig)`: each dataclass field becomes `--field value` (`--field=value`
works too, booleans accept True/False/yes/no/1/0), `--help` lists every field with its
default. transformers' HfArgumentParser does the parsing; this module adds the optional
leading sub-command (`train.py train`, `dpo_train.py merge`) and the rule that bad input
ends in one line on stderr and exit status 2, never in a traceback. SIGTERM (`kill`,
`timeout`, a job scheduler) is handled like Ctrl+C: the run unwinds, removing its scratch
and partial outputs, and ends in one line with exit status 143 (130 for Ctrl+C).
"""
from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import fields
from typing import Callable, Sequence, TypeVar

# UserError, the file checks and is_given live on model/'s ground floor (model/common.py), which
# model/ imports without reaching up into utils/; they are re-exported here for the scripts.
from model.common import _GIVEN, UserError, is_given, require_file, require_writable  # noqa: F401

T = TypeVar("T")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl+C's KeyboardInterrupt so the same clean-up runs (a subclass:
    every `except KeyboardInterrupt` and `finally` that tidies up after Ctrl+C covers it)."""


def _raise_terminated(signum, frame):
    # A second SIGTERM during the clean-up stops at once (the default action), as Ctrl+C
    # does in the trainers; scratch it leaves is removed by the next run.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated


def parse_config(config_cls: type[T], argv: Sequence[str] | None = None,
                 commands: Sequence[str] | None = None, default_command: str | None = None,
                 description: str | None = None) -> tuple[str | None, T]:
    """Parse `[command] --field value ...` into (command, config_cls instance).

    Unknown flags are an error (a typo must not silently train with a default).
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    command = default_command
    if commands:
        if argv and not argv[0].startswith("-"):
            command = argv.pop(0)
            if command not in commands:
                raise UserError(f"unknown command {command!r}; expected one of: {', '.join(commands)}")
    # allow_abbrev=False: argparse would otherwise accept "--epoch" for "--epochs", and a
    # misspelt flag must fail rather than silently match a different field.
    parser = HfArgumentParser(config_cls, description=description, allow_abbrev=False,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    for action in parser._actions:
        if action.dest != "help" and not action.help:
            action.help = "(default: %(default)s)"
    if commands:
        parser.usage = f"%(prog)s [{'|'.join(commands)}] [--field value ...]"
    cfg, rest = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False,
                                                   return_remaining_strings=True)
    options = parser._option_string_actions  # argparse's map of "--flag" to its action
    if rest:
        raise UserError(_unknown_arguments(rest, options, parser.prog))
    setattr(cfg, _GIVEN, frozenset(options[a.split("=", 1)[0]].dest for a in argv
                                   if a.startswith("--") and a.split("=", 1)[0] in options))
    return command, cfg


def _unknown_arguments(rest: list[str], options, prog: str) -> str:
    """One line naming what was not understood, with the nearest setting's name for a typo."""
    import difflib

    flags = [a.split("=", 1)[0] for a in rest if a.startswith("-")]
    if not flags:
        return f"unexpected argument {rest[0]!r}: settings are given as --name value (`{prog} --help` lists them)"
    near = difflib.get_close_matches(flags[0], [o for o in options if o.startswith("--")], n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return (f"unknown setting{'s' if len(flags) > 1 else ''} {', '.join(flags)}{hint}: "
            f"`{prog} --help` lists every setting")


def config_fields(config_cls) -> list[str]:
    return [f.name for f in fields(config_cls)]


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(); turn UserError, Ctrl+C and SIGTERM into a one-line exit."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)  # (run_cli runs in the main thread)
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if previous is not None:  # None: a handler installed outside Python, never replaced here
            signal.signal(signal.SIGTERM, previous)

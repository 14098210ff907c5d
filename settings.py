"""Valid values of settings, checked whenever a config dataclass is made (command line or code),
and `UserError`, the one-line error they (and every other check of user input) raise.

    @dataclass
    class TrainConfig(Settings, rules={"epochs": at_least(1), "optimizer": one_of("adamw", "adafactor")},
                      checks=(lambda c: "" if ... else "what is wrong",)):
        epochs: int = 8

A config dataclass that derives from `Settings` checks every field named in its `rules`,
then each of its `checks` (settings that must agree with each other; each returns "" or
what is wrong), in `__post_init__`:
so `parse_config` (which builds the dataclass), `dataclasses.replace` and code that
builds a config directly all get the same one-line UserError, e.g.
`--ngram must be an integer >= 1, got 0`, before anything is read or trained. A NaN or
an infinity is never a valid number. argparse only converts types; it has no ranges.

It sits beside config.py, below model/ and utils/, and imports nothing of the project:
config.py builds on it, so nothing config.py reads may import model/ or utils/
(tests/test_layering.py checks the direction of every import).
"""
from __future__ import annotations

import math
import re
from typing import Callable, ClassVar, NamedTuple


class UserError(Exception):
    """Bad input a user can fix (missing file, malformed config...). Printed as one line."""


class Rule(NamedTuple):
    ok: Callable[[object], bool]
    text: str  # what a valid value is: "an integer >= 1"


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def at_least(n: int, note: str = "") -> Rule:
    return Rule(lambda v: _int(v) and v >= n, f"an integer >= {n}{note}")


def unset_or_at_least(n: int = 1, meaning: str = "no limit") -> Rule:
    """The documented -1 sentinel, or a real count."""
    return Rule(lambda v: _int(v) and (v == -1 or v >= n), f"-1 ({meaning}) or an integer >= {n}")


def in_range(lo: int, hi: int) -> Rule:
    return Rule(lambda v: _int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi}]")


def positive() -> Rule:
    return Rule(lambda v: _number(v) and v > 0, "a finite number > 0")


def non_negative() -> Rule:
    return Rule(lambda v: _number(v) and v >= 0, "a finite number >= 0")


def fraction(low_open: bool = False, high_open: bool = False) -> Rule:
    """A number in [0, 1], either end optionally excluded."""
    def ok(v) -> bool:
        return _number(v) and (0 < v if low_open else 0 <= v) and (v < 1 if high_open else v <= 1)
    return Rule(ok, f"a number in {'(' if low_open else '['}0, 1{')' if high_open else ']'}")


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, "one of: " + ", ".join(choices))


def matches(pattern: str, text: str) -> Rule:
    regex = re.compile(pattern)
    return Rule(lambda v: isinstance(v, str) and regex.fullmatch(v) is not None, text)


def names_from(*names: str) -> Rule:
    """A comma-separated list of at least one of `names`."""
    def ok(v) -> bool:
        items = [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else []
        return bool(items) and set(items) <= set(names)
    return Rule(ok, "a comma-separated list of one or more of: " + ", ".join(names))


SEED = in_range(0, 2**32 - 1)  # numpy's seeding takes no more (transformers' set_seed seeds it)


class Settings:
    """Base of the config dataclasses: checks `rules` and `checks` when an instance is made."""
    rules: ClassVar[dict[str, Rule]] = {}
    checks: ClassVar[tuple[Callable[[object], str], ...]] = ()

    def __init_subclass__(cls, rules: dict[str, Rule] | None = None, checks=(), **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.rules, cls.checks = dict(rules or {}), tuple(checks)

    def __post_init__(self) -> None:
        for name, rule in type(self).rules.items():
            value = getattr(self, name)
            if not rule.ok(value):
                raise UserError(f"--{name} must be {rule.text}, got {value!r}")
        for check in type(self).checks:
            problem = check(self)
            if problem:
                raise UserError(problem)

"""argparse ``type=`` callables that range-check numbers at parse time.

A bad value becomes argparse's usage error (exit code 2) naming the option and what it expects,
before any work starts: ``--repeats -1`` or ``--seeds 1e30`` never reach the code that uses them.
"""
from __future__ import annotations

import argparse
import math

INT64_MAX = 2 ** 63 - 1


def _integer(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(minimum: int, maximum: int = INT64_MAX):
    """An integer in [minimum, maximum]."""
    def parse(text: str) -> int:
        value = _integer(text)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected an integer in [{minimum}, {maximum}], got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def float_at_least(minimum: float, *, inclusive: bool = True):
    """A finite number >= minimum (> minimum when not ``inclusive``)."""
    def parse(text: str) -> float:
        value = _number(text)
        if value < minimum or (not inclusive and value == minimum):
            raise argparse.ArgumentTypeError(
                f"expected a number {'>=' if inclusive else '>'} {minimum:g}, got {value:g}")
        return value
    parse.__name__ = f"number {'>=' if inclusive else '>'} {minimum:g}"
    return parse


def parsed_with(parse, what: str):
    """Wraps a parser raising ValueError (e.g. the sweep grid's list parsers) for argparse."""
    def convert(text: str):
        try:
            parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text  # kept as written: the command parses it again with the same function
    convert.__name__ = what
    return convert


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
seed_int = int_at_least(0)

"""Command-line plumbing shared by ``optiscope`` (`optiscope.cli`) and its ``bench`` command
(`optiscope.bench.cli`): a parser that reports a malformed command line in one line, and the
argument types both use. Imports nothing from optiscope, so that neither command imports the
other to get them.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["OneLineParser", "positive_int", "nonnegative_int", "positive_float", "size"]


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input as one line, the reason (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    return _integer(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """A whole number >= 0."""
    return _integer(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def size(text: str) -> int:
    """A count of parameters: a whole number >= 1, in e-notation too (``1e6``)."""
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be a positive integer like 1000000 or 1e6, "
                                         f"got {text!r}") from None
    if value != value or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"size must be a positive integer, got {text}")
    return int(value)

"""Command-line value parsing shared by every subcommand's parser (a leaf: imports only errors).
A bad value is a UsageError: one `error: ...` line and exit 2, like every other error."""

from __future__ import annotations

import argparse
import math
import os

from rewriter.errors import UsageError, first_line


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UsageError (argparse itself prints the usage block
    and exits)."""

    def error(self, message):
        raise UsageError(message)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"want a positive integer, got {text!r}")
    return value


def tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"want a finite number >= 0, got {text!r}")
    return value


def int_list(text: str, option: str = "--tokens", least: int = 1) -> list[int]:
    """"1,128,512" -> [1, 128, 512] ("" -> []); UsageError naming `option` unless each is >= `least`."""
    items = [t for t in str(text).replace(" ", "").split(",") if t]
    if not all(t.isdigit() and int(t) >= least for t in items):
        raise UsageError(f"{option} {text!r}: want integers >= {least} separated by commas")
    return [int(t) for t in items]


def printable(text) -> str:
    """`text` as any stream can print it: a path from non-UTF-8 bytes (os.fsdecode gives lone
    surrogates) is shown with backslash escapes instead of failing to encode."""
    return os.fspath(text).encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(exc: BaseException, limit: int = 300) -> str:
    return printable(first_line(exc, limit))

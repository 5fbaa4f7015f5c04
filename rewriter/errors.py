"""Errors the CLI turns into one line on stderr and a documented exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1     # outputs differ beyond the tolerance
EXIT_USAGE = 2             # bad command line (argparse's own code)
EXIT_BAD_INPUT = 3         # not ONNX, truncated, missing/short external data
EXIT_UNSUPPORTED = 4       # invalid graph, unknown opset or domain
EXIT_OUTPUT = 5            # cannot write the output (or would overwrite the input)
EXIT_NOTHING = 6           # no normalization in the model


class RewriterError(Exception):
    exit_code = EXIT_BAD_INPUT


class BadInput(RewriterError):
    exit_code = EXIT_BAD_INPUT


class Unsupported(RewriterError):
    exit_code = EXIT_UNSUPPORTED


class OutputError(RewriterError):
    exit_code = EXIT_OUTPUT


class NothingToRewrite(RewriterError):
    exit_code = EXIT_NOTHING


class VerificationFailed(RewriterError):
    exit_code = EXIT_VERIFY_FAILED

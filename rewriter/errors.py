"""Errors the CLI turns into one line on stderr and a documented exit code.

    0 ok                  3 bad input            6 no normalization found
    1 verification failed 4 unsupported/invalid  7 internal error (a bug: rerun with --debug)
    2 usage               5 cannot write output  8 the models cannot be run (onnxruntime)
                                                 130 interrupted (nothing written)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1     # outputs differ beyond the tolerance
EXIT_USAGE = 2             # bad command line (argparse's own code)
EXIT_BAD_INPUT = 3         # not ONNX, truncated, missing/short/unreadable external data, bad cost file
EXIT_UNSUPPORTED = 4       # invalid graph, unknown opset or domain
EXIT_OUTPUT = 5            # cannot write the output, or it would replace a file it must not
EXIT_NOTHING = 6           # no normalization in the model
EXIT_INTERNAL = 7          # a bug: an exception we did not foresee, or a rewritten model that fails
                           # its own checks (--debug shows the traceback)
EXIT_CANNOT_RUN = 8        # verification could not run the models at all (onnxruntime refused to
                           # load or run one): nothing is known about their outputs, unlike 1
EXIT_INTERRUPTED = 130     # Ctrl-C (nothing written)
EXIT_PIPE_CLOSED = 141     # whoever read our standard output stopped reading (`| head`), as SIGPIPE would

DOCUMENTED_EXIT_CODES = (EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE, EXIT_BAD_INPUT, EXIT_UNSUPPORTED,
                         EXIT_OUTPUT, EXIT_NOTHING, EXIT_INTERNAL, EXIT_CANNOT_RUN, EXIT_INTERRUPTED, EXIT_PIPE_CLOSED)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """One line out of a (multi-line, C++) exception message."""
    text = " ".join(str(exc).split())
    text = text.replace("==> Context: ", "").strip()
    if not text:
        return type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class RewriterError(Exception):
    exit_code = EXIT_BAD_INPUT


class BadInput(RewriterError):
    exit_code = EXIT_BAD_INPUT


class UsageError(RewriterError):
    exit_code = EXIT_USAGE


class Unsupported(RewriterError):
    exit_code = EXIT_UNSUPPORTED


class OutputError(RewriterError):
    exit_code = EXIT_OUTPUT


class NothingToRewrite(RewriterError):
    exit_code = EXIT_NOTHING


class InternalError(RewriterError):
    """The rewriter produced something its own checks reject: a bug, not the user's input."""
    exit_code = EXIT_INTERNAL


class VerificationFailed(RewriterError):
    """Outputs differ beyond the tolerance; `diffs` holds the per-output comparison."""
    exit_code = EXIT_VERIFY_FAILED

    def __init__(self, message: str, diffs=()):
        super().__init__(message)
        self.diffs = list(diffs)


class CannotRun(RewriterError):
    """onnxruntime could not load or run one of the models being compared."""
    exit_code = EXIT_CANNOT_RUN

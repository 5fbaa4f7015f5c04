"""Command line: `python -m rewriter model.onnx -o model_flash.onnx` and subcommands.

    python -m rewriter MODEL -o OUT [--mode defer|fold] [--clone-shared] [--report R.json] [--verify]
    python -m rewriter verify ORIGINAL REWRITTEN [--inputs X.npz] [--tolerance T]
    python -m rewriter bench ORIGINAL [REWRITTEN] [--tokens 1,128,...]
    python -m rewriter calibrate [MODEL] --provider cpu|cuda -o COSTS.json   measure the strategies
    python -m rewriter demo [--workdir DIR]      the main job on a built-in default model

Exit codes (rewriter/errors.py):
    0  ok
    1  verification failed: outputs differ beyond the tolerance (with --verify nothing is written,
       unless --keep-failed, which writes OUT's stem + .failed.onnx)
    2  usage (bad command line, bad option value, bad --external-data name)
    3  bad input: not ONNX, truncated, missing, short or unreadable external data file, bad cost file
    4  unsupported or invalid model: unknown opset or domain, dangling edge, cycle, a node or
       types/shapes that onnx.checker or strict shape inference reject
    5  cannot write the output: it (or --report, or the external data) would replace the input
       or its external data without --overwrite, the output itself, a file another model
       references, a file of the input folder or one the output folder holds (folder mode), or
       something that is not a regular file (a device, FIFO, directory or symlink); nothing is written
    6  no normalization found (nothing written)
    7  internal error, i.e. a bug: an exception nobody foresaw, or a rewritten model that fails
       its own checks (rerun with --debug, report it)
    8  the models cannot be run: onnxruntime failed to load or run one (nothing was compared)
    130 interrupted (nothing written)
    141 the reader of standard output went away (e.g. `| head`): the rest is not printed
Errors print one line on stderr ("error: ..."); --debug shows the traceback. The input is never
modified; the output appears only once complete, checked and (--verify) verified (temporary
folder + rename).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

from rewriter.api import check_outputs, rewrite_file
from rewriter.args import ArgumentParser, int_list, one_line, positive_int, printable, tolerance
from rewriter.costs import CostTable
from rewriter.errors import (EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_PIPE_CLOSED, BadInput, OutputError,
                             RewriterError, UsageError, VerificationFailed)
from rewriter.folders import rewrite_folder
from rewriter.files import check_not_a_model_file
from rewriter.io import check_target
from rewriter.plan import MODES, STRATEGIES, TARGETS, Options
from rewriter.verify import format_verdicts, load_npz, summary

SUBCOMMANDS = ("verify", "explain", "bench", "calibrate", "demo", "quantize")


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    """What decides each site's rewrite (shared by the rewrite and `explain`)."""
    p.add_argument("--mode", choices=MODES, default="defer",
                   help="defer: fold gains and defer 1/RMS past the linears (FlashNorm, default); "
                        "fold: fold gains only, keep a weightless norm")
    p.add_argument("--no-push", action="store_true",
                   help="apply each deferred 1/RMS right after its linear instead of as late as "
                        "the scale algebra allows")
    p.add_argument("--target", choices=tuple(TARGETS),
                   help="choose each site's strategy for this runtime from measured costs "
                        "(built-in tables, or --costs): portable = the paper's form everywhere; "
                        "ort-cuda/ort-cpu = the fastest measured of keep, fold, fold-fused, defer, "
                        "defer-normop, never one measured slower than the reference (fold-fused "
                        "on both); then onnxscript's ORT fusions (see --compose)")
    p.add_argument("--compose", choices=("auto", "always", "never"), default="auto",
                   help="ort-* targets: run onnxscript's ORT fusions (attention, rotary, skip norms, "
                        "GELU) on the rewrite — auto: where the target's measurements say so (not on "
                        "KV-cache graphs on ORT CPU, where its attention made decoding slower)")
    p.add_argument("--costs", metavar="JSON", help="cost file from `python -m rewriter calibrate` "
                   "(default: the target's built-in table)")
    p.add_argument("--tokens", metavar="N,N", help="token counts the chooser optimizes for "
                   "(default: every measured count)")
    p.add_argument("--strategy", choices=tuple(STRATEGIES),
                   help="force one strategy at every site (overrides --mode and --target)")
    p.add_argument("--approx", action="store_true",
                   help="let a deferred scale cancel in a following norm (QK-norm, norm→linear→norm): "
                        "exact only for ε = 0; the measured error is reported")
    p.add_argument("--clone-shared", action="store_true",
                   help="fold into a copy of a weight something else also reads (tied lm_head: + its "
                        "size); default: keep the weight, the gain stays one Mul on that linear's input")
    p.add_argument("--rotate", action="store_true",
                   help="fold the gains (--mode fold; a tied head stays tied), then rotate the residual "
                        "stream by a seeded random-sign Hadamard matrix: the same function, outlier channels "
                        "spread (for quantizers); refused as a whole, with the reason, where not provable")
    p.add_argument("--rotate-seed", type=int, default=0, metavar="N", help="seed of the rotation (default 0)")
    p.add_argument("--rotate-online", action="store_true",
                   help="--rotate, and each stream writer's input (o_proj, down_proj) rotated at run time by a "
                        "Kronecker-factored Hadamard (two small MatMuls); quantize them only with `quantize`, "
                        "which keeps them in float")
    p.add_argument("--rotate-heads", action="store_true",
                   help="--rotate, and V/O rotated head-wise (QuaRot's R2: free at run time; measured neutral on "
                        "real SmolLM2, W8A8 per-tensor slightly worse: README Rotation)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _rewrite_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m rewriter", description="FlashNorm rewrite of an ONNX model "
                       f"(subcommands: {', '.join(SUBCOMMANDS)} — see --help of each)")
    p.add_argument("model", help="input .onnx (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnx (written atomically)")
    _add_plan_options(p)
    p.add_argument("--report", metavar="JSON", help="write the per-site report here")
    p.add_argument("--verify", action="store_true",
                   help="run both models and compare before the output is renamed into place: "
                        "on a difference nothing is written (exit 1)")
    p.add_argument("--keep-failed", action="store_true",
                   help="with --verify: write a model that fails it as OUT's stem + .failed.onnx")
    p.add_argument("--external-data", metavar="NAME",
                   help="write weights to this file (a name, beside the output); default: "
                        "OUTPUT.data when the input had external data or the model passes 2 GiB")
    p.add_argument("--overwrite", action="store_true",
                   help="allow OUTPUT to be the input path (replaced atomically, with its external data)")
    p.add_argument("--measure", nargs="?", const="1,128", metavar="N,N",
                   help="choose on the whole model: rewrite it every way (the options given, each strategy "
                        "everywhere, keep), check each exact, time them side by side at these token counts "
                        "(default 1,128) on --provider, and write the fastest exact one")
    p.add_argument("--provider", choices=("cuda", "cpu"), help="with --measure (default: CUDA when available)")
    p.add_argument("--quiet", action="store_true")
    return p


def _explain_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m rewriter explain",
                       description="why the normalization that NAME belongs to was or was not rewritten, "
                                   "step by step (nothing is written)")
    p.add_argument("model", help="input .onnx")
    p.add_argument("name", help="a node or value name of the norm, or of a linear it feeds")
    _add_plan_options(p)
    return p


def cmd_explain(args) -> int:
    from rewriter.explain import explain
    print(explain(args.model, args.name, _options(args)))
    return EXIT_OK


def _quantize_parser() -> argparse.ArgumentParser:
    from rewriter.quantize import SCHEMES
    p = ArgumentParser(prog="python -m rewriter quantize",
                       description="[rotate the residual stream, then] quantize with onnxruntime's own quantizers: "
                                   + "; ".join(f"{k}: {v}" for k, v in SCHEMES.items()))
    p.add_argument("model", help="input fp32 .onnx, or an onnxruntime-genai folder (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnx, or folder (written atomically)")
    p.add_argument("--scheme", choices=tuple(SCHEMES), required=True)
    p.add_argument("--rotate", action="store_true", help="fold the gains and rotate the residual stream first "
                   "(refused with the reason where it cannot be proven: nothing written). Measured to help W8A8; "
                   "int4 (weight-only) was worse after every rotation: for int4 quantize the original")
    p.add_argument("--rotate-seed", type=int, default=0, metavar="N")
    p.add_argument("--rotate-online", action="store_true", help="--rotate, and each stream writer's input rotated "
                   "at run time (Hadamard MatMuls, kept in float: excluded from quantization)")
    p.add_argument("--rotate-heads", action="store_true", help="--rotate, and V/O rotated head-wise (R2)")
    p.add_argument("--tolerance", type=tolerance, help="the rotated fp32 model is checked against the input as "
                   "`verify` does, within this relative bound (default: the rewrite's, fp32 1e-5)")
    p.add_argument("--overwrite", action="store_true", help="allow OUTPUT to be the input path (a folder: replace "
                   "a non-empty OUTPUT)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p


def cmd_quantize(args) -> int:
    from rewriter.quantize import quantize
    if not args.debug:      # onnxruntime's quantizers log a line per node (and advice) on the root logger
        logging.disable(logging.WARNING)
    try:
        report = quantize(args.model, args.output, args.scheme, rotate=args.rotate, seed=args.rotate_seed,
                          online=args.rotate_online, heads=args.rotate_heads, overwrite=args.overwrite,
                          tolerance=args.tolerance)
    finally:
        logging.disable(logging.NOTSET)
    if not args.quiet:
        if report is not None:
            print(report.notes[-1])
        print(f"wrote {printable(args.output)} ({args.scheme})")
        if report is not None and args.scheme.startswith("int4"):
            print("note: weight-only int4 after a rotation measured worse than int4 of the original (real "
                  "SmolLM2: README 'Rotation'); for int4, quantize the original (without --rotate)", file=sys.stderr)
    return EXIT_OK


def _verify_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m rewriter verify",
                       description="compare two models' outputs under onnxruntime")
    p.add_argument("original")
    p.add_argument("rewritten")
    p.add_argument("--inputs", metavar="NPZ", help="inputs to use (default: made from the signature)")
    p.add_argument("--tolerance", type=tolerance, help="max relative error (default by dtype: fp32 1e-5, "
                   "fp16 1e-2, bf16 5e-2)")
    p.add_argument("--provider", choices=("cuda", "cpu"), help="default: CUDA when available")
    p.add_argument("--seq", type=positive_int, default=16)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--debug", action="store_true")
    return p


def cmd_rewrite(args) -> int:
    progress = None if args.quiet else _progress
    if args.report:
        _check_report_path(Path(args.report), [args.model, args.output])
    if args.keep_failed and not args.verify:
        raise UsageError("--keep-failed keeps a model that fails --verify: give --verify too")
    # a folder (onnxruntime-genai: genai_config.json) is rewritten as a whole: rewriter/folders.py
    rewrite = rewrite_folder if Path(args.model).is_dir() else rewrite_file
    if args.measure:
        if Path(args.model).is_dir():
            raise UsageError("--measure takes a model file (not a folder)")
        from rewriter.measure import measured_rewrite
        rewrite = functools.partial(measured_rewrite, tokens=tuple(int_list(args.measure, "--measure")) or (1,),
                                    provider=args.provider, log=(lambda m: None) if args.quiet else _log)
    report = rewrite(args.model, args.output, options=_options(args), overwrite=args.overwrite, external_data=args.external_data, progress=progress,
                          verify=_printing_check(quiet=args.quiet) if args.verify else False,
                          keep_failed=args.keep_failed,
                          also_writes={"report": args.report} if args.report else None)
    if args.report:
        try:
            report.to_json(args.report)
        except OSError as exc:
            raise OutputError(f"{args.report}: cannot write the report ({exc.strerror or exc})") from exc
    if not args.quiet:
        print(report.table())
        print(f"wrote {printable(args.output)}")
    return EXIT_OK


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _options(args) -> Options:
    """The plan options of a rewrite or `explain` command line."""
    measured = tuple(t for t, spec in TARGETS.items() if spec["ep"])
    if (args.costs or args.tokens) and (args.strategy or args.target not in measured):
        raise UsageError(f"--costs/--tokens choose per site: give --target {' or '.join(measured)} "
                         "(and no --strategy)")
    choice = {"target": args.target, "strategy": args.strategy, "costs": _costs(args.costs),
              "tokens": _tokens(args.tokens)}
    compose = {"auto": None, "always": True, "never": False}[getattr(args, "compose", "auto")]
    return Options(mode=args.mode, clone_shared=args.clone_shared, push_scales=not args.no_push,
                   approx=args.approx, compose=compose, rotate=args.rotate, rotate_seed=args.rotate_seed,
                   rotate_online=args.rotate_online, rotate_heads=args.rotate_heads,
                   **{k: v for k, v in choice.items() if v is not None})


def _printing_check(quiet: bool, **settings):
    """check_outputs that prints the comparison table (always when outputs differ)."""

    def check(original, rewritten):
        try:
            diffs = check_outputs(original, rewritten, **settings)
        except VerificationFailed as exc:
            print(format_verdicts(exc.diffs))
            raise
        if not quiet:
            print(summary(diffs))
        return diffs
    return check


def _costs(path):
    if path is None:
        return None
    try:
        return CostTable.load(path)
    except OSError as exc:
        raise BadInput(f"{path}: cannot read the cost file ({exc.strerror or exc})") from exc
    except ValueError as exc:        # json.JSONDecodeError included
        raise BadInput(f"{path}: not a usable cost file ({one_line(exc, 160)})") from exc


def _tokens(text):
    if text is None:
        return None
    values = tuple(int_list(text))
    if not values:
        raise UsageError(f"--tokens {text!r}: want positive integers separated by commas")
    return values


def _calibrate_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m rewriter calibrate",
                       description="measure every strategy per site shape on a provider and "
                                   "write the cost file the chooser reads (--costs)")
    p.add_argument("model", nargs="?", help="take the site shapes from this model")
    p.add_argument("--shapes", help="or give them: DxN[xN2...],... (e.g. 576x960,4096x4096)")
    p.add_argument("--kind", choices=("rms", "layer", "dyt"), default="rms", help="with --shapes")
    p.add_argument("--form", choices=("decomposed", "fused"), default="decomposed", help="with --shapes")
    p.add_argument("--no-residual", action="store_true", help="with --shapes: the norm input is no residual sum")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="with --shapes")
    p.add_argument("--provider", choices=("cpu", "cuda"), help="default: CUDA when available")
    p.add_argument("--tokens", default="1,512", help="token counts (default 1,512)")
    p.add_argument("--layers", type=int, default=4, help="sites per probe chain (default 4)")
    p.add_argument("--budget", type=float, default=1.5, help="timing seconds per token count (default 1.5)")
    p.add_argument("--rounds", type=int, default=60, help="at most this many interleaved rounds per token count")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: 1 on CPU — timings "
                   "with every core busy spread 2×; 0 = ORT's default on CUDA)")
    p.add_argument("-o", "--output", required=True, help="cost file to write")
    p.add_argument("--merge", action="store_true", help="add to OUTPUT's probes instead of replacing the file")
    p.add_argument("--debug", action="store_true")
    return p


def cmd_calibrate(args) -> int:
    from rewriter.bench.timing import Settings, resolve_provider
    from rewriter.calibrate import calibrate, model_shapes, parse_shapes
    if bool(args.model) == bool(args.shapes):
        raise UsageError("give a MODEL or --shapes (one of the two)")
    check_not_a_model_file(Path(args.output), (args.model,), "output")
    shapes = model_shapes(args.model) if args.model else parse_shapes(
        args.shapes, kind=args.kind, form=args.form, residual=not args.no_residual, dtype=args.dtype)
    shapes = [s for s in shapes if s.dtype in ("float16", "float32")]
    if not shapes:
        raise UsageError("no site shape to measure (float16/float32 sites only)")
    provider = resolve_provider(args.provider)
    threads = args.threads if args.threads is not None else (1 if provider == "cpu" else 0)
    settings = Settings(warmup=3, min_rounds=5, max_rounds=max(5, args.rounds), budget_s=args.budget,
                        threads=threads)
    table = calibrate(shapes, provider=provider, tokens=_tokens(args.tokens), layers=args.layers,
                      settings=settings, log=lambda m: print(m, file=sys.stderr))
    if args.merge and Path(args.output).exists():
        table = _costs(args.output).merge(table)
    try:
        table.save(args.output)
    except OSError as exc:
        raise OutputError(f"{args.output}: cannot write ({exc.strerror or exc})") from exc
    print(f"wrote {args.output}: {len(table.probes)} probe(s)")
    return EXIT_OK


def _check_report_path(report: Path, models) -> None:
    """Before the rewrite: the report's folder exists and it would replace neither a model nor
    anything but a regular file. Its collisions with external data files are io.save's
    (`also_writes`): only it knows the output's data file name."""
    parent = report.parent if str(report.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{parent}: report directory does not exist")
    check_target(report, "report")
    if any(report.resolve() == Path(m).resolve() for m in models):
        raise OutputError(f"report {report}: is the input or the output model; refusing to write over it")


def _progress(done: int, total: int, name: str) -> None:
    if total >= 64 and sys.stderr.isatty():
        print(f"\r  saving weights {done}/{total}", end="" if done < total else "\n", file=sys.stderr)


def cmd_verify(args) -> int:
    for path in (args.original, args.rewritten, args.inputs):
        if path is not None and not Path(path).is_file():
            raise BadInput(f"{path}: no such file")
    try:
        feeds = load_npz(args.inputs) if args.inputs else None
    except Exception as exc:
        raise BadInput(f"{args.inputs}: not a readable .npz of inputs ({one_line(exc, 160)})") from exc
    check = _printing_check(quiet=False, inputs=feeds, tolerance=args.tolerance, provider=args.provider,
                            seq=args.seq, batch=args.batch)
    check(args.original, args.rewritten)
    return EXIT_OK


@contextlib.contextmanager
def _sigterm_interrupts():
    """`kill` (SIGTERM) unwinds like Ctrl-C, so the temporary output folder is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _quiet_libraries(debug: bool):
    """onnx_ir logs a warning per dangling edge it repairs while loading: the error line
    says it better. --debug keeps them."""
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    if not debug:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # library warnings are held back: a failed run prints its one error line only; a run that
    # completes (or --debug) shows each as one "warning: ..." line
    with _sigterm_interrupts(), _quiet_libraries(debug), warnings.catch_warnings(record=True) as caught:
        code = _main(argv, debug)
    if code == EXIT_OK or debug:
        shown = set()
        for w in caught:
            line = f"warning: {one_line(w.message)}"
            if line not in shown:
                shown.add(line)
                print(line, file=sys.stderr)
    return code


def _command(argv: list[str]) -> int:
    if argv and argv[0] == "verify":
        return cmd_verify(_verify_parser().parse_args(argv[1:]))
    if argv and argv[0] == "explain":
        return cmd_explain(_explain_parser().parse_args(argv[1:]))
    if argv and argv[0] == "bench":
        from rewriter.bench.cli import main as bench_main
        return bench_main(argv[1:])
    if argv and argv[0] == "calibrate":
        return cmd_calibrate(_calibrate_parser().parse_args(argv[1:]))
    if argv and argv[0] == "quantize":
        return cmd_quantize(_quantize_parser().parse_args(argv[1:]))
    if argv and argv[0] == "demo":
        from rewriter.demo import main as demo_main     # needs the repo's models/ (and torch)
        return demo_main(argv[1:])
    return cmd_rewrite(_rewrite_parser().parse_args(argv))


def _main(argv: list[str], debug: bool) -> int:
    try:
        code = _command(argv)
        sys.stdout.flush()          # a closed pipe shows here, not as a traceback at exit
        return code
    except RewriterError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:         # `... | head`: not an error of ours, and nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_PIPE_CLOSED
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted (nothing written)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:    # a bug or an input we did not foresee: still one line
        if debug:
            traceback.print_exc()
        print(f"error: internal error, {type(exc).__name__}: {one_line(exc, 200)} "
              "(a bug: rerun with --debug and report the traceback)", file=sys.stderr)
        return EXIT_INTERNAL

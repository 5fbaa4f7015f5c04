"""The Python API for export pipelines.

    from rewriter import rewrite
    model_flash, report = rewrite("model.onnx", mode="defer")        # onnx_ir.Model
    proto_flash, report = rewrite(model_proto)                       # onnx.ModelProto
    graph_flash, report = rewrite(gs_graph)                          # onnx_graphsurgeon.Graph
    program, report = rewrite(torch.onnx.export(module, args, dynamo=True))   # ONNXProgram
    report = rewrite_file("model.onnx", "model_flash.onnx")

A path loads lazily and returns an `onnx_ir.Model`; an `onnx_ir.Model` and a
`torch.onnx.ONNXProgram` (its `.model`) are rewritten in place and returned; a ModelProto or
graphsurgeon Graph is converted and returned as a new object of the same kind (the argument
is left unchanged).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from rewriter import io
from rewriter.errors import (BadInput, CannotRun, InternalError, NothingToRewrite, RewriterError, VerificationFailed,
                             first_line)
from rewriter.compose import ort_load_error
from rewriter.passes import infer_shapes  # noqa: F401 (calibrate, tests)
from rewriter.patterns.graph import weight_bytes
from rewriter.plan import Options
from rewriter.pipeline import run_pipeline
from rewriter.report import Report
from rewriter.verify import RUN_CHECK_BYTES, RunCheckFailed, badness, judge_runs, run_check, session
from rewriter.verify import verify as compare_outputs


def rewrite_ir(model: ir.Model, options: Options) -> Report:
    """Match, plan and rewrite `model` in place (rewriter/pipeline.py)."""
    return run_pipeline(model, options).report


def rewrite(model, *, base_dir=None, **options):
    """Rewrite `model` (path, ModelProto, onnx_ir.Model, graphsurgeon Graph or ONNXProgram).

    `options` are the fields of rewriter.Options (mode="defer"|"fold", target="portable"|
    "ort-cpu"|"ort-cuda", clone_shared, push_scales, approx). `base_dir`: the folder the
    external data of a model handed in memory lies in (`onnx.load(p, load_external_data=False)`:
    p's folder; default: where an onnx_ir.Model's tensors say, else the current directory).
    Returns (the rewritten model as the same kind of thing — an onnx_ir.Model for a path —,
    Report). Bad input raises rewriter.errors.BadInput / Unsupported (see errors.py)."""
    loaded, kind = io.load(model, base_dir=base_dir)
    report = rewrite_ir(loaded, Options(**options))
    return io.to_kind(loaded, kind, model), report


def check_outputs(original, rewritten, *, inputs: dict | None = None, tolerance: float | None = None,
                  provider: str | None = None, **shape) -> list:
    """Run both models under onnxruntime on the same inputs and compare their outputs.
    Returns the per-output diffs; raises VerificationFailed (with them) when any differs beyond
    the tolerance, CannotRun when onnxruntime cannot load or run either model, BadInput when a
    path is no file."""
    for model in (original, rewritten):
        if isinstance(model, (str, os.PathLike)) and not Path(model).is_file():
            raise BadInput(f"{model}: {'a directory' if Path(model).is_dir() else 'no such file'}, not a model file")
    try:
        diffs = compare_outputs(original, rewritten, inputs=inputs, tolerance=tolerance, provider=provider, **shape)
    except (RewriterError, KeyboardInterrupt):
        raise
    except Exception as exc:    # onnxruntime refuses a model, or the feeds: nothing was compared
        raise CannotRun(f"could not run the models under onnxruntime: {first_line(exc)}") from exc
    return refuse_differences(diffs)


def refuse_differences(diffs: list) -> list:
    """`diffs` (per-output verdicts) when every output is within its bound; else VerificationFailed."""
    bad = [d for d in diffs if not d.ok]
    if bad:
        worst = max(bad, key=badness)
        floor = f", the original's own floor {worst.floor:.2e} by {worst.floor_by}" if worst.floor_by else ""
        raise VerificationFailed(f"verification failed: {len(bad)} of {len(diffs)} output(s) differ, worst "
                                 f"{worst.name!r} {worst.max_rel:.3e} relative (bound {worst.bound:.1e}: tolerance "
                                 f"{worst.tolerance:.0e}{floor})", diffs)
    return diffs


def check_approx(src, rewritten, report: Report, diffs: list | None = None) -> None:
    """--approx: the rewritten model is run against the original (CPU, inputs from the
    signature) and its measured error goes into the report's notes; beyond the tolerance it is
    refused (VerificationFailed, nothing written). `diffs`: a comparison already made."""
    try:
        diffs = diffs if diffs is not None else check_outputs(src, rewritten, provider="cpu")
    except VerificationFailed as exc:
        raise VerificationFailed(f"--approx: {exc}: a scale cancelled in a following norm is not exact enough "
                                 "here (its ε against the row's mean square); nothing written — rewrite "
                                 "without --approx", exc.diffs) from exc
    worst = max((d.max_rel for d in diffs), default=0.0)
    report.notes.append(f"--approx: measured worst-case error {worst:.3e} relative "
                        "(max |Δ| / max |original| over outputs, random inputs, CPU)")


def check_loads_and_runs(src, model: ir.Model, written, report: Report, *, ran: bool = False) -> None:
    """Refuse (InternalError, exit 7; nothing is written) a rewritten `model` that onnxruntime
    (CPU) cannot load or run. With weights under RUN_CHECK_BYTES, unless a comparison runs it
    anyway (`ran`), `written` (its temporary file) is loaded and run once on inputs made from
    its signature (verify.run_check), the input run on the same inputs, and the two judged
    (VerificationFailed, exit 1, beyond the bound); otherwise its weightless skeleton is loaded
    (any size). Where the input fails alike the failure is not the rewrite's: a note says what
    went unchecked."""
    if ran or weight_bytes(model) >= RUN_CHECK_BYTES:
        problem = ort_load_error(model)
        if problem:
            _blame("load", problem, bool(ort_load_error(io.load(src)[0])), report)
        return
    try:
        feeds, outputs = run_check(written)
    except RunCheckFailed as exc:   # onnxruntime's refusal, judged against the input's
        if exc.stage == "inputs":
            report.notes.append("no inputs could be made from the output's signature: it was load-checked only")
        elif exc.stage == "load":
            _blame("load", exc.problem, _fails(lambda: session(src, "cpu")), report)
        else:
            feeds = exc.feeds
            _blame("run", exc.problem, _fails(lambda: run_check(src, feeds)), report)
        return
    try:
        _, reference = run_check(src, feeds)
    except RunCheckFailed as exc:
        report.notes.append(f"the input does not run on the check's inputs ({exc.problem}): the output was "
                            "run, not compared")
        return
    refuse_differences(judge_runs(src, [(feeds, reference, outputs, "run check")], provider="cpu"))


def _fails(action) -> bool:
    try:
        action()
    except Exception:               # noqa: BLE001 - any refusal counts
        return True
    return False


def _blame(stage: str, problem: str, input_fails: bool, report: Report) -> None:
    """The output failed to `stage` ("load" or "run"): InternalError, unless the input fails
    alike (then a note)."""
    if input_fails:
        report.notes.append(f"the input does not {stage} in onnxruntime (CPU) either: the output was not "
                            f"{stage}-checked")
        return
    raise InternalError(f"the rewritten model does not {stage} in onnxruntime where the input does: {problem} "
                        "(a bug: rerun with --debug and report it; nothing written)")


def failed_name(dst) -> Path:
    """Where --keep-failed puts a model that failed verification: flash.onnx -> flash.failed.onnx."""
    dst = Path(dst)
    return dst.with_name(f"{dst.stem if dst.suffix else dst.name}.failed{dst.suffix or '.onnx'}")


def _keep_failed(model: ir.Model, src, dst, exc: RewriterError) -> RewriterError:
    """Write the refused model under its failed name (default external data name, so that no
    file of a good output is touched); returns the error to raise, saying where it went."""
    failed = failed_name(dst)
    try:
        io.save(model, failed, source=src, check=False)
        note = f"the rewritten model was kept as {failed}"
    except RewriterError as keep_exc:
        note = f"could not keep the rewritten model ({keep_exc})"
    kept = type(exc)(f"{exc}; {note}")
    kept.diffs = getattr(exc, "diffs", [])
    return kept


def _unchanged(report: Report, options: Options) -> bool:
    """No site was rewritten and no peer fusion was asked for (an ort-* target composes them):
    the output is the input's own bytes, not a re-serialization of the same graph."""
    return report.rewritten == 0 and not (options.measured and options.compose is not False)


def rewrite_file(src, dst, *, overwrite: bool = False, external_data: str | None = None,
                 require_norms: bool = True, progress=None, verify=False, keep_failed: bool = False,
                 also_writes: dict | None = None, options: Options | None = None, **fields) -> Report:
    """Rewrite the model at `src` into `dst` (atomic; `src` is never modified).

    verify: True, or a callable(original, rewritten_path) that raises to refuse (check_outputs
    with other settings, or printing): the rewritten model is checked in its temporary folder,
    before anything is renamed into place, so a failure (VerificationFailed, CannotRun) writes
    nothing — with keep_failed=True it is written as `failed_name(dst)` for inspection.
    also_writes: {what: path} of files the caller writes afterwards (the report); they are
    refused before anything is written if they are a file the input or the output uses.
    With approx=True the rewritten model is run against the original and the measured
    worst-case relative error is added to the report's notes; beyond the tolerance nothing is
    written (VerificationFailed). `options` (or its `fields` as
    keywords) say how each site is rewritten."""
    opts = options if options is not None else Options(**fields)
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"rewrite_file reads a model file: got a {type(src).__name__} (rewrite() takes "
                        "a model in memory; save what it returns)")
    io.check_target(Path(dst), "output")        # fail before a long rewrite, not after
    model, _ = io.load(src)
    report = rewrite_ir(model, opts)
    if require_norms and report.found == 0:
        raise NothingToRewrite(f"{src}: no normalization found (nothing to rewrite, nothing written)")
    checker = check_outputs if verify is True else (verify or None)

    def before_commit(tmp_model):
        if not unchanged:       # the input's own bytes are not ours to judge
            ran = checker is not None or bool(opts.approx and report.rewritten)    # they run it below
            check_loads_and_runs(src, model, tmp_model, report, ran=ran)
        diffs = checker(src, tmp_model) if checker is not None else None
        if opts.approx and report.rewritten:
            check_approx(src, tmp_model, report, diffs if isinstance(diffs, list) else None)
    unchanged = _unchanged(report, opts)
    if unchanged:
        report.notes.append("no site rewritten: the output is the input model, unchanged")
    try:
        io.save(model, dst, external_data=external_data, overwrite=overwrite, source=src, progress=progress,
                before_commit=before_commit, also_writes=also_writes, unchanged=unchanged)
    except (VerificationFailed, CannotRun) as exc:
        if keep_failed:
            raise _keep_failed(model, src, dst, exc) from exc
        raise
    return report

"""Rewrite a model and run both graphs under onnxruntime: the proof every test relies on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx

from rewriter import rewrite_file
from rewriter.verify import judge_runs, make_inputs, run, session

FP32_TOL = 1e-5     # max |a − b| / max |a|, the product's fp32 exactness bar (rewriter.verify.judge's
                    # bound: the larger of this and FLOOR_K × the original's own noise floor)


def rewrite_and_run(proto_or_path, tmp_path: Path, *, mode="defer", feeds=None, name="model", **options):
    """(report, verdicts, rewritten ModelProto) for `proto_or_path` rewritten with `options`: the
    verdicts of rewriter.verify.judge_runs, the judgement `verify` makes (FP32_TOL, or beyond it
    FLOOR_K × the original's own noise floor)."""
    tmp_path = Path(tmp_path)
    if isinstance(proto_or_path, onnx.ModelProto):
        src = tmp_path / f"{name}.onnx"
        onnx.save(proto_or_path, src)
    else:
        src = Path(proto_or_path)
    dst = tmp_path / f"{name}_{options.get('strategy') or options.get('target') or mode}.onnx"
    report = rewrite_file(src, dst, mode=mode, **options)
    a, b = session(src, "cpu"), session(dst, "cpu")
    feeds = feeds if feeds is not None else random_feeds(a, src)
    diffs = judge_runs(src, [(feeds, run(src, feeds, sess=a), run(dst, feeds, sess=b), "")], tolerance=FP32_TOL,
                       provider="cpu")
    return report, diffs, onnx.load(str(dst), load_external_data=False)


def random_feeds(sess, path=None, seed: int = 0, seq: int = 5) -> dict:
    """Inputs from the signature (token ids within the vocabulary); float inputs get an
    offset and a spread so that mean-centering and 1/RMS are really exercised."""
    feeds = make_inputs(path, batch=2, seq=seq, seed=seed, sess=sess)
    for name, value in feeds.items():
        if value.dtype.kind == "f":
            feeds[name] = (3 * value + 0.5).astype(value.dtype)
    return feeds


def assert_exact(diffs, tol: float | None = None):
    """Every output passes judge's verdict at the fp32 bar (tol None; the floor where measured) or
    is within the explicit `tol` (0: bit-exact)."""
    for d in diffs:
        if tol is None:
            fp32 = dataclasses.replace(d, tolerance=min(d.tolerance, FP32_TOL))
            assert fp32.ok, (f"{d.name}: max rel {d.max_rel:.3e} > bound {fp32.bound:.1e} (the original's floor "
                             f"{d.floor:.2e} {d.floor_by}; max abs {d.max_abs:.3e})")
        else:
            assert d.max_rel <= tol, f"{d.name}: max rel {d.max_rel:.3e} > {tol:.0e} (max abs {d.max_abs:.3e})"


def op_types(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]

"""Rewrite a model and run both graphs under onnxruntime: the proof every test relies on."""

from __future__ import annotations

from pathlib import Path

import onnx

from rewriter import rewrite_file
from rewriter.verify import compare, make_inputs, run, session

FP32_TOL = 1e-5     # max |a − b| / max |a|, the product's fp32 exactness bar


def rewrite_and_run(proto_or_path, tmp_path: Path, *, mode="defer", feeds=None, name="model", **options):
    """(report, diffs, rewritten ModelProto) for `proto_or_path` rewritten with `options`."""
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
    diffs = compare(run(src, feeds, sess=a), run(dst, feeds, sess=b))
    return report, diffs, onnx.load(str(dst), load_external_data=False)


def random_feeds(sess, path=None, seed: int = 0, seq: int = 5) -> dict:
    """Inputs from the signature (token ids within the vocabulary); float inputs get an
    offset and a spread so that mean-centering and 1/RMS are really exercised."""
    feeds = make_inputs(path, batch=2, seq=seq, seed=seed, sess=sess)
    for name, value in feeds.items():
        if value.dtype.kind == "f":
            feeds[name] = (3 * value + 0.5).astype(value.dtype)
    return feeds


def assert_exact(diffs, tol: float = FP32_TOL):
    for d in diffs:
        assert d.max_rel <= tol, f"{d.name}: max rel {d.max_rel:.3e} > {tol:.0e} (max abs {d.max_abs:.3e})"


def op_types(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]

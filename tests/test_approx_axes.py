"""--approx cancels a deferred scale in a following norm only where the scale is constant over
the axis that norm normalizes (its row axes are not normalized); a scale that varies along it
(the rows moved onto the normalized axis by a Transpose) is applied before the norm, and the
report and the trace say why. A cancellation whose measured error passes the tolerance (a large
ε) writes nothing and fails (exit 1)."""

import os

import numpy as np
import onnx
import pytest

from builders import GraphBuilder
from parity import assert_exact, rewrite_and_run
from test_scale_walker import placements

from rewriter import rewrite_file
from rewriter.cli import main
from rewriter.errors import EXIT_VERIFY_FAILED, VerificationFailed
from rewriter.io import load
from rewriter.pipeline import run_pipeline
from rewriter.plan import Options

B, T, N, HEADS, HD = 2, 6, 16, 2, 8


def moved_rows(eps):
    """RMSNorm → MatMul → Transpose(0, 2, 1) → a second RMSNorm over the token axis → MatMul:
    the first norm's 1/RMS varies along the axis the second one normalizes."""
    g = GraphBuilder()
    x = g.input("x", [B, T, N])
    a = g.op("MatMul", [g.rms(x, gain=g.gain(N)), g.weight(N, N)])
    t = g.op("Transpose", [a], perm=[0, 2, 1])
    g.output(g.op("MatMul", [g.rms(t, gain=g.gain(T), eps=eps), g.weight(T, 8)]))
    return g.model()


def heads_moved(eps):
    """RMSNorm → MatMul → Reshape to heads → Transpose(0, 2, 1, 3) → a per-head norm over the
    last axis (QK-norm after the head transpose): the rows moved, the normalized axis did not."""
    g = GraphBuilder()
    x = g.input("x", [B, T, N])
    q = g.op("MatMul", [g.rms(x, gain=g.gain(N)), g.weight(N, N)])
    q = g.op("Transpose", [g.op("Reshape", [q, g.const(np.array([B, T, HEADS, HD], np.int64))])], perm=[0, 2, 1, 3])
    g.output(g.rms(q, gain=g.gain(HD), eps=eps), shape=[B, HEADS, T, HD])
    return g.model()


def latent(eps):
    """norm → MatMul → a second norm (over the last axis) → MatMul (MLA's latent norm)."""
    g = GraphBuilder()
    x = g.input("x", [B, T, N])
    a = g.op("MatMul", [g.rms(x, gain=g.gain(N)), g.weight(N, 12)])
    g.output(g.op("MatMul", [g.rms(a, gain=g.gain(12), eps=eps), g.weight(12, N)]))
    return g.model()


def trace_verdicts(proto):
    model, _ = load(proto)
    return [step.verdict for step in run_pipeline(model, Options(approx=True)).trace]


@pytest.mark.parametrize("build", [heads_moved, latent])
def test_cancels_over_the_normalized_axis(build, tmp_path):
    """ε = 0: the scale is constant over the normalized axis, so it cancels exactly."""
    report, diffs, out = rewrite_and_run(build(0.0), tmp_path, approx=True)
    assert any("1 deferred scale(s) cancelled" in n for n in report.notes), report.notes
    assert not any("applied before a following norm" in n for n in report.notes)
    assert_exact(diffs)
    assert any(v.startswith("cancels in this norm") for v in trace_verdicts(build(0.0)))


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_not_cancelled_where_the_rows_are_normalized(eps, tmp_path):
    """The rows moved onto the normalized axis: no cancellation (not even at ε = 0), the scale is
    applied before the second norm, the result is exact and the report names the axis."""
    report, diffs, out = rewrite_and_run(moved_rows(eps), tmp_path, approx=True)
    assert report.rewritten == 2
    assert any("0 deferred scale(s) cancelled" in n for n in report.notes), report.notes
    kept = [n for n in report.notes if "applied before a following norm" in n]
    assert kept and "normalizes" in kept[0] and "row axes [0, 2]" in kept[0], report.notes
    # one Mul on the transposed tensor, read by the second norm's linear and its 1/RMS
    assert ("Transpose", "MatMul,Mul,Mul") in placements(out), placements(out)
    assert_exact(diffs)
    verdicts = trace_verdicts(moved_rows(eps))
    assert not any(v.startswith("cancels in this norm") for v in verdicts)
    assert any("--approx cannot cancel it" in v for v in verdicts), verdicts


def test_same_graph_exact_without_approx(tmp_path):
    _, diffs, _ = rewrite_and_run(moved_rows(0.0), tmp_path)
    assert_exact(diffs)


def test_large_measured_error_writes_nothing(tmp_path):
    """A cancellation the algebra allows, with an ε of the order of the row's mean square: the
    measured error passes the tolerance, so the API raises and the CLI exits 1, nothing written."""
    src = tmp_path / "latent.onnx"
    onnx.save(latent(10.0), src)
    dst = tmp_path / "out.onnx"
    with pytest.raises(VerificationFailed, match="--approx") as caught:
        rewrite_file(src, dst, approx=True)
    assert caught.value.diffs and not all(d.ok for d in caught.value.diffs)
    assert main([str(src), "-o", str(dst), "--approx", "--quiet"]) == EXIT_VERIFY_FAILED
    assert sorted(os.listdir(tmp_path)) == ["latent.onnx"]
    # the same model without --approx is exact and written
    assert main([str(src), "-o", str(dst), "--quiet"]) == 0 and dst.exists()


def test_small_measured_error_is_reported(tmp_path):
    src = tmp_path / "latent.onnx"
    onnx.save(latent(1e-6), src)
    report = rewrite_file(src, tmp_path / "out.onnx", approx=True)
    assert any("measured worst-case error" in n for n in report.notes)
    assert (tmp_path / "out.onnx").exists()

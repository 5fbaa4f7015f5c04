"""Prop. 3: a deferred scale reaching a following norm. Exact by default (the scale is
applied before that norm); with approx=True it cancels there and the report states the
measured error."""

import numpy as np
import pytest

from builders import GraphBuilder
from parity import assert_exact, rewrite_and_run
from test_scale_walker import placements

N, HEADS, HD = 16, 2, 8


def qk_norm_block():
    """Qwen3/Gemma 3 style: q = RMSNorm_head(reshape(q_proj(norm(x)))), v = v_proj(norm(x))."""
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    y = g.rms(x, gain=g.gain(N))
    heads = g.const(np.array([2, 5, HEADS, HD], np.int64))
    q = g.op("Reshape", [g.op("MatMul", [y, g.weight(N, N)]), heads])
    q = g.rms(q, gain=g.gain(HD), eps=1e-6)
    g.output(g.op("Transpose", [q], perm=[0, 2, 1, 3]), shape=[2, HEADS, 5, HD])
    g.output(g.op("Reshape", [g.op("MatMul", [y, g.weight(N, N)]), heads]), shape=[2, 5, HEADS, HD])
    return g.model()


def latent_norm_block():
    """DeepSeek MLA style: norm → q_a_proj → q_a_norm → q_b_proj (a rewritten second norm)."""
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    a = g.op("MatMul", [g.rms(x, gain=g.gain(N)), g.weight(N, 12)])
    g.output(g.op("MatMul", [g.rms(a, gain=g.gain(12), eps=1e-6), g.weight(12, N)]))
    return g.model()


@pytest.mark.parametrize("build", [qk_norm_block, latent_norm_block])
def test_exact_by_default(build, tmp_path):
    report, diffs, _ = rewrite_and_run(build(), tmp_path)
    assert_exact(diffs)
    assert not report.notes


def test_qk_norm_cancels_with_approx(tmp_path):
    exact, _, exact_out = rewrite_and_run(qk_norm_block(), tmp_path, name="exact")
    # exact: q's scale is applied once, in front of q_norm (it reads the tensor twice)
    assert placements(exact_out) == [("Reshape", "Pow,Mul"), ("Reshape", "output")]
    report, diffs, out = rewrite_and_run(qk_norm_block(), tmp_path, approx=True, name="approx")
    # only V keeps its scale; q's scale cancelled in q_norm
    assert len(placements(out)) == 1
    assert any("cancelled" in n for n in report.notes)
    assert any("measured worst-case error" in n for n in report.notes)
    assert_exact(diffs, tol=1e-4)      # ε₂ = 1e-6 ≪ MS: the approximation is tiny but not zero


def test_latent_norm_cancels_with_approx(tmp_path):
    report, diffs, out = rewrite_and_run(latent_norm_block(), tmp_path, approx=True)
    assert report.rewritten == 2
    assert len(placements(out)) == 1          # only the second norm's own scale remains
    assert_exact(diffs, tol=1e-4)

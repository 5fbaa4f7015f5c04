"""Gemm's α, β, transB and every C shape after a norm whose β (LayerNorm) adds a bias term:
Gemm(A, B, C) = α·A'·B' + β·C with A = n·γ + b gives α·(n·γ)·B' + α·b·B' + β·C. γ folds into B
(α stays); the rewrite writes C' = β·C + α·b·B' (float64, cast once) with beta = 1 — exact for
β = 0 too —, or, when 1/RMS is deferred, takes C out of the Gemm and adds it after the scale."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from builders import GraphBuilder, float64_copy
from parity import assert_exact, rewrite_and_run
from rewriter.patterns.linear import match_linears

M, N, K = 6, 16, 12
C_SHAPES = {"absent": None, "empty": "", "scalar": (), "one": (1, 1), "row": (K,), "row2d": (1, K), "column": (M, 1), "full": (M, K)}


def gemm_graph(alpha=1.0, beta=1.0, trans_b=0, c_shape=None, ln_beta=True, form="op", trans_a=0,
               c_input=False):
    g = GraphBuilder(18)
    x = g.input("x", [M, N])
    gamma = g.gain(N)
    b = (0.5 * g.rng.standard_normal(N)).astype(np.float32) if ln_beta else None
    if form == "op":
        y = g.op("LayerNormalization", [x, g.const(gamma, "gamma")] + ([g.const(b, "beta")] if ln_beta else []),
                 axis=-1, epsilon=1e-5)
    elif form == "decomposed":
        y = g.layernorm(x, gain=gamma, beta=b)
    else:       # RMSNorm: no β
        y = g.rms(x, gain=gamma)
    rows = M if trans_a else N          # transA: A'·B' = Aᵀ·B' contracts A's rows
    w = g.weight(K, rows) if trans_b else g.weight(rows, K)
    inputs = [y, w]
    if c_input:
        inputs.append(g.input("c", [K]))
    elif c_shape == "":          # an empty name: C omitted
        inputs.append("")
    elif c_shape is not None:
        inputs.append(g.const(g.rng.standard_normal(c_shape).astype(np.float32), "C"))
    g.output(g.op("Gemm", inputs, transA=trans_a, transB=trans_b, alpha=alpha, beta=beta),
             shape=[N if trans_a else M, K])
    return g.model()


@pytest.mark.parametrize("c_shape", C_SHAPES)
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("ln_beta", [True, False])
@pytest.mark.parametrize("strategy", ["fold", "defer"])
def test_gemm_alpha_beta_c_shapes(strategy, ln_beta, alpha, beta, trans_b, c_shape, tmp_path):
    proto = gemm_graph(alpha, beta, trans_b, C_SHAPES[c_shape], ln_beta)
    report, diffs, out = rewrite_and_run(proto, tmp_path, strategy=strategy)
    assert (report.rewritten, report.sites[0].strategy) == (1, strategy), report.table()
    assert_exact(diffs)
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    alphas = [a.f for a in gemm.attribute if a.name == "alpha"]
    assert alphas in ([], [alpha]) and (alphas or alpha == 1.0), "α stays on the Gemm"


@pytest.mark.parametrize("form", ["op", "decomposed", "rms"])
@pytest.mark.parametrize("options", [{"mode": "fold"}, {"mode": "defer"}, {"target": "ort-cpu"},
                                     {"strategy": "fold-fused"}, {"strategy": "defer-normop"}])
def test_gemm_beta_zero_with_c_every_path(form, options, tmp_path):
    """The reported case: LayerNorm(γ, β) → Gemm(alpha = 0.5, beta = 0, C): β's term survives."""
    report, diffs, _ = rewrite_and_run(gemm_graph(0.5, 0.0, 1, (K,), form=form), tmp_path, **options)
    assert report.rewritten == 1, report.table()
    assert_exact(diffs)


def test_fold_writes_beta_one_and_one_bias(tmp_path):
    """fold: C' = β·C + α·b·W in one constant, beta = 1, no Add after the Gemm."""
    report, diffs, out = rewrite_and_run(gemm_graph(0.5, 0.0, 0, (M, K)), tmp_path, mode="fold")
    assert report.rewritten == 1
    assert_exact(diffs)
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert [a.f for a in gemm.attribute if a.name == "beta"] == [1.0]
    assert len(gemm.input) == 3 and "Add" not in [n.op_type for n in out.graph.node if n.input[0] == gemm.output[0]]


def test_fold_without_c_adds_c(tmp_path):
    report, diffs, out = rewrite_and_run(gemm_graph(0.5, 2.0, 1, None), tmp_path, mode="fold")
    assert report.rewritten == 1
    assert_exact(diffs)
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert len(gemm.input) == 3 and [a.f for a in gemm.attribute if a.name == "beta"] == [1.0]


@pytest.mark.parametrize("mode", ["fold", "defer"])
def test_trans_a_does_not_fire(mode, tmp_path):
    """transA = 1 contracts A's first axis, not the normalized one."""
    report, diffs, _ = rewrite_and_run(gemm_graph(0.5, 0.0, 0, (K,), trans_a=1), tmp_path, mode=mode)
    assert report.rewritten == 0
    assert report.sites[0].reason == "Gemm with transA=1 (normalized axis is not the contraction axis)"
    assert report.sites[0].at.startswith("Gemm node")
    assert_exact(diffs, tol=0)


@pytest.mark.parametrize("mode", ["fold", "defer"])
def test_c_from_an_input_does_not_fire(mode, tmp_path):
    report, diffs, _ = rewrite_and_run(gemm_graph(0.5, 0.0, 0, c_input=True), tmp_path, mode=mode)
    assert report.rewritten == 0
    assert report.sites[0].reason == "Gemm bias is not constant"
    assert_exact(diffs, tol=0)


@pytest.mark.parametrize("c_shape", [(1, 1, K), (M, K + 1), (K - 1,)])
def test_c_that_does_not_broadcast_is_refused(c_shape):
    """onnxruntime rejects such a Gemm; the matcher must not fold β into it either (C' = β·C +
    α·b·W would broadcast to a shape C never had). Matched directly: the loader refuses the model."""
    proto = gemm_graph(0.5, 0.0, 0, c_shape)
    model = ir.serde.deserialize_model(proto)
    gemm = next(node for node in model.graph if node.op_type == "Gemm")
    found = match_linears(gemm.inputs[0], N, model.graph)
    assert found.reason == f"Gemm C of shape {list(c_shape)} does not broadcast to the output"
    assert found.at is gemm.inputs[2]


@pytest.mark.parametrize("strategy", ["fold", "defer"])
@pytest.mark.parametrize("alpha,beta,c_shape", [(0.5, 0.0, (K,)), (1.0, 2.0, (M, K)), (0.5, 1.0, None)])
def test_no_worse_than_the_original_against_float64(strategy, alpha, beta, c_shape, tmp_path):
    """The rewrite's error against a float64 run of the original stays within 1.5× the
    original's own (C' is summed in float64 and rounded once)."""
    proto = gemm_graph(alpha, beta, 1, c_shape, form="decomposed")
    feeds = {"x": (3 * np.random.default_rng(2).standard_normal((M, N)) + 0.5).astype(np.float32)}
    report, _, out = rewrite_and_run(proto, tmp_path, strategy=strategy, feeds=feeds)
    assert report.rewritten == 1
    (ref,) = _run(float64_copy(proto), {"x": feeds["x"].astype(np.float64)})
    (a,), (b,) = _run(proto, feeds), _run(out, feeds)
    err_a, err_b = (np.abs(v - ref).max() / np.abs(ref).max() for v in (a, b))
    assert err_b <= 1.5 * err_a + 1e-7, (err_a, err_b)


def _run(proto, feeds):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("push", [True, False])
@pytest.mark.parametrize("c_shape", [None, (K,), (M, K)])
def test_deferred_scale_meets_c_before_the_next_linear(push, c_shape, tmp_path):
    """Gemm(α, β, C) → Relu → MatMul: 1/RMS is applied before β·C (and the folded β's term) is
    added — a scale pushed past the bias into Relu and the MatMul would scale C too."""
    g = GraphBuilder(18)
    y = g.rms(g.input("x", [M, N]), gain=g.gain(N))
    inputs = [y, g.weight(N, K)] + ([g.const(g.rng.standard_normal(c_shape).astype(np.float32), "C")]
                                    if c_shape else [])
    h = g.op("Relu", [g.op("Gemm", inputs, alpha=0.5, beta=2.0)])
    g.output(g.op("MatMul", [h, g.weight(K, 4)]), shape=[M, 4])
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path, push_scales=push)
    assert (report.rewritten, report.sites[0].strategy) == (1, "defer")
    assert_exact(diffs)

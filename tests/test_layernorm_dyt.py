"""Decomposed LayerNorm (γ, β folded; the linears read x − mean(x); 1/σ deferred) and DyT (g, β folded)."""

import numpy as np
import pytest

from builders import GraphBuilder
from parity import assert_exact, op_types, rewrite_and_run

N, K = 16, 12


def ln_graph(inverse="div", with_gain=True, with_beta=True, bias=False, offset=4.0):
    g = GraphBuilder()
    x = g.input("x", [None, None, N])
    y = g.layernorm(x, gain=g.gain(N) if with_gain else None,
                    beta=(0.3 * g.rng.standard_normal(N)).astype(np.float32) if with_beta else None,
                    inverse=inverse)
    for _ in range(2):
        out = g.op("MatMul", [y, g.weight(N, K)])
        if bias:
            out = g.op("Add", [out, g.const(g.rng.standard_normal(K).astype(np.float32), "bias")])
        g.output(out)
    return g.model()


@pytest.mark.parametrize("mode", ["defer", "fold"])
@pytest.mark.parametrize("inverse", ["div", "reciprocal"])
@pytest.mark.parametrize("bias", [False, True])
def test_decomposed_layernorm(mode, inverse, bias, tmp_path):
    report, diffs, out = rewrite_and_run(ln_graph(inverse, bias=bias), tmp_path, mode=mode)
    assert (report.found, report.rewritten, report.weights_changed) == (1, 1, 2)
    assert report.sites[0].kind == "layer"
    assert_exact(diffs)
    if mode == "fold":      # weightless LayerNorm: γ's Mul and β's Add kept at 1 and 0 (the original's
        # kernels: onnxruntime fuses them as it fused the original), β also in one bias per linear
        assert op_types(out).count("Add") == 1 + 1 + 2 and op_types(out).count("Mul") == 1 + (inverse == "reciprocal")


def test_layernorm_without_affine(tmp_path):
    report, diffs, _ = rewrite_and_run(ln_graph(with_gain=False, with_beta=False), tmp_path)
    assert report.rewritten == 1
    assert_exact(diffs)


@pytest.mark.parametrize("mode", ["defer", "fold"])
def test_dyt(mode, tmp_path):
    g = GraphBuilder()
    x = g.input("x", [None, None, N])
    y = g.dyt(x, gain=g.gain(N), beta=(0.2 * g.rng.standard_normal(N)).astype(np.float32))
    g.output(g.op("MatMul", [y, g.weight(N, K)]))
    g.output(g.op("MatMul", [y, g.weight(N, K)]))
    report, diffs, out = rewrite_and_run(g.model(), tmp_path, mode=mode)
    assert (report.found, report.rewritten) == (1, 1)
    assert report.sites[0].kind == "dyt" and report.sites[0].action == "fold"
    assert_exact(diffs)
    assert op_types(out).count("Tanh") == 1 and op_types(out).count("Mul") == 1   # only α·x left


def test_bare_tanh_is_not_a_norm(tmp_path):
    g = GraphBuilder()
    x = g.input("x", [None, None, N])
    g.output(g.op("MatMul", [g.dyt(x), g.weight(N, K)]))
    report, _, _ = rewrite_and_run(g.model(), tmp_path, require_norms=False)
    assert report.found == 0

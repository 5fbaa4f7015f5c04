"""Normalizations that arrive as one op: ONNX RMSNormalization / LayerNormalization and
onnxruntime's SimplifiedLayerNormalization / Skip* contrib ops."""

import numpy as np
import pytest

from builders import GraphBuilder
from parity import assert_exact, op_types, rewrite_and_run

N, K = 16, 12


def fused(op_type, *, opset=18, domain="", with_beta=False, residual_used=False, n_linears=2):
    g = GraphBuilder(opset)
    x = g.input("x", [None, None, N])
    inputs = [x]
    n_out = 1
    if op_type.startswith("Skip"):
        inputs.append(g.input("skip", [None, None, N]))
        n_out = 4
    inputs.append(g.const(g.gain(N), "gain"))
    if with_beta:
        inputs.append(g.const((0.2 * g.rng.standard_normal(N)).astype(np.float32), "beta"))
    outs = g.op(op_type, inputs, n_out=n_out, domain=domain, epsilon=1e-5)
    y = outs[0] if n_out > 1 else outs
    for _ in range(n_linears):
        g.output(g.op("MatMul", [y, g.weight(N, K)]))
    if residual_used:
        g.output(g.op("Add", [outs[3], outs[3]]))
    return g.model()


CASES = {
    "RMSNormalization-opset23": dict(op_type="RMSNormalization", opset=23),
    "SimplifiedLayerNormalization": dict(op_type="SimplifiedLayerNormalization"),
    "SkipSimplifiedLayerNormalization": dict(op_type="SkipSimplifiedLayerNormalization", domain="com.microsoft"),
    "SkipSimplified+residual-out": dict(op_type="SkipSimplifiedLayerNormalization", domain="com.microsoft",
                                        residual_used=True),
    "LayerNormalization": dict(op_type="LayerNormalization", opset=17, with_beta=True),
    "LayerNormalization-no-beta": dict(op_type="LayerNormalization", opset=17),
    "SkipLayerNormalization+residual-out": dict(op_type="SkipLayerNormalization", domain="com.microsoft",
                                                with_beta=True, residual_used=True),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("mode", ["defer", "fold"])
def test_fused_norm(case, mode, tmp_path):
    spec = CASES[case]
    proto = fused(**spec)
    report, diffs, out = rewrite_and_run(proto, tmp_path, mode=mode)
    assert (report.found, report.rewritten, report.weights_changed) == (1, 1, 2)
    assert report.sites[0].form == "fused" and report.sites[0].op == spec["op_type"]
    assert_exact(diffs)
    if mode == "defer":     # the fused op is gone, the MatMuls read the raw (residual) input
        assert spec["op_type"] not in op_types(out)
    else:                   # still one fused op, now with a unit gain
        assert op_types(out).count(spec["op_type"]) == 1


def test_statistics_output_used_is_skipped(tmp_path):
    g = GraphBuilder()
    x = g.input("x", [None, None, N])
    y, inv = g.op("SimplifiedLayerNormalization", [x, g.const(g.gain(N))], n_out=2)
    g.output(g.op("MatMul", [y, g.weight(N, K)]))
    g.output(inv)
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path)
    assert report.rewritten == 0 and report.skipped == {"statistics output 1 is used": 1}
    assert_exact(diffs, tol=0)

"""One tiny graph per RMSNorm form: the matcher finds it, both modes rewrite it exactly."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto

from rewriter import patterns
from builders import GraphBuilder
from parity import assert_exact, op_types, rewrite_and_run

N, K = 16, 12


def norm_then_linears(opset=18, n_linears=1, dtype=np.float32, **rms):
    g = GraphBuilder(opset)
    x = g.input("x", [None, None, N], dtype)
    y = g.rms(x, gain=g.gain(N, dtype), **rms)
    for _ in range(n_linears):
        g.output(g.op("MatMul", [y, g.weight(N, K, dtype)]), dtype)
    return g.model()


def sites_of(proto):
    return patterns.find_sites(ir.from_proto(proto).graph)


FORMS = {
    "pow-reciprocal (dynamo)": dict(square="pow", inverse="reciprocal"),
    "mul-xx": dict(square="mul", inverse="reciprocal"),
    "div-one (torchscript)": dict(inverse="div_one"),
    "div-direct": dict(inverse="div"),
    "gain-right": dict(gain_side="right"),
    "gain-constant-node": dict(gain_as="node"),
    "gemma-one-plus-w": dict(gain_as="one_plus"),
    "no-epsilon": dict(eps=None),
}


@pytest.mark.parametrize("form", FORMS, ids=list(FORMS))
@pytest.mark.parametrize("mode", ["defer", "fold"])
def test_decomposed_forms(form, mode, tmp_path):
    proto = norm_then_linears(**FORMS[form])
    sites, misses = sites_of(proto)
    assert (len(sites), len(misses)) == (1, 0)
    assert sites[0].kind == "rms" and sites[0].form == "decomposed"
    report, diffs, out = rewrite_and_run(proto, tmp_path, mode=mode)
    assert report.rewritten == 1 and report.weights_changed == 1
    assert_exact(diffs)
    if mode == "defer":     # the MatMul reads the raw input; 1/RMS is a Mul after it
        matmul = next(n for n in out.graph.node if n.op_type == "MatMul")
        assert matmul.input[0] == "x"
        # 1/RMS = 1/sqrt(mean(x·x) + ε) (the exported norm's own kernels), then the deferred scale
        assert sorted(op_types(out)) == ["Add", "MatMul", "Mul", "Mul", "Reciprocal", "ReduceMean", "Sqrt"]
    else:                   # weightless norm: exactly the gain Mul is gone
        assert op_types(out).count("Mul") == op_types(proto).count("Mul") - 1
        assert op_types(out).count("MatMul") == 1


@pytest.mark.parametrize("opset", [17, 18])
def test_reduce_axes_attribute_and_input(opset, tmp_path):
    report, diffs, _ = rewrite_and_run(norm_then_linears(opset=opset), tmp_path)
    assert report.rewritten == 1
    assert_exact(diffs)


def test_no_gain_defer(tmp_path):
    g = GraphBuilder()
    x = g.input("x", [None, None, N])
    g.output(g.op("MatMul", [g.rms(x), g.weight(N, K)]))
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path)
    assert report.rewritten == 1
    assert_exact(diffs)
    report, _, _ = rewrite_and_run(g.model(), tmp_path, mode="fold")
    assert report.rewritten == 0 and "nothing to fold" in report.sites[0].reason


def test_fp16_with_casts(tmp_path):
    proto = norm_then_linears(dtype=np.float16, cast=TensorProto.FLOAT16, n_linears=2)
    report, diffs, out = rewrite_and_run(proto, tmp_path)
    assert report.rewritten == 1 and report.weights_changed == 2
    # fp16 linears: folded only (x·W may overflow fp16 where the normalized input's product cannot)
    assert report.sites[0].action == "fold" and "computes in fp16" in report.sites[0].reason
    assert_exact(diffs, tol=5e-3)


def test_fan_out_qkv(tmp_path):
    report, diffs, _ = rewrite_and_run(norm_then_linears(n_linears=3), tmp_path)
    assert report.rewritten == 1 and report.weights_changed == 3
    assert_exact(diffs)

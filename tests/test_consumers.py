"""Linear consumers: MatMul/Gemm/FusedMatMul behind Cast/Identity/Reshape, weights behind
Transpose/Cast, shared weights, and the consumers that block a rewrite."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from builders import GraphBuilder
from parity import assert_exact, op_types, rewrite_and_run

N, K = 16, 12


def start(opset=18):
    g = GraphBuilder(opset)
    x = g.input("x", [None, None, N])
    return g, x, g.rms(x, gain=g.gain(N))


@pytest.mark.parametrize("mode", ["defer", "fold"])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_bias_behind_reshape(mode, trans_b, tmp_path):
    """GPT-2 style: Reshape(-1, n) → Gemm(W, bias) → Reshape back."""
    g, x, y = start()
    flat = g.op("Reshape", [y, g.const(np.array([-1, N], np.int64))])
    w = g.weight(K, N) if trans_b else g.weight(N, K)
    bias = g.const(g.rng.standard_normal(K).astype(np.float32), "bias")
    out = g.op("Gemm", [flat, w, bias], transB=trans_b, alpha=0.5, beta=2.0)
    g.output(g.op("Reshape", [out, g.const(np.array([2, -1, K], np.int64))]))
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path, mode=mode)
    assert report.rewritten == 1
    assert_exact(diffs)


@pytest.mark.parametrize("mode", ["defer", "fold"])
def test_tied_weight_is_kept_or_cloned_on_request(mode, tmp_path):
    """Tied embeddings (dynamo): one table feeds Gather and Transpose → MatMul. By default the
    table stays shared (0 bytes added, the gain a Mul before the head); --clone-shared folds a copy."""
    g = GraphBuilder()
    ids = g.input("ids", [None, None], np.int64)
    table = g.const(g.rng.standard_normal((K, N)).astype(np.float32), "embed")
    h = g.op("Gather", [table, ids])
    y = g.rms(h, gain=g.gain(N))
    y = g.op("Identity", [g.op("Cast", [y], to=TensorProto.FLOAT)])
    g.output(g.op("MatMul", [y, g.op("Transpose", [table], perm=[1, 0])]))
    feeds = {"ids": np.array([[1, 5, 7], [0, 11, 3]], np.int64)}
    report, diffs, out = rewrite_and_run(g.model(), tmp_path, mode=mode, feeds=feeds, clone_shared=True)
    assert report.rewritten == 1 and report.bytes_added == K * N * 4
    assert_exact(diffs)
    assert "Gather" in op_types(out) and len(out.graph.initializer) >= 2

    report, diffs, out = rewrite_and_run(g.model(), tmp_path, mode=mode, feeds=feeds)
    assert report.rewritten == 1 and report.bytes_added == 0 and "shared weight(s) kept" in report.sites[0].reason
    assert_exact(diffs)
    big = [t for t in out.graph.initializer if np.prod(t.dims) >= K * N]
    assert len(big) == 1, "the table is stored once"


def test_fused_projection_then_split(tmp_path):
    """Phi-3 qkv_proj / gate_up_proj: one weight, outputs split after the MatMul."""
    g, x, y = start()
    qkv = g.op("MatMul", [y, g.weight(N, 3 * K)])
    for part in g.op("Split", [qkv, g.const(np.array([K, K, K], np.int64))], n_out=3, axis=-1):
        g.output(part)
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path)
    assert report.rewritten == 1
    assert_exact(diffs)


def test_fused_matmul_trans_b(tmp_path):
    g, x, y = start()
    g.output(g.op("FusedMatMul", [y, g.weight(K, N)], domain="com.microsoft", transB=1, alpha=1.5))
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path)
    assert report.rewritten == 1
    assert_exact(diffs)


def test_shape_consumer_is_redirected(tmp_path):
    """TorchScript reads Shape(normalized) for the attention reshapes."""
    g, x, y = start()
    mm = g.op("MatMul", [y, g.weight(N, K)])
    shape = g.op("Shape", [y])
    g.output(g.op("Reshape", [mm, g.op("Concat", [g.op("Slice", [shape, g.const(np.array([0], np.int64)),
                                                          g.const(np.array([2], np.int64))]),
                                                g.const(np.array([K], np.int64))], axis=0)]))
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path)
    assert report.rewritten == 1
    assert_exact(diffs)


BLOCKERS = {
    "residual-add": ("Add", "consumer Add is not a linear on the normalized axis"),
    "graph-output": ("output", "norm output is a graph output"),
    "activation-weight": ("weight", "MatMul reads the normalized tensor as its weight"),
}


@pytest.mark.parametrize("case", BLOCKERS)
def test_blocked_sites_are_reported_and_untouched(case, tmp_path):
    g, x, y = start()
    g.output(g.op("MatMul", [y, g.weight(N, K)]))
    kind, reason = BLOCKERS[case]
    if kind == "Add":
        g.output(g.op("Add", [y, x]))
    elif kind == "output":
        g.output(y)
    else:
        g.output(g.op("MatMul", [g.op("Transpose", [x], perm=[0, 2, 1]), y]))
    report, diffs, out = rewrite_and_run(g.model(), tmp_path)
    assert (report.found, report.rewritten) == (1, 0)
    assert report.sites[0].reason == reason
    assert_exact(diffs, tol=0)


@pytest.mark.parametrize("strategy", ["defer", "fold", "fold-fused", "defer-normop"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_shared_weight_keeps_its_bytes_under_every_strategy(norm, strategy, tmp_path):
    """A weight read by two norms' linears: kept once, the gain applied to that linear's input
    (a deferred LayerNorm's input already centered), β through a bias; exact."""
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    w = g.weight(N, K)
    outs = []
    for _ in range(2):
        y = g.rms(x, gain=g.gain(N)) if norm == "rms" else \
            g.layernorm(x, gain=g.gain(N), beta=(g.gain(N) - 1).astype(np.float32))
        outs.append(g.op("MatMul", [y, w]))
    g.output(g.op("Add", outs))
    report, diffs, out = rewrite_and_run(g.model(), tmp_path, strategy=strategy)
    assert report.rewritten == 2 and report.bytes_added == 0, report.table()
    assert_exact(diffs)
    assert sum(np.prod(t.dims) == N * K for t in out.graph.initializer) == 1


def test_quantized_linears_are_reported_plainly(tmp_path):
    """MatMulNBits (block-quantized int4) and QDQ weights: no exact fold exists; the report says
    so and points at the order that works (rewrite the float model, then quantize)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    g = GraphBuilder()
    x = g.input("x", [2, 5, 64])
    g.output(g.op("MatMul", [g.rms(x, gain=g.gain(64)), g.weight(64, 64)]), shape=[2, 5, 64])
    src = tmp_path / "float.onnx"
    onnx.save(g.model(), src)
    nbits = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True)
    nbits.process()
    int4 = tmp_path / "int4.onnx"
    nbits.model.save_model_to_file(str(int4))
    int8 = tmp_path / "int8.onnx"
    quantize_dynamic(str(src), str(int8), weight_type=QuantType.QInt8)
    from rewriter import rewrite
    for path, what in ((int4, "MatMulNBits"), (int8, "DynamicQuantizeLinear")):
        _, report = rewrite(str(path))
        assert report.rewritten == 0 and f"quantized (consumer {what})" in report.sites[0].reason, report.table()

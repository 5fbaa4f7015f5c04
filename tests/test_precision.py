"""Precision of the exact forms against a float64 reference.

The deferred 1/RMS multiplies whole rows: its rounding error has one sign over a row, so the
following matmuls do not average it out the way they average the original's per-element
roundings. It must therefore be as accurate as the original's own 1/RMS. onnxruntime's CPU
ReduceSumSquare sums the squares one after the other in fp32 (error growing like √n);
ReduceMean's vectorized sum does not — the deferred form computes mean(x²) with Mul + ReduceMean,
the kernels of the exported norm. fp64 models get their 1/RMS in fp64.
The real-model criterion (SmolLM2, fp64 reference) is in tests/test_smollm2_real.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builders import GraphBuilder
from rewriter import rewrite
from rewriter.verify import session

EPS = 1e-5
EXACT_FORMS = {
    "defer": dict(),
    "defer-nopush": dict(push_scales=False),
    "defer-normop": dict(strategy="defer-normop"),
    "defer-normop-nopush": dict(strategy="defer-normop", push_scales=False),
    "fold": dict(mode="fold"),
    "fold-fused": dict(strategy="fold-fused"),
}


def residual_rows(rows: int, n: int, seed: int = 0) -> np.ndarray:
    """Rows shaped like a transformer's residual stream: RMS spread over three decades, a few
    massive channels (|x| up to ~500 where the rest is O(1))."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)) * np.exp(1.5 * rng.standard_normal((rows, 1)))
    massive = rng.random((rows, n)) < 4 / n
    x[massive] *= rng.uniform(20, 500, massive.sum())
    return x.astype(np.float32)[None]


def run(proto: onnx.ModelProto, feeds: dict, outputs=None) -> list[np.ndarray]:
    return session(proto.SerializeToString(), "cpu").run(outputs, feeds)


# -- fp64 models: the 1/RMS in fp64 -------------------------------------------------------------
def rms_linear_f64(n: int = 64, k: int = 48, eps: float = EPS, seed: int = 0) -> onnx.ModelProto:
    """x (double) → decomposed RMSNorm with a gain → two MatMuls, all in float64."""
    g = GraphBuilder(opset=18, seed=seed)
    x = g.input("x", [None, None, n], np.float64)
    ms = g.reduce_mean(g.op("Mul", [x, x]))
    root = g.op("Sqrt", [g.op("Add", [ms, g.const(np.array(eps, np.float64), "eps")])])
    y = g.op("Mul", [g.op("Mul", [x, g.op("Reciprocal", [root])]), g.const(g.gain(n, np.float64), "gain")])
    for _ in range(2):
        g.output(g.op("MatMul", [y, g.weight(n, k, np.float64)]), np.float64)
    return g.model()


def float_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value of the (shape-inferred) graph."""
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return types


@pytest.mark.parametrize("form", EXACT_FORMS)
def test_float64_model_keeps_float64(form):
    proto = rms_linear_f64()
    out, report = rewrite(proto, **EXACT_FORMS[form])
    assert report.rewritten == 1
    types = float_types(out)
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert not casts, [(n.input, n.attribute) for n in casts]     # nothing narrowed to fp32
    if form.startswith("defer"):
        # the deferred 1/RMS: Mul(x, x) → ReduceMean → Add ε → Sqrt → Reciprocal, all double
        path = [n for n in out.graph.node if n.op_type in ("ReduceMean", "Sqrt", "Reciprocal")]
        assert [n.op_type for n in path] == ["ReduceMean", "Sqrt", "Reciprocal"]
        assert all(types[n.output[0]] == TensorProto.DOUBLE for n in path)
    assert all(t != TensorProto.FLOAT for t in types.values())
    x = residual_rows(7, 64).astype(np.float64)
    x[0, 3] = 0.0                                               # one all-zero row: 1/sqrt(ε)
    want = run(proto, {"x": x})
    got = run(out, {"x": x})
    for a, b in zip(want, got):
        assert b.dtype == np.float64
        assert np.max(np.abs(a - b)) <= 1e-12 * np.max(np.abs(a))


def test_float64_inverse_rms_matches_numpy():
    """The scale itself, exposed as an output: fp64 to the last few ulps."""
    proto = rms_linear_f64()
    out, _ = rewrite(proto)
    inv = next(n for n in out.graph.node if n.op_type == "Reciprocal").output[0]
    out.graph.output.append(helper.make_tensor_value_info(inv, TensorProto.DOUBLE, None))
    x = residual_rows(64, 64).astype(np.float64)
    s = run(out, {"x": x}, [inv])[0]
    exact = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
    assert np.max(np.abs(s - exact) / exact) <= 1e-14


# -- fp32: the deferred 1/RMS is as accurate as the original's ---------------------------------
def rms_linear(n: int, k: int, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    g = GraphBuilder(opset=18, seed=seed)
    x = g.input("x", [None, None, n])
    gain = (1 + 0.3 * g.rng.standard_normal(n)).astype(np.float32)
    w = (g.rng.standard_normal((n, k)) / np.sqrt(n)).astype(np.float32)
    y = g.rms(x, square="pow", inverse="reciprocal", eps=EPS, gain=gain)
    g.output(g.op("MatMul", [y, g.const(w, "W")]))
    return g.model(), gain, w


def exact_output(x: np.ndarray, gain: np.ndarray, w: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * gain.astype(np.float64) \
        @ w.astype(np.float64)


def scale_output(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """`proto` with its 1/RMS (the Reciprocal or the fused norm's inverse-std) as an output."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    fused = [n.output[1] for n in proto.graph.node if n.op_type == "SimplifiedLayerNormalization"]
    roots = {n.output[0] for n in proto.graph.node if n.op_type == "Sqrt"}
    inverse = [n.output[0] for n in proto.graph.node       # Reciprocal(root) or Div(c, root)
               if n.op_type in ("Reciprocal", "Div") and n.input[-1] in roots]
    (name,) = fused or inverse
    proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return proto, name


@pytest.mark.parametrize("n", [576, 4096])
@pytest.mark.parametrize("strategy", ["defer", "defer-normop"])
def test_deferred_inverse_rms_as_accurate_as_the_originals(n, strategy):
    """Error of the 1/RMS itself, in units of 2⁻²⁴ relative: the rewritten graph's vs the
    original graph's own (its decomposed ReduceMean chain), on the same rows. The
    ReduceSumSquare form was 2.2 (576) and ~8 (4096) rms, 3–4× the original's."""
    proto, _, _ = rms_linear(n, 8)
    rewritten, _ = rewrite(proto, strategy=strategy)
    x = residual_rows(2048, n)
    exact = 1 / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + EPS)

    def error(model):
        model, name = scale_output(model)
        s = run(model, {"x": x}, [name])[0].astype(np.float64)
        e = (s - exact) / exact / 2.0 ** -24
        return float(np.sqrt(np.mean(e * e))), float(np.max(np.abs(e)))

    (orig_rms, orig_max), (new_rms, new_max) = error(proto), error(rewritten)
    assert new_rms <= 1.25 * orig_rms and new_max <= 1.5 * orig_max + 1, \
        f"1/RMS error (2^-24 units): rewritten rms {new_rms:.2f} max {new_max:.1f}, original rms {orig_rms:.2f} max {orig_max:.1f}"


@pytest.mark.parametrize("form", EXACT_FORMS)
def test_output_error_no_worse_than_the_originals(form):
    """norm → linear on residual-like rows: the rewritten output's error against float64 (rms
    over the tensor, relative) is the original's, not more. (The ReduceSumSquare form: 1.3×
    at n = 576, more at larger n.)"""
    n, k = 2048, 256
    proto, gain, w = rms_linear(n, k)
    rewritten, report = rewrite(proto, **EXACT_FORMS[form])
    assert report.rewritten == 1
    x = residual_rows(1024, n, seed=1)
    exact = exact_output(x, gain, w)

    def error(model):
        y = run(model, {"x": x})[0].astype(np.float64)
        return float(np.sqrt(np.mean((y - exact) ** 2) / np.mean(exact ** 2)))

    orig, new = error(proto), error(rewritten)
    assert new <= 1.1 * orig, f"{form}: rewritten {new:.3e} vs original {orig:.3e} ({new / orig:.2f}×)"

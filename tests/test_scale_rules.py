"""Every rule of the scale algebra (rewriter/scale.py RULES), where it must fire and where it
must not. Each case builds norm → linear → h → [ops under test] → Softmax (which stops any
scale), rewrites it with the deferred form and asserts, together with onnxruntime parity:
  - passes: the probe node reads h's descendants unscaled (the factor went past it);
  - stops:  the probe node reads a deferred-scale Mul (the factor was applied before it).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from builders import GraphBuilder
from parity import assert_exact, rewrite_and_run
from rewriter.scale import RULES

B, S, N, H = 2, 5, 16, 12


def c(array):
    """float32 unless the array is integer (shapes, axes)."""
    array = np.asarray(array)
    return array if array.dtype.kind == "i" else array.astype(np.float32)


# name -> (expected, chain(g, h) -> (probe output, chain output))
def _unary(op_type, **attrs):
    return lambda g, h: (lambda p: (p, p))(g.op(op_type, [h], **attrs))


def _binary(op_type, other, swap=False):
    def chain(g, h):
        o = other(g, h)
        p = g.op(op_type, [o, h] if swap else [h, o])
        return p, p
    return chain


def _const(array):
    return lambda g, h: g.const(c(array))


def _typed(array):
    """A constant of exactly this dtype (a CastLike target)."""
    return lambda g, h: g.const(array)


def _with(op_type, *extra, **attrs):
    def chain(g, h):
        p = g.op(op_type, [h, *[e(g, h) if callable(e) else e for e in extra]], **attrs)
        return p, p
    return chain


def _transpose_then(perm, then):
    def chain(g, h):
        t = g.op("Transpose", [h], perm=perm)
        return then(g, t)
    return chain


def _matmul_const(rows):
    return lambda g, h: (lambda p: (p, p))(g.op("MatMul", [h, g.weight(rows, 7)]))


def _split(axis):
    def chain(g, h):
        a, b = g.op("Split", [h], n_out=2, axis=axis, num_outputs=2)
        return a, g.op("Concat", [a, b], axis=axis)
    return chain


def _if_reads(g, h):
    """An If whose branches read h from the outer scope (not a listed input)."""
    from onnx import helper
    then = helper.make_graph([helper.make_node("Relu", [h], ["then_out"])], "then", [],
                             [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", [h], ["else_out"])], "else", [],
                              [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)])
    cond = g.const(np.array(True), "cond")
    out = g.name("if_out")
    g.nodes.append(helper.make_node("If", [cond], [out], name=g.name("If"), then_branch=then, else_branch=other))
    return out, out


CASES = {
    # rule        case name                 passes?  chain
    "unary": [("Relu", True, _unary("Relu")), ("Neg", True, _unary("Neg")), ("Abs", True, _unary("Abs")),
              ("LeakyRelu", True, _unary("LeakyRelu", alpha=0.1)), ("Identity", True, _unary("Identity")),
              ("Sigmoid (no rule)", False, _unary("Sigmoid")), ("Exp (no rule)", False, _unary("Exp"))],
    "cast": [("to fp64 (widening)", True, _unary("Cast", to=TensorProto.DOUBLE)),
             ("to fp16 (narrowing)", False, _unary("Cast", to=TensorProto.FLOAT16)),
             ("CastLike fp64 (widening)", True, _with("CastLike", _typed(np.zeros(1, np.float64)))),
             ("CastLike fp16 (narrowing)", False, _with("CastLike", _typed(np.zeros(1, np.float16))))],
    "mul": [("by a constant row", True, _binary("Mul", _const(np.linspace(-1, 1, H)))),
            ("h·h (degree 2)", True, lambda g, h: (lambda p: (p, p))(g.op("Mul", [h, h]))),
            ("constant adds a leading axis", False, _binary("Mul", _const(np.ones((1, 1, 1, H)))))],
    "div": [("by a constant", True, _binary("Div", _const(np.linspace(1, 2, H)))),
            ("constant / h (degree −1)", True, _binary("Div", _const(np.linspace(1, 2, H)), swap=True)),
            ("constant adds a leading axis", False, _binary("Div", _const(np.ones((1, 1, 1, H)))))],
    "same_factor": [("h + h", True, lambda g, h: (lambda p: (p, p))(g.op("Add", [h, h]))),
                    ("h + bias", False, _binary("Add", _const(np.linspace(-1, 1, H)))),
                    ("h − h·2", True, lambda g, h: (lambda p: (p, p))(g.op("Sub", [h, g.op("Mul", [h, g.const(c(2.0))])]))),
                    ("Sum(h, h)", True, lambda g, h: (lambda p: (p, p))(g.op("Sum", [h, h]))),
                    ("Sum(h, constant)", False, lambda g, h: (lambda p: (p, p))(g.op("Sum", [h, g.const(c(np.ones(H)))])))],
    "power": [("scalar exponent", True, _with("Pow", _const(2.0))),
              ("exponent of shape [1]", True, _with("Pow", _const([3.0]))),
              ("per-channel exponent", False, _with("Pow", _const(np.full(H, 2.0)))),
              ("exponent adds axes", False, _with("Pow", _const(np.full((1, 1, 1, 1), 2.0))))],
    # in fp16/bf16 the degree stays within ±1: tests/regressions/fp16_scale_squared_overflow.onnx
    "matmul": [("by a constant weight", True, _matmul_const(H)),
               ("rows moved to the contracted axis", False, _transpose_then([0, 2, 1], lambda g, t: (
                   lambda p: (p, p))(g.op("MatMul", [t, g.weight(S, 7)])))),
               ("by an activation", False, lambda g, h: (lambda p: (p, p))(g.op("MatMul", [h, g.op("Transpose", [h], perm=[0, 2, 1])])))],
    "transpose": [("swap rows", True, _unary("Transpose", perm=[1, 0, 2])),
                  ("rows to the last axis, then a feature op", True, _unary("Transpose", perm=[0, 2, 1]))],
    "reshape": [("split the features", True, _with("Reshape", _const(np.array([B, S, 3, 4], np.int64)))),
                ("merge the rows", False, _with("Reshape", _const(np.array([B * S, H], np.int64)))),
                ("rows into features", False, _with("Reshape", _const(np.array([B, S * H], np.int64))))],
    "slice_": [("feature axis", True, _with("Slice", _const(np.array([2], np.int64)), _const(np.array([8], np.int64)),
                                            _const(np.array([-1], np.int64)))),
               ("row axis", False, _with("Slice", _const(np.array([1], np.int64)), _const(np.array([3], np.int64)),
                                         _const(np.array([1], np.int64))))],
    "split": [("feature axis", True, _split(-1)), ("row axis", False, _split(0))],
    "concat": [("h, h on features", True, lambda g, h: (lambda p: (p, p))(g.op("Concat", [h, h], axis=-1))),
               ("h, h on rows", False, lambda g, h: (lambda p: (p, p))(g.op("Concat", [h, h], axis=1))),
               ("h, constant", False, lambda g, h: (lambda p: (p, p))(g.op("Concat", [h, g.const(c(np.ones((B, S, 2))))], axis=-1)))],
}
ALL = [(rule, name, passes, chain) for rule, cases in CASES.items() for name, passes, chain in cases]


def build(chain, opset=18):
    g = GraphBuilder(opset=opset)
    x = g.input("x", [B, S, N])
    h = g.op("MatMul", [g.rms(x, gain=g.gain(N)), g.weight(N, H)])
    probe, out = chain(g, h)
    y = g.op("Softmax", [out], axis=-1)
    g.outputs.append(onnx.helper.make_tensor_value_info(y, TensorProto.UNDEFINED, None))
    proto = g.model()
    inferred = onnx.shape_inference.infer_shapes(proto)       # declare the output's type and rank
    proto.graph.output[0].CopyFrom(inferred.graph.output[0])
    return proto, probe


def reads_deferred_scale(proto, output_name: str) -> bool:
    """Whether the node making `output_name` reads a value the rewriter scaled."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    node = producers[output_name]
    return any(producers.get(i) is not None and producers[i].name.startswith("flashnorm/deferred_scale")
               for i in node.input)


def test_every_rule_has_cases():
    assert {rule.__name__ for rule in RULES.values()} - {"rotary"} <= set(CASES)
    for rule, cases in CASES.items():
        assert {p for _, p, _ in cases} == {True, False} or rule in ("transpose",), rule


@pytest.mark.parametrize("rule,name,passes,chain", ALL, ids=[f"{r}:{n}" for r, n, _, _ in ALL])
def test_rule(rule, name, passes, chain, tmp_path):
    proto, probe = build(chain)
    report, diffs, out = rewrite_and_run(proto, tmp_path)
    assert report.rewritten == 1
    tol = 1e-2 if "fp16" in name else 1e-5
    assert_exact(diffs, tol)
    assert reads_deferred_scale(out, probe) is (not passes), f"{rule}: {name}"


def test_subgraph_reader_gets_the_scale(tmp_path):
    proto, probe = build(_if_reads)
    report, diffs, out = rewrite_and_run(proto, tmp_path)
    assert report.rewritten == 1
    assert_exact(diffs)
    branch_inputs = {i for n in out.graph.node if n.op_type == "If" for a in n.attribute for b in [a.g]
                     for m in b.node for i in m.input}
    producers = {o: n for n in out.graph.node for o in n.output}
    assert all(producers[i].name.startswith("flashnorm/deferred_scale") for i in branch_inputs if i in producers)


def _rotary(g, h):
    """ONNX RotaryEmbedding (opset 23) on [B, S, 3 heads × 4]: pairs rotate within each head."""
    angles = np.outer(np.arange(S), 1.0 / 10000 ** (np.arange(2) / 2))
    cos, sin = g.const(np.cos(angles).astype(np.float32), "cos"), g.const(np.sin(angles).astype(np.float32), "sin")
    positions = g.const(np.tile(np.arange(S, dtype=np.int64), (B, 1)), "positions")
    p = g.op("RotaryEmbedding", [h, cos, sin, positions], num_heads=3)
    return p, p


def test_rotary_embedding_passes(tmp_path):
    proto, probe = build(_rotary, opset=23)
    report, diffs, out = rewrite_and_run(proto, tmp_path)
    assert report.rewritten == 1
    assert_exact(diffs)
    assert not reads_deferred_scale(out, probe)

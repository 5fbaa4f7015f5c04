"""The scale algebra: where the deferred 1/RMS lands, proven by execution each time.

Each graph is one norm feeding a block; the assertions name the op each deferred Mul ends up
reading (its placement) and compare outputs with the original under onnxruntime.
"""

import numpy as np
import onnx
import pytest

from builders import GraphBuilder
from parity import assert_exact, rewrite_and_run

N, H = 16, 24


def placements(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    """(producer op of the scaled tensor, consumer op of the result) per deferred Mul."""
    prod = {o: n for n in proto.graph.node for o in n.output}
    cons: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n.op_type)
    outputs = {o.name for o in proto.graph.output}
    found = []
    for n in proto.graph.node:
        factor = prod.get(n.input[1]) if n.op_type == "Mul" and n.input[0] != n.input[1] else None
        if factor is not None and _is_scale(factor, prod):
            src = prod.get(n.input[0])
            dst = "output" if n.output[0] in outputs else ",".join(cons.get(n.output[0], []))
            found.append((src.op_type if src else n.input[0], dst))
    return sorted(found)


def _is_scale(node, prod) -> bool:
    """The factor is the rewriter's 1/RMS (possibly cast, squared, reshaped or transposed);
    the rewriter prefixes the nodes it creates with "flashnorm/"."""
    while node is not None and node.op_type in ("Cast", "Mul", "Transpose", "Reshape", "Pow"):
        if node.op_type == "Mul" and node.input[0] != node.input[1]:
            return False
        node = prod.get(node.input[0])
    return node is not None and node.op_type in ("Reciprocal", "Div") and node.name.startswith("flashnorm/")


def block(kind: str):
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    y = g.rms(x, gain=g.gain(N))
    if kind == "swiglu":        # down(silu(gate(y)) ⊙ up(y)), SiLU as x·sigmoid(x)
        gate, up = g.op("MatMul", [y, g.weight(N, H)]), g.op("MatMul", [y, g.weight(N, H)])
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        out = g.op("MatMul", [g.op("Mul", [act, up]), g.weight(H, N)])
    elif kind == "reglu":       # down(gate(y) ⊙ relu(up(y)))
        gate, up = g.op("MatMul", [y, g.weight(N, H)]), g.op("MatMul", [y, g.weight(N, H)])
        out = g.op("MatMul", [g.op("Mul", [gate, g.op("Relu", [up])]), g.weight(H, N)])
    elif kind == "relu-ffn":
        out = g.op("MatMul", [g.op("Relu", [g.op("MatMul", [y, g.weight(N, H)])]), g.weight(H, N)])
    elif kind == "squared-relu":
        r = g.op("Relu", [g.op("MatMul", [y, g.weight(N, H)])])
        out = g.op("MatMul", [g.op("Pow", [r, g.const(np.array(2.0, np.float32))]), g.weight(H, N)])
    elif kind == "bias":        # Qwen2-style q bias: the scale must be applied before the Add
        out = g.op("Add", [g.op("MatMul", [y, g.weight(N, N)]), g.const(g.rng.standard_normal(N).astype(np.float32))])
    elif kind == "rope-attention":
        heads, hd = 2, N // 2
        def split_heads(t):
            return g.op("Transpose", [g.op("Reshape", [t, g.const(np.array([2, 5, heads, hd], np.int64))])],
                        perm=[0, 2, 1, 3])
        def rope(t):
            cos = g.const(np.cos(np.arange(5 * hd).reshape(1, 1, 5, hd) / 7).astype(np.float32), "cos")
            sin = g.const(np.sin(np.arange(5 * hd).reshape(1, 1, 5, hd) / 7).astype(np.float32), "sin")
            half = hd // 2
            ax, one = g.const(np.array([3], np.int64)), g.const(np.array([1], np.int64))
            x1 = g.op("Slice", [t, g.const(np.array([0], np.int64)), g.const(np.array([half], np.int64)), ax, one])
            x2 = g.op("Slice", [t, g.const(np.array([half], np.int64)), g.const(np.array([hd], np.int64)), ax, one])
            rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
            return g.op("Add", [g.op("Mul", [t, cos]), g.op("Mul", [rot, sin])])
        q, k, v = (split_heads(g.op("MatMul", [y, g.weight(N, N)])) for _ in range(3))
        scores = g.op("MatMul", [rope(q), g.op("Transpose", [rope(k)], perm=[0, 1, 3, 2])])
        out = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    g.output(out, shape=[2, None, None, None] if kind == "rope-attention" else [2, 5, N])
    return g.model()


EXPECTED = {
    # SiLU = g·σ(g): σ needs s on its input, applied once at g for both of g's readers (the
    # x·σ(x) pattern ORT fuses into QuickGelu stays intact); up's s rides the product and down
    "swiglu": [("MatMul", "Sigmoid,Mul"), ("MatMul", "output")],
    # ReLU is positively homogeneous: both scalars merge into s² after down
    "reglu": [("MatMul", "output")],
    "relu-ffn": [("MatMul", "output")],
    "squared-relu": [("MatMul", "output")],
    "bias": [("MatMul", "Add")],
    # bound for attention: applied at each projection's output (as big a tensor as anywhere
    # later, and outside the RoPE/attention patterns onnxruntime fuses)
    "rope-attention": [("MatMul", "Reshape")] * 3,
}


@pytest.mark.parametrize("kind", EXPECTED)
def test_scale_lands_where_the_algebra_says(kind, tmp_path):
    report, diffs, out = rewrite_and_run(block(kind), tmp_path)
    assert report.rewritten == 1
    assert_exact(diffs)
    assert placements(out) == sorted(EXPECTED[kind])


@pytest.mark.parametrize("kind", EXPECTED)
def test_no_push_applies_scales_right_after_each_linear(kind, tmp_path):
    report, diffs, out = rewrite_and_run(block(kind), tmp_path, push_scales=False)
    assert_exact(diffs)
    assert all(src == "MatMul" for src, _ in placements(out))

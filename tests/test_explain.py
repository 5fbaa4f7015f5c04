"""`python -m rewriter explain MODEL NAME`: the norm, its consumers, the decision and every op
the deferred scale met — or the failed condition and the node at fault."""

import numpy as np
import onnx

from builders import GraphBuilder
from test_faults import cli

N, H = 16, 24


def model(tmp_path, blocked=False):
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    y = g.rms(x, gain=g.gain(N))
    h = g.op("MatMul", [y, g.weight(N, H)])
    if blocked:                    # a residual Add of the normalized tensor: not a linear
        y2 = g.rms(x, gain=g.gain(N))
        g.output(g.op("Add", [y2, x]))
    heads = g.op("Reshape", [h, g.const(np.array([2, 5, 4, 6], np.int64), "shape")])
    g.output(g.op("Softmax", [g.op("Relu", [heads])], axis=-1), shape=[2, 5, 4, 6])
    path = tmp_path / "m.onnx"
    onnx.save(g.model(), path)
    return path, g


def test_explain_a_deferred_site_step_by_step(tmp_path):
    path, g = model(tmp_path)
    matmul = next(n.name for n in g.nodes if n.op_type == "MatMul")
    code, out, err = cli("explain", str(path), matmul)
    assert code == 0, err
    assert "rms/decomposed normalization at ReduceMean" in out
    assert f'linear:  MatMul "{matmul}"' in out
    assert "decision: defer" in out
    lines = out.splitlines()
    assert any("Reshape" in line and "passes (rule reshape)" in line for line in lines)
    assert any("Relu" in line and "passes (rule unary)" in line for line in lines)
    assert any("Softmax" in line and "applied before it: no rule for Softmax" in line for line in lines)


def test_explain_names_the_failed_condition_and_the_node(tmp_path):
    path, g = model(tmp_path, blocked=True)
    add = next(n for n in g.nodes if n.op_type == "Add" and "x" in n.input)
    code, out, err = cli("explain", str(path), add.input[0])
    assert code == 0, err
    assert f'not rewritten: consumer Add is not a linear on the normalized axis (at Add node "{add.name}")' in out


def test_explain_an_unknown_name_is_exit_6(tmp_path):
    path, _ = model(tmp_path)
    code, out, err = cli("explain", str(path), "no_such_node")
    assert code == 6 and err.startswith("error: no_such_node: no normalization") and err.count("\n") == 1


def test_explain_says_why_a_scale_stops_at_an_attention_projection(tmp_path):
    """q and k reach a MatMul of two activations: the scale is applied at the projection (so
    onnxruntime's attention fusion still matches), and explain says that — not 'x·f(x)'."""
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    y = g.rms(x, gain=g.gain(N))
    q = g.op("MatMul", [y, g.weight(N, N)])
    k = g.op("MatMul", [y, g.weight(N, N)])
    g.output(g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 2, 1])]), shape=[2, 5, 5])
    path = tmp_path / "attn.onnx"
    onnx.save(g.model(), path)
    matmul = next(n.name for n in g.nodes if n.op_type == "MatMul")
    code, out, err = cli("explain", str(path), matmul)
    assert code == 0, err
    assert "applied at the projection bound for attention" in out, out
    assert "x·f(x)" not in out, out

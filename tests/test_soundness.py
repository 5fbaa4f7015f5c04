"""Soundness regressions, one per class of wrong rewrite: each graph was once rewritten wrongly with
exit 0. Now each is rewritten exactly or left alone with its reason — asserted with the
site counts, the structure and onnxruntime (or the ONNX reference evaluator for fp16)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from builders import GraphBuilder
from parity import assert_exact, rewrite_and_run
from rewriter import rewrite

N, H = 16, 12


def _out(g, value, dtype=TensorProto.FLOAT):
    g.outputs.append(helper.make_tensor_value_info(value, dtype, None))
    proto = g.model()
    proto.graph.output[0].CopyFrom(onnx.shape_inference.infer_shapes(proto).graph.output[0])
    return proto


def _bool_input(g, name):
    g.inputs.append(helper.make_tensor_value_info(name, TensorProto.BOOL, []))
    return name


def _branch(name, op_type, reads, out_dtype=TensorProto.FLOAT, extra=()):
    nodes = [helper.make_node(op_type, [reads, *extra], [f"{name}_out"])]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_out", out_dtype, None)])


# -- 1. values read inside subgraphs ------------------------------------------------------------

@pytest.mark.parametrize("push", [True, False])
def test_deferred_output_read_in_if_branches(push, tmp_path):
    g = GraphBuilder()
    x, cond = g.input("x", [2, 5, N]), _bool_input(g, "cond")
    h = g.op("MatMul", [g.rms(x, gain=g.gain(N)), g.weight(N, H)])
    out = g.name("if_out")
    g.nodes.append(helper.make_node("If", [cond], [out], then_branch=_branch("then", "Relu", h),
                                    else_branch=_branch("else", "Neg", h)))
    proto = _out(g, out)
    for flag in (True, False):
        feeds = {"x": np.random.default_rng(1).standard_normal((2, 5, N)).astype(np.float32) * 7,
                 "cond": np.array(flag)}
        report, diffs, _ = rewrite_and_run(proto, tmp_path, feeds=feeds, push_scales=push)
        assert report.rewritten == 1
        assert_exact(diffs)


def test_deferred_output_read_in_loop_body(tmp_path):
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    h = g.op("MatMul", [g.rms(x, gain=g.gain(N)), g.weight(N, H)])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", h], ["acc_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None)])
    out = g.name("loop_out")
    g.nodes.append(helper.make_node("Loop", [g.const(np.array(3, np.int64)), g.const(np.array(True)),
                                             g.const(np.zeros((2, 5, H), np.float32))], [out], body=body))
    g.outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, 5, H]))
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path)
    assert report.rewritten == 1
    assert_exact(diffs)


def test_linear_inside_a_branch_reading_the_norm_is_left_alone(tmp_path):
    g = GraphBuilder()
    x, cond = g.input("x", [2, 5, N]), _bool_input(g, "cond")
    y = g.rms(x, gain=g.gain(N))
    w = g.weight(N, H)
    out = g.name("if_out")
    g.nodes.append(helper.make_node("If", [cond], [out], then_branch=_branch("then", "MatMul", y, extra=[w]),
                                    else_branch=_branch("else", "MatMul", y, extra=[w])))
    proto = _out(g, g.op("Relu", [out]))
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 5, N)).astype(np.float32), "cond": np.array(True)}
    report, diffs, _ = rewrite_and_run(proto, tmp_path, feeds=feeds)
    assert report.rewritten == 0
    assert "inside a subgraph" in report.to_dict()["sites"][0]["reason"]
    assert_exact(diffs)


# -- 2. the scaled axis ---------------------------------------------------------------------------

@pytest.mark.parametrize("rows,width", [(N, N), (5, 7)], ids=["square", "non-square"])
def test_rows_transposed_onto_the_contracted_axis(rows, width, tmp_path):
    """h [B, S, W] → Transpose(0,2,1) → [B, W, S] → MatMul V[S, K]: S (the rows) is contracted."""
    g = GraphBuilder()
    x = g.input("x", ["batch", rows, N])
    h = g.op("MatMul", [g.rms(x, gain=g.gain(N)), g.weight(N, width)])
    t = g.op("Transpose", [h], perm=[0, 2, 1])
    report, diffs, out = rewrite_and_run(_out(g, g.op("MatMul", [t, g.weight(rows, 6)])), tmp_path)
    assert report.rewritten == 1
    assert_exact(diffs)


def test_reshape_dropping_a_width_one_feature_axis(tmp_path):
    """h [S, 1] → Reshape [S] → MatMul V[S, K]: the only axis left is the row axis."""
    g = GraphBuilder()
    x = g.input("x", [5, N])
    h = g.op("MatMul", [g.rms(x, gain=g.gain(N)), g.weight(N, 1)])
    flat = g.op("Reshape", [h, g.const(np.array([5], np.int64), "shape")])
    report, diffs, _ = rewrite_and_run(_out(g, g.op("MatMul", [flat, g.weight(5, 4)])), tmp_path)
    assert report.rewritten == 1
    assert_exact(diffs)


# -- 3. attributes that change the meaning ------------------------------------------------------

@pytest.mark.parametrize("mean_axes", [None, [-2], [0, 1, 2]], ids=["all-axes", "axis-2", "listed-all"])
def test_layernorm_mean_over_other_axes_is_not_a_layernorm(mean_axes, tmp_path):
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    if mean_axes is None:
        mean = g.op("ReduceMean", [x], keepdims=1)
    else:
        mean = g.op("ReduceMean", [x, g.const(np.array(mean_axes, np.int64), "axes")], keepdims=1)
    d = g.op("Sub", [x, mean])
    var = g.reduce_mean(g.op("Pow", [d, g.const(np.array(2.0, np.float32))]))
    y = g.op("Div", [d, g.op("Sqrt", [g.op("Add", [var, g.const(np.array(1e-5, np.float32))])])])
    y = g.op("Add", [g.op("Mul", [y, g.const(g.gain(N))]), g.const(np.linspace(-1, 1, N).astype(np.float32))])
    report, diffs, _ = rewrite_and_run(_out(g, g.op("MatMul", [y, g.weight(N, H)])), tmp_path)
    assert report.rewritten == 0 or all(s["kind"] != "layer" for s in report.to_dict()["sites"] if s["action"] != "skip")
    assert_exact(diffs)


# -- 4. precision: no wider range in a narrower type ---------------------------------------------

def test_scale_is_applied_before_a_narrowing_cast(tmp_path):
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    h = g.op("MatMul", [g.rms(x, gain=g.gain(N)), g.weight(N, H)])
    half = g.op("Relu", [g.op("Cast", [h], to=TensorProto.FLOAT16)])
    proto = _out(g, half, TensorProto.FLOAT16)
    report, diffs, out = rewrite_and_run(proto, tmp_path)
    assert report.rewritten == 1
    producers = {o: n for n in out.graph.node for o in n.output}
    cast = next(n for n in out.graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16
                and not n.name.startswith("flashnorm/"))
    assert producers[cast.input[0]].name.startswith("flashnorm/deferred_scale"), "scale applied in fp32"
    assert_exact(diffs, 1e-3)


def test_autocast_norm_is_folded_not_deferred(tmp_path):
    """fp32 norm → Cast fp16 → fp16 MatMul: deferring would cast the raw x (RMS up to 1e5) to fp16."""
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    y16 = g.op("Cast", [g.rms(x, gain=g.gain(N))], to=TensorProto.FLOAT16)
    proto = _out(g, g.op("MatMul", [y16, g.weight(N, H, dtype=np.float16)]), TensorProto.FLOAT16)
    flash, report = rewrite(proto)
    decision = report.to_dict()["sites"][0]
    assert decision["action"] == "fold" and "narrows" in decision["reason"], decision
    feeds = {"x": (np.random.default_rng(3).standard_normal((2, 5, N)) * 1e5).astype(np.float32)}
    want = ReferenceEvaluator(proto).run(None, feeds)[0].astype(np.float64)
    got = ReferenceEvaluator(flash).run(None, feeds)[0].astype(np.float64)
    assert np.isfinite(want).all() and np.isfinite(got).all()
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-2


# -- 5. smaller: bf16 gains, ε that adds axes ----------------------------------------------------

def test_bfloat16_gain_is_recognized():
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    y = g.rms(x)
    gain = helper.make_tensor("gain_bf16", TensorProto.BFLOAT16, [N], vals=g.gain(N).tolist())
    g.inits.append(gain)
    y = g.op("Mul", [g.op("Cast", [y], to=TensorProto.BFLOAT16), "gain_bf16"])
    w = helper.make_tensor("w_bf16", TensorProto.BFLOAT16, [N, H], vals=g.rng.standard_normal(N * H).tolist())
    g.inits.append(w)
    proto = _out(g, g.op("Cast", [g.op("MatMul", [y, "w_bf16"])], to=TensorProto.FLOAT))
    _, report = rewrite(proto)
    site = report.to_dict()["sites"][0]
    assert site["action"] != "skip" and site.get("gain", True), site


def test_epsilon_that_adds_axes_is_not_matched(tmp_path):
    """ε of shape [1,1,1] on a rank-2 input makes the norm's output rank 3: not a per-row norm."""
    g = GraphBuilder()
    x = g.input("x", [5, N])
    ms = g.reduce_mean(g.op("Mul", [x, x]))
    root = g.op("Sqrt", [g.op("Add", [ms, g.const(np.full((1, 1, 1), 1e-5, np.float32), "eps")])])
    y = g.op("Mul", [g.op("Mul", [x, g.op("Reciprocal", [root])]), g.const(g.gain(N), "gain")])
    report, diffs, _ = rewrite_and_run(_out(g, g.op("MatMul", [y, g.weight(N, H)])), tmp_path)
    assert report.rewritten == 0
    assert_exact(diffs)

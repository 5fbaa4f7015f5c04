"""Norms inside subgraphs and functions: optimum's merged decoders put the decoder in
If branches, dynamo exports keep model-local functions. Each scope is rewritten exactly, with
outer reads in both directions."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import GraphBuilder
from parity import assert_exact, rewrite_and_run

N, H = 16, 24
rng = np.random.default_rng(0)


def branch(name: str, x: str, gain: np.ndarray, weight: str):
    """RMSNorm(x) → MatMul(weight) → Relu, inside a branch; x and the weight are outer values."""
    c = lambda a, n: numpy_helper.from_array(np.asarray(a, np.float32), f"{name}_{n}")  # noqa: E731
    nodes = [helper.make_node("Mul", [x, x], [f"{name}_sq"]),
             helper.make_node("ReduceMean", [f"{name}_sq", f"{name}_axes"], [f"{name}_ms"], keepdims=1),
             helper.make_node("Add", [f"{name}_ms", f"{name}_eps"], [f"{name}_var"]),
             helper.make_node("Sqrt", [f"{name}_var"], [f"{name}_rms"]),
             helper.make_node("Div", [x, f"{name}_rms"], [f"{name}_normed"]),
             helper.make_node("Mul", [f"{name}_normed", f"{name}_gain"], [f"{name}_y"]),
             helper.make_node("MatMul", [f"{name}_y", weight], [f"{name}_h"]),
             helper.make_node("Relu", [f"{name}_h"], [f"{name}_out"])]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), f"{name}_axes"), c(1e-6, "eps"), c(gain, "gain")]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
                             inits)


def if_model(shared_weight: bool):
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    cond = "cond"
    g.inputs.append(helper.make_tensor_value_info(cond, TensorProto.BOOL, []))
    w1 = g.weight(N, H)
    w2 = w1 if shared_weight else g.weight(N, H)
    out = g.name("if_out")
    g.nodes.append(helper.make_node("If", [cond], [out], then_branch=branch("then", x, g.gain(N), w1),
                                    else_branch=branch("else", x, g.gain(N), w2)))
    g.outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, 5, H]))
    return g.model()


@pytest.mark.parametrize("shared_weight", [False, True], ids=["own-weights", "one-outer-weight"])
@pytest.mark.parametrize("strategy", ["defer", "fold", "fold-fused"])
def test_norms_in_both_branches_of_an_if(shared_weight, strategy, tmp_path):
    proto = if_model(shared_weight)
    for flag in (True, False):
        feeds = {"x": (rng.standard_normal((2, 5, N)) * 4 + 1).astype(np.float32), "cond": np.array(flag)}
        report, diffs, out = rewrite_and_run(proto, tmp_path, feeds=feeds, strategy=strategy)
        assert (report.found, report.rewritten) == (2, 2), report.table()
        assert_exact(diffs)
    branches = [a.g for n in out.graph.node if n.op_type == "If" for a in n.attribute]
    if strategy == "defer":         # each branch's MatMul reads the outer x, its norm's Div is gone
        for b in branches:
            assert "Div" not in [m.op_type for m in b.node]
            reads = next(m for m in b.node if m.op_type == "MatMul").input[0]
            assert reads == "x" or (shared_weight and "shared_gain" in reads), reads   # shared: x·γ


def test_norm_in_a_loop_body(tmp_path):
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    body = branch("body", "acc_in", g.gain(N), g.weight(N, N))
    body.node.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    body.input.extend([helper.make_tensor_value_info("i", TensorProto.INT64, []),
                       helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                       helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [2, 5, N])])
    body.output.insert(0, helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []))
    out = g.name("loop_out")
    g.nodes.append(helper.make_node("Loop", [g.const(np.array(3, np.int64)), g.const(np.array(True)), x], [out],
                                    body=body))
    g.outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, 5, N]))
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path)
    assert report.rewritten == 1, report.table()
    assert_exact(diffs)


def test_norm_in_a_local_function_is_inlined_and_rewritten(tmp_path):
    fn_nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]),
                helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([-1], np.int64))),
                helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
                helper.make_node("Constant", [], ["eps"], value=numpy_helper.from_array(np.array(1e-6, np.float32))),
                helper.make_node("Add", ["ms", "eps"], ["var"]),
                helper.make_node("Sqrt", ["var"], ["rms"]),
                helper.make_node("Div", ["x", "rms"], ["normed"]),
                helper.make_node("Mul", ["normed", "gain"], ["y"])]
    fn = helper.make_function("local", "RMSNorm", ["x", "gain"], ["y"], fn_nodes,
                              [helper.make_opsetid("", 18)])
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    y = g.op("RMSNorm", [x, g.const(g.gain(N), "gain")], domain="local")
    g.output(g.op("MatMul", [y, g.weight(N, H)]), shape=[2, 5, H])
    proto = g.model()
    proto.functions.append(fn)
    proto.opset_import.append(helper.make_opsetid("local", 1))
    report, diffs, out = rewrite_and_run(proto, tmp_path)
    assert report.rewritten == 1 and any("inlined 1 call" in n for n in report.notes), report.table()
    assert_exact(diffs)
    assert "RMSNorm" not in [n.op_type for n in out.graph.node]


def merged_decoder(same_gain: bool, embedding_reads_weight: bool = False):
    """optimum's merged decoder in miniature: both If branches normalize the outer x and read one
    outer weight, after norms with the same gain (or not)."""
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    g.inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    w = g.weight(N, H)
    gain = g.gain(N)
    out = g.name("if_out")
    g.nodes.append(helper.make_node("If", ["cond"], [out], then_branch=branch("then", x, gain, w),
                                    else_branch=branch("else", x, gain if same_gain else g.gain(N), w)))
    g.outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, 5, H]))
    if embedding_reads_weight:          # a tied embedding: Gather rows of the same weight
        ids = g.input("ids", [2, 5], np.int64)
        g.output(g.op("Gather", [w, ids], axis=0), shape=[2, 5, H])
    return g.model(), w


@pytest.mark.parametrize("strategy", ["defer", "fold", "fold-fused"])
def test_a_weight_both_branches_read_after_the_same_gain_is_folded_once(strategy, tmp_path):
    proto, w = merged_decoder(same_gain=True)
    for flag in (True, False):
        feeds = {"x": (rng.standard_normal((2, 5, N)) * 4 + 1).astype(np.float32), "cond": np.array(flag)}
        report, diffs, out = rewrite_and_run(proto, tmp_path, feeds=feeds, strategy=strategy)
        assert (report.found, report.rewritten, report.bytes_added) == (2, 2, 0), report.table()
        assert_exact(diffs)
    branches = [a.g for n in out.graph.node if n.op_type == "If" for a in n.attribute]
    weights = {next(m for m in b.node if m.op_type == "MatMul").input[1] for b in branches}
    assert len(weights) == 1 and w not in weights, weights       # one folded copy, read by both
    assert w not in {i.name for i in out.graph.initializer}      # the original has no reader left
    assert not any("shared_gain" in i for b in branches for m in b.node for i in m.input)
    assert all("folded once" in s["reason"] for s in report.to_dict()["sites"]), report.table()


@pytest.mark.parametrize("case", ["different-gains", "embedding-reads-it"])
def test_a_weight_read_elsewhere_or_after_other_gains_keeps_the_gain_on_the_input(case, tmp_path):
    proto, w = merged_decoder(same_gain=case != "different-gains", embedding_reads_weight=case == "embedding-reads-it")
    feeds = {"x": (rng.standard_normal((2, 5, N)) * 4 + 1).astype(np.float32), "cond": np.array(True)}
    if case == "embedding-reads-it":
        feeds["ids"] = rng.integers(0, N, (2, 5)).astype(np.int64)
    report, diffs, out = rewrite_and_run(proto, tmp_path, feeds=feeds, strategy="fold")
    assert report.rewritten == 2 and report.bytes_added == 0
    assert_exact(diffs)
    assert w in {i.name for i in out.graph.initializer}
    assert not any("folded once" in s["reason"] for s in report.to_dict()["sites"])
    assert all("shared weight(s) kept" in s["reason"] for s in report.to_dict()["sites"]), report.table()

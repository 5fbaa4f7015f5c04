"""Every graph onnxruntime accepts is accepted: declarations that contradict the
graph are repaired and reported, never fatal; the output keeps the producer's graph outside the
rewritten sites — nothing inferred is added — and a run that rewrites nothing writes the graph
it read."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builders import GraphBuilder
from parity import assert_exact, rewrite_and_run
from test_faults import _write as make_fault, cli

N, H = 16, 24


def test_contradicting_output_shape_is_kept_with_a_warning(dirs):
    src, out = dirs
    path = make_fault("shape_conflict", src)
    code, _, err = cli(path, "-o", out / "m.onnx")
    assert code == 0, err
    assert "warning: declared shape of output" in err and "kept as declared" in err
    written = onnx.load(str(out / "m.onnx"), load_external_data=False)
    assert written.graph.output[0].type.tensor_type.shape.dim[2].dim_value == 99


def _with_stale_scalar_value_info():
    """The onnxruntime-genai builder's habit: a rank-0 value_info for a 1-D Constant."""
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    y = g.rms(x, gain=g.gain(N))
    shape = g.const(np.array([2, 5, H], np.int64), "shape", as_node=True)
    h = g.op("Reshape", [g.op("MatMul", [y, g.weight(N, H)]), shape])
    g.output(h, shape=[2, 5, H])
    proto = g.model()
    proto.graph.value_info.append(helper.make_tensor_value_info(shape, TensorProto.INT64, []))
    return proto


def test_stale_value_info_is_dropped_and_reported(tmp_path):
    proto = _with_stale_scalar_value_info()
    with pytest.warns(UserWarning, match="dropped 1 stale value_info"):
        report, diffs, written = rewrite_and_run(proto, tmp_path)
    assert report.rewritten == 1
    assert_exact(diffs)
    assert not written.graph.value_info            # nothing inferred added, the stale one gone


def test_declared_value_info_is_kept_and_nothing_inferred_is_added(tmp_path):
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    y = g.rms(x, gain=g.gain(N))
    h = g.op("MatMul", [y, g.weight(N, H)])
    r = g.op("Relu", [h])
    g.output(g.op("Softmax", [r], axis=-1), shape=[2, 5, H])
    proto = g.model()
    proto.graph.value_info.append(helper.make_tensor_value_info(r, TensorProto.FLOAT, [2, 5, H]))
    report, diffs, written = rewrite_and_run(proto, tmp_path)
    assert report.rewritten == 1
    assert [v.name for v in written.graph.value_info] == [r]


def test_a_run_that_rewrites_nothing_writes_the_graph_it_read(tmp_path):
    """Norms found, none rewritable (a residual Add reads each): not one field changes."""
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    y = g.op("Add", [g.rms(x, gain=g.gain(N)), x])
    z = g.op("Add", [g.layernorm(y, gain=g.gain(N), beta=g.gain(N)), y])
    g.output(g.op("MatMul", [z, g.weight(N, H)]), shape=[2, 5, H])
    proto = g.model()
    proto.graph.value_info.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, 5, N]))
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(proto, src)
    code, _, err = cli(src, "-o", dst)
    assert code == 0, err
    assert onnx.load(str(dst)).graph == onnx.load(str(src)).graph


def test_a_type_error_is_still_refused(dirs):
    src, out = dirs
    code, _, err = cli(make_fault("wrong_dtype", src), "-o", out / "m.onnx")
    assert code == 4 and "inconsistent type" in err


def test_castlike_constants_are_constants(tmp_path):
    """Dynamo exports of the torch 2.5/2.6 era: ε, the exponent and the gain arrive as
    CastLike(Constant, x), and the activation meets the weight through CastLike."""
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])

    def like(array):
        return g.op("CastLike", [g.const(np.asarray(array, np.float64), "c", as_node=True), x])
    ms = g.reduce_mean(g.op("Pow", [x, like(2.0)]))
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, like(1e-6)])])])
    y = g.op("Mul", [like(g.gain(N)), g.op("Mul", [x, inv])])
    w = g.weight(N, H)
    h = g.op("MatMul", [g.op("CastLike", [y, w]), w])
    g.output(h, shape=[2, 5, H])
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path)
    assert report.found == 1 and report.rewritten == 1, report.table()
    assert_exact(diffs)

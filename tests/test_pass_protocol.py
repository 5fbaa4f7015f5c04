"""FlashNormPass in onnx_ir's pass protocol: composed in a PassManager with onnx_ir's own
passes, it reports what it did through its PassResult and rewrites exactly."""

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (CommonSubexpressionEliminationPass, RemoveUnusedNodesPass,
                                   ShapeInferencePass, TopologicalSortPass)

from builders import GraphBuilder
from parity import assert_exact
from rewriter import rewrite
from rewriter.passes import FlashNormPass, FlashNormResult
from rewriter.verify import judge

N, H = 16, 24


def two_norms():
    g = GraphBuilder()
    x = g.input("x", [2, 5, N])
    h = g.op("MatMul", [g.rms(x, gain=g.gain(N)), g.weight(N, H)])
    y = g.op("MatMul", [g.layernorm(x, gain=g.gain(N), beta=g.gain(N) - 1), g.weight(N, H)])
    g.output(g.op("Add", [h, y]))
    return g.model()


def run(proto, feeds):
    import onnxruntime as ort
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_flashnorm_pass_in_a_pass_manager():
    proto = two_norms()
    model = ir.from_proto(proto)
    flash = FlashNormPass(mode="defer")
    result = ir.passes.PassManager([ShapeInferencePass(), CommonSubexpressionEliminationPass(), flash,
                                    RemoveUnusedNodesPass(), TopologicalSortPass()])(model)
    assert result.modified
    assert flash.report.found == 2 and flash.report.rewritten == 2
    kept = [n.op_type for n in model.graph if not n.name.startswith("flashnorm/")]
    assert sorted(kept) == ["Add", "MatMul", "MatMul"], kept                      # both norms gone
    feeds = {"x": (np.random.default_rng(0).standard_normal((2, 5, N)) * 3 + 1).astype(np.float32)}
    assert_exact(judge(run(proto, feeds), run(ir.to_proto(model), feeds)))


def test_a_second_run_modifies_nothing():
    model = ir.from_proto(two_norms())
    FlashNormPass()(model)
    RemoveUnusedNodesPass()(model)
    again = FlashNormPass()(model)
    assert isinstance(again, FlashNormResult)
    assert not again.modified and again.report.rewritten == 0


def test_the_library_leaves_logging_alone():
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnx_ir.passes.common.shape_inference")]
    levels = [logger.level for logger in loggers]
    rewrite(two_norms())
    assert [logger.level for logger in loggers] == levels

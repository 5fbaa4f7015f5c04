"""FlashNormPass in onnx_ir's pass protocol: composed in a PassManager with onnx_ir's own
passes, it reports what it did through its PassResult and rewrites exactly."""

import json
import logging
import subprocess
import sys

import numpy as np
import onnx
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


def computed_reshape():
    """LayerNorm → Reshape → Gemm with the Reshape's target computed from Shape (GPT-2's Conv1D
    under TorchScript): whether the Reshape keeps the normalized axis is known only from
    inferred shapes."""
    g = GraphBuilder()
    x = g.input("x", ["batch", "seq", N])
    ln = g.layernorm(x, gain=g.gain(N), beta=g.gain(N) - 1)
    width = g.op("Unsqueeze", [g.op("Gather", [g.op("Shape", [ln]), g.const(np.array(-1, np.int64))]),
                               g.const(np.array([0], np.int64))])
    flat = g.op("Reshape", [ln, g.op("Concat", [g.const(np.array([-1], np.int64)), width], axis=0)])
    g.output(g.op("Gemm", [flat, g.weight(N, H)]))
    return g.model()


def _graph(model: ir.Model) -> list:
    """Nodes (op, inputs, outputs, attributes) and initializers (name, bytes) of the main graph."""
    nodes = [(n.op_type, [v.name if v else "" for v in n.inputs], [v.name for v in n.outputs],
              sorted((k, str(a.value)) for k, a in n.attributes.items())) for n in model.graph]
    weights = sorted((name, v.const_value.numpy().tobytes()) for name, v in model.graph.initializers.items())
    return [nodes, weights]


def test_the_readme_example_rewrites_what_the_cli_does(tmp_path):
    """The README's PassManager([FlashNormPass(...), RemoveUnusedNodesPass()]) infers shapes
    itself (the pass's precondition): it rewrites the site the CLI rewrites, into the same graph;
    without shape inference (infer_shapes=False) the site is skipped."""
    src, dst = tmp_path / "m.onnx", tmp_path / "cli.onnx"
    onnx.save(computed_reshape(), src)
    done = subprocess.run([sys.executable, "-m", "rewriter", str(src), "-o", str(dst), "--report",
                           str(tmp_path / "r.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cli = json.loads((tmp_path / "r.json").read_text())

    model_ir = ir.load(src)
    flash = FlashNormPass(mode="defer")
    ir.passes.PassManager([flash, RemoveUnusedNodesPass()])(model_ir)
    assert (flash.report.found, flash.report.rewritten) == (1, 1)
    assert flash.report.to_dict()["sites"] == cli["sites"]
    assert _graph(model_ir) == _graph(ir.load(dst))

    bare = FlashNormPass(infer_shapes=False)
    bare(ir.load(src))
    assert (bare.report.found, bare.report.rewritten) == (1, 0)
    assert bare.report.sites[0].reason == "Reshape changes the normalized axis or dtype"

"""Compose, don't compete: the rewrite never removes a fusion the ecosystem would
have made. onnxscript's ORT fusions (optimize_for_ort) are counted by the fused ops they leave,
on the original and on our output; `--target ort-*` runs them itself."""

from collections import Counter

import onnx_ir as ir
import pytest
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from models_cache import exported
from parity import assert_exact, rewrite_and_run
from rewriter.compose import ort_load_error
from test_zoo import EXPECTED as ZOO

FUSED = ("MultiHeadAttention", "GroupQueryAttention", "Attention", "RotaryEmbedding",
         "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
         "SkipLayerNormalization", "FastGelu", "Gelu", "BiasGelu")


def fused_ops(path) -> Counter:
    """Fused ops in `path` after onnxscript's ORT fusions; none when onnxruntime cannot load
    what the peer made (it made no fusion anyone can run)."""
    model, _ = optimize_for_ort(ir.load(str(path)))
    if ort_load_error(model):
        return Counter()
    return Counter(n.op_type for n in model.graph.all_nodes() if n.op_type in FUSED)


@pytest.mark.parametrize("family,options", [("llama", {}), ("qwen3", {}),
                                            ("llama", {"target": "ort-cpu", "compose": False})],
                         ids=["llama-defer", "qwen3-defer", "llama-fold-fused"])
def test_the_peers_fusions_survive_the_rewrite(family, options, tmp_path):
    src = exported(family, "dynamo", 18)
    report, diffs, _ = rewrite_and_run(src, tmp_path, **options)
    assert report.rewritten > 0
    assert_exact(diffs)
    before = fused_ops(src)
    after = fused_ops(tmp_path / f"model_{options.get('target') or 'defer'}.onnx")
    for op in ("MultiHeadAttention", "GroupQueryAttention", "Attention", "RotaryEmbedding"):
        assert after[op] >= before[op], (op, before, after)
    assert before["MultiHeadAttention"] + before["GroupQueryAttention"] + before["Attention"] > 0, before


@pytest.mark.parametrize("family", ZOO)
def test_no_fusion_of_the_peer_is_lost_on_any_zoo_model(family, tmp_path):
    """`--target ort-cpu` output holds every fused op the peer makes on the original (norms
    included: a folded LayerNormalization keeps a zero β so that Add + LayerNormalization
    still becomes SkipLayerNormalization)."""
    src = exported(family, "dynamo", 18)
    report, diffs, out = rewrite_and_run(src, tmp_path, target="ort-cpu")
    assert_exact(diffs)
    ours = Counter(n.op_type for n in out.graph.node if n.op_type in FUSED)
    peer = fused_ops(src)
    assert all(ours[op] >= n for op, n in peer.items()), (peer, ours)
    if not peer:            # GPT-2: the peer's MultiHeadAttention feeds a rank-2 Gemm
        assert family == "gpt2", family
        assert any("not applied: onnxruntime cannot load the result" in n for n in report.notes), report.notes


def test_target_ort_cpu_composes_with_the_peer(tmp_path):
    src = exported("llama", "dynamo", 18)
    report, diffs, out = rewrite_and_run(src, tmp_path, target="ort-cpu")
    assert_exact(diffs)
    ops = Counter(n.op_type for n in out.graph.node if n.op_type in FUSED)
    assert ops["SkipSimplifiedLayerNormalization"] + ops["SimplifiedLayerNormalization"] == report.rewritten
    peer = fused_ops(src)            # the peer alone on the original: every fusion it makes is here
    assert all(ops[op] >= n for op, n in peer.items()), (peer, ops)
    assert ops["MultiHeadAttention"] + ops["GroupQueryAttention"] > 0, ops
    assert any("optimize_for_ort" in note for note in report.notes)


REGRESSIONS = __import__("pathlib").Path(__file__).parent / "regressions"


def test_a_peer_leaving_an_unregistered_op_is_undone(tmp_path):
    """onnxscript fuses q·kᵀ·v into its intermediate SDPA op and, with a symbolic head count,
    cannot lower it to MultiHeadAttention: the op stays (ai.onnxruntime._fusion, which
    onnxruntime does not register). The rewrite is kept, the peer's result is not."""
    import onnx
    src = onnx.load(str(REGRESSIONS / "target_sdpa_fusion_unregistered.onnx"))
    src.graph.value_info.extend([onnx.helper.make_tensor_value_info("relu22", onnx.TensorProto.FLOAT, None)])
    peer, _ = optimize_for_ort(ir.from_proto(src))          # the peer alone leaves it
    assert any(n.domain == "ai.onnxruntime._fusion" for n in peer.graph.all_nodes())
    feeds = {"x": __import__("numpy").random.default_rng(0).standard_normal((2, 2, 3, 8)).astype("float32")}
    report, diffs, out = rewrite_and_run(src, tmp_path, target="ort-cpu", feeds=feeds)
    assert report.rewritten == 1
    assert_exact(diffs)
    assert {n.domain for n in out.graph.node} <= {"", "com.microsoft"}
    assert any("ORT fusions not applied" in note and "ai.onnxruntime._fusion:SDPA" in note
               for note in report.notes), report.notes
    assert [v.name for v in out.graph.value_info] == ["relu22"]     # the producer's declaration kept


@pytest.mark.parametrize("target,compose,applied", [
    ("ort-cpu", None, False),       # ORT CPU, KV cache: its attention made decoding slower
    ("ort-cpu", True, True),        # --compose always
    ("ort-cuda", None, True),
    ("ort-cpu", False, None),       # --compose never: not even tried
])
def test_the_peer_runs_on_a_kv_cache_graph_where_the_target_says(target, compose, applied, tmp_path):
    from rewriter.api import rewrite_file
    from test_kv_verify import gqa_decoder
    src = tmp_path / "decoder.onnx"
    __import__("onnx").save(gqa_decoder(), src)
    report = rewrite_file(src, tmp_path / "out.onnx", target=target, compose=compose)
    assert report.rewritten == 1
    notes = [n for n in report.notes if "ORT fusions" in n]
    if applied is None:
        assert notes == [], notes
    else:
        assert len(notes) == 1 and ("then onnxscript's ORT fusions" in notes[0]) == applied, notes
        assert applied or "a graph with a KV cache on ORT CPU" in notes[0]


def test_the_cli_passes_compose(tmp_path):
    from rewriter.cli import main
    from test_kv_verify import gqa_decoder
    src, rep = tmp_path / "decoder.onnx", tmp_path / "r.json"
    __import__("onnx").save(gqa_decoder(), src)
    assert main([str(src), "-o", str(tmp_path / "o.onnx"), "--target", "ort-cpu", "--compose", "always",
                 "--report", str(rep), "--quiet"]) == 0
    assert any("then onnxscript's ORT fusions" in n for n in __import__("json").loads(rep.read_text())["notes"])


@pytest.mark.parametrize("with_beta", [True, False], ids=["beta", "no-beta"])
def test_a_folded_layernorm_keeps_a_zero_beta_only_where_it_had_one(with_beta, tmp_path):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) + 1, "gamma"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W")]
    norm_inputs = ["x", "gamma"]
    if with_beta:
        inits.append(numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "beta"))
        norm_inputs.append("beta")
    graph = helper.make_graph(
        [helper.make_node("LayerNormalization", norm_inputs, ["y"], axis=-1, epsilon=1e-5),
         helper.make_node("MatMul", ["y", "W"], ["out"])], "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 8])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    feeds = {"x": (rng.standard_normal((2, 3, 16)) * 3 + 1).astype(np.float32)}
    report, diffs, out = rewrite_and_run(proto, tmp_path, feeds=feeds, mode="fold")
    assert report.rewritten == 1
    assert_exact(diffs)
    ln = next(n for n in out.graph.node if n.op_type == "LayerNormalization")
    assert len([i for i in ln.input if i]) == (3 if with_beta else 2), ln.input
    if with_beta:
        zero = next(t for t in out.graph.initializer if t.name == ln.input[2])
        assert not numpy_helper.to_array(zero).any()


def _ln_matmul(rng, seq=3):
    """LayerNormalization → MatMul, fp32, opset 18: one site the peer has nothing to fuse in."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) + 1, "gamma"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W")]
    graph = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "gamma"], ["y"], axis=-1, epsilon=1e-5),
         helper.make_node("MatMul", ["y", "W"], ["out"])], "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, seq, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, seq, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_a_peer_result_that_loads_but_does_not_run_is_undone():
    """The peer's result loads in onnxruntime and fails at run time (its FusedMatMul on a
    transposed activation): the API returns the rewrite alone, which runs, and says why."""
    import onnx
    from rewriter import rewrite
    from rewriter.verify import run_check
    out, report = rewrite(onnx.load(str(REGRESSIONS / "target_peer_fusedmatmul_transpose.onnx")), target="ort-cpu")
    assert report.rewritten == 1
    assert any("ORT fusions not applied: onnxruntime cannot run the result" in n and "FusedMatMul" in n
               for n in report.notes), report.notes
    _, outputs = run_check(out.SerializeToString())          # raises where it does not run
    assert outputs


def test_a_peer_result_that_runs_but_differs_is_undone(monkeypatch):
    """A peer result that loads and runs but whose outputs the rewrite alone does not match
    (here: negated) is undone with the verdict; the same peer that changes nothing is kept."""
    import numpy as np
    import onnxscript.rewriter.ort_fusions as fusions
    from rewriter import rewrite

    def negate(model):          # the output, same name, negated: it loads and runs
        old = model.graph.outputs[0]
        node = ir.node("Neg", [old])
        model.graph.append(node)
        new = node.outputs[0]
        new.shape, new.type, name, old.name = old.shape, old.type, old.name, "before_neg"
        new.name = name
        model.graph.outputs[0] = new
        return model, {"negate": 1}
    src = _ln_matmul(np.random.default_rng(0))
    monkeypatch.setattr(fusions, "optimize_for_ort", negate)
    out, report = rewrite(src, target="ort-cpu", compose=True)
    assert report.rewritten == 1
    assert [o.name for o in out.graph.output] == ["out"] and "Neg" not in {n.op_type for n in out.graph.node}
    assert any("ORT fusions not applied: the result does not match the rewrite alone: 1 of 1 output(s)" in n
               and "'out' 2.000e+00 relative" in n for n in report.notes), report.notes
    monkeypatch.setattr(fusions, "optimize_for_ort", lambda model: (model, {"nothing": 0}))
    _, report = rewrite(src, target="ort-cpu", compose=True)
    assert "then onnxscript's ORT fusions (optimize_for_ort): none" in report.notes, report.notes

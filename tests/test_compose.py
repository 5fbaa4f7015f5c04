"""Compose, don't compete (issue 13): the rewrite never removes a fusion the ecosystem would
have made. onnxscript's ORT fusions (optimize_for_ort) are counted by the fused ops they leave,
on the original and on our output; `--target ort-*` runs them itself."""

from collections import Counter

import onnx_ir as ir
import pytest
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from models_cache import exported
from parity import assert_exact, rewrite_and_run

FUSED = ("MultiHeadAttention", "GroupQueryAttention", "Attention", "RotaryEmbedding",
         "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
         "SkipLayerNormalization", "FastGelu", "Gelu", "BiasGelu")


def fused_ops(path) -> Counter:
    """Fused ops in `path` after onnxscript's ORT fusions."""
    model, _ = optimize_for_ort(ir.load(str(path)))
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

"""End to end on exported Llama graphs: both torch exporters, opsets 17/18/23, fp32 and fp16,
and onnxruntime-fused graphs — one rule set, no per-exporter code.

Counts and numerics are asserted together: a tiny Llama (2 layers, tied embeddings) has 5
RMSNorms (2 per layer + final), each feeding linears only, so all 5 must be rewritten.
"""

import pytest

from models_cache import exported
from parity import FP32_TOL, assert_exact, rewrite_and_run
from rewriter.verify import judge, make_inputs, run

EXPORTS = [("dynamo", 18), ("dynamo", 23), ("torchscript", 17)]


@pytest.mark.parametrize("exporter,opset", EXPORTS, ids=[f"{e}-{o}" for e, o in EXPORTS])
@pytest.mark.parametrize("mode", ["defer", "fold"])
def test_fp32_exports(exporter, opset, mode, tmp_path):
    src = exported("llama", exporter, opset)
    feeds = make_inputs(src, batch=2, seq=7)
    report, diffs, _ = rewrite_and_run(src, tmp_path, mode=mode, feeds=feeds)
    assert (report.found, report.rewritten) == (5, 5), report.table()
    assert report.weights_changed == 2 * (3 + 2) + 1        # q,k,v + gate,up per layer, lm_head
    expected_form = "RMSNormalization" if opset >= 23 else "decomposed"
    assert {s.op or s.form for s in report.sites} == {expected_form}
    assert_exact(diffs, FP32_TOL)


@pytest.mark.parametrize("exporter,opset", [("dynamo", 18), ("torchscript", 17)])
def test_fp16_no_worse_than_original_against_fp32(exporter, opset, tmp_path):
    """fp16 graphs are not bit-identical: the rewritten fp16 model must be no further from
    the fp32 reference than the original fp16 model is (with 25 % slack for rounding luck)."""
    ref_path, src = exported("llama", exporter, opset, "fp32"), exported("llama", exporter, opset, "fp16")
    report, _, _ = rewrite_and_run(src, tmp_path)
    assert report.rewritten == 5
    feeds = make_inputs(ref_path, batch=2, seq=7)
    ref = run(ref_path, feeds, provider="cpu")
    original = run(src, feeds, provider="cpu")
    rewritten = run(tmp_path / "model_defer.onnx", feeds, provider="cpu")
    err_original = judge(ref, original)[0].max_rel
    err_rewritten = judge(ref, rewritten)[0].max_rel
    assert err_rewritten <= 1.25 * err_original + 1e-4, (err_rewritten, err_original)


@pytest.mark.parametrize("mode", ["defer", "fold"])
def test_ort_fused_graph(mode, tmp_path):
    """After onnxruntime's transformers optimizer: SimplifiedLayerNormalization and
    SkipSimplifiedLayerNormalization (whose residual-sum output feeds the next block)."""
    src = exported("llama", "dynamo", 18, ort_opt=True)
    report, diffs, out = rewrite_and_run(src, tmp_path, mode=mode, feeds=make_inputs(src, batch=2, seq=7))
    forms = {s.op for s in report.sites}
    assert forms <= {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"} and \
        "SkipSimplifiedLayerNormalization" in forms, forms
    assert (report.found, report.rewritten) == (5, 5), report.table()
    assert_exact(diffs, FP32_TOL)


@pytest.mark.parametrize("exporter,opset", [("dynamo", 18), ("torchscript", 17)])
def test_target_ort_cuda_folds_and_fuses(exporter, opset, tmp_path):
    """--target ort-cuda: gains folded, each decomposed norm replaced by one weightless fused
    kernel (SkipSimplifiedLayerNormalization where a residual Add feeds it)."""
    src = exported("llama", exporter, opset)
    report, diffs, out = rewrite_and_run(src, tmp_path, target="ort-cuda", feeds=make_inputs(src, batch=2, seq=7))
    assert (report.found, report.rewritten) == (5, 5)
    kinds = [n.op_type for n in out.graph.node]
    assert kinds.count("SkipSimplifiedLayerNormalization") == 4      # every norm after a residual Add
    assert kinds.count("SimplifiedLayerNormalization") == 1          # the first, on the embedding
    assert "ReduceMean" not in kinds and "Reciprocal" not in kinds
    assert_exact(diffs, FP32_TOL)
    again, _, _ = rewrite_and_run(tmp_path / "model_ort-cuda.onnx", tmp_path, target="ort-cuda", name="again")
    assert again.rewritten == 0


FUSED_BY_ORT = ("QuickGelu", "Gelu", "FastGelu", "FusedMatMul", "Attention", "MultiHeadAttention",
                "GroupQueryAttention", "RotaryEmbedding", "BiasGelu", "SkipSimplifiedLayerNormalization",
                "SimplifiedLayerNormalization")


@pytest.mark.parametrize("strategy", ["defer", "defer-normop", "fold-fused"])
def test_onnxruntime_fusions_survive_the_rewrite(strategy, tmp_path):
    """What ORT actually runs: the ORT-optimized (transformers optimizer) export, rewritten,
    then optimized again by an ORT session (level all): every fusion ORT made on the original
    (QuickGelu for SiLU, FusedMatMul, ...) is still made on the rewritten graph; only the
    deferred norms go away (their 1/RMS is a reduction or one inverse-std norm kernel)."""
    from rewriter.verify import ort_kernels
    src = exported("llama", "dynamo", 18, ort_opt=True)
    report, diffs, _ = rewrite_and_run(src, tmp_path, strategy=strategy)
    assert report.rewritten == 5
    assert_exact(diffs, FP32_TOL)
    before = ort_kernels(src, "cpu")
    after = ort_kernels(tmp_path / f"model_{strategy}.onnx", "cpu")
    assert before.get("QuickGelu") == 2, before          # the SiLU of both layers
    deferred = strategy.startswith("defer")
    for kind in FUSED_BY_ORT:
        expected = before.get(kind, 0)
        if deferred and kind == "SkipSimplifiedLayerNormalization":
            expected = 0                                 # residual sums are plain Adds again
        if deferred and kind == "SimplifiedLayerNormalization":
            expected = 0 if strategy == "defer" else 5   # defer-normop: one 1/RMS kernel per site
        assert after.get(kind, 0) == expected, (kind, before, after)


@pytest.mark.parametrize("ort_opt", [False, True], ids=["raw", "ortopt"])
def test_gelu_fusion_survives_a_deferred_layernorm(ort_opt, tmp_path):
    """GPT-2's tanh GELU reads the deferred c_fc output x in x·½(1+tanh(…(x+0.044715x³))):
    the scale is applied once at x, so onnxruntime still fuses FastGelu after the rewrite."""
    from rewriter.verify import ort_kernels
    src = exported("gpt2", "dynamo", 18, ort_opt=ort_opt)
    report, diffs, _ = rewrite_and_run(src, tmp_path, strategy="defer")
    assert report.rewritten == 5
    assert_exact(diffs, FP32_TOL)
    before, after = ort_kernels(src, "cpu"), ort_kernels(tmp_path / "model_defer.onnx", "cpu")
    assert before.get("FastGelu") == after.get("FastGelu") == 2, (before, after)
    assert after.get("FusedMatMul") == before.get("FusedMatMul")

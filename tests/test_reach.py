"""Issue 14: norm → linear sites behind row moves (Swin windows, MoE token Gathers), T5's scaled
tied head, Conv consumers (ConvNeXt, SegFormer), and reasons that name the real blocker.
Each path rewritten exactly (onnxruntime CPU, ≤ 1e-5; float64 where fp32 LayerNorm itself is
badly conditioned), and each has a graph where it must not fire, with the reason and the node."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from builders import GraphBuilder, float64_copy
from parity import assert_exact, op_types, rewrite_and_run

C, K = 16, 12
B, H, W, WIN = 2, 4, 4, 2


def i64(*v):
    return np.array(v, np.int64)


def norm(g, x, kind, beta=True):
    if kind == "rms":
        return g.rms(x, gain=g.gain(C))
    return g.layernorm(x, gain=g.gain(C), beta=g.gain(C) - 1 if beta else None)


# -- 1. the real blocker ---------------------------------------------------------------------

def test_transposes_that_keep_the_last_axis_are_walked(tmp_path):
    """[B, S, C] → Transpose(1, 0, 2) → MatMul: rewritten (defer), the scale transposed too."""
    g = GraphBuilder()
    y = g.rms(g.input("x", [B, 5, C]), gain=g.gain(C))
    g.output(g.op("MatMul", [g.op("Transpose", [y], perm=[1, 0, 2]), g.weight(C, K)]))
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path)
    assert (report.rewritten, report.sites[0].strategy) == (1, "defer")
    assert_exact(diffs)


def test_reason_names_the_blocker_past_harmless_ops(tmp_path):
    """Qwen3's q-norm shape: Transpose (harmless) → Mul by cos (the blocker)."""
    g = GraphBuilder()
    y = g.rms(g.input("x", [B, 5, C]), gain=g.gain(C))
    t = g.op("Transpose", [y], perm=[1, 0, 2])
    mul = g.op("Mul", [t, g.input("cos", [5, B, C])])
    g.output(mul)
    g.output(g.op("MatMul", [y, g.weight(C, K)]))
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path)
    site = report.sites[0]
    assert report.rewritten == 0 and site.reason.startswith("consumer Mul scales the normalized tensor by a non-constant")
    assert site.at.startswith("Mul node")
    assert_exact(diffs, tol=0)


# -- 3. T5's tied head: · d_model^-0.5 after the gain -----------------------------------------

@pytest.mark.parametrize("mode", ["defer", "fold"])
def test_t5_scalar_after_gain_folds(mode, tmp_path):
    g = GraphBuilder()
    y = g.rms(g.input("x", [B, 5, C]), gain=g.gain(C))
    y = g.op("Mul", [y, g.const(np.array(C ** -0.5, np.float32), "d_model_scale")])
    g.output(g.op("MatMul", [y, g.weight(C, K)]))
    report, diffs, out = rewrite_and_run(g.model(), tmp_path, mode=mode)
    assert report.rewritten == 1
    assert_exact(diffs)
    if mode == "defer":
        assert "Pow" not in op_types(out)


def test_t5_scalar_by_a_non_constant_does_not_fire(tmp_path):
    g = GraphBuilder()
    y = g.rms(g.input("x", [B, 5, C]), gain=g.gain(C))
    y = g.op("Mul", [y, g.input("s", [])])
    g.output(g.op("MatMul", [y, g.weight(C, K)]))
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path, feeds={
        "x": np.random.default_rng(0).standard_normal((B, 5, C)).astype(np.float32), "s": np.array(0.3, np.float32)})
    assert report.rewritten == 0
    assert "non-constant" in report.sites[0].reason and report.sites[0].at.startswith("Mul node")
    assert_exact(diffs, tol=0)


# -- 4. Conv consumers (ConvNeXt / SegFormer downsampling) -------------------------------------

def conv_graph(kind, pads=(0, 0, 0, 0), perm=(0, 3, 1, 2), beta=True, bias=True):
    g = GraphBuilder()
    x = g.input("x", [B, H, W, C])
    y = g.op("Transpose", [norm(g, x, kind, beta)], perm=list(perm))
    w = g.const(g.rng.standard_normal((K, C, 2, 2)).astype(np.float32) * 0.2, "conv_w")
    inputs = [y, w] + ([g.const(g.rng.standard_normal(K).astype(np.float32), "conv_b")] if bias else [])
    g.output(g.op("Conv", inputs, kernel_shape=[2, 2], strides=[2, 2], pads=list(pads)))
    return g.model()


@pytest.mark.parametrize("kind,bias", [("layer", True), ("layer", False), ("rms", True)])
def test_conv_folds_gamma_and_beta_fold_only(kind, bias, tmp_path):
    report, diffs, out = rewrite_and_run(conv_graph(kind, bias=bias), tmp_path)
    site = report.sites[0]
    assert (report.rewritten, site.strategy) == (1, "fold")
    assert "fold only: the Conv mixes rows" in site.reason and site.at.startswith("Conv node")
    assert_exact(diffs)


def test_conv_with_padding_folds_gamma_only(tmp_path):
    """Zero padding: γ·0 = 0, exact; an RMSNorm (no β) is rewritten."""
    report, diffs, _ = rewrite_and_run(conv_graph("rms", pads=(1, 1, 1, 1)), tmp_path)
    assert report.rewritten == 1
    assert_exact(diffs)


def test_conv_with_padding_and_beta_folds_gamma_and_adds_beta_by_border(tmp_path):
    """Zero padding: β's part differs at the borders, added after the Conv (tests/test_conv_pad.py)."""
    report, diffs, _ = rewrite_and_run(conv_graph("layer", pads=(1, 1, 1, 1)), tmp_path)
    assert (report.rewritten, report.sites[0].strategy) == (1, "fold")
    assert "it pads its input" in report.sites[0].reason
    assert_exact(diffs)


def test_conv_reading_another_axis_as_channels_does_not_fire(tmp_path):
    """Transpose(0, 2, 1, 3): the Conv's channels are W, the normalized axis stays last."""
    proto = conv_graph("layer", perm=(0, 2, 1, 3))
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value = C     # [B, H, C, C]: [B, C, H, C] feeds the Conv
    report, diffs, _ = rewrite_and_run(proto, tmp_path)
    assert report.rewritten == 0
    assert report.sites[0].reason == "Conv input channels are not the normalized axis"
    assert_exact(diffs, tol=0)


# -- 5. Swin: Reshape → Pad → roll (Slice/Concat) → window partition → q/k/v ---------------------

def swin_graph(kind, pads=0, beta=True, foreign_concat=False):
    g = GraphBuilder()
    x = g.input("x", [B, H * W, C])
    y = norm(g, x, kind, beta)
    y = g.op("Reshape", [y, g.const(i64(B, H, W, C))])
    y = g.op("Pad", [y, g.const(i64(0, 0, 0, 0, 0, pads, pads, 0))])
    h, w = H + pads, W + pads
    # roll by one row along H: Concat(Slice(1:), Slice(:1))
    tail = g.op("Slice", [y, g.const(i64(1)), g.const(i64(h)), g.const(i64(1))])
    head = g.op("Slice", [y, g.const(i64(0)), g.const(i64(1)), g.const(i64(1))])
    if foreign_concat:
        head = g.input("other", [B, 1, w, C])
    y = g.op("Concat", [tail, head], axis=1)
    y = g.op("Reshape", [y, g.const(i64(B, h // WIN, WIN, w // WIN, WIN, C))])
    y = g.op("Transpose", [y], perm=[0, 1, 3, 2, 4, 5])
    y = g.op("Reshape", [y, g.const(i64(-1, WIN * WIN, C))])
    for _ in range(3):
        g.output(g.op("MatMul", [y, g.weight(C, K)]))
    return g.model()


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("mode", ["defer", "fold"])
def test_swin_windows_fold_and_defer(kind, mode, tmp_path):
    report, diffs, out = rewrite_and_run(swin_graph(kind), tmp_path, mode=mode)
    site = report.sites[0]
    assert (report.rewritten, site.strategy, len(site.consumers)) == (1, mode, 3)
    assert_exact(diffs)


def test_swin_with_zero_padding_folds_only(tmp_path):
    report, diffs, _ = rewrite_and_run(swin_graph("rms", pads=2), tmp_path)
    site = report.sites[0]
    assert (report.rewritten, site.strategy) == (1, "fold")
    assert "fold only: Pad adds zero rows" in site.reason and site.at.startswith("Pad node")
    assert_exact(diffs)


def test_swin_with_zero_padding_and_beta_does_not_fire(tmp_path):
    report, diffs, _ = rewrite_and_run(swin_graph("layer", pads=2), tmp_path)
    assert report.rewritten == 0
    assert report.sites[0].reason.startswith("Pad adds zero rows: β") and report.sites[0].at.startswith("Pad node")
    assert_exact(diffs, tol=0)


def test_concat_with_foreign_rows_does_not_fire(tmp_path):
    report, diffs, _ = rewrite_and_run(swin_graph("rms", foreign_concat=True), tmp_path)
    assert report.rewritten == 0
    assert report.sites[0].reason == "Concat joins the normalized rows with rows from elsewhere"
    assert_exact(diffs, tol=0)


def test_swin_layernorm_with_a_shared_offset_against_float64(tmp_path):
    """Inputs with a large offset shared by every channel: fp32 LayerNorm itself is ~1e-4 from
    float64; the rewrite is judged against float64 (no worse than 1.5× the original)."""
    proto = swin_graph("layer")
    rng = np.random.default_rng(3)
    feeds = {"x": (rng.standard_normal((B, H * W, C)) * 0.05 + 300.0).astype(np.float32)}
    report, _, out = rewrite_and_run(proto, tmp_path, feeds=feeds)
    assert report.rewritten == 1
    ref = [np.asarray(v) for v in _run(float64_copy(proto), {"x": feeds["x"].astype(np.float64)})]
    for a, b, r in zip(_run(proto, feeds), _run(out, feeds), ref):
        err_a, err_b = np.abs(a - r).max() / np.abs(r).max(), np.abs(b - r).max() / np.abs(r).max()
        assert err_b <= 1.5 * err_a + 1e-7, (err_a, err_b)
        print(f"float64 reference: original {err_a:.2e}, rewritten {err_b:.2e}")


def _run(proto, feeds):
    import onnxruntime as ort
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


# -- 7. MoE: router and experts reading gathered token rows ------------------------------------

def moe_graph(gather_axis=0):
    g = GraphBuilder()
    x = g.input("x", [B, 5, C])
    idx = g.input("idx", [3], np.int64)
    y = g.rms(x, gain=g.gain(C))
    flat = g.op("Reshape", [y, g.const(i64(-1, C))])
    g.output(g.op("MatMul", [flat, g.weight(C, 4)]))                 # router
    for _ in range(2):                                                # experts on their tokens
        rows = g.op("Gather", [flat, idx], axis=gather_axis)
        g.output(g.op("MatMul", [rows, g.weight(C if gather_axis == 0 else 3, K)]))
    return g.model()


def test_moe_router_and_experts(tmp_path):
    feeds = {"x": np.random.default_rng(0).standard_normal((B, 5, C)).astype(np.float32) * 3,
             "idx": i64(7, 0, 3)}
    for mode in ("defer", "fold"):
        report, diffs, _ = rewrite_and_run(moe_graph(), tmp_path, mode=mode, feeds=feeds)
        assert (report.rewritten, len(report.sites[0].consumers), report.sites[0].strategy) == (1, 3, mode)
        assert_exact(diffs)


def test_moe_gather_along_the_feature_axis_does_not_fire(tmp_path):
    feeds = {"x": np.random.default_rng(0).standard_normal((B, 5, C)).astype(np.float32),
             "idx": i64(7, 0, 3)}
    report, diffs, _ = rewrite_and_run(moe_graph(gather_axis=1), tmp_path, feeds=feeds)
    assert report.rewritten == 0
    assert report.sites[0].reason == "Gather along the normalized axis (selects features)"
    assert_exact(diffs, tol=0)


# -- 6. gated group norms (Mamba2): normalized [.., G, n] → Reshape [.., G·n] → Mul(γ) → out_proj -

def gated_graph(groups, gain_const=True):
    g = GraphBuilder()
    x = g.input("x", [B, 5, C])
    gate = g.input("gate", [B, 5, C])
    h = g.op("Mul", [x, g.op("Mul", [gate, g.op("Sigmoid", [gate])])])
    h = g.op("Reshape", [h, g.const(i64(B, 5, groups, C // groups))])
    y = g.rms(h)
    y = g.op("Reshape", [y, g.const(i64(B, 5, C))])
    y = g.op("Mul", [g.const(g.gain(C), "gamma") if gain_const else g.input("w", [C]), y])
    g.output(g.op("MatMul", [y, g.weight(C, K)]))
    return g.model()


def _gated_feeds(extra=()):
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal((B, 5, C)).astype(np.float32) * 2 for k in ("x", "gate")}
    feeds.update({k: rng.standard_normal(C).astype(np.float32) for k in extra})
    return feeds


@pytest.mark.parametrize("groups,strategy", [(2, "fold"), (4, "fold"), (1, "defer")])
def test_gated_group_norm_gain_after_the_merge_folds(groups, strategy, tmp_path):
    report, diffs, out = rewrite_and_run(gated_graph(groups), tmp_path, feeds=_gated_feeds())
    site = report.sites[0]
    assert (report.rewritten, site.strategy) == (1, strategy)
    if groups > 1:
        assert f"fold only: the norm runs over {groups} groups" in site.reason and site.at.startswith("Reshape node")
    assert_exact(diffs)


def test_gated_group_norm_with_a_non_constant_gain_does_not_fire(tmp_path):
    report, diffs, _ = rewrite_and_run(gated_graph(2, gain_const=False), tmp_path, feeds=_gated_feeds(["w"]))
    assert report.rewritten == 0
    assert report.sites[0].reason == "Reshape changes the normalized axis or dtype"
    assert_exact(diffs, tol=0)


# -- computed amounts and targets (TorchScript computes F.pad's pads and view's shapes) ---------

def computed_pad_graph(pad_axis_value):
    g = GraphBuilder()
    x = g.input("x", [B, H * W, C])
    y = g.layernorm(x, gain=g.gain(C), beta=g.gain(C) - 1)
    y = g.op("Reshape", [y, g.const(i64(B, H, W, C))])
    zeros = g.op("ConstantOfShape", [g.const(i64(3))], value=helper.make_tensor("v", TensorProto.INT64, [1], [0]))
    pads = g.op("Concat", [zeros, g.const(i64(pad_axis_value)), zeros, g.const(i64(0))], axis=0)
    y = g.op("Pad", [y, g.op("Reshape", [pads, g.const(i64(-1))])])
    g.output(g.op("MatMul", [y, g.weight(C + pad_axis_value, K)]))
    return g.model()


def test_computed_zero_pads_are_folded_and_walked(tmp_path):
    report, diffs, _ = rewrite_and_run(computed_pad_graph(0), tmp_path)
    assert (report.rewritten, report.sites[0].strategy) == (1, "defer")
    assert_exact(diffs)


def test_computed_pads_on_the_normalized_axis_do_not_fire(tmp_path):
    report, diffs, _ = rewrite_and_run(computed_pad_graph(2), tmp_path)
    assert report.rewritten == 0 and report.sites[0].reason == "Pad pads the normalized axis"
    assert_exact(diffs, tol=0)


@pytest.mark.parametrize("target,fires", [((B, C, H, W), True), ((C, B, H, W), False)])
def test_reshape_after_a_transpose(target, fires, tmp_path):
    """SegFormer's spatial reduction: [B, N, C] → Transpose → [B, C, N] → Reshape [B, C, H, W] →
    Conv (k = s). Fires when the axes up to the normalized one keep their sizes (fold only)."""
    g = GraphBuilder()
    y = g.layernorm(g.input("x", [B, H * W, C]), gain=g.gain(C), beta=g.gain(C) - 1)
    g.output(g.op("MatMul", [y, g.weight(C, K)]))
    t = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1]), g.const(i64(*target))])
    w = g.const(g.rng.standard_normal((K, target[1], 2, 2)).astype(np.float32), "conv_w")
    g.output(g.op("Conv", [t, w], kernel_shape=[2, 2], strides=[2, 2]))
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path)
    site = report.sites[0]
    if fires:
        assert (report.rewritten, site.strategy) == (1, "fold") and "fold only: the Conv mixes rows" in site.reason
        assert_exact(diffs)
    else:
        assert report.rewritten == 0
        assert site.reason == "Reshape changes the normalized axis or the axes before it" and site.at.startswith("Reshape")
        assert_exact(diffs, tol=0)


def test_concat_with_a_part_that_permutes_features_does_not_fire(tmp_path):
    """Concat(Slice(y) rows, Gather(y, perm, axis=-1)): the second part has its features
    permuted — the same source, but not a row move."""
    g = GraphBuilder()
    y = g.rms(g.input("x", [B, 5, C]), gain=g.gain(C))
    rows = g.op("Slice", [y, g.const(i64(1)), g.const(i64(5)), g.const(i64(1))])
    permuted = g.op("Gather", [y, g.const(np.arange(C)[::-1].astype(np.int64))], axis=2)
    g.output(g.op("MatMul", [g.op("Concat", [rows, permuted], axis=1), g.weight(C, K)]))
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path)
    assert report.rewritten == 0
    assert report.sites[0].reason in ("Concat joins the normalized rows with rows from elsewhere",
                                      "Gather along the normalized axis (selects features)")
    assert_exact(diffs, tol=0)


@pytest.mark.parametrize("group", [2, C])
@pytest.mark.parametrize("kind,pads", [("rms", 1), ("layer", 0), ("layer", 1)])
def test_grouped_and_depthwise_conv(group, kind, pads, tmp_path):
    """ConvNeXt's depthwise 7×7 (here 3×3) after the stem LN: γ folds per input channel of each
    group; β into the bias, or with padding as a map added after the Conv."""
    g = GraphBuilder()
    y = g.op("Transpose", [norm(g, g.input("x", [B, H, W, C]), kind)], perm=[0, 3, 1, 2])
    w = g.const(g.rng.standard_normal((2 * group, C // group, 3, 3)).astype(np.float32) * 0.2, "conv_w")
    b = g.const(g.rng.standard_normal(2 * group).astype(np.float32), "conv_b")
    g.output(g.op("Conv", [y, w, b], kernel_shape=[3, 3], pads=[pads] * 4, group=group))
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path)
    assert (report.rewritten, report.sites[0].strategy) == (1, "fold")
    assert_exact(diffs)


def test_moe_experts_sliced_from_a_stacked_constant(tmp_path):
    """transformers' stacked experts: Gather(gate_up [E, 2F, C], e) → Transpose → MatMul, with a
    constant expert index (an unrolled loop): each expert's matrix folds like any weight."""
    g = GraphBuilder()
    y = g.rms(g.input("x", [B, 5, C]), gain=g.gain(C))
    flat = g.op("Reshape", [y, g.const(i64(-1, C))])
    stacked = g.const(g.rng.standard_normal((3, K, C)).astype(np.float32), "gate_up")
    for e, idx in enumerate(([0, 4], [7, 1, 2])):
        rows = g.op("Gather", [flat, g.const(i64(*idx))], axis=0)
        w = g.op("Transpose", [g.op("Gather", [stacked, g.const(np.array(e, np.int64))], axis=0)], perm=[1, 0])
        g.output(g.op("MatMul", [rows, w]))
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path)
    assert (report.rewritten, len(report.sites[0].consumers), report.sites[0].strategy) == (1, 2, "defer")
    assert_exact(diffs)


def stacked_graph(kind="rms", beta=False, leak=False):
    """transformers' MoE experts: the expert index is known only at run time."""
    g = GraphBuilder()
    x, e = g.input("x", [B, 5, C]), g.input("e", [], np.int64)
    y = norm(g, x, kind, beta)
    flat = g.op("Reshape", [y, g.const(i64(-1, C))])
    stacked = g.const(g.rng.standard_normal((3, K, C)).astype(np.float32), "gate_up")
    rows = g.op("Gather", [flat, g.const(i64(7, 0, 3))], axis=0)
    w = g.op("Transpose", [g.op("Gather", [stacked, e], axis=0)], perm=[1, 0])
    g.output(g.op("MatMul", [rows, w]))
    if leak:        # the stack also read by something that is not this norm's linear
        g.output(g.op("ReduceSum", [stacked], keepdims=0))
    return g.model()


@pytest.mark.parametrize("kind,mode", [("rms", "defer"), ("rms", "fold"), ("layer", "defer")])
def test_moe_stacked_experts_chosen_at_run_time(kind, mode, tmp_path):
    for expert in range(3):
        feeds = {"x": np.random.default_rng(expert).standard_normal((B, 5, C)).astype(np.float32) * 2 + 0.5,
                 "e": np.array(expert, np.int64)}
        report, diffs, _ = rewrite_and_run(stacked_graph(kind), tmp_path, mode=mode, feeds=feeds)
        assert (report.rewritten, report.sites[0].strategy) == (1, mode)
        assert_exact(diffs)


@pytest.mark.parametrize("case,reason", [
    ("beta", "β through an expert chosen at run time is no constant bias"),
    ("leak", "the stacked experts are also read elsewhere (folding the stack would change them)")])
def test_moe_stacked_experts_do_not_fire(case, reason, tmp_path):
    proto = stacked_graph("layer", beta=True) if case == "beta" else stacked_graph(leak=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((B, 5, C)).astype(np.float32), "e": np.array(1, np.int64)}
    report, diffs, _ = rewrite_and_run(proto, tmp_path, feeds=feeds)
    assert report.rewritten == 0 and report.sites[0].reason == reason
    assert_exact(diffs, tol=0)

"""LayerNorm (channels last) → Transpose → Conv that pads its input (SegFormer's overlapping
patch embedding, ConvNeXt's depthwise conv): γ folds into each input channel's weights (zero
padding stays zero); β's part of the output, Σ_c W[o, c, taps]·β[c] over the taps that read the
input and not the padding, differs at the borders, so it is added after the Conv as
Conv(ones [1, 1, spatial], Σ_c W·β) with the Conv's own pads, strides and dilations — exact
for any input size."""

from __future__ import annotations

import numpy as np
import pytest

from builders import GraphBuilder
from parity import assert_exact, op_types, rewrite_and_run
from rewriter.verify import judge, run, session

C, K, B = 8, 6, 2


def i64(*v):
    return np.array(v, np.int64)


def padded_conv(*, spatial=(5, 7), kernel=(3, 3), beta=True, bias=True, group=1, kind="layer", pad_op=False,
                opset=18, fused=False, **conv):
    """x [B, spatial..., C] → norm over C → Transpose to [B, C, spatial...] (→ Pad) → Conv."""
    g = GraphBuilder(opset)
    x = g.input("x", [B, *spatial, C])
    if kind == "rms":
        y = g.rms(x, gain=g.gain(C))
    elif fused:
        y = g.op("LayerNormalization", [x, g.const(g.gain(C), "gamma"), g.const(g.gain(C) - 1, "beta")], axis=-1)
    else:
        y = g.layernorm(x, gain=g.gain(C), beta=(0.7 * g.rng.standard_normal(C)).astype(np.float32) if beta else None)
    rank = len(spatial) + 2
    y = g.op("Transpose", [y], perm=[0, rank - 1, *range(1, rank - 1)])
    if pad_op:      # a Pad op (not the Conv's own pads) adding zero rows
        y = g.op("Pad", [y, g.const(i64(*[0, 0] + [1] * len(spatial) + [0, 0] + [1] * len(spatial)))])
    w = g.const((0.3 * g.rng.standard_normal((K * group, C // group, *kernel))).astype(np.float32), "conv_w")
    inputs = [y, w] + ([g.const(g.rng.standard_normal(K * group).astype(np.float32), "conv_b")] if bias else [])
    g.output(g.op("Conv", inputs, kernel_shape=list(kernel), group=group, **conv), shape=[None] * rank)
    return g.model()


CASES = {
    "symmetric": dict(pads=[1, 1, 1, 1]),
    "asymmetric": dict(pads=[0, 1, 2, 0]),
    "strided": dict(pads=[1, 1, 1, 1], strides=[2, 2]),          # SegFormer's patch embedding
    "dilated": dict(pads=[2, 2, 2, 2], dilations=[2, 2]),
    "same_upper": dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    "same_lower": dict(auto_pad="SAME_LOWER"),
    "grouped": dict(pads=[1, 1, 1, 1], group=2),
    "depthwise": dict(pads=[1, 1, 1, 1], group=C),
    "no_conv_bias": dict(pads=[1, 1, 1, 1], bias=False),
    "wide_kernel": dict(pads=[0, 2, 0, 2], kernel=(1, 5)),
    "conv1d": dict(spatial=(9,), kernel=(3,), pads=[1, 1]),
    "conv3d": dict(spatial=(3, 4, 5), kernel=(3, 3, 3), pads=[1] * 6),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("options", [{"mode": "defer"}, {"mode": "fold"}, {"target": "ort-cpu"}])
def test_padded_conv_folds_gamma_and_adds_beta_by_border(case, options, tmp_path):
    report, diffs, out = rewrite_and_run(padded_conv(**CASES[case]), tmp_path, **options)
    site = report.sites[0]
    assert report.rewritten == 1 and site.strategy in ("fold", "fold-fused"), report.table()
    if "mode" in options and options["mode"] == "defer":
        assert "fold only: the Conv mixes rows (it pads its input: β's part" in site.reason
        assert site.at.startswith("Conv node")
    assert_exact(diffs)
    types = op_types(out)
    assert types.count("Conv") == 2 and "ConstantOfShape" in types


@pytest.mark.parametrize("opset,fused", [(7, False), (8, False), (9, False), (13, False), (17, True)])
def test_padded_conv_across_opsets_and_the_fused_norm(opset, fused, tmp_path):
    """Slice with attributes below opset 10; no ConstantOfShape below opset 9 (the ones are a
    Tile of one 1); the LayerNormalization op (opset 17)."""
    report, diffs, out = rewrite_and_run(padded_conv(pads=[1, 1, 1, 1], opset=opset, fused=fused), tmp_path)
    assert report.rewritten == 1 and "it pads its input" in report.sites[0].reason, report.table()
    assert_exact(diffs)
    ones = "ConstantOfShape" if opset >= 9 else "Tile"
    assert op_types(out).count(ones) == 1 and op_types(out).count("Conv") == 2
    assert op_types(out).count("Conv") == 2


def test_border_map_holds_for_every_input_size(tmp_path):
    """Dynamic spatial sizes: the map is computed from the input's shape at run time."""
    proto = padded_conv(pads=[1, 1, 1, 1], strides=[2, 2])
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for d in dims[1:3]:
        d.dim_param = "side"
    report, _, _ = rewrite_and_run(proto, tmp_path, feeds={"x": np.ones((B, 4, 4, C), np.float32)})
    assert report.rewritten == 1
    src, dst = tmp_path / "model.onnx", tmp_path / "model_defer.onnx"
    a, b = session(src, "cpu"), session(dst, "cpu")
    rng = np.random.default_rng(1)
    for side in (1, 2, 5, 8):
        feeds = {"x": (2 * rng.standard_normal((B, side, side, C)) + 0.5).astype(np.float32)}
        assert_exact(judge(run(src, feeds, sess=a), run(dst, feeds, sess=b)))


@pytest.mark.parametrize("kind,beta", [("rms", False), ("layer", False)])
def test_padded_conv_without_beta_adds_nothing(kind, beta, tmp_path):
    report, diffs, out = rewrite_and_run(padded_conv(pads=[1, 1, 1, 1], kind=kind, beta=beta), tmp_path)
    assert (report.rewritten, report.sites[0].strategy) == (1, "fold")
    assert "pads its input" not in report.sites[0].reason
    assert_exact(diffs)
    assert op_types(out).count("Conv") == 1 and "ConstantOfShape" not in op_types(out)


def test_unpadded_conv_keeps_beta_in_its_bias(tmp_path):
    report, diffs, out = rewrite_and_run(padded_conv(strides=[2, 2], kernel=(2, 2), spatial=(4, 6)), tmp_path)
    assert report.rewritten == 1
    assert_exact(diffs)
    assert op_types(out).count("Conv") == 1


def test_beta_through_a_pad_op_does_not_fire(tmp_path):
    """A Pad op before the Conv adds zero rows the norm never saw: β would appear on them."""
    report, diffs, _ = rewrite_and_run(padded_conv(pad_op=True), tmp_path)
    assert report.rewritten == 0
    assert report.sites[0].reason == "Pad adds zero rows: β folded into a bias would appear on them"
    assert report.sites[0].at.startswith("Pad node")
    assert_exact(diffs, tol=0)

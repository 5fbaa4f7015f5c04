"""Issue 14's architectures built from transformers configs in code (models/reach.py: random
weights, perturbed norms, TorchScript export): per model, the sites found, rewritten, skipped
with the reason that names the real blocker, and exactness under onnxruntime CPU."""

from __future__ import annotations

import pytest

from models.reach import export, feeds
from parity import FP32_TOL, assert_exact, rewrite_and_run

LN_INTO_LN = "consumer LayerNormalization is not a linear on the normalized axis"   # the residual stream
EXPECTED = {   # model: (found, rewritten, {strategy: count}, {reason: count})
    # every RMSNorm, the final decoder norm through the tied head's d_model^-0.5 included
    "t5": (7, 7, {"defer": 7}, {}),
    # the attention LNs through zero-pad, roll (Slice/Concat) and window partition
    "swin": (6, 4, {"defer": 4}, {LN_INTO_LN: 1, "norm output is a graph output": 1}),
    # the downsampling LN → Conv(k = s, no pad): γ, β folded, fold only; the stem LN feeds a
    # depthwise (grouped, padded) Conv
    "convnext": (4, 3, {"defer": 2, "fold": 1},
                 {"grouped Conv (a channel's gain would not reach every output)": 1}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPECTED)
def test_reach_model(name, tmp_path):
    src = export(name, tmp_path / f"{name}.onnx")
    report, diffs, _ = rewrite_and_run(src, tmp_path, feeds=feeds(name), name=name)
    found, rewritten, strategies, reasons = EXPECTED[name]
    got = {}
    for s in report.sites:
        if s.action != "skip":
            got[s.strategy] = got.get(s.strategy, 0) + 1
    assert (report.found, report.rewritten, got, dict(report.skipped)) == (found, rewritten, strategies, reasons), \
        report.table()
    if name == "convnext":
        fold = next(s for s in report.sites if s.strategy == "fold")
        assert "fold only: the Conv mixes rows" in fold.reason and fold.at.startswith("Conv node")
    assert_exact(diffs, FP32_TOL)

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
    # Mixtral-style MoE: the post-norm feeds the router and, through Gathers of token rows,
    # every expert's w1 and w3 (1 + 2·4 linears), 1/RMS deferred along the gathered rows
    "moe": (2, 2, {"defer": 2}, {}),
    # SegFormer: the LN before efficient attention feeds q (MatMul) and, through Transpose →
    # Reshape, the spatial-reduction Conv (k = s): fold only; the stage-end LN feeds the next
    # stage's padded patch-embedding Conv: fold only, β's border terms a Conv of ones after it
    "segformer": (9, 6, {"defer": 4, "fold": 2},
                  {LN_INTO_LN: 2, "norm output reaches a graph output (after Transpose)": 1}),
    # transformers' own Mixtral (eager experts): the post-attention norm feeds the router and the
    # experts picked from the stacked gate_up weights by a run-time index: γ folds into the stack
    "mixtral": (3, 3, {"defer": 3}, {}),
    # Mamba2 (dynamo): the gated group norm (2 groups) → Reshape → γ → out_proj: γ folded, fold
    # only (1/RMS per group); the block's and the final RMSNorm defer
    "mamba2": (3, 3, {"defer": 2, "fold": 1}, {}),
    # the downsampling LN → Conv(k = s, no pad): γ, β folded, fold only; the stem LN (channels
    # first) also feeds the first block's residual Add
    "convnext": (4, 3, {"defer": 2, "fold": 1}, {"consumer Add is not a linear on the normalized axis": 1}),
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
    if name == "moe":
        assert len(report.sites[0].consumers) == 9
    if name == "mamba2":
        fold = next(s for s in report.sites if s.strategy == "fold")
        assert "fold only: the norm runs over 2 groups" in fold.reason and fold.at.startswith("Reshape node")
    if name in ("convnext", "segformer"):
        folds = [s for s in report.sites if s.strategy == "fold"]
        assert all("fold only: the Conv mixes rows" in s.reason and s.at.startswith("Conv node") for s in folds)
        assert sum("it pads its input" in s.reason for s in folds) == (name == "segformer")
    assert_exact(diffs, FP32_TOL)

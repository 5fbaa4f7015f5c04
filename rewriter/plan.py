"""Decide, per matched site, what to do — without touching a weight.

The plan is a plain list of `Decision`s: printable, diffable and testable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from patterns import Linear, Miss, Site
from rewriter.irtools import op, users

MODES = ("defer", "fold")
# --target: what each runtime does best (measured: docs/BENCHMARKS.md, PERF_BASELINE.md).
# ORT CUDA has no GEMM epilogue for a per-row scale, so a deferred Mul costs a pass over the
# output while its fused norm kernel is near free: fold the gains into the weights and keep
# one fused, weightless norm kernel. Elsewhere the paper's form (fold + defer).
TARGETS = {
    "portable": dict(mode="defer", fuse_norms=False),
    "ort-cpu": dict(mode="defer", fuse_norms=False),
    "ort-cuda": dict(mode="fold", fuse_norms=True),
}


@dataclass
class Options:
    mode: str = "defer"          # "defer": fold + defer 1/RMS past the linears; "fold": fold only
    clone_shared: bool = True    # clone a weight that something else also reads (tied lm_head)
    push_scales: bool = True     # defer: move each 1/RMS as far downstream as the algebra allows
    approx: bool = False         # let a deferred scale cancel in a following norm (exact only for ε=0)
    fuse_norms: bool = False     # fold: emit onnxruntime's fused norm kernels for decomposed norms
    target: str | None = None    # sets mode and fuse_norms from TARGETS

    def __post_init__(self):
        if self.target is not None:
            if self.target not in TARGETS:
                raise ValueError(f"unknown target {self.target!r} (choose from {', '.join(TARGETS)})")
            for key, value in TARGETS[self.target].items():
                setattr(self, key, value)
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r} (choose from {', '.join(MODES)})")


@dataclass
class Decision:
    site: Site | None
    miss: Miss | None
    action: str                  # "defer" | "fold" | "skip"
    reason: str = ""
    cloned: list[Linear] = field(default_factory=list)   # linears whose weight is shared

    @property
    def rewritten(self) -> bool:
        return self.action != "skip"

    @property
    def bytes_added(self) -> int:
        return sum(linear.weight.nbytes for linear in self.cloned)


def owns_weight(linear: Linear) -> bool:
    """True when nothing but `linear` reads its weight (so it can be replaced, not cloned)."""
    value = linear.weight.source
    if value.is_graph_input() or value.is_graph_output():
        return False
    while True:
        uses = users(value)
        if len(uses) != 1:
            return False
        node, _ = uses[0]
        if node is linear.node:
            return True
        if not op(node, "Transpose", "Cast", "Identity", domain=""):
            return False
        value = node.outputs[0]


def is_trivial(site: Site) -> bool:
    """Nothing to fold: unit (or absent) gain, zero (or absent) β, and no scale to defer."""
    unit = site.gain is None or bool(np.all(site.gain == 1))
    no_beta = site.beta is None or not np.any(site.beta)
    return unit and no_beta


def decide(site: Site, options: Options) -> Decision:
    action = "fold" if site.kind == "dyt" else options.mode
    if action == "fold" and is_trivial(site) and not (options.fuse_norms and site.form == "decomposed"):
        return Decision(site, None, "skip", "nothing to fold: unit gain and no β (already folded?)")
    shared = [linear for linear in site.linears if not owns_weight(linear)]
    if shared and not options.clone_shared:
        return Decision(site, None, "skip",
                        f"weight of {shared[0].node.op_type} {shared[0].node.name!r} is shared "
                        "(tied embedding or reused weight) and --no-clone was given")
    reason = "fold gain into weights" if action == "fold" else "fold gain, defer 1/RMS past the linears"
    if site.kind == "layer":
        reason = ("fold γ, β into weights/bias" if action == "fold"
                  else "fold γ, β and mean-centering into weights, defer 1/σ")
    if action == "fold" and options.fuse_norms and site.form == "decomposed":
        reason += "; norm fused into one onnxruntime kernel"
    if shared:
        reason += f"; cloned {len(shared)} shared weight(s)"
    return Decision(site, None, action, reason, cloned=shared)


def make_plan(sites: list[Site], misses: list[Miss], options: Options) -> list[Decision]:
    plan = [decide(site, options) for site in sites]
    plan += [Decision(None, miss, "skip", miss.reason) for miss in misses]
    return plan


__all__ = ["Decision", "MODES", "Options", "TARGETS", "decide", "make_plan", "owns_weight"]

"""LayerNorm and DyT in decomposed form (the single-op forms are rows of patterns/fused.py).

LayerNorm (anchored at the variance's ReduceMean):
    μ = ReduceMean(x); d = Sub(x, μ); ReduceMean(Pow(d, 2)) → [Add ε] → Sqrt →
    Div(d, ·) | Mul(d, Reciprocal(·)) → [Cast] → [Mul γ] → [Add β] → [Cast]
DyT (anchored at the Tanh):  Tanh(Mul(x, α)) → [Mul g] → [Add β]
"""

from __future__ import annotations

import onnx_ir as ir

from .base import Form, Miss, NormKind, Site
from .rmsnorm import match_affine, match_decomposed
from .graph import broadcast_scalar, op, rank_of


class DecomposedLayerNorm:
    kind = NormKind.LAYER
    form = Form.DECOMPOSED
    anchors = ("ReduceMean",)

    def match(self, reduce: ir.Node) -> Site | Miss | None:
        return match_decomposed(reduce, self.kind)


class DecomposedDyT:
    """Dynamic Tanh (Zhu et al. 2025): g ⊙ tanh(α·x) + β. Only g and β fold; no scale."""

    kind = NormKind.DYT
    form = Form.DECOMPOSED
    anchors = ("Tanh",)

    def match(self, tanh: ir.Node) -> Site | Miss | None:
        scaled = tanh.inputs[0].producer()
        if not op(scaled, "Mul", domain=""):
            return None
        a, b = scaled.inputs
        alpha = [broadcast_scalar(a, rank_of(b)), broadcast_scalar(b, rank_of(a))]
        if all(a is None for a in alpha):
            return None
        x = scaled.inputs[1] if alpha[0] is not None else scaled.inputs[0]
        nodes = [scaled, tanh]
        output, gain, beta, pre_affine = match_affine(tanh.outputs[0], nodes)
        if not any(v is not None and v.size > 1 for v in (gain, beta)):
            return None     # tanh(α·x) with no per-channel affine is an activation (GELU's tanh form)
        return Site(self.kind, self.form, tanh, x, output, 0.0, gain=gain, beta=beta,
                    nodes=tuple(nodes), pre_affine=pre_affine)

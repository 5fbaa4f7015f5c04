"""Normalization ops that arrive as one node: a table, one row per op (rules as data)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .base import Form, Miss, NormKind, Site, fail
from .rmsnorm import DEFERRED, per_channel
from .graph import attr, const_array, is_used, rank_of


@dataclass(frozen=True)
class FusedNorm:
    kind: NormKind               # RMS | LAYER
    gain: int                    # input index of the gain (γ)
    beta: int | None = None      # input index of β
    skip: int | None = None      # Skip* ops: input index of the residual skip
    bias: int | None = None      # Skip* ops: input index of the optional bias added to input+skip
    residual_out: int | None = None   # Skip* ops: output index of input+skip+bias
    extra_outputs: tuple[int, ...] = ()  # statistics outputs that must be unused
    has_axis: bool = True


FUSED_NORMS: dict[tuple[str, str], FusedNorm] = {
    ("", "RMSNormalization"): FusedNorm(NormKind.RMS, gain=1),
    ("", "LayerNormalization"): FusedNorm(NormKind.LAYER, gain=1, beta=2, extra_outputs=(1, 2)),
    # ORT registers SimplifiedLayerNormalization in the ONNX domain only (none in com.microsoft:
    # no runtime defines that op, or its defaults), the Skip* ops in com.microsoft
    ("", "SimplifiedLayerNormalization"): FusedNorm(NormKind.RMS, gain=1, extra_outputs=(1,)),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): FusedNorm(
        NormKind.RMS, gain=2, skip=1, bias=3, residual_out=3, extra_outputs=(1, 2), has_axis=False),
    ("com.microsoft", "SkipLayerNormalization"): FusedNorm(
        NormKind.LAYER, gain=2, beta=3, skip=1, bias=4, residual_out=3, extra_outputs=(1, 2),
        has_axis=False),
}


def _input(node: ir.Node, index: int | None) -> ir.Value | None:
    if index is None or index >= len(node.inputs):
        return None
    return node.inputs[index]


def _widens(value: ir.Value, other: ir.Value) -> bool:
    """`other` added to `value` would make a sum larger than `value` (an axis where `value` has 1
    and `other` may not, or more axes). Skip* kernels keep their input's shape and read only the
    skip's leading batch there, so such a site is not the Add it is rewritten into."""
    a, b = value.shape, other.shape
    if a is None or b is None:
        return False
    if len(b) > len(a):
        return True
    return any(da == 1 and db != 1 for da, db in zip(reversed(list(a)), reversed(list(b))))


class FusedNormRule:
    """Matches any op in FUSED_NORMS."""

    form = Form.FUSED
    anchors = tuple(op_type for _, op_type in FUSED_NORMS)

    def match(self, node: ir.Node) -> Site | Miss | None:
        domain = "" if node.domain == "ai.onnx" else node.domain
        spec = FUSED_NORMS.get((domain, node.op_type))
        if spec is None:
            return None
        form = self.form
        if spec.has_axis:
            axis = attr(node, "axis")
            rank = rank_of(node.inputs[0])
            if axis != -1 and (rank is None or axis != rank - 1):
                return Miss(node, spec.kind, fail(f"normalizes over axes {axis}.. (not only the last)", node), form)
        for index in spec.extra_outputs:
            if index < len(node.outputs) and is_used(node.outputs[index]):
                if not is_used(node.outputs[0]):    # only its inverse std: a deferred 1/RMS
                    return Miss(node, spec.kind, fail(DEFERRED, node), form)
                return Miss(node, spec.kind, fail(f"statistics output {index} is used", node.outputs[index]), form)
        rank = rank_of(node.inputs[0])
        gain = const_array(_input(node, spec.gain))
        if not per_channel(gain, rank):
            return Miss(node, spec.kind, fail("gain is not a constant along the normalized axis",
                                              _input(node, spec.gain) or node), form)
        beta = None
        if _input(node, spec.beta) is not None:
            beta = const_array(node.inputs[spec.beta])
            if not per_channel(beta, rank):
                return Miss(node, spec.kind, fail("β is not a constant along the normalized axis", node.inputs[spec.beta]),
                            form)
        skip_inputs: tuple = ()
        residual = None
        if spec.skip is not None:
            if _widens(node.inputs[0], node.inputs[spec.skip]):
                return Miss(node, spec.kind, fail("the skip is larger than the input along an axis: onnxruntime's "
                                                  "kernel keeps the input's shape, input + skip would broadcast",
                                                  node.inputs[spec.skip]), form)
            skip_inputs = (node.inputs[0], node.inputs[spec.skip], _input(node, spec.bias))
            if spec.residual_out < len(node.outputs) and is_used(node.outputs[spec.residual_out]):
                residual = node.outputs[spec.residual_out]
        return Site(spec.kind, form, node, None if skip_inputs else node.inputs[0], node.outputs[0],
                    float(attr(node, "epsilon")),
                    gain=np.asarray(gain).reshape(-1),
                    beta=None if beta is None else np.asarray(beta).reshape(-1),
                    nodes=(node,), skip_inputs=skip_inputs, residual_out=residual,
                    gain_input=spec.gain, beta_input=spec.beta if beta is not None else None)

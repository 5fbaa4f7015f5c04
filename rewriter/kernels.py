"""onnxruntime's norm kernels as the rewriter emits them: a weightless norm as one fused op
(strategy fold-fused) and 1/RMS (1/σ) from one norm op's inverse-std output (defer-normop).
Which sites each op accepts (ranks, the gain's size, dtypes) is decided in rewriter.plan
(kernel_contract, skip_operands); `NormKernels` builds them, as methods of
transform.Rewriter."""

from __future__ import annotations

import onnx_ir as ir

from rewriter.patterns import NormKind, Site
from rewriter.patterns.graph import dtype_of, exact_source, holds, rank_of, residual_add, set_dtype
from rewriter.plan import KERNEL_DTYPES, LAYERNORM_OPSET, Strategy, kernel_contract, kernel_width, skip_operands
from rewriter.plumbing import Plumbing

F32 = ir.DataType.FLOAT


class NormKernels(Plumbing):
    """onnxruntime's norm kernels on the plumbing's graph (a room of transform.Rewriter)."""

    def norm_kernel_stats(self, x: ir.Value, eps: float, centered: bool, size: int | None) -> list[ir.Value] | None:
        """The fp32 statistics outputs of SimplifiedLayerNormalization ([inverse std]) or, when
        centered, LayerNormalization ([mean, inverse std]) run on x with a unit gain; its
        normalized output is not used. None when the dtype or opset has no such kernel (fp64:
        the inverse std would be fp32 at best, so an fp64 model takes inverse_rms's fp64
        reduction)."""
        source = exact_source(x)
        dtype = dtype_of(source)
        if size is None or dtype not in KERNEL_DTYPES[Strategy.DEFER_NORMOP] or (
                centered and self.edit.opset < LAYERNORM_OPSET):
            return None
        ones = self.constant(1, (size,), dtype)
        attrs = {"epsilon": eps, "axis": -1, "stash_type": 1}
        if centered:
            node = self.edit.node("LayerNormalization", [source, ones], attrs, num_outputs=3, hint="inv_std")
        else:
            node = self.edit.node("SimplifiedLayerNormalization", [source, ones], attrs, num_outputs=2,
                                  hint="inv_rms")
        set_dtype(node.outputs[0], dtype)
        for out in node.outputs[1:]:
            set_dtype(out, F32)
        return list(node.outputs[1:])

    def fuse(self, site: Site) -> bool:
        """Replace a decomposed weightless norm by onnxruntime's fused kernel with a unit gain
        (`fuse_norm`; never SkipLayerNormalization, LayerNormalization only from opset 17); a
        gated group norm's kernel normalizes each group, the Reshape merging them follows it."""
        if site.kind not in (NormKind.RMS, NormKind.LAYER) or \
                kernel_contract(site, Strategy.FOLD_FUSED, {"": self.edit.opset}):
            return False
        x = self.current(site.x)
        if holds(dtype_of(site.output), dtype_of(exact_source(x))):
            x = self.narrow_source(x, dtype_of(site.output))   # an exact copy in the output's type
        # else (fp32 norm → fp16 output, autocast): the kernel normalizes in x's type, the Cast after
        dtype = dtype_of(x)
        if dtype not in KERNEL_DTYPES[Strategy.FOLD_FUSED]:
            return False
        self.fuse_norm(x, site.output, site.kind, site.eps, self.constant(1, (kernel_width(site),), dtype),
                       merge=site.merge)
        return True

    def fuse_norm(self, x: ir.Value, output: ir.Value, kind: NormKind, eps: float, gain: ir.Value,
                  beta: ir.Value | None = None, *, skip_layernorm: bool = False,
                  trust_unknown_shapes: bool = False, merge: ir.Node | None = None) -> str:
        """Replace the norm x → `output` (RMS or LAYER; x already in output's dtype) by
        onnxruntime's fused op weighted by `gain` (and `beta`). Where the Skip* kernels take x's
        residual Add (plan.skip_operands): SkipSimplifiedLayerNormalization (SkipLayerNormalization
        only with `skip_layernorm`) on its operands, its output 3 replacing the sum; else
        SimplifiedLayerNormalization / LayerNormalization (fp32 statistics). `trust_unknown_shapes`:
        see patterns.graph.residual_add. `merge`: a Reshape applied to the normalized output
        (a group norm's). Returns the op type emitted."""
        add = x.producer()
        weights = [gain] if beta is None else [gain, beta]
        operands = skip_operands(x) if not trust_unknown_shapes else tuple(add.inputs) if (
            rank_of(x) in (None, 2, 3) and residual_add(add, trust_unknown_shapes)) else None
        if (kind == NormKind.RMS or skip_layernorm) and operands:
            op_type = "SkipSimplifiedLayerNormalization" if kind == NormKind.RMS else "SkipLayerNormalization"
            fused = self.edit.node(op_type, [*operands, *weights], {"epsilon": float(eps)},
                                   domain="com.microsoft", num_outputs=4, hint=op_type)
            for stat in fused.outputs[1:3]:
                set_dtype(stat, F32)
            self.redirect(x, fused.outputs[3])
        else:
            op_type = "SimplifiedLayerNormalization" if kind == NormKind.RMS else "LayerNormalization"
            fused = self.edit.node(op_type, [x, *weights], {"epsilon": float(eps), "axis": -1, "stash_type": 1},
                                   hint=op_type)
        set_dtype(fused.outputs[0], dtype_of(x))
        normed = fused.outputs[0] if merge is None else self.edit.op1("Reshape", fused.outputs[0], merge.inputs[1])
        set_dtype(normed, dtype_of(x))
        self.redirect(output, self.edit.cast(normed, dtype_of(output)) if dtype_of(output) else normed)
        return op_type


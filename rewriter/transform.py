"""Carry out a plan: the only stage that edits the graph.

`Rewriter` rewrites one site after another; what each site needs is done in a room of its
own: rewriter/plumbing.py (rerouting readers, graph outputs), fold.py (gains into weights),
bias.py (a linear's bias, a Gemm's C), rowmoves.py (the scale laid out through row moves),
kernels.py (onnxruntime's norm kernels); the deferred scale's walk downstream is
rewriter/scale.py's. Here: per site, fold or defer, and 1/RMS itself.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewriter.bias import BiasPlacement
from rewriter.fold import WeightFolding
from rewriter.kernels import NormKernels
from rewriter.patterns import Form, NormKind, Site
from rewriter.patterns.graph import GraphEditor, const_array, dtype_of, set_dtype, users
from rewriter.plan import Action, Decision, Strategy
from rewriter.rowmoves import RowMoves
from rewriter.scale_walker import ScaleWalker

F32 = ir.DataType.FLOAT


def _compute_dtype(x: ir.Value) -> ir.DataType:
    """Where a deferred norm's statistics are computed: fp32, fp64 for an fp64 model."""
    return ir.DataType.DOUBLE if dtype_of(x) == ir.DataType.DOUBLE else F32


class Rewriter(WeightFolding, BiasPlacement, RowMoves, NormKernels):
    """Rewrites the sites of one graph of `model`: the main graph, or a subgraph (an If branch,
    a Loop body) whose new nodes and names get their own prefix."""

    def __init__(self, model: ir.Model, push_scales: bool = True, approx: bool = False,
                 graph: ir.Graph | None = None, prefix: str = "flashnorm"):
        graph = graph if graph is not None else model.graph
        super().__init__(graph, GraphEditor(graph, prefix, main=model.graph))
        self.scales = ScaleWalker(self.graph, self.edit, self.take_output_slot, push=push_scales)
        self.approx = approx

    # -- 1/RMS ----------------------------------------------------------------------------
    def inverse_rms(self, x: ir.Value, eps: float, size: int | None, norm_kernel: bool = False) -> ir.Value:
        """1/sqrt(mean(x²)+ε) (a LayerNorm's 1/σ: of the centered x, `center`), shape [..., 1],
        computed in the wider of fp32 and x's dtype (an fp64 model gets an fp64 scale).

        With `norm_kernel`, the inverse-std output of one onnxruntime norm op. Otherwise the
        kernels an exported RMSNorm runs: Mul(x, x) → ReduceMean → Add ε → Sqrt → Reciprocal.
        Not ReduceSumSquare: onnxruntime's CPU kernel sums the squares one after the other in
        fp32 (error growing like √n: ~4·2⁻²⁴ rms at n = 576, ~16·2⁻²⁴ at 4096), where
        ReduceMean's vectorized sum stays at ~1–3·2⁻²⁴; and 1/RMS multiplies whole rows, so its
        error is the same sign over a row and the following matmuls do not average it out.
        Tests: tests/test_precision.py (the scale, fp64), tests/test_smollm2_real.py (vs float64)."""
        if norm_kernel:
            stats = self.norm_kernel_stats(x, eps, centered=False, size=size)
            if stats is not None:
                return stats[-1]
        e = self.edit
        dtype = _compute_dtype(x)
        xf = e.cast(x, dtype)
        ms = e.reduce_mean_last(e.op1("Mul", xf, xf))
        root = e.op1("Sqrt", e.op1("Add", ms, e.initializer(np.array(eps, dtype.numpy()), "epsilon")))
        return e.op1("Reciprocal", root, hint="inv_rms")

    def center(self, x: ir.Value, eps: float, size: int | None,
               norm_kernel: bool = False) -> tuple[ir.Value, ir.Value]:
        """A deferred LayerNorm: (x − mean(x), 1/σ). Its linears read the centered x, as the
        original computes it; only 1/σ is deferred (γ, β folded). Folding the centering into
        the weights instead (each column minus its mean over the input axis) is exact too and
        saves this Sub, but then the fp32 linear cancels x's common mean itself: on a stream
        with a large common mean that doubles the original's error against float64
        (tests/test_layernorm_precision.py), and the pass cannot see the data. The mean is
        corrected by a second pass, (x − m) − mean(x − m): an fp32 mean m of values near m is off
        by a few ulps of m, a common shift the centering keeps where |m| ≫ the spread, while
        x − m is exact there (Sterbenz) and its mean small (test_reach's offset-300 Swin:
        2e-7 from float64 against the original's 3e-4). 1/σ is the RMS of the same centered
        value (E[x²]−E[x]² cancels in fp32); with `norm_kernel`, the inverse std of one
        LayerNormalization, whose Mean output centers x (the original's own fused kernel)."""
        e = self.edit
        xf = e.cast(x, _compute_dtype(x))
        stats = self.norm_kernel_stats(x, eps, centered=True, size=size) if norm_kernel else None
        mean = stats[0] if stats is not None else e.reduce_mean_last(xf)
        centered = e.op1("Sub", xf, mean, hint="centered")
        set_dtype(centered, dtype_of(xf))
        if stats is None:       # a second pass: see the docstring
            centered = e.op1("Sub", centered, e.reduce_mean_last(centered), hint="centered")
            set_dtype(centered, dtype_of(xf))
        return centered, stats[-1] if stats is not None else self.inverse_rms(centered, eps, size)

    # -- one site -------------------------------------------------------------------------
    def apply(self, decision: Decision) -> None:
        site = decision.site
        defer = decision.action == Action.DEFER and site.kind in (NormKind.RMS, NormKind.LAYER)
        kept = {id(linear) for linear in decision.gain_kept}
        once = {id(linear) for linear in decision.folded_once}
        deltas = [self.fold_linear(site, linear, keep_weight=id(linear) in kept, once=id(linear) in once)
                  for linear in site.linears]
        if defer:
            self.defer(site, deltas, norm_kernel=decision.strategy == Strategy.DEFER_NORMOP)
        else:
            self.drop_gain(site, fuse=decision.fused)
            for linear, delta in zip(site.linears, deltas):
                self.add_bias(linear, linear.output, delta, detach_gemm_bias=False)
        for linear in decision.gain_kept:
            self.gain_before(site, linear)

    def residual_input(self, site: Site) -> ir.Value:
        """x itself, rebuilt as input + skip (+ bias) for Skip* ops."""
        if not site.skip_inputs:
            return self.current(site.x)
        inp, skip, bias = (self.current(v) for v in site.skip_inputs)
        x = self.edit.op1("Add", inp, skip, hint="residual")
        if bias is not None:
            x = self.edit.op1("Add", x, bias, hint="residual")
        set_dtype(x, dtype_of(inp))
        if site.residual_out is not None:
            self.redirect(site.residual_out, x)
        return x

    def defer(self, site: Site, deltas, norm_kernel: bool = False) -> None:
        x = self.residual_input(site)
        before = {node for node, _ in users(x)}
        if site.kind == NormKind.LAYER:
            read, scale = self.center(x, site.eps, site.size, norm_kernel)
        else:
            read, scale = x, self.inverse_rms(x, site.eps, site.size, norm_kernel)
        root = self.narrow_source(read, dtype_of(site.output))
        if site.merge is not None:      # one group: the raw input and 1/RMS merged like the norm's output
            dtype = dtype_of(root)
            root = self.edit.op1("Reshape", root, site.merge.inputs[1], hint="merged")
            set_dtype(root, dtype)
            scale = self.reshape_scale(site.merge, scale)
        self.redirect(site.output, root)
        if self.approx and not site.skip_inputs:
            # a scale arriving at x may cancel: s_B(s·t)·(s·t)W = s_B(t)·tW up to ε
            self.scales.cancel_in(x, [node for node, _ in users(x) if node not in before], site.axes)
        for linear, delta in zip(site.linears, deltas):
            self.add_bias(linear, linear.output, delta, detach_gemm_bias=True)
            self.scales.seed(linear.output, self.scale_for(linear, scale, root))

    def drop_gain(self, site: Site, fuse: bool = False) -> None:
        """Fold: keep the norm, weightless (as one fused op when `fuse`)."""
        if fuse and site.form == Form.DECOMPOSED and self.fuse(site):
            return
        if site.pre_affine is not None and site.kind == NormKind.LAYER:
            self.unit_affine(site)
        elif site.pre_affine is not None:
            self.redirect(site.output, self.narrow_source(site.pre_affine, dtype_of(site.output)))
        if site.gain_input is not None:
            gain = site.anchor.inputs[site.gain_input]
            dtype = dtype_of(gain)
            shape = tuple(gain.shape) if gain.shape is not None else site.gain.shape
            site.anchor.replace_input_with(site.gain_input, self.constant(1, shape, dtype))
        if site.beta_input is not None:
            # β is in the linears' bias now. A zero β (not none) keeps the op's signature, so that
            # the ecosystem's Add + LayerNormalization(γ, β) → SkipLayerNormalization still matches
            beta = site.anchor.inputs[site.beta_input]
            shape = tuple(beta.shape) if beta.shape is not None else site.beta.shape
            site.anchor.replace_input_with(site.beta_input, self.constant(0, shape, dtype_of(beta)))

    def unit_affine(self, site: Site) -> None:
        """A decomposed LayerNorm kept weightless: its γ Mul and β Add stay, γ = 1 and β = 0
        (exact), the original's own kernels, so a runtime fuses them as it fused the original.
        onnxruntime fuses ReduceMean … Div → Mul → Add into its LayerNormalization kernel, whose
        mean is more accurate than an fp32 ReduceMean; the bare … Div it leaves decomposed: on a
        stream with a large common offset that was 3.4× the original's error against float64
        (tests/test_layernorm_precision.py). Like the fused ops' unit gain and zero β."""
        value = site.pre_affine
        while value is not site.output:
            node = users(value)[0][0]       # match_affine: each value of the chain has one reader
            if node.op_type in ("Mul", "Add"):
                index = 1 if node.inputs[0] is value else 0
                other = node.inputs[index]
                shape = const_array(other).shape
                node.replace_input_with(index, self.constant(int(node.op_type == "Mul"), shape, dtype_of(other)))
            value = node.outputs[0]

    def meet_untouched_norm(self, site: Site) -> None:
        """A scale reaching this (not rewritten) norm's input is applied once before it, or
        with --approx cancels in it."""
        if site.kind not in (NormKind.RMS, NormKind.LAYER) or site.skip_inputs or site.x is None:
            return
        x = self.current(site.x)
        readers = [node for node in site.nodes if x in node.inputs]
        if self.approx:
            self.scales.cancel_in(x, readers, site.axes)
        else:
            self.scales.stop_at(readers)

    def finish(self) -> None:
        """Place the deferred scales and leave a sorted graph (dead nodes are removed by the
        pipeline's unused-node pass, rewriter/pipeline.py)."""
        self.scales.run()
        self.graph.sort()


def apply_plan(model: ir.Model, plan: list[Decision], push_scales: bool = True,
               approx: bool = False, graph: ir.Graph | None = None, prefix: str = "flashnorm",
               folded_once: dict | None = None) -> Rewriter:
    """Rewrite every non-skipped site of `plan` — sites of `graph` (default: the main graph) —
    in `model` (in place). `folded_once`: the copies of weights folded once for all their
    readers (Decision.folded_once), shared by the calls for every scope of the model."""
    rewriter = Rewriter(model, push_scales, approx, graph, prefix)
    if folded_once is not None:
        rewriter.folded_once = folded_once
    done = 0
    for decision in plan:
        if decision.rewritten:
            rewriter.apply(decision)
            done += 1
        elif decision.miss is not None and decision.miss.site is not None:
            rewriter.meet_untouched_norm(decision.miss.site)
    if done:
        rewriter.finish()
    return rewriter

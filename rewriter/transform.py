"""Carry out a plan: the only stage that edits the graph.

Weights are folded lazily: each new weight is an `ir.LazyTensor` computed (the exact product
rounded once: rewriter/weights.py) when the model is saved or run, so nothing holds the whole
model in memory.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewriter.patterns import Linear, Site
from rewriter.patterns.linear import weight_dtype
from rewriter.patterns.graph import GraphEditor, attr, const_array, dtype_of, holds, op, set_dtype, users
from rewriter.conv import add_conv_beta, conv_beta_kernel, folded_conv_weight
from rewriter.kernels import NormKernels
from rewriter.plan import Decision, owns_weight
from rewriter.scale_walker import ScaleWalker
from rewriter.weights import beta_through_weight, folded_weight, gemm_bias

F32 = ir.DataType.FLOAT


def _compute_dtype(x: ir.Value) -> ir.DataType:
    """Where a deferred norm's statistics are computed: fp32, fp64 for an fp64 model."""
    return ir.DataType.DOUBLE if dtype_of(x) == ir.DataType.DOUBLE else F32


def _alpha(linear: Linear) -> float:
    return float(attr(linear.node, "alpha")) if linear.node.op_type in ("Gemm", "FusedMatMul") else 1.0


class Rewriter(NormKernels):
    """Rewrites the sites of one graph of `model`: the main graph, or a subgraph (an If branch,
    a Loop body) whose new nodes and names get their own prefix."""

    def __init__(self, model: ir.Model, push_scales: bool = True, approx: bool = False,
                 graph: ir.Graph | None = None, prefix: str = "flashnorm"):
        self.graph = graph if graph is not None else model.graph
        self.edit = GraphEditor(self.graph, prefix, main=model.graph)
        self.scales = ScaleWalker(self.graph, self.edit, self._take_output_slot, push=push_scales)
        self._constants: dict = {}
        self._mirrors: dict = {}
        self._stacks: set = set()
        self.folded_once: dict = {}     # (weight, gain) → its folded copy, in the weight's scope
        self.replaced: dict[ir.Value, ir.Value] = {}    # redirect()'s old → new, for later sites
        self.approx = approx

    # -- graph plumbing -------------------------------------------------------------------
    def insert_after(self, value: ir.Value, make) -> ir.Value:
        """Route every reader of `value` (graph outputs included) through `make(value)`; a later
        site matched against `value` (a norm reading a linear's output) reads `new` too."""
        readers = users(value)
        new = make(value)
        for node, index in readers:
            node.replace_input_with(index, new)
        self._take_output_slot(value, new)
        self.replaced[value] = new
        return new

    def redirect(self, old: ir.Value, new: ir.Value) -> None:
        """Replace `old` by the equivalent `new` everywhere (graph outputs included)."""
        if new.shape is None:
            new.shape = old.shape
        if (new.type is None or new.dtype is None) and old.type is not None:
            new.type = old.type
        for node, index in users(old):
            node.replace_input_with(index, new)
        self._take_output_slot(old, new)
        self.replaced[old] = new

    def current(self, value: ir.Value | None) -> ir.Value | None:
        """`value` as the graph now has it: a later site matched against a value an earlier
        site replaced (a Skip* norm's residual output) must read the replacement, or the old
        producer stays alive."""
        while value in self.replaced:
            value = self.replaced[value]
        return value

    def _take_output_slot(self, old: ir.Value, new: ir.Value) -> None:
        if not old.is_graph_output():
            return
        for i, out in enumerate(self.graph.outputs):
            if out is old:
                self.graph.outputs[i] = new
        name, old.name = old.name, self.edit.fresh("renamed")
        new.name = name
        new.shape, new.type = new.shape or old.shape, new.type or old.type

    def narrow_source(self, value: ir.Value, dtype: ir.DataType | None) -> ir.Value:
        """`value` in `dtype`, skipping lossless Casts (widening or to the same type) back to
        a value already in `dtype` instead of casting again."""
        node = value.producer()
        if op(node, "Cast", domain="") and dtype is not None:
            source = node.inputs[0]
            lossless = holds(dtype_of(value), dtype_of(source))
            if lossless and dtype_of(source) in (dtype, dtype_of(value)):
                return self.narrow_source(source, dtype)
        return self.edit.cast(value, dtype) if dtype is not None else value

    # -- weights --------------------------------------------------------------------------
    def fold_linear(self, site: Site, linear: Linear, keep_weight: bool = False,
                    once: bool = False) -> np.ndarray | None:
        """Replace the linear's weight by diag(gain)·W — in place, or in one copy its readers
        share (`once`, see Decision.folded_once), or not at all (`keep_weight`: `gain_before`
        scales the input). A deferred LayerNorm's centering is not folded (see `center`).
        Returns the bias delta α·β·W, or None when β is absent."""
        ref = linear.weight
        if keep_weight:
            return self.beta_delta(site, linear)
        if linear.conv:
            return self.fold_conv(site, linear)
        if linear.stacked_axis is not None:
            return self.fold_stack(site, linear)
        dtype = weight_dtype(linear)
        gain = None if site.gain is None or np.all(site.gain == 1) else site.gain.astype(np.float64)
        if gain is None:        # the weight stays; β, if any, goes through it
            return self.beta_delta(site, linear)
        n, k = linear.weight_shape
        out_shape = (k, n) if ref.transposed else (n, k)

        def folded() -> ir.TensorProtocol:
            return ir.Tensor(folded_weight(ref, gain, dtype), dtype=dtype)

        tensor = ir.LazyTensor(folded, dtype=dtype, shape=ir.Shape(out_shape))
        if once:        # before owns_weight: the last reader would own what the others left
            key = (ref.source, None if gain is None else gain.tobytes())
            if key not in self.folded_once:
                self.folded_once[key] = self.edit.initializer(tensor, "folded_weight", graph=ref.source.graph)
            linear.node.replace_input_with(1, self.folded_once[key])
        elif owns_weight(linear) and not ref.steps and ref.source.is_initializer():
            tensor.name = ref.source.name
            ref.source.const_value = tensor
        else:
            linear.node.replace_input_with(1, self.edit.initializer(tensor, "folded_weight"))

        return self.beta_delta(site, linear)

    def fold_conv(self, site: Site, linear: Linear) -> np.ndarray | None:
        """W[:, c, ...]·γ[c] (float64, cast back once); returns β's part, Σ_c W[o, c, ...]·β[c]
        per tap (rewriter/conv.py)."""
        ref = linear.weight
        if site.gain is not None and not np.all(site.gain == 1):
            gain, dtype = site.gain.astype(np.float64).reshape(-1), ref.tensor.dtype
            tensor = ir.LazyTensor(lambda: ir.Tensor(folded_conv_weight(linear, gain), dtype=dtype),
                                   dtype=dtype, shape=ir.Shape(tuple(ref.tensor.shape)))
            linear.node.replace_input_with(1, self.edit.initializer(tensor, "folded_conv_weight"))
        return self.beta_delta(site, linear)

    def fold_stack(self, site: Site, linear: Linear) -> None:
        """Stacked experts [E, a, b] (the expert chosen at run time): γ along the contracted
        axis of every expert at once, once per stack (a deferred LayerNorm's experts read the
        centered input like every other linear); β never reaches here (patterns refuse it: no
        constant bias)."""
        table = linear.weight.source
        if table in self._stacks or site.gain is None or np.all(site.gain == 1):
            return None
        self._stacks.add(table)
        ref, axis = linear.weight, linear.stacked_axis
        gain = site.gain.astype(np.float64).reshape(-1)
        dtype = ref.tensor.dtype

        def folded() -> ir.TensorProtocol:
            w = ref.tensor.numpy().astype(np.float64)
            w = w * np.broadcast_to(gain, (w.shape[axis],)).reshape([-1 if i == axis else 1 for i in range(3)])
            return ir.Tensor(w.astype(dtype.numpy()), dtype=dtype)

        tensor = ir.LazyTensor(folded, dtype=dtype, shape=ir.Shape(tuple(ref.tensor.shape)))
        if table.is_initializer():
            tensor.name = table.name
            table.const_value = tensor
        else:
            new = self.edit.initializer(tensor, "folded_experts")
            for reader, index in users(table):
                reader.replace_input_with(index, new)
        return None

    @staticmethod
    def beta_delta(site: Site, linear: Linear) -> np.ndarray | None:
        """α·β·W: what β adds after the linear (a Conv: its kernel, conv_beta_kernel; None when
        β is absent)."""
        if site.beta is None or not np.any(site.beta):
            return None
        if linear.conv:
            return conv_beta_kernel(linear, site.beta.astype(np.float64).reshape(-1))
        return _alpha(linear) * beta_through_weight(linear.weight, site.beta.astype(np.float64))

    def gain_before(self, site: Site, linear: Linear) -> None:
        """A shared weight stays as it is: its linear reads x·gain (a deferred LayerNorm's x
        already centered) — exact, no byte of weight added."""
        value = linear.node.inputs[0]
        dtype = dtype_of(value)
        if site.gain is not None and not np.all(site.gain == 1):
            gain = self.edit.initializer(site.gain.astype(dtype.numpy() if dtype else np.float32), "shared_gain")
            value = self.edit.op1("Mul", value, gain, hint="shared_gain")
            set_dtype(value, dtype)
        linear.node.replace_input_with(0, value)

    def add_bias(self, linear: Linear, after: ir.Value, delta: np.ndarray | None, detach_gemm_bias: bool):
        """Apply the linear's bias (+ β·W delta) after `after`: in place when the bias stays
        where it is, otherwise as an Add following `after`."""
        node = linear.node
        if linear.conv:         # fold only: β's part joins the Conv's bias, or (padded) follows it
            border = add_conv_beta(self.edit, linear, delta) if delta is not None else None
            if border is not None:
                self.insert_after(after, lambda v: self.edit.op1("Add", v, border, hint="beta_border"))
            return
        gemm_c = op(node, "Gemm", domain="") and linear.bias is not None
        if op(node, "Gemm", domain="") and not detach_gemm_bias and (gemm_c or linear.bias_add is None):
            if delta is not None:       # C' = β·C + α·β_LN·W, beta := 1 (β may be 0: C' is exact for any β)
                c = const_array(linear.bias) if gemm_c else None
                dtype = c.dtype if c is not None else (dtype_of(linear.output) or F32).numpy()
                new = delta if c is None else gemm_bias(c, float(attr(node, "beta")), delta)
                node.resize_inputs(3)
                node.replace_input_with(2, self.edit.initializer(new.astype(dtype), "bias"))
                node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            return
        if gemm_c:          # the scale must come before the bias: take C out of the Gemm
            c = const_array(linear.bias).astype(np.float64) * float(attr(node, "beta"))
            if self.edit.opset < 11:        # Gemm-7..10 require C: a zero one
                zero = np.zeros(1, const_array(linear.bias).dtype)
                node.replace_input_with(2, self.edit.initializer(zero, "zero_c", dtype=dtype_of(linear.bias)))
            else:
                node.resize_inputs(2)
            delta = c if delta is None else c + delta
        elif linear.bias_add is not None and delta is not None:
            index = 0 if linear.bias_add.inputs[0] is linear.bias else 1
            c = const_array(linear.bias)
            linear.bias_add.replace_input_with(index, self.edit.initializer(
                (c.astype(np.float64) + delta).astype(c.dtype), "bias"))
            return
        if delta is None:
            return
        dtype = dtype_of(linear.output) or F32
        bias = self.edit.initializer(delta.astype(dtype.numpy()), "bias", dtype=dtype)
        self.insert_after(after, lambda v: self.edit.op1("Add", v, bias, hint="bias"))

    # -- scales ---------------------------------------------------------------------------
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

    def scale_for(self, linear: Linear, scale: ir.Value, root: ir.Value | None = None) -> ir.Value:
        """The per-row scale (fp32) laid out like the linear's input: every row move and Reshape
        between `root` (what the norm's output became) and the linear is mirrored on the scale
        (a Reshape's last axis set to 1), so each row of the linear meets its own 1/RMS."""
        if root is None:
            return self._scale_along_path(linear, scale)
        memo = self._mirrors.setdefault((id(root), id(scale)), {root: scale})   # shared by the linears

        def mirror(value: ir.Value) -> ir.Value:
            if value in memo:
                return memo[value]
            node = value.producer()
            if op(node, "Reshape", domain=""):
                out = self._reshape_scale(node, mirror(node.inputs[0]))
            elif op(node, "Cast", "CastLike", "Identity", "Pad", domain=""):   # Pad: all-zero pads only
                out = mirror(node.inputs[0])
            else:       # Transpose, Slice, Gather, Split, Concat: the same op on the scale
                inputs = [mirror(v) if i == 0 or op(node, "Concat") else v for i, v in enumerate(node.inputs)]
                copy = self.edit.node(node.op_type, inputs, {a.name: a for a in node.attributes.values()},
                                      num_outputs=len(node.outputs), hint="scale_move")
                out = copy.outputs[list(node.outputs).index(value)]
                set_dtype(out, dtype_of(scale))
            memo[value] = out
            return out

        return mirror(linear.node.inputs[0])

    def _reshape_scale(self, node: ir.Node, s: ir.Value) -> ir.Value:
        target = const_array(node.inputs[1])
        if target is not None:
            target = target.astype(np.int64).copy()
            target[-1] = 1
            shape = self.edit.initializer(target, "scale_shape")
        else:       # the reshaped activation's shape with the last axis set to 1
            e = self.edit
            rows = e.slice(e.op1("Shape", node.outputs[0]), [0], [-1])
            shape = e.op1("Concat", rows, e.initializer(np.array([1], np.int64), "one"), axis=0)
        return self.edit.op1("Reshape", s, shape, hint="scale_r")

    def _scale_along_path(self, linear: Linear, scale: ir.Value) -> ir.Value:
        s = scale
        for node in linear.path:
            if op(node, "Reshape", domain=""):
                s = self._reshape_scale(node, s)
        return s

    # -- one site -------------------------------------------------------------------------
    def apply(self, decision: Decision) -> None:
        site = decision.site
        defer = decision.action == "defer" and site.kind in ("rms", "layer")
        kept = {id(linear) for linear in decision.gain_kept}
        once = {id(linear) for linear in decision.folded_once}
        deltas = [self.fold_linear(site, linear, keep_weight=id(linear) in kept, once=id(linear) in once)
                  for linear in site.linears]
        if defer:
            self.defer(site, deltas, norm_kernel=decision.strategy == "defer-normop")
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
        if site.kind == "layer":
            read, scale = self.center(x, site.eps, site.size, norm_kernel)
        else:
            read, scale = x, self.inverse_rms(x, site.eps, site.size, norm_kernel)
        root = self.narrow_source(read, dtype_of(site.output))
        if site.merge is not None:      # one group: the raw input and 1/RMS merged like the norm's output
            dtype = dtype_of(root)
            root = self.edit.op1("Reshape", root, site.merge.inputs[1], hint="merged")
            set_dtype(root, dtype)
            scale = self._reshape_scale(site.merge, scale)
        self.redirect(site.output, root)
        if self.approx and not site.skip_inputs:
            # a scale arriving at x may cancel: s_B(s·t)·(s·t)W = s_B(t)·tW up to ε
            self.scales.cancel_in(x, [node for node, _ in users(x) if node not in before], site.axes)
        for linear, delta in zip(site.linears, deltas):
            self.add_bias(linear, linear.output, delta, detach_gemm_bias=True)
            self.scales.seed(linear.output, self.scale_for(linear, scale, root))

    def drop_gain(self, site: Site, fuse: bool = False) -> None:
        """Fold: keep the norm, weightless (as one fused op when `fuse`)."""
        if fuse and site.form == "decomposed" and self.fuse(site):
            return
        if site.pre_affine is not None and site.kind == "layer":
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
        if site.kind not in ("rms", "layer") or site.skip_inputs or site.x is None:
            return
        x = self.current(site.x)
        readers = [node for node in site.nodes if x in node.inputs]
        if self.approx:
            self.scales.cancel_in(x, readers, site.axes)
        else:
            self.scales.stop_at(readers)

    def constant(self, value: int, shape, dtype: ir.DataType) -> ir.Value:
        """One shared initializer per (value, shape, dtype): unit gains, zero biases."""
        key = (value, tuple(shape), dtype)
        if key not in self._constants:
            self._constants[key] = self.edit.initializer(np.full(shape, value, dtype.numpy()),
                                                    "unit_gain" if value == 1 else "zero_beta", dtype=dtype)
        return self._constants[key]

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

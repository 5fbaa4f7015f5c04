"""Folding a norm's gain into the weights of the linears it feeds: a MatMul/Gemm weight (in
place, in one copy its readers share, or — a shared weight kept — as a Mul on the linear's
input), a Conv's input channels, stacked MoE experts; and β's term after the linear (α·β·W).
A deferred LayerNorm's centering is not folded: its linears read the centered input
(transform.Rewriter.center). Weights are folded lazily: each is an `ir.LazyTensor` computed
(the exact product rounded once: rewriter/weights.py) when the model is saved or run."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewriter.conv import conv_beta_kernel, folded_conv_weight
from rewriter.patterns import Linear, Site
from rewriter.patterns.graph import attr, dtype_of, set_dtype, users
from rewriter.patterns.linear import weight_dtype
from rewriter.plan import owns_weight
from rewriter.plumbing import Plumbing
from rewriter.weights import beta_through_weight, folded_weight


def _gain(site: Site) -> np.ndarray | None:
    """The site's gain in float64, None when there is none to fold (absent or all ones)."""
    return None if site.unit_gain else site.gain.astype(np.float64)


def _alpha(linear: Linear) -> float:
    return float(attr(linear.node, "alpha")) if linear.node.op_type in ("Gemm", "FusedMatMul") else 1.0


class WeightFolding(Plumbing):
    """Gains into weights (a room of transform.Rewriter)."""

    def __init__(self, graph: ir.Graph, edit):
        super().__init__(graph, edit)
        self.folded_once: dict = {}     # (weight, gain) → its folded copy, in the weight's scope
        self._stacks: set = set()

    def fold_linear(self, site: Site, linear: Linear, keep_weight: bool = False,
                    once: bool = False) -> np.ndarray | None:
        """Replace the linear's weight by diag(gain)·W — in place, or in one copy its readers
        share (`once`, see Decision.folded_once), or not at all (`keep_weight`: `gain_before`
        scales the input). A deferred LayerNorm's centering is not folded (transform.Rewriter.center).
        Returns the bias delta α·β·W, or None when β is absent."""
        ref = linear.weight
        if keep_weight:
            return self.beta_delta(site, linear)
        if linear.conv:
            return self.fold_conv(site, linear)
        if linear.stacked_axis is not None:
            return self.fold_stack(site, linear)
        dtype = weight_dtype(linear)
        gain = _gain(site)
        if gain is None:        # the weight stays; β, if any, goes through it
            return self.beta_delta(site, linear)
        n, k = linear.weight_shape
        out_shape = (k, n) if ref.transposed else (n, k)

        def folded() -> ir.TensorProtocol:
            return ir.Tensor(folded_weight(ref, gain, dtype), dtype=dtype)

        tensor = ir.LazyTensor(folded, dtype=dtype, shape=ir.Shape(out_shape))
        if once:        # before owns_weight: the last reader would own what the others left
            key = (ref.source, gain.tobytes())
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
        if (gain := _gain(site)) is not None:
            gain, dtype = gain.reshape(-1), ref.tensor.dtype
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
        gain = _gain(site)
        if table in self._stacks or gain is None:
            return None
        self._stacks.add(table)
        ref, axis = linear.weight, linear.stacked_axis
        gain = gain.reshape(-1)
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

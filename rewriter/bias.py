"""Where a linear's bias goes after the rewrite: a Gemm's C (kept in the Gemm, with a folded
β's term joined to it, or taken out when a deferred scale must come before it), a bias Add
after a MatMul, a Conv's bias or its padded border term (rewriter/conv.py)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewriter.conv import add_conv_beta
from rewriter.patterns import Linear
from rewriter.patterns.graph import attr, const_array, dtype_of, op
from rewriter.plumbing import Plumbing
from rewriter.weights import gemm_bias

F32 = ir.DataType.FLOAT


class BiasPlacement(Plumbing):
    """A linear's bias and β's term (a room of transform.Rewriter)."""

    def add_bias(self, linear: Linear, after: ir.Value, delta: np.ndarray | None, detach_gemm_bias: bool):
        """Apply the linear's bias (+ β·W delta) after `after`: in place when the bias stays
        where it is, otherwise as an Add following `after`."""
        node = linear.node
        if linear.conv:         # fold only: β's part joins the Conv's bias, or (padded) follows it
            border = add_conv_beta(self.edit, linear, delta) if delta is not None else None
            if border is not None:
                self.insert_after(after, lambda v: self.edit.op1("Add", v, border, hint="beta_border"))
            return
        gemm = op(node, "Gemm", domain="")
        gemm_c = gemm and linear.bias is not None
        if gemm and not detach_gemm_bias and (gemm_c or linear.bias_add is None):
            if delta is not None:       # C' = β·C + α·β_LN·W, beta := 1 (β may be 0: C' is exact for any β)
                c = const_array(linear.bias) if gemm_c else None
                dtype = c.dtype if c is not None else (dtype_of(linear.output) or F32).numpy()
                new = delta if c is None else gemm_bias(c, float(attr(node, "beta")), delta)
                node.resize_inputs(3)
                node.replace_input_with(2, self.edit.initializer(new.astype(dtype), "bias"))
                node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            return
        if gemm_c:          # the scale must come before the bias: take C out of the Gemm
            stored = const_array(linear.bias)
            c = gemm_bias(stored, float(attr(node, "beta")), 0.0)
            if self.edit.opset < 11:        # Gemm-7..10 require C: a zero one
                zero = np.zeros(1, stored.dtype)
                node.replace_input_with(2, self.edit.initializer(zero, "zero_c", dtype=dtype_of(linear.bias)))
            else:
                node.resize_inputs(2)
            delta = c if delta is None else c + delta
        elif linear.bias_add is not None and delta is not None:
            index = 0 if linear.bias_add.inputs[0] is linear.bias else 1
            c = const_array(linear.bias)
            linear.bias_add.replace_input_with(index, self.edit.initializer(
                gemm_bias(c, 1.0, delta).astype(c.dtype), "bias"))
            return
        if delta is None:
            return
        dtype = dtype_of(linear.output) or F32
        bias = self.edit.initializer(delta.astype(dtype.numpy()), "bias", dtype=dtype)
        self.insert_after(after, lambda v: self.edit.op1("Add", v, bias, hint="bias"))

"""A norm's per-channel gain and β against a Conv weight [O, C/group, k...] (fold only)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewriter.patterns import Linear
from rewriter.patterns.graph import GraphEditor, attr, const_array, dtype_of, set_dtype
from rewriter.patterns.linear import conv_pads


def conv_channels(linear: Linear, per_channel: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A per-input-channel vector laid out against the Conv weight `w`: entry [o, j] is input
    channel (o // (O/group))·(C/group) + j."""
    group = int(attr(linear.node, "group"))
    out, width = w.shape[0], w.shape[1]
    channels = (np.arange(out)[:, None] // (out // group)) * width + np.arange(width)[None, :]
    values = np.broadcast_to(per_channel, (width * group,))[channels]
    return values.reshape(values.shape + (1,) * (w.ndim - 2))


def folded_conv_weight(linear: Linear, gain: np.ndarray) -> np.ndarray:
    """W[:, c, ...]·γ[c] in float64, cast back once."""
    w = linear.weight.tensor.numpy()
    return (w.astype(np.float64) * conv_channels(linear, gain, w)).astype(w.dtype)


def conv_beta_kernel(linear: Linear, beta: np.ndarray) -> np.ndarray:
    """Σ_c W[o, c, ...]·β[c], [O, 1, k...] in float64: what β adds through each tap of the
    kernel (summed over the taps: the bias delta where no tap reads padding)."""
    w = linear.weight.tensor.numpy().astype(np.float64)
    return (w * conv_channels(linear, beta, w)).sum(axis=1, keepdims=True)


def add_conv_beta(edit: GraphEditor, linear: Linear, kernel: np.ndarray) -> ir.Value | None:
    """β's part of the Conv's output, `kernel` from conv_beta_kernel. Without padding it is one
    vector: it joins the Conv's bias (returns None). With padding the taps on the zero border
    read no β, so it varies near the borders: returns Conv(ones [1, 1, spatial...], kernel)
    with the Conv's own pads, strides and dilations (group 1) — a map [1, O, out...] to add
    after the Conv, exact for any input size (its cost: one input channel, batch 1)."""
    node = linear.node
    dtype = dtype_of(node.inputs[0]) or linear.weight.tensor.dtype
    if not conv_pads(node):
        delta = kernel.sum(axis=tuple(range(1, kernel.ndim)))
        c = const_array(linear.bias) if linear.bias is not None else None
        new = delta if c is None else c.astype(np.float64) + delta
        bias = edit.initializer(new.astype(c.dtype if c is not None else dtype.numpy()), "conv_bias")
        node.resize_inputs(max(3, len(node.inputs)))
        node.replace_input_with(2, bias)
        return None
    spatial = edit.slice(edit.op1("Shape", node.inputs[0]), [2], [np.iinfo(np.int64).max])
    dims = edit.op1("Concat", edit.initializer(np.array([1, 1], np.int64), "one_one"), spatial, axis=0)
    if edit.opset >= 9:
        ones = edit.op1("ConstantOfShape", dims, value=ir.tensor(np.ones(1, dtype.numpy())), hint="ones")
    else:               # no ConstantOfShape before opset 9: a single 1 tiled to the shape
        one = edit.initializer(np.ones([1] * kernel.ndim, dtype.numpy()), "one")
        ones = edit.op1("Tile", one, dims, hint="ones")
    set_dtype(ones, dtype)
    attributes = {a.name: a for a in node.attributes.values() if a.name != "group"}
    weights = edit.initializer(kernel.astype(dtype.numpy()), "beta_kernel")
    border = edit.node("Conv", [ones, weights], attributes, hint="beta_border").outputs[0]
    set_dtype(border, dtype)
    return border

"""A norm's per-channel gain and β against a Conv weight [O, C/group, k...] (fold only)."""

from __future__ import annotations

import numpy as np

from rewriter.patterns import Linear
from rewriter.patterns.graph import attr


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


def conv_beta_delta(linear: Linear, beta: np.ndarray) -> np.ndarray:
    """Σ W[o, c, ...]·β[c]: the bias delta (exact when the Conv does not pad)."""
    w = linear.weight.tensor.numpy().astype(np.float64)
    return (w * conv_channels(linear, beta, w)).sum(axis=tuple(range(1, w.ndim)))

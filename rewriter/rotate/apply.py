"""Rotating the stream's constants: float64, cast back to each constant's type once.

A constant indexed by the stream along `axis` becomes T ×_axis Q (T'[.., j, ..] =
Σ_i T[.., i, ..]·Q[i, j]): the embedding E·Q, a writer W·Q and its bias b·Q, a reader Qᵀ·W.
With LayerNorm readers Q fixes the all-ones direction (rotation(fix_ones=True)), and the
writers and the embedding are first centered along that axis (T − mean): every reader is a
norm that subtracts the row mean, so each summand of the stream can lose its mean exactly —
except a table a head also reads (tied): the head needs its rows as they are.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewriter.patterns.graph import GraphEditor, const_array, const_tensor, op, rank_of, set_dtype

from .stream import Stream

CENTERED_ROLES = {"embedding", "writer", "bias"}


def rotated(array: np.ndarray, axis: int, q: np.ndarray, center: bool) -> np.ndarray:
    """`array` ×_axis Q in float64 (centered along `axis` first when `center`)."""
    x = np.moveaxis(array.astype(np.float64), axis, -1)
    if center:
        x = x - x.mean(axis=-1, keepdims=True)
    return np.moveaxis(x @ q, -1, axis)


def rotate_stream(stream: Stream, q: np.ndarray, inputs: dict[ir.Node, np.ndarray] | None = None,
                  heads: dict[ir.Value, list[tuple[int, np.ndarray]]] | None = None) -> int:
    """Rewrite every constant of `stream` in place (lazily: computed when it is read or saved).
    `inputs`: {writer: R} for writers whose input is rotated online by R (their weight gets Rᵀ
    on its input axis, in the same float64 pass). `heads`: {constant: [(axis, B)]}, the
    head-wise rotations (rewriter.rotate.heads), applied first — they act on the other axis
    of a stream weight (V's output, O's input, the online R's axis after B). Returns how many
    stream constants changed."""
    online = {use.source: inputs[use.node] for use in stream.uses if inputs and use.node in inputs
              and use.role == "writer"}
    roles: dict[ir.Value, set[str]] = {}
    for use in stream.uses:
        roles.setdefault(use.source, set()).add(use.role)
    center = stream.kind == "layer"
    heads = heads or {}
    axes: dict[ir.Value, int | None] = {**dict.fromkeys(heads), **stream.sources}
    for source, axis in axes.items():
        old = const_tensor(source)
        dtype = old.dtype
        # a table also read as a head (tied) stays uncentered: its head would lose the rows' means
        # (exact all the same: Q fixes the ones vector, so each summand's mean may stay)
        kinds = roles.get(source, set())
        do_center = center and bool(kinds & CENTERED_ROLES) and "reader" not in kinds
        before, r = tuple(heads.get(source, ())), online.get(source)

        def compute(old=old, axis=axis, dtype=dtype, do_center=do_center, r=r, before=before) -> ir.TensorProtocol:
            values = old.numpy().astype(np.float64)
            for head_axis, b in before:
                values = rotated(values, head_axis, b, False)
            if r is not None:       # Rᵀ·W on the input axis of a 2-D writer weight
                values = rotated(values, 1 - axis, r, False)
            if axis is not None:
                values = rotated(values, axis, q, do_center)
            return ir.Tensor(values.astype(dtype.numpy()), dtype=dtype)

        tensor = ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(list(old.shape)), name=old.name)
        producer = source.producer()
        if op(producer, "Constant", domain=""):
            producer.attributes["value"] = ir.AttrTensor("value", tensor)
        else:
            source.const_value = tensor
    return len(stream.sources)


def rotate_kept_gains(graph: ir.Graph, stream: Stream, q: np.ndarray) -> list[str]:
    """Each kept gain's Mul(y, g) becomes y·M, M = Qᵀ·diag(g)·Q (rewriter.rotate.stream.kept_gain),
    computed in float64, made exactly symmetric and cast once. M symmetric, y·M = (M·yᵀ)ᵀ: the
    MatMul takes M as its *first* input (behind a Transpose of y's last two axes, and one back),
    so onnxruntime's quantizers, which quantize constant second inputs, leave it in float by
    default, as they leave the online Hadamards. Returns the MatMuls' names."""
    editor = GraphEditor(graph, prefix="rotate_gain")
    names = []
    for mul in stream.kept_gains:
        normalized = next(v for v in mul.inputs if const_array(v, follow=False) is None)
        gain = const_array(next(v for v in mul.inputs if v is not normalized), follow=False)
        dtype = normalized.dtype or ir.DataType.FLOAT
        matrix = q.T @ (gain.astype(np.float64).reshape(-1, 1) * q)
        constant = editor.initializer(((matrix + matrix.T) / 2).astype(dtype.numpy()), "gain_matrix")
        rank = rank_of(normalized)
        swap = {"perm": list(range(rank - 2)) + [rank - 1, rank - 2]} if rank >= 2 else None
        y = editor.node("Transpose", [normalized], swap, before=mul).outputs[0] if swap else normalized
        matmul = editor.node("MatMul", [constant, y], hint="gain_matrix", before=mul)
        out = editor.node("Transpose", [matmul.outputs[0]], swap, before=mul).outputs[0] if swap \
            else matmul.outputs[0]
        for value in {y, matmul.outputs[0], out}:
            set_dtype(value, dtype)
        out.shape = mul.outputs[0].shape
        mul.outputs[0].replace_all_uses_with(out)
        graph.remove(mul, safe=True)
        names.append(matmul.name)
    return names


__all__ = ["rotate_kept_gains", "rotate_stream", "rotated"]

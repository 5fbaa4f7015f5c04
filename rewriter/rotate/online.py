"""Online rotations: a Hadamard transform of each stream writer's input, as graph ops.

The residual-stream rotation reaches the activations the norms produce; the inputs of the
writers (the attention output before o_proj, the GLU product before down_proj) keep their
outlier channels. For a writer x·W with W [k, n]: x·W = (x·R)·(Rᵀ·W) for any orthogonal R,
so R is applied to x at run time and Rᵀ folded into W. R = (A ⊗ B)·P, A and B normalized
Hadamard matrices of orders a·b = k, P a permutation: with x viewed as X [.., a, b]
(row-major), Reshape → MatMul(Aᵀ, X) → Transpose (last two axes) → MatMul(Bᵀ, ·) → Reshape
computes (Aᵀ·X·B)ᵀ flattened, i.e. x·(A ⊗ B) with its entries permuted (P, folded into W
with the rest) — k·(a + b) multiply-adds per row instead of k².

Both MatMuls take their constant as the *first* input: onnxruntime's quantize_dynamic (with
its defaults) quantizes a MatMul by a constant second input, which would lose what the
rotation gains, and leaves these in float; MatMulNBits takes constant second inputs only.
`online_rotation_nodes` finds them by structure (a MatMul with a constant square matrix of
entries of one magnitude), for quantizers configured otherwise (nodes_to_exclude).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from rewriter.patterns.graph import GraphEditor, const_array, const_tensor, op, rank_of

from .hadamard import hadamard
from .stream import Stream

MAX_FACTOR = 256        # the larger factor's bound (its constant is MAX_FACTOR² entries)


def kronecker_factors(k: int) -> tuple[int, int] | None:
    """(a, b), a·b = k, both Hadamard orders: the most balanced such pair with a ≤ b ≤ MAX_FACTOR
    — fewest multiply-adds k·(a + b) per row and the shortest fp32 sums, so the least rounding
    added (OPT-shaped, hidden 256: 1.48× the original's error against float64 with 1·256 and
    4·256, 1.26× with 16·16 and 32·32) —, else b the largest order ≤ MAX_FACTOR that leaves a
    Hadamard a; or None."""
    for a in range(math.isqrt(k), 0, -1):
        if k % a == 0 and k // a <= MAX_FACTOR and hadamard(a) is not None and hadamard(k // a) is not None:
            return a, k // a
    for b in range(min(k, MAX_FACTOR), 0, -1):
        if k % b == 0 and hadamard(b) is not None and hadamard(k // b) is not None:
            return k // b, b
    return None


def _normalized(order: int) -> np.ndarray:
    return hadamard(order).astype(np.float64) / np.sqrt(order)


def online_matrix(a: int, b: int) -> np.ndarray:
    """R = (A ⊗ B)·P (orthogonal, float64) that `insert_online` applies for factors (a, b):
    column j·a + i of R is column i·b + j of A ⊗ B."""
    r = np.kron(_normalized(a), _normalized(b))
    perm = (np.arange(a)[None, :] * b + np.arange(b)[:, None]).reshape(-1)     # new j·a + i ← old i·b + j
    return r[:, perm]


def insert_online(graph: ir.Graph, stream: Stream) -> dict[ir.Node, np.ndarray]:
    """Insert x → x·R before every MatMul or Gemm writer of `stream` whose input width has a Kronecker
    factorization; returns {writer: R} (Rᵀ is for its weight, rewriter.rotate.apply)."""
    editor = GraphEditor(graph, prefix="rotate_online")
    done: dict[ir.Node, np.ndarray] = {}
    factors_made: dict[tuple[int, ir.DataType], ir.Value] = {}     # one constant per order, shared

    def factor(order: int, dtype: ir.DataType) -> ir.Value:
        if (order, dtype) not in factors_made:
            factors_made[order, dtype] = editor.initializer(_normalized(order).T.astype(dtype.numpy()), "hadamard")
        return factors_made[order, dtype]

    def eligible(use) -> bool:
        """A MatMul or Gemm writer whose input can be rotated (a Kronecker order, rank ≥ 2). Gemm
        writers too (GPT-2's Conv1D, OPT's fc2: addmm → Gemm, transA = 0 as find_stream checked):
        x is A, its rows rotated the same way."""
        if use.role != "writer" or not op(use.node, "MatMul", "Gemm", domain=""):
            return False
        rank = rank_of(use.node.inputs[0])
        k = int(const_tensor(use.source).shape[1 - use.axis])
        return kronecker_factors(k) is not None and rank is not None and rank >= 2

    # Rᵀ goes into the weight, so every linear that reads it (one weight shared by writers: a
    # MatMul and a Gemm, or a MatMul whose input's rank is unknown) must get R on its input
    shared_ok: dict[ir.Value, bool] = {}
    for use in stream.uses:
        shared_ok[use.source] = shared_ok.get(use.source, True) and eligible(use)
    for use in stream.uses:
        node = use.node
        if not shared_ok[use.source] or node in done:
            continue
        x = node.inputs[0]
        k = int(const_tensor(use.source).shape[1 - use.axis])
        rank = rank_of(x)
        a, b = kronecker_factors(k)
        dtype = x.dtype or ir.DataType.FLOAT
        lead = [0] * (rank - 1)         # Reshape's 0 copies the dim (allowzero stays 0)
        split = editor.initializer(np.array(lead + [a, b], np.int64), "split_shape")
        merge = editor.initializer(np.array(lead + [k], np.int64), "merge_shape")
        y = editor.node("Reshape", [x, split], before=node).outputs[0]
        if a > 1:
            y = editor.node("MatMul", [factor(a, dtype), y], before=node).outputs[0]
        perm = list(range(rank - 1)) + [rank, rank - 1]
        y = editor.node("Transpose", [y], {"perm": perm}, before=node).outputs[0]
        y = editor.node("MatMul", [factor(b, dtype), y], before=node).outputs[0]
        y = editor.node("Reshape", [y, merge], before=node).outputs[0]
        y.dtype = dtype
        node.replace_input_with(0, y)
        done[node] = online_matrix(a, b)
    return done


def online_rotation_nodes(graph: ir.Graph) -> list[str]:
    """Names of the MatMuls that apply a normalized Hadamard factor: a constant square
    operand whose entries all have one magnitude (what `insert_online` makes)."""
    names = []
    for node in graph:
        if not op(node, "MatMul", domain=""):
            continue
        for value in node.inputs:
            tensor = const_tensor(value)
            if tensor is None or len(tensor.shape) != 2 or tensor.shape[0] != tensor.shape[1] \
                    or tensor.shape[0] > 4096:
                continue
            array = np.abs(const_array(value).astype(np.float64))
            if array.size > 1 and np.allclose(array, array.flat[0], rtol=1e-6) and array.flat[0] > 0:
                names.append(node.name)
                break
    return names


__all__ = ["insert_online", "kronecker_factors", "online_matrix", "online_rotation_nodes"]

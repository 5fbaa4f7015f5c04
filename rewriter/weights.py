"""Folding a gain into a weight in bounded memory.

The stored tensor S (2-D, possibly memory-mapped external data) is read in row blocks; each
block is folded and written into the output in the layout the linear reads, so the peak is one
output tensor plus one block — never a float64 copy of a whole weight.

Precision: the result is the exact product rounded once to the output type. When every
product w·g is exactly an fp32 number (fp16/bf16 weights, gains with few significand bits —
checked on the gain's values) the block is multiplied in fp32, which is bit-identical to the
fp64 path and faster (fp16: onnxruntime's vectorized casts); otherwise it is folded in
float64.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from rewriter.patterns.base import WeightRef

BLOCK_BYTES = 4 << 20       # float64 bytes per block: stays in cache, many blocks to share out
F32_BLOCK_BYTES = 256 << 10  # float32 bytes multiplied at once on the fp32 path: L2-sized, ~6 ns/el
                             # against ~9 at 1 MiB (2048x8192 fp16, one thread)
WORKERS = min(4, os.cpu_count() or 1)   # numpy releases the GIL in the conversions and products


def _flipped(ref: WeightRef) -> bool:
    """The node reads the stored S transposed (odd number of 2-D Transpose steps)."""
    flips = sum(1 for kind, perm in ref.steps if kind == "transpose" and tuple(perm) == (1, 0))
    return flips % 2 == 1


def _spans(ref: WeightRef, block_bytes: int | None = None, itemsize: int = 8) -> list[tuple[int, int]]:
    rows, cols = (int(d) for d in ref.tensor.shape)
    step = max(1, (block_bytes or BLOCK_BYTES) // (itemsize * max(cols, 1)))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _cast(ref: WeightRef, block: np.ndarray) -> np.ndarray:
    """A block of S with the chain's Casts applied."""
    for kind, dtype in ref.steps:
        if kind == "cast":
            block = block.astype(dtype)
    return block


def _block(ref: WeightRef, source, r0: int, r1: int) -> np.ndarray:
    """S[r0:r1] in float64, with the chain's Casts applied."""
    return _cast(ref, source(r0, r1)).astype(np.float64)


def _cast_dtype(ref: WeightRef) -> np.dtype:
    """The element type the linear sees S in (after the chain's Casts)."""
    return _cast(ref, np.zeros((0, 0), ref.tensor.dtype.numpy())).dtype


# significand bits and log2 of the smallest nonzero magnitude (subnormal) of the weight types
# whose products with a short gain fit fp32's 24-bit significand
_SHORT = {np.dtype(np.float16): (11, -24), np.dtype(ir.DataType.BFLOAT16.numpy()): (8, -133)}


def fp32_exact(weight: np.dtype, gain: np.ndarray | None) -> bool:
    """Every product w·g (w any value of `weight`, g in `gain`) is exactly an fp32 number.

    Then rounding the fp32 product to the output type is rounding the exact product once, as
    the fp64 path does: bit-identical. It holds when the gain has at most 24 − p significand
    bits (p: the weight's) and its lowest bit times the weight's smallest subnormal stays on
    fp32's grid (2^-149); overflow needs no condition (beyond fp32's max is beyond fp16's and
    bf16's, so both paths give ±Inf). Non-finite gains keep the fp64 path."""
    if np.dtype(weight) not in _SHORT:
        return False
    if gain is None:
        return True
    bits, low = _SHORT[np.dtype(weight)]
    g = np.abs(np.asarray(gain, np.float64)).reshape(-1)
    if not np.all(np.isfinite(g)) or np.any(g > np.finfo(np.float32).max):
        return False
    mantissa, _ = np.frexp(g)                       # g = m·2^e, m in [0.5, 1) (0 for g = 0)
    short = np.ldexp(mantissa, 24 - bits)           # an integer iff m has <= 24 - bits bits
    on_grid = np.ldexp(g, 149 + low)                # an integer iff g's lowest bit >= 2^(-149-low)
    return bool(np.all(short == np.floor(short)) and np.all(on_grid == np.floor(on_grid)))


def _blocks(ref: WeightRef) -> Iterator[tuple[int, int, np.ndarray]]:
    source = _reader(ref.tensor)
    for r0, r1 in _spans(ref):
        yield r0, r1, _block(ref, source, r0, r1)


def _prefetch(path, offset: int, length: int) -> None:
    """Ask the kernel to start reading the tensor now, so that reading overlaps folding."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
    except OSError:
        pass


def _reader(tensor: ir.TensorProtocol):
    """Row-slice reader: external data is read with plain file reads (not mmap), so pages of a
    multi-GB file do not accumulate in the process's resident memory."""
    if isinstance(tensor, ir.ExternalTensor) and tensor.dtype.numpy().itemsize * 8 == tensor.dtype.bitwidth:
        path = tensor.path
        dtype = tensor.dtype.numpy()
        cols = int(tensor.shape[1])
        row_bytes = cols * dtype.itemsize
        base = tensor.offset or 0
        _prefetch(path, base, int(tensor.shape[0]) * row_bytes)

        def read(r0: int, r1: int) -> np.ndarray:
            with open(path, "rb") as f:
                f.seek(base + r0 * row_bytes)
                data = f.read((r1 - r0) * row_bytes)
            return np.frombuffer(data, dtype=dtype).reshape(r1 - r0, cols)
        return read
    array = tensor.numpy()
    return lambda r0, r1: array[r0:r1]


def folded_weight(ref: WeightRef, gain: np.ndarray | None, dtype: ir.DataType) -> np.ndarray:
    """diag(gain)·W in the layout the linear reads (W or Wᵀ for transB), cast to `dtype`."""
    # the node reads B = S or Sᵀ (Transpose steps); the effective [n_in, k_out] W is B or Bᵀ
    # (transB): `flip` says whether W = Sᵀ, the output is written in B's layout
    flip = _flipped(ref) != ref.transposed
    rows, cols = (int(d) for d in ref.tensor.shape)
    out_is_source = not _flipped(ref)
    out = np.empty((rows, cols) if out_is_source else (cols, rows), dtype.numpy())
    if gain is not None and gain.size == 1:
        gain = np.full(cols if flip else rows, float(gain.reshape(())))
    source = _reader(ref.tensor)
    if _cast_dtype(ref) == out.dtype and fp32_exact(out.dtype, gain):
        _fold_fp32(ref, source, gain, flip, out_is_source, out)
        return out

    def fold(span: tuple[int, int]) -> None:      # blocks write disjoint slices of `out`
        r0, r1 = span
        block = _block(ref, source, r0, r1)
        if gain is not None:
            block *= gain[None, :] if flip else gain[r0:r1, None]
        _store(out, out_is_source, r0, r1, block)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(fold, _spans(ref)))
    return out


def _store(out: np.ndarray, out_is_source: bool, r0: int, r1: int, block: np.ndarray) -> None:
    """Rows r0:r1 of S, folded, into `out` (S's layout, or Sᵀ's)."""
    if out_is_source:
        out[r0:r1] = block
    else:               # narrow first: the strided transposed write is the slow part
        out[:, r0:r1] = block.astype(out.dtype, copy=False).T


@functools.lru_cache(maxsize=1)
def _fp16_multiply():
    """o = fp16(fp32(w) · g) as an onnxruntime session (one thread per call, callers share it):
    its fp16<->fp32 Casts are vectorized, ~3x faster than numpy's scalar ones. None when it
    cannot be built (the numpy path then does the same arithmetic)."""
    try:
        import onnxruntime as ort
        nodes = [helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", ["w32", "g"], ["p"]),
                 helper.make_node("Cast", ["p"], ["o"], to=TensorProto.FLOAT16)]
        graph = helper.make_graph(nodes, "fold", [
            helper.make_tensor_value_info("w", TensorProto.FLOAT16, ["r", "c"]),
            helper.make_tensor_value_info("g", TensorProto.FLOAT, ["gr", "gc"])],
            [helper.make_tensor_value_info("o", TensorProto.FLOAT16, ["r", "c"])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # no Cast fusions
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return lambda w, g: session.run(None, {"w": w, "g": g})[0]
    except Exception:   # noqa: BLE001 - any failure: numpy computes the same bits, slower
        return None


def _fold_fp32(ref: WeightRef, source, gain: np.ndarray | None, flip: bool, out_is_source: bool,
               out: np.ndarray) -> None:
    """diag(gain)·W into `out`, multiplied in fp32 (exact there: `fp32_exact`), rounded once."""
    g32 = None if gain is None else gain.astype(np.float32)

    step = _spans(ref, F32_BLOCK_BYTES, 4)[0][1]
    multiply = _fp16_multiply() if g32 is not None and out.dtype == np.float16 else None

    def fold(span: tuple[int, int]) -> None:      # blocks write disjoint slices of `out`
        stored = _cast(ref, source(*span))       # one read per span, folded in cache-sized pieces
        if multiply is not None:
            r0, r1 = span
            block = multiply(np.ascontiguousarray(stored), g32[None, :] if flip else g32[r0:r1, None])
            _store(out, out_is_source, r0, r1, block)
            return
        for r0 in range(span[0], span[1], step):
            r1 = min(span[1], r0 + step)
            block = stored[r0 - span[0]:r1 - span[0]].astype(np.float32)
            if g32 is not None:
                block *= g32[None, :] if flip else g32[r0:r1, None]
            _store(out, out_is_source, r0, r1, block)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(fold, _spans(ref)))


def beta_through_weight(ref: WeightRef, beta: np.ndarray) -> np.ndarray:
    """β·W (float64, [k_out]) without materializing W."""
    flip = _flipped(ref) != ref.transposed
    rows, cols = (int(d) for d in ref.tensor.shape)
    total = np.zeros(rows if flip else cols)
    for r0, r1, block in _blocks(ref):
        if flip:                        # W = Sᵀ: (β·Sᵀ)[j] = S[j]·β
            total[r0:r1] = block @ beta
        else:
            total += beta[r0:r1] @ block
    return total


def gemm_bias(c: np.ndarray, beta: float, delta: np.ndarray) -> np.ndarray:
    """β·C + delta in float64, for a Gemm whose beta becomes 1 (exact for any β, 0 included;
    C' = C + delta/β would divide by zero and round twice). C broadcasts against the output
    [M, N] (checked by the pattern), so C' does too. With β = 0 C is not read at all (as
    onnxruntime's Gemm skips it): 0·inf would be NaN."""
    return (beta * c.astype(np.float64) if beta != 0 else np.zeros(c.shape)) + delta

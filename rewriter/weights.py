"""Folding a gain into a weight in bounded memory.

The stored tensor S (2-D, possibly memory-mapped external data) is read in row blocks; each
block is folded in float64 and written into the output in the layout the linear reads, so the
peak is one output tensor plus one block — never a float64 copy of a whole weight.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import onnx_ir as ir

from rewriter.patterns.base import WeightRef

BLOCK_BYTES = 4 << 20       # float64 bytes per block: stays in cache, many blocks to share out
WORKERS = min(4, os.cpu_count() or 1)   # numpy releases the GIL in the conversions and products


def _flipped(ref: WeightRef) -> bool:
    """The node reads the stored S transposed (odd number of 2-D Transpose steps)."""
    flips = sum(1 for kind, perm in ref.steps if kind == "transpose" and tuple(perm) == (1, 0))
    return flips % 2 == 1


def _spans(ref: WeightRef) -> list[tuple[int, int]]:
    rows, cols = (int(d) for d in ref.tensor.shape)
    step = max(1, BLOCK_BYTES // (8 * max(cols, 1)))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _block(ref: WeightRef, source, r0: int, r1: int) -> np.ndarray:
    """S[r0:r1] in float64, with the chain's Casts applied."""
    block = source(r0, r1)
    for kind, dtype in ref.steps:
        if kind == "cast":
            block = block.astype(dtype)
    return block.astype(np.float64)


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


def folded_weight(ref: WeightRef, gain: np.ndarray | None, center: bool, dtype: ir.DataType) -> np.ndarray:
    """diag(gain)·W (then each output column centered over the input axis when `center`), in
    the layout the linear reads (W or Wᵀ for transB), cast to `dtype`."""
    # the node reads B = S or Sᵀ (Transpose steps); the effective [n_in, k_out] W is B or Bᵀ
    # (transB): `flip` says whether W = Sᵀ, the output is written in B's layout
    flip = _flipped(ref) != ref.transposed
    rows, cols = (int(d) for d in ref.tensor.shape)
    out_is_source = not _flipped(ref)
    out = np.empty((rows, cols) if out_is_source else (cols, rows), dtype.numpy())
    if gain is not None and gain.size == 1:
        gain = np.full(cols if flip else rows, float(gain.reshape(())))
    column_mean = None
    if center and not flip:             # W = S: the mean runs over S's rows (first pass)
        total = np.zeros(cols)
        for r0, r1, block in _blocks(ref):
            total += (block * gain[r0:r1, None] if gain is not None else block).sum(axis=0)
        column_mean = total / rows
    source = _reader(ref.tensor)

    def fold(span: tuple[int, int]) -> None:      # blocks write disjoint slices of `out`
        r0, r1 = span
        block = _block(ref, source, r0, r1)
        if gain is not None:
            block *= gain[None, :] if flip else gain[r0:r1, None]
        if center:                      # W = Sᵀ: each S row is one output column
            block -= column_mean[None, :] if not flip else block.mean(axis=1, keepdims=True)
        if out_is_source:
            out[r0:r1] = block
        else:                           # narrow first: the strided transposed write is the slow part
            out[:, r0:r1] = block.astype(out.dtype).T

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(fold, _spans(ref)))
    return out


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

"""Block-wise folding equals the whole-matrix formula for every weight layout; the fp32 path
is bit-identical to the fp64 one wherever it is taken."""

import itertools

import numpy as np
import onnx_ir as ir
import pytest

from rewriter.patterns.base import WeightRef
from rewriter import weights


@pytest.mark.parametrize("stored_transposed,trans_b,scalar_gain",
                         list(itertools.product([False, True], [False, True], [False, True])))
def test_folded_weight_matches_formula(monkeypatch, stored_transposed, trans_b, scalar_gain):
    monkeypatch.setattr(weights, "BLOCK_BYTES", 8 * 7 * 3)      # a few rows per block
    rng = np.random.default_rng(0)
    n, k = 11, 7
    w_eff = rng.standard_normal((n, k))                        # the [n_in, k_out] matrix
    node_b = w_eff.T if trans_b else w_eff                     # what the node reads
    stored = node_b.T if stored_transposed else node_b
    steps = (("transpose", (1, 0)),) if stored_transposed else ()
    value = ir.Value(name="w")
    ref = WeightRef(value, ir.tensor(stored.astype(np.float32)), steps, trans_b)
    gain = rng.standard_normal(1 if scalar_gain else n) + 1
    out = weights.folded_weight(ref, gain, ir.DataType.FLOAT)
    expected = w_eff.astype(np.float32).astype(np.float64) * (gain.reshape(-1, 1) if not scalar_gain else gain)
    expected = expected.T if trans_b else expected
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    beta = rng.standard_normal(n)
    np.testing.assert_allclose(weights.beta_through_weight(ref, beta),
                               beta @ w_eff.astype(np.float32).astype(np.float64), rtol=1e-6, atol=1e-6)



BF16 = ir.DataType.BFLOAT16.numpy()


def _fp64_reference(monkeypatch, ref, gain, dtype):
    with monkeypatch.context() as m:
        m.setattr(weights, "fp32_exact", lambda *a: False)
        return weights.folded_weight(ref, gain, dtype)


def _every_value(np_dtype) -> np.ndarray:
    """All 65536 bit patterns of a 16-bit float type (subnormals, ±0, ±max, ±Inf, NaNs)."""
    return np.arange(1 << 16, dtype=np.uint16).view(np_dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")     # Inf·0, overflow: both paths alike
@pytest.mark.parametrize("dtype,kernel", [(ir.DataType.FLOAT16, "onnxruntime"), (ir.DataType.FLOAT16, "numpy"),
                                          (ir.DataType.BFLOAT16, "numpy")])
def test_fp32_fold_bit_identical_on_every_weight_value(monkeypatch, dtype, kernel):
    """Every fp16/bf16 weight value times fp16-valued gains (tiny, subnormal, near fp16's max,
    −0, negative): the fp32 path gives the fp64 path's bits, NaN payloads and signs included —
    with onnxruntime's casts (fp16) and with numpy's."""
    if kernel == "numpy":
        monkeypatch.setattr(weights, "_fp16_multiply", lambda: None)
    else:
        assert weights._fp16_multiply() is not None            # onnxruntime is a dependency
    np_dtype = dtype.numpy()
    rng = np.random.default_rng(1)
    special = np.array([1, -1, 0, -0.0, 65504, -65504, 6e-8, -6e-8, 2 ** -14, 1.5 * 2 ** -14, 3.0,
                        2 ** -10 + 1, 1000.5], np.float16)
    gain = np.concatenate([special, (rng.standard_normal(51) * np.exp(rng.uniform(-6, 6, 51)))
                           .astype(np.float16)]).astype(np.float64)
    if dtype == ir.DataType.BFLOAT16:       # bf16: the gain's lowest bit must be >= 2^-16
        gain = gain[np.ldexp(gain, 16) == np.floor(np.ldexp(gain, 16))]
    assert weights.fp32_exact(np_dtype, gain)
    stored = np.broadcast_to(_every_value(np_dtype), (gain.size, 1 << 16)).copy()
    ref = WeightRef(ir.Value(name="w"), ir.tensor(stored), (), False)
    calls = []
    monkeypatch.setattr(weights, "_fold_fp32", lambda *a, _f=weights._fold_fp32: calls.append(1) or _f(*a))
    out = weights.folded_weight(ref, gain, dtype)
    assert calls, "the fp32 path was not taken"
    expected = _fp64_reference(monkeypatch, ref, gain, dtype)
    np.testing.assert_array_equal(out.view(np.uint16), expected.view(np.uint16))


@pytest.mark.parametrize("dtype", [ir.DataType.FLOAT16, ir.DataType.BFLOAT16])
@pytest.mark.parametrize("stored_transposed,trans_b", list(itertools.product([False, True], [False, True])))
def test_fp32_fold_bit_identical_every_layout(monkeypatch, dtype, stored_transposed, trans_b):
    monkeypatch.setattr(weights, "BLOCK_BYTES", 8 * 7 * 5)          # a few rows per read
    monkeypatch.setattr(weights, "F32_BLOCK_BYTES", 4 * 7 * 2)      # and fewer per product
    rng = np.random.default_rng(2)
    stored = (rng.standard_normal((13, 7)) * 100).astype(dtype.numpy())
    steps = (("transpose", (1, 0)),) if stored_transposed else ()
    ref = WeightRef(ir.Value(name="w"), ir.tensor(stored), steps, trans_b)
    n = stored.shape[1] if stored_transposed != trans_b else stored.shape[0]
    gain = (rng.standard_normal(n) * 3).astype(np.float16).astype(np.float64)
    out = weights.folded_weight(ref, gain, dtype)
    np.testing.assert_array_equal(out.view(np.uint16), _fp64_reference(monkeypatch, ref, gain, dtype).view(np.uint16))


def test_fp32_exact_only_when_the_product_fits():
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
    fp16_gain = np.array([1.0, -0.5, 65504.0, 6e-8, 0.0]).astype(np.float16).astype(np.float64)
    assert weights.fp32_exact(f16, fp16_gain)
    assert weights.fp32_exact(f16, None)
    assert weights.fp32_exact(f16, np.array([1 + 2 ** -12]))               # 13 bits: 11 + 13 = 24
    assert not weights.fp32_exact(f16, np.array([1 + 2 ** -13]))           # 14 bits: one too many
    assert not weights.fp32_exact(f16, np.float32(0.1).astype(np.float64).reshape(1))   # fp32-valued
    assert not weights.fp32_exact(f16, np.array([0.1]))                    # fp64-valued
    assert not weights.fp32_exact(f16, np.array([1.0, np.inf]))
    assert not weights.fp32_exact(f16, np.array([1.0, np.nan]))
    assert not weights.fp32_exact(f32, fp16_gain)                          # fp32 weights: fp64 path
    assert not weights.fp32_exact(np.dtype(np.float64), fp16_gain)
    assert weights.fp32_exact(BF16, np.array([1 + 2 ** -15, 3.0, 2 ** -16]))   # 16 bits, lowest >= 2^-16
    assert not weights.fp32_exact(BF16, np.array([1 + 2 ** -16]))          # 17 bits
    assert not weights.fp32_exact(BF16, np.array([2.0 ** -17]))             # x 2^-133 leaves fp32's grid


def test_more_precise_gain_keeps_fp64_path(monkeypatch):
    rng = np.random.default_rng(3)
    stored = rng.standard_normal((9, 5)).astype(np.float16)
    ref = WeightRef(ir.Value(name="w"), ir.tensor(stored), (), False)
    gain = 1 + rng.standard_normal(9) * 0.1                                 # full fp64 gains
    monkeypatch.setattr(weights, "_fold_fp32", lambda *a: pytest.fail("fp32 path taken"))
    out = weights.folded_weight(ref, gain, ir.DataType.FLOAT16)
    np.testing.assert_array_equal(out, (stored.astype(np.float64) * gain[:, None]).astype(np.float16))

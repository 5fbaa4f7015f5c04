"""Block-wise folding equals the whole-matrix formula for every weight layout."""

import itertools

import numpy as np
import onnx_ir as ir
import pytest

from rewriter.patterns.base import WeightRef
from rewriter import weights


@pytest.mark.parametrize("stored_transposed,trans_b,center,scalar_gain",
                         list(itertools.product([False, True], [False, True], [False, True], [False, True])))
def test_folded_weight_matches_formula(monkeypatch, stored_transposed, trans_b, center, scalar_gain):
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
    out = weights.folded_weight(ref, gain, center, ir.DataType.FLOAT)
    expected = w_eff.astype(np.float32).astype(np.float64) * (gain.reshape(-1, 1) if not scalar_gain else gain)
    if center:
        expected = expected - expected.mean(axis=0, keepdims=True)
    expected = expected.T if trans_b else expected
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    beta = rng.standard_normal(n)
    np.testing.assert_allclose(weights.beta_through_weight(ref, beta),
                               beta @ w_eff.astype(np.float32).astype(np.float64), rtol=1e-6, atol=1e-6)


"""Minimal graphs the differential fuzzer (test_differential_fuzz) once found wrong, each
rewritten with every strategy and mode and checked by the same checker (tests/differential.py).
tests/regressions/README.md says what each one shows."""

from pathlib import Path

import onnx
import pytest

import differential as diff

REGRESSIONS = sorted((Path(__file__).parent / "regressions").glob("*.onnx"))
# graphs whose fix has not landed yet: stem -> why (xfail, not strict: they pass once it lands)
PENDING: dict[str, str] = {
    "target_peer_fusedmatmul_transpose": "the peer's ORT fusions are kept when they load; this one fails at run time",
}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.xfail(reason=PENDING[p.stem], strict=False))
                                  if p.stem in PENDING else p for p in REGRESSIONS],
                         ids=[p.stem for p in REGRESSIONS])
def test_regression(path):
    model = onnx.load(str(path))
    result = diff.check_model(model)
    diff.STATS["regression graphs checked"] += 1
    assert result.ok, f"{path.name}: {diff.recipe(model)}\n{result.summary()}"

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


def test_cli_survives_a_graph_onnxruntime_crashes_on_at_level_all(tmp_path):
    """onnxruntime 1.32 crashes the process (SIGSEGV) creating an ORT_ENABLE_ALL session of
    target_load_check_segfault.onnx (a valid fp16 graph it runs at ORT_ENABLE_EXTENDED): the
    rewriter's own checks of its output (load, run) must not open one."""
    import subprocess
    import sys
    out = tmp_path / "out.onnx"
    for extra in ([], ["--target", "ort-cpu"]):
        done = subprocess.run([sys.executable, "-m", "rewriter", str(Path(__file__).parent / "regressions" /
                                                                     "target_load_check_segfault.onnx"),
                               "-o", str(out), "--overwrite", *extra], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (extra, done.returncode, done.stderr[-500:])
        assert onnx.load(str(out)).graph.node

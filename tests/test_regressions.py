"""Minimal graphs the differential fuzzer (test_differential_fuzz) once found wrong, each
rewritten with every strategy and mode and checked by the same checker (tests/differential.py).
tests/regressions/README.md says what each one shows."""

from pathlib import Path

import onnx
import pytest

import differential as diff

REGRESSIONS = sorted((Path(__file__).parent / "regressions").glob("*.onnx"))
# graphs whose fix has not landed yet: stem -> why (xfail, not strict: they pass once it lands)
PENDING: dict[str, str] = {}


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


def test_verify_survives_a_graph_onnxruntime_crashes_on_at_level_all(tmp_path):
    """verify and --verify open their sessions at verify.CHECK_LEVEL, not ORT_ENABLE_ALL (where
    onnxruntime 1.32 crashes on target_load_check_segfault.onnx); a crash fails the test here (a
    subprocess), it does not kill pytest. The graph fixes its rows at 3 while its skip input's
    are free: at verify's default 16 tokens the input itself cannot run (exit 8, CannotRun),
    at --seq 3 both run and are judged."""
    import subprocess
    import sys
    src = Path(__file__).parent / "regressions" / "target_load_check_segfault.onnx"
    out = tmp_path / "out.onnx"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "rewriter", *map(str, args)], capture_output=True, text=True,
                              timeout=120)
    done = cli(src, "-o", out, "--verify")
    assert done.returncode == 8 and "the original model failed" in done.stderr, (done.returncode, done.stderr[-500:])
    assert not out.exists()
    done = cli(src, "-o", out)
    assert done.returncode == 0, (done.returncode, done.stderr[-500:])
    done = cli("verify", src, out, "--seq", 3)
    assert done.returncode == 0 and "verified: 4 of 4" in done.stdout, (done.returncode, done.stdout, done.stderr[-500:])

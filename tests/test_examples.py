"""The examples README's "Use" section points at run as a user runs them."""

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def test_export_and_rewrite_example(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "export_and_rewrite.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "rewritten 5 norms" in run.stdout, run.stdout       # 2 layers × 2 norms + the final norm
    original = onnx.load(str(tmp_path / "model.onnx"))
    flash = onnx.load(str(tmp_path / "model_flash.onnx"))
    def gains(model):    # the norms' [hidden] weights: folded into the linears, none left
        return [i.name for i in model.graph.initializer if list(i.dims) == [128]]
    assert len(gains(original)) == 5 and gains(flash) == [], gains(flash)
    assert "max relative difference" in run.stdout

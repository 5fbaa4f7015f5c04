"""`verify` on KV-cache graphs: inputs built from the graph itself — past head counts
and sizes from the attention op or the cache's declared shape, the mask over past + sequence,
positions after the past — a prefill, then decode steps fed the presents; exit 0 when equal,
1 when the outputs differ, 8 when onnxruntime cannot run a model.

Graphs: a hand-built GroupQueryAttention decoder layer shaped like onnxruntime-genai's (its
cache's head size a symbol, `kv_cache_dim`), and a TorchScript export with optimum's
`text-generation-with-past` interface (models/kv_export.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builders import GraphBuilder
from rewriter.cli import main
from rewriter.errors import EXIT_BAD_INPUT, EXIT_CANNOT_RUN, EXIT_OK, EXIT_VERIFY_FAILED
from rewriter.feeds import signature
from rewriter.verify import make_inputs, verify

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD = 50, 32, 4, 2, 8


def gqa_decoder(seed: int = 0) -> onnx.ModelProto:
    """Embedding → RMSNorm → packed QKV MatMul → GroupQueryAttention (past/present) → lm_head,
    with onnxruntime-genai's input names and dimension names."""
    b = GraphBuilder(opset=18, seed=seed)
    ids = b.input("input_ids", ["batch_size", "sequence_length"], np.int64)
    mask = b.input("attention_mask", ["batch_size", "total_sequence_length"], np.int64)
    cache = ["batch_size", KV_HEADS, "past_sequence_length", "kv_cache_dim"]
    past_k, past_v = (b.input(f"past_key_values.0.{kv}", cache) for kv in ("key", "value"))
    x = b.op("Gather", [b.const(b.rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "embed"), ids])
    qkv = b.op("MatMul", [b.rms(x, gain=b.gain(HIDDEN)), b.weight(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD)])
    seqlens = b.op("Cast", [b.op("Sub", [b.op("ReduceSum", [mask, b.const(np.array([1]))], keepdims=1),
                                         b.const(np.array(1))])], to=onnx.TensorProto.INT32)
    total = b.op("Cast", [b.op("Gather", [b.op("Shape", [mask]), b.const(np.array(1))])], to=onnx.TensorProto.INT32)
    attn, present_k, present_v = b.op("GroupQueryAttention", [qkv, "", "", past_k, past_v, seqlens, total],
                                      n_out=3, domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS)
    b.nodes[-1].output[1:] = ["present.0.key", "present.0.value"]
    b.op("MatMul", [attn, b.weight(HEADS * HEAD, VOCAB)], hint="logits")
    b.nodes[-1].output[0] = "logits"
    b.output("logits", shape=["batch_size", "sequence_length", VOCAB])
    for name in ("present.0.key", "present.0.value"):
        b.output(name, shape=["batch_size", KV_HEADS, "total_sequence_length", "kv_cache_dim"])
    return b.model()


def perturbed(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with one projection weight changed by 1 %: wrong on purpose."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    weights = {t.name: t for t in model.graph.initializer}
    weight = next(weights[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.01), weight.name))
    return model


@pytest.fixture
def gqa(tmp_path):
    """(original, rewritten) GroupQueryAttention decoders."""
    src, dst = tmp_path / "gqa.onnx", tmp_path / "gqa_flash.onnx"
    onnx.save(gqa_decoder(), src)
    assert main([str(src), "-o", str(dst), "--quiet"]) == EXIT_OK
    return src, dst


def test_signature_from_the_graph(gqa):
    sig = signature(gqa[0])
    roles = {i.name: i.role for i in sig.inputs}
    assert roles == {"input_ids": "tokens", "attention_mask": "mask", "past_key_values.0.key": "past",
                     "past_key_values.0.value": "past"}
    key = sig.pasts[0]
    assert (key.present, key.axis, key.sizes) == ("present.0.key", 2, {1: KV_HEADS, 3: HEAD})
    assert sig.logits == "logits" and sig.inputs[0].rows == VOCAB
    feeds = make_inputs(gqa[0], batch=2, seq=5, past=3)
    assert feeds["attention_mask"].shape == (2, 8) and feeds["past_key_values.0.value"].shape == (2, KV_HEADS, 3, HEAD)
    assert feeds["input_ids"].max() < VOCAB


def test_verify_gqa_steps(gqa):
    diffs = verify(*gqa, provider="cpu", batch=2, seq=5)
    assert {d.name for d in diffs} == {"logits", "present.0.key", "present.0.value"}
    assert all(d.ok for d in diffs) and {d.step for d in diffs} <= {"prefill", "decode 1", "decode 2"}
    assert main(["verify", *map(str, gqa)]) == EXIT_OK


def test_verify_given_token_ids_steps_from_them(gqa, tmp_path):
    """--inputs with the token ids only: the rest is made to match (batch 1, 6 tokens)."""
    ids = tmp_path / "ids.npz"
    np.savez(ids, input_ids=np.array([[3, 1, 4, 1, 5, 9]], dtype=np.int64))
    assert main(["verify", *map(str, gqa), "--inputs", str(ids)]) == EXIT_OK
    np.savez(ids, tokens=np.array([[3]], dtype=np.int64))
    assert main(["verify", *map(str, gqa), "--inputs", str(ids)]) == EXIT_BAD_INPUT


def test_verify_wrong_model_exits_1(gqa, tmp_path):
    wrong = tmp_path / "wrong.onnx"
    onnx.save(perturbed(onnx.load(gqa[1])), wrong)
    assert main(["verify", str(gqa[0]), str(wrong)]) == EXIT_VERIFY_FAILED


def test_verify_unrunnable_model_exits_8(gqa, tmp_path, capsys):
    unknown = onnx.load(gqa[1])                 # an op onnxruntime has no kernel for: load fails
    unknown.graph.node[0].domain = "com.example"
    unknown.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(unknown, tmp_path / "unknown.onnx")
    assert main(["verify", str(gqa[0]), str(tmp_path / "unknown.onnx")]) == EXIT_CANNOT_RUN
    assert "it cannot load the rewritten model" in capsys.readouterr().err
    narrow = onnx.load(gqa[1])                  # loads, but refuses the original's int64 token ids
    narrow.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT32
    onnx.save(narrow, tmp_path / "narrow.onnx")
    assert main(["verify", str(gqa[0]), str(tmp_path / "narrow.onnx")]) == EXIT_CANNOT_RUN
    assert "the rewritten model failed at the prefill" in capsys.readouterr().err


def test_verify_optimum_style_export(tmp_path):
    """A TorchScript export with optimum's text-generation-with-past interface."""
    pytest.importorskip("transformers")
    from models.kv_export import export_optimum_style
    from models.zoo import build
    src, dst, wrong = tmp_path / "decoder.onnx", tmp_path / "flash.onnx", tmp_path / "wrong.onnx"
    export_optimum_style(build("llama", "tiny"), src)
    assert main([str(src), "-o", str(dst), "--quiet"]) == EXIT_OK
    assert main(["verify", str(src), str(dst), "--batch", "2"]) == EXIT_OK
    sig = signature(src)
    assert [i.role for i in sig.inputs[:3]] == ["tokens", "mask", "positions"] and len(sig.pasts) == 4
    onnx.save(perturbed(onnx.load(dst)), wrong)
    assert main(["verify", str(src), str(wrong)]) == EXIT_VERIFY_FAILED

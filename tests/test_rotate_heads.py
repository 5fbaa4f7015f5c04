"""Head-wise V/O rotation (rewriter.rotate.heads, QuaRot's R2) under --rotate: exact on
hand-built attention blocks (MHA, GQA, V bias as an Add or a Gemm's C) and on exported llamas
(every layer), the constants it changes being exactly W_v·B, b_v·B and Bᵀ·W_o; skipped — with
the reason and the node, the stream still rotated and the model still exact — where V meets a
KV cache or an op that does not act on each head alike."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from builders import GraphBuilder, float64_copy
from models_cache import exported, zoo_model
from rewriter import rewrite
from rewriter.rotate import rotation
from test_rotate import assert_zoo_rotation_exact, initializers, run

N, VOCAB, HD = 24, 40, 4        # stream width, vocabulary, head_dim
SEED = 7


def attention_decoder(*, heads=4, kv_heads=4, v_proj="matmul", v_op=None, merge_perm=(1, 0, 2), cache=None):
    """ids [T] → Gather → norm → attention (q/k/v projections, heads split, GQA repeat by
    Unsqueeze+Expand+Reshape, softmax(q·kᵀ)·v, heads merged, o_proj) → residual Add → norm → head.
    v_proj: matmul | matmul+bias | gemm+bias | fused-qkv (one MatMul + bias, then a Split). v_op: "channel_mul" puts a per-channel Mul on V.
    merge_perm: the Transpose before the heads are merged ((1, 2, 0) moves head_dim inwards).
    cache: "past" concatenates V with a graph input, "present" also returns V (split into heads)."""
    g = GraphBuilder(opset=17, seed=3)
    ids = g.input("ids", [None], np.int64)
    table = (g.rng.standard_normal((VOCAB, N)) + 8.0 * (np.arange(N) == 3)).astype(np.float32)
    x = g.op("Gather", [g.const(table, "E"), ids], axis=0)
    y = g.rms(x, gain=g.gain(N))
    group = heads // kv_heads

    def split(t, count, perm):         # [T, count·HD] → [count, T, HD] (or perm'd)
        return g.op("Transpose", [g.op("Reshape", [t, g.const(np.array([-1, count, HD], np.int64), "split")])],
                    perm=list(perm))

    def repeat(t, tail):               # [KV, a, b] → [H, a, b] (transformers' repeat_kv); tail: [a, b]
        if group == 1:
            return t
        t = g.op("Unsqueeze", [t, g.const(np.array([1], np.int64), "ax")])
        t = g.op("Expand", [t, g.const(np.array([1, group, 1, 1], np.int64), "rep")])
        return g.op("Reshape", [t, g.const(np.array([heads, *tail], np.int64), "merge_kv")])

    if v_proj == "fused-qkv":      # one projection, V its last columns, cut out by a Split (GPT-2's c_attn)
        sizes = [heads * HD, kv_heads * HD, kv_heads * HD]
        wqkv = (g.rng.standard_normal((N, sum(sizes))) / 4).astype(np.float32)
        qkv = g.op("Add", [g.op("MatMul", [y, g.const(wqkv, "Wqkv")]), g.const(g.gain(sum(sizes)) - 1.0, "bqkv")])
        q, k, v = g.op("Split", [qkv, g.const(np.array(sizes, np.int64), "sizes")], n_out=3, axis=-1)
    else:
        q = g.op("MatMul", [y, g.weight(N, heads * HD)])
        k = g.op("MatMul", [y, g.weight(N, kv_heads * HD)])
    q = split(q, heads, (1, 0, 2))
    k = split(k, kv_heads, (1, 2, 0))
    if cache == "past":
        k = g.op("Concat", [g.input("past_k", [kv_heads, HD, None]), k], axis=2)
    k = repeat(k, [HD, -1])
    wv = (g.rng.standard_normal((N, kv_heads * HD)) / 4).astype(np.float32)
    bias = g.gain(kv_heads * HD) - 1.0
    if v_proj == "gemm+bias":
        v = g.op("Gemm", [y, g.const(wv.T.copy(), "Wv"), g.const(bias, "bv")], transB=1)
    elif v_proj == "fused-qkv":
        pass
    else:
        v = g.op("MatMul", [y, g.const(wv, "Wv")])
        if v_proj == "matmul+bias":
            v = g.op("Add", [v, g.const(bias, "bv")])
    if v_op == "channel_mul":
        v = g.op("Mul", [v, g.const(g.gain(kv_heads * HD), "vscale")])
    v = split(v, kv_heads, (1, 0, 2))
    if cache == "past":
        past = g.input("past_v", [kv_heads, None, HD])
        v = g.op("Concat", [past, v], axis=1)
    if cache == "present":
        g.output(v, shape=[kv_heads, None, HD])
    v = repeat(v, [-1, HD])
    scores = g.op("Mul", [g.op("MatMul", [q, k]), g.const(np.array(HD ** -0.5, np.float32), "scale")])
    probs = g.op("Softmax", [scores], axis=-1)
    attn = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=list(merge_perm))
    attn = g.op("Reshape", [attn, g.const(np.array([-1, heads * HD], np.int64), "merge")])
    x = g.op("Add", [x, g.op("MatMul", [attn, g.const((g.rng.standard_normal((heads * HD, N)) / 4).astype(
        np.float32), "Wo")])])
    g.output(g.op("MatMul", [g.rms(x, gain=g.gain(N)), g.weight(N, VOCAB)], hint="logits"), shape=[None, VOCAB])
    return g.model(contrib=False)


def feeds_for(proto: onnx.ModelProto) -> dict:
    feeds = {"ids": np.arange(VOCAB, dtype=np.int64)[:9]}
    if "past_v" in {i.name for i in proto.graph.input}:
        kv = next(i for i in proto.graph.input if i.name == "past_v").type.tensor_type.shape.dim[0].dim_value
        rng = np.random.default_rng(1)
        feeds["past_v"] = rng.standard_normal((kv, 3, HD)).astype(np.float32)
        feeds["past_k"] = rng.standard_normal((kv, HD, 3)).astype(np.float32)
    return feeds


def assert_exact(proto, rotated):
    """The fp32 standard: ≤ 1e-5 relative to the original, ≤ 1.5× its error against float64
    (float inputs, a past cache, fed in float64 to the float64 copy)."""
    feeds = feeds_for(proto)
    wide = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
    want = run(float64_copy(proto), wide)[-1]
    orig, got = run(proto, feeds)[-1], run(rotated, feeds)[-1]
    err_orig, err_rot = (float(np.sqrt(np.mean((a.astype(np.float64) - want) ** 2))) for a in (orig, got))
    parity = float(np.abs(got - orig).max() / np.abs(orig).max())
    assert parity <= 1e-5 and err_rot <= 1.5 * err_orig, (parity, err_orig, err_rot)


def named(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers by the hint the builder was given ("Wv37" → "Wv"; unnamed ones as they are)."""
    return {name.rstrip("0123456789") if name.rstrip("0123456789") in ("Wv", "Wo", "bv", "Wqkv", "bqkv") else name: array
            for name, array in initializers(proto).items()}


def stream_only(proto, monkeypatch):
    """The same rewrite with the head-wise rotation switched off."""
    with monkeypatch.context() as patch:
        patch.setattr("rewriter.rotate.find_head_blocks", lambda graph: [])
        return rewrite(proto, rotate_heads=True, rotate_seed=SEED)[0]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("v_proj", ["matmul", "matmul+bias", "gemm+bias"])
def test_hand_built_heads_rotated_exactly(heads, kv_heads, v_proj, monkeypatch):
    proto = attention_decoder(heads=heads, kv_heads=kv_heads, v_proj=v_proj)
    rotated, report = rewrite(proto, rotate_heads=True, rotate_seed=SEED)
    r = report.rotation
    assert r["applied"] and r["attention_blocks"] == 1 and r["heads_rotated"] == 1 and r["head_dim"] == HD, r
    assert not r["heads_skipped"] and any("R2, head_dim 4) in 1 of 1" in note for note in report.notes)
    assert_exact(proto, rotated)
    # what changed against the stream rotation alone: W_v·B, b_v·B, Bᵀ·W_o — nothing else
    base, got = named(stream_only(proto, monkeypatch)), named(rotated)
    r2 = rotation(HD, SEED + 1)[0]
    changed = {name for name in got if not np.array_equal(got[name], base[name])}
    assert changed == ({"Wv", "Wo", "bv"} if "bias" in v_proj else {"Wv", "Wo"}), changed
    b_kv, b_h = np.kron(np.eye(kv_heads), r2), np.kron(np.eye(heads), r2)
    wv = base["Wv"].T @ b_kv if v_proj == "gemm+bias" else base["Wv"] @ b_kv
    assert np.allclose(got["Wv"], wv.T if v_proj == "gemm+bias" else wv, atol=1e-6)
    assert np.allclose(got["Wo"], b_h.T @ base["Wo"], atol=1e-6)
    if "bias" in v_proj:
        assert np.allclose(got["bv"], base["bv"] @ b_kv, atol=1e-6)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_fused_qkv_rotated_on_v_columns_only(heads, kv_heads, monkeypatch):
    proto = attention_decoder(heads=heads, kv_heads=kv_heads, v_proj="fused-qkv")
    rotated, report = rewrite(proto, rotate_heads=True, rotate_seed=SEED)
    assert report.rotation["heads_rotated"] == 1, report.rotation
    assert_exact(proto, rotated)
    base, got = named(stream_only(proto, monkeypatch)), named(rotated)
    assert {name for name in got if not np.array_equal(got[name], base[name])} == {"Wqkv", "bqkv", "Wo"}
    v = slice((heads + kv_heads) * HD, (heads + 2 * kv_heads) * HD)      # V's columns; Q's and K's untouched
    b_kv = np.kron(np.eye(kv_heads), rotation(HD, SEED + 1)[0])
    assert np.array_equal(got["Wqkv"][:, :v.start], base["Wqkv"][:, :v.start])
    assert np.allclose(got["Wqkv"][:, v], base["Wqkv"][:, v] @ b_kv, atol=1e-6)
    assert np.allclose(got["bqkv"][v], base["bqkv"][v] @ b_kv, atol=1e-6)


@pytest.mark.parametrize("online", [False, True], ids=["rotate", "rotate-online"])
@pytest.mark.parametrize("family,exporter,opset", [("llama", "torchscript", 17), ("llama", "dynamo", 18),
                                                   ("gpt2", "torchscript", 17)])
def test_zoo_every_layer_head_rotated(family, exporter, opset, online):
    """Llama (separate q/k/v, GQA repeat) and GPT-2 (fused c_attn cut by a Split, Reshapes to
    [b, s, -1] and [b·s, n] around Gemms, the stream a centered LayerNorm one)."""
    proto = onnx.load(str(exported(family, exporter, opset)))
    rotated, report = rewrite(proto, rotate_heads=True, rotate_online=online)
    cfg = zoo_model(family).config
    r = report.rotation
    assert r["applied"] and r["attention_blocks"] == r["heads_rotated"] == cfg.num_hidden_layers, r
    assert r["head_dim"] == cfg.hidden_size // cfg.num_attention_heads
    assert_zoo_rotation_exact(family, proto, rotated)


def test_fp16_weights_keep_v_basis():
    """fp16 weights: R2 skipped (it added rounding error there, and quantize takes fp32), the
    stream still rotated (tests/test_rotate.py holds its fp16 accuracy)."""
    proto = onnx.load(str(exported("llama", "dynamo", 18, dtype="fp16")))
    _, report = rewrite(proto, rotate_heads=True)
    r = report.rotation
    assert r["applied"] and r["attention_blocks"] == 2 and r["heads_rotated"] == 0, r
    assert all("float16" in s["reason"] and "MatMul" in s["at"] for s in r["heads_skipped"]), r["heads_skipped"]


def skipped(proto, reason: str, at: str, monkeypatch):
    """R2 skipped in the one block with `reason` at the node `at`; the stream rotated, exact,
    and the constants those of the stream rotation alone."""
    rotated, report = rewrite(proto, rotate_heads=True, rotate_seed=SEED)
    r = report.rotation
    assert r["applied"] and r["attention_blocks"] == 1 and r["heads_rotated"] == 0, r
    (skip,) = r["heads_skipped"]
    assert reason in skip["reason"] and at in skip["at"], skip
    assert any("skipped ×1: " + skip["reason"] in note for note in report.notes)
    assert_exact(proto, rotated)
    base, got = initializers(stream_only(proto, monkeypatch)), initializers(rotated)
    assert all(np.array_equal(got[name], base[name]) for name in got)


def test_skipped_when_v_meets_the_past_cache(monkeypatch):
    skipped(attention_decoder(kv_heads=2, cache="past"), 'concatenated with the graph input "past_v" (a KV cache)',
            "Concat", monkeypatch)


def test_skipped_when_v_leaves_as_the_present_cache(monkeypatch):
    skipped(attention_decoder(cache="present"), "leaves the graph as output", "Transpose", monkeypatch)


def test_skipped_at_a_per_channel_mul(monkeypatch):
    skipped(attention_decoder(v_op="channel_mul"), "Mul by a constant of shape [16] on the V path", "Mul",
            monkeypatch)


def test_skipped_when_head_dim_is_not_the_merged_inner_axis(monkeypatch):
    skipped(attention_decoder(merge_perm=(1, 2, 0)), "Reshape regroups the V path while head_dim is not its last",
            "Reshape", monkeypatch)


def test_kv_cache_decoder_keeps_its_cache_basis(tmp_path):
    """An optimum-style decoder with a KV cache: every block skipped (V is a present output and
    meets the past), the stream rotated, exact at prefill and decode (rewriter.verify)."""
    from models.kv_export import export_optimum_style
    from rewriter import rewrite_file
    from rewriter.api import check_outputs
    src, dst = tmp_path / "kv.onnx", tmp_path / "kv-rot.onnx"
    export_optimum_style(zoo_model("llama"), str(src))
    report = rewrite_file(src, dst, rotate_heads=True)
    r = report.rotation
    assert r["applied"] and r["heads_rotated"] == 0 and r["attention_blocks"] == 2, r
    assert all("KV cache" in s["reason"] and s["at"] for s in r["heads_skipped"]), r["heads_skipped"]
    check_outputs(src, dst, provider="cpu")     # raises VerificationFailed beyond 1e-5


def test_explain_shows_the_head_rotation(tmp_path):
    from rewriter.explain import explain
    from rewriter.plan import Options
    path = tmp_path / "mul.onnx"
    onnx.save(attention_decoder(v_op="channel_mul"), str(path))
    mul = next(n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Mul" and "vscale" in n.input[1])
    text = explain(path, "nothing-of-that-name", Options(rotate_heads=True))
    assert "head-wise V/O rotation" in text and "in 0 of 1 attention blocks" in text and f'Mul "{mul}"' in text


def mha_decoder(*, present: bool = False) -> onnx.ModelProto:
    """onnxruntime's fused form: q/k/v projections → com.microsoft MultiHeadAttention (separate
    V, num_heads) → o_proj; `present` returns its present value (a KV cache)."""
    g = GraphBuilder(opset=17, seed=5)
    ids = g.input("ids", [1, None], np.int64)
    x = g.op("Gather", [g.const(g.rng.standard_normal((VOCAB, N)).astype(np.float32), "E"), ids], axis=0)
    y = g.rms(x, gain=g.gain(N))
    q, k, v = (g.op("MatMul", [y, g.weight(N, 4 * HD)]) for _ in range(3))
    outs = g.op("MultiHeadAttention", [q, k, v], n_out=3 if present else 1, domain="com.microsoft", num_heads=4)
    attn = outs[0] if present else outs
    if present:
        g.output(outs[2], shape=[1, 4, None, HD])
    x = g.op("Add", [x, g.op("MatMul", [attn, g.weight(4 * HD, N)])])
    g.output(g.op("MatMul", [g.rms(x, gain=g.gain(N)), g.weight(N, VOCAB)], hint="logits"), shape=[1, None, VOCAB])
    proto = g.model(contrib=True)
    # onnx's shape inference does not know contrib ops: declare the attention output's shape
    proto.graph.value_info.append(onnx.helper.make_tensor_value_info(attn, onnx.TensorProto.FLOAT, [1, None, 4 * HD]))
    return proto


@pytest.mark.parametrize("present", [False, True], ids=["no-cache", "present-value-output"])
def test_fused_multi_head_attention(present):
    """MultiHeadAttention's value input: rotated exactly (≤ 1e-5 of the original: onnxruntime has
    no float64 kernel of it for the reference), or skipped when its present value leaves."""
    proto = mha_decoder(present=present)
    rotated, report = rewrite(proto, rotate_heads=True, rotate_seed=SEED)
    r = report.rotation
    assert r["applied"] and r["attention_blocks"] == 1 and r["heads_rotated"] == (0 if present else 1), r
    if present:
        assert "present value (a KV cache)" in r["heads_skipped"][0]["reason"]
        assert "MultiHeadAttention" in r["heads_skipped"][0]["at"]
    feeds = {"ids": np.arange(9, dtype=np.int64)[None]}
    want, got = run(proto, feeds)[-1], run(rotated, feeds)[-1]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_head_rotation_is_asked_for(tmp_path):
    """R2 measured neutral on real SmolLM2 (W8A8 per-tensor slightly worse at three seeds:
    README Rotation): plain --rotate leaves V/O as the stream rotation made them; --rotate-heads
    (the CLI, as the API's rotate_heads) rotates them."""
    import json
    from models_cache import exported
    from rewriter.cli import main
    src = exported("llama", "torchscript", 17)
    _, plain = rewrite(onnx.load(str(src)), rotate=True)
    assert plain.rotation["applied"] and plain.rotation["heads_rotated"] == 0
    report = tmp_path / "r.json"
    assert main([str(src), "-o", str(tmp_path / "h.onnx"), "--rotate-heads", "--report", str(report), "--quiet"]) == 0
    rotation = json.loads(report.read_text())["rotation"]
    assert rotation["applied"] and rotation["heads_rotated"] == 2


def test_plain_rotation_does_not_talk_about_heads():
    """Not asked for, R2 is not in the rotation's line (it used to say 'no attention block found')."""
    from models_cache import exported
    _, report = rewrite(onnx.load(str(exported("llama", "torchscript", 17))), rotate=True)
    assert report.rotation["applied"] and not report.rotation["heads"]
    assert "head-wise" not in report.notes[-1], report.notes[-1]
    _, asked = rewrite(onnx.load(str(exported("llama", "torchscript", 17))), rotate_heads=True)
    assert "head-wise V/O rotation (R2" in asked.notes[-1], asked.notes[-1]

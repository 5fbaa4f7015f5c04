"""Rotating pre-LayerNorm decoders (issue 20): GPT-2, OPT and Phi-2 shapes exported by both
exporters, exact with `--rotate` and `--rotate-online`; and the rules they needed, each with a
hand-built positive and negative case — a parallel block (attention and MLP summed before the
residual Add: each addend a writer), row-regrouping Reshapes on the stream (OPT's [B·T, n]),
learned positions read at an offset (OPT's + 2)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from builders import GraphBuilder
from models_cache import exported, zoo_model
from rewriter import rewrite
from test_rotate import assert_zoo_rotation_exact, errors_vs_float64, refused

N, VOCAB, POSITIONS = 24, 40, 16

#: family: (norms, writers) for L layers — Phi-2's block reads one LayerNorm and has two writers
COUNTS = {"gpt2": lambda L: (2 * L + 1, 2 * L), "opt": lambda L: (2 * L + 1, 2 * L),
          "phi": lambda L: (L + 1, 2 * L)}
EXPORTS = [("gpt2", "dynamo", 18), ("opt", "torchscript", 17), ("opt", "dynamo", 18),
           ("phi", "torchscript", 17), ("phi", "dynamo", 18)]     # gpt2 torchscript: test_rotate


@pytest.mark.parametrize("online", [False, True], ids=["rotate", "rotate-online"])
@pytest.mark.parametrize("family,exporter,opset", EXPORTS, ids=[f"{f}-{e}" for f, e, _ in EXPORTS])
def test_preln_zoo_rotation_exact(family, exporter, opset, online):
    proto = onnx.load(str(exported(family, exporter, opset)))
    rotated, report = rewrite(proto, rotate=True, rotate_online=online)
    r = report.rotation
    assert r["applied"], r
    cfg = zoo_model(family).config
    norms, writers = COUNTS[family](cfg.num_hidden_layers)
    assert (r["norm_kind"], r["norms"], r["writers"]) == ("layer", norms, writers), r
    # every writer's input width (64 = 8·8, 128, 256) factors into Hadamard orders: Gemm writers too
    assert r["online"] == (writers if online else 0), r
    assert_zoo_rotation_exact(family, proto, rotated)


# -- hand-built: ids, pos [T] → Gather(E) + Gather(P, pos + 2) → blocks → LayerNorm → head (+ bias)

def parallel_decoder(*, two_norms=False, tanh_branch=False, second_norm_read=False, row_reshape=False,
                     bad_reshape=False) -> onnx.ModelProto:
    """Two parallel blocks v + attn(LN(v)) + mlp(LN(v)) (Phi-2; `two_norms`: each branch its
    own LayerNorm, GPT-J/NeoX style). `tanh_branch`: the MLP branch ends in a Tanh, not a
    linear; `second_norm_read`: the MLP branch's norm is also a graph output; `row_reshape`:
    the stream goes [T, n] → [1, T, n] → [T, n] in the first block (rows regrouped);
    `bad_reshape`: [T, n] → [T, 2, n/2] (a row split: not a rotation's alias)."""
    g = GraphBuilder(opset=17, seed=3)
    ids = g.input("ids", [None], np.int64)
    pos = g.input("pos", [None], np.int64)
    table = (g.rng.standard_normal((VOCAB, N)) + 12.0 * (np.arange(N) == 5)).astype(np.float32)
    positions = g.rng.standard_normal((POSITIONS + 2, N)).astype(np.float32)
    shifted = g.op("Add", [pos, g.const(np.array(2, np.int64), "offset")])       # OPT: positions + 2
    v = g.op("Add", [g.op("Gather", [g.const(table, "E"), ids], axis=0),
                     g.op("Gather", [g.const(positions, "P"), shifted], axis=0)])

    def reshape(x, shape):
        return g.op("Reshape", [x, g.const(np.array(shape, np.int64), "shape")])

    def norm(x):
        return g.layernorm(x, gain=g.gain(N), beta=0.1 * g.gain(N))
    for layer in range(2):
        if row_reshape or (bad_reshape and layer == 0):     # out and back: the block reads [T, n]
            v = reshape(v, [1, -1, N] if row_reshape else [-1, 2, N // 2])
            v = reshape(v, [-1, N])
        y = norm(v)
        attn = g.op("Mul", [g.op("MatMul", [y, g.weight(N, 16)]), g.op("MatMul", [y, g.weight(N, 16)])])
        attn = g.op("Add", [g.const(g.gain(N), "bo"), g.op("MatMul", [attn, g.weight(16, N)])])
        y2 = norm(v) if two_norms or second_norm_read else y
        if second_norm_read and layer == 1:
            g.output(y2, shape=[None, N])
        h = g.op("Relu", [g.op("Gemm", [y2, g.weight(N, 32), g.const(g.gain(32), "c")])])
        mlp = g.op("Gemm", [h, g.const((g.rng.standard_normal((N, 32)) / 6).astype(np.float32), "W2t"),
                            g.const(g.gain(N), "b2")], transB=1)
        if tanh_branch and layer == 1:
            mlp = g.op("Tanh", [mlp])
        v = g.op("Add", [g.op("Add", [attn, mlp]), v])
        if row_reshape and layer == 0:         # the residual sum regrouped before the next block
            v = reshape(v, [1, -1, N])
    logits = g.op("Add", [g.op("MatMul", [norm(v), g.weight(N, VOCAB)]), g.const(g.gain(VOCAB), "head_bias")],
                  hint="logits")
    g.output(logits, shape=[None, VOCAB])
    return g.model(contrib=False)


FEEDS = {"ids": np.arange(VOCAB, dtype=np.int64) % VOCAB, "pos": np.arange(VOCAB, dtype=np.int64) % POSITIONS}


@pytest.mark.parametrize("online", [False, True], ids=["rotate", "rotate-online"])
@pytest.mark.parametrize("two_norms,row_reshape", [(False, False), (True, False), (False, True)],
                         ids=["one-norm", "two-norms", "row-reshape"])
def test_parallel_block_rotation_exact(two_norms, row_reshape, online):
    proto = parallel_decoder(two_norms=two_norms, row_reshape=row_reshape)
    rotated, report = rewrite(proto, rotate=True, rotate_online=online, rotate_seed=5)
    r = report.rotation
    assert r["applied"], r
    # two blocks of two writers each; the norms: per block one (or two), and the final one
    assert (r["norm_kind"], r["writers"], r["norms"]) == ("layer", 4, 5 if two_norms else 3), r
    # E, P, per block 3 reader + 2 writer weights and 2 biases (two_norms: the same), the head
    assert r["constants"] == 2 + 2 * 7 + 1, r
    assert r["online"] == (4 if online else 0), r
    parity, err_orig, err_rot = errors_vs_float64(proto, rotated, FEEDS)
    assert parity <= 1e-5 and err_rot <= 1.5 * err_orig, (parity, err_orig, err_rot)


def test_refused_parallel_branch_not_linear():
    """One addend of the block's sum ends in a Tanh: no writer, refused at it."""
    refused(parallel_decoder(tanh_branch=True), "written by Tanh", "Tanh")


def test_refused_parallel_branch_norm_not_folded():
    """The MLP branch reads its own LayerNorm whose output is also a graph output (its gain
    cannot fold): the stream has a norm it cannot prove, refused."""
    refused(parallel_decoder(two_norms=True, second_norm_read=True), "was not rewritten", "")


def test_refused_reshape_that_splits_rows():
    """[T, n] → [T, 2, n/2] → [T, n] is no row regrouping: a rotation of n does not pass
    through it, so the stream cannot be traced back past the first block's residual Add."""
    refused(parallel_decoder(bad_reshape=True), "does not start at a Gather of embedding rows", "Add")


def test_int4_quantizes_gemm_linears(tmp_path):
    """GPT-2's Conv1D exports as Gemm, which MatMulNBitsQuantizer skips: `quantize --scheme int4`
    hands it every linear as a MatMul (+ Add of the bias) — all of them quantized, and the
    unquantized conversion computes what the Gemms did."""
    from rewriter.cli import main
    from rewriter.quantize import gemms_as_matmuls
    from rewriter.verify import session
    proto = onnx.load(str(exported("gpt2", "torchscript", 17)))
    gemms = sum(n.op_type == "Gemm" for n in proto.graph.node)
    assert gemms >= 8
    converted = gemms_as_matmuls(proto)
    assert not any(n.op_type == "Gemm" for n in converted.graph.node)
    ids = np.random.default_rng(0).integers(0, zoo_model("gpt2").config.vocab_size, (1, 9))
    feeds = {i.name: (ids if i.name == "input_ids" else np.ones_like(ids))
             for i in session(proto.SerializeToString(), "cpu").get_inputs()}
    want = session(proto.SerializeToString(), "cpu").run(None, feeds)[0]
    got = session(converted.SerializeToString(), "cpu").run(None, feeds)[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    src, dst = tmp_path / "gpt2.onnx", tmp_path / "int4.onnx"
    onnx.save(proto, str(src))
    assert main(["quantize", str(src), "-o", str(dst), "--scheme", "int4", "--quiet"]) == 0
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert "Gemm" not in ops and ops.count("MatMulNBits") >= gemms


def test_gemms_as_matmuls_leaves_other_gemms_alone():
    """Only a plain linear is converted: a Gemm with alpha ≠ 1, transA or a non-constant B stays
    a Gemm (MatMulNBits then leaves it in float, as before)."""
    from rewriter.quantize import gemms_as_matmuls
    g = GraphBuilder(opset=17, seed=1)
    x = g.input("x", [4, 8])
    w = g.const(g.rng.standard_normal((8, 8)).astype(np.float32), "W")
    y = g.op("Gemm", [x, w], alpha=0.5)
    y = g.op("Gemm", [g.op("Transpose", [y], perm=[1, 0]), w], transA=1)
    y = g.op("Gemm", [y, y])
    y = g.op("Gemm", [y, w, g.const(np.ones(8, np.float32), "c")], transB=1)     # the one plain linear
    g.output(y, shape=[4, 8])
    converted = gemms_as_matmuls(g.model(contrib=False))
    ops = [n.op_type for n in converted.graph.node]
    assert ops.count("Gemm") == 3 and ops.count("MatMul") == 1, ops

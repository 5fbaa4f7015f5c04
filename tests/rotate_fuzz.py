"""Random residual-stream models for the rotation fuzzer (tests/test_rotate_fuzz.py).

A model: token ids → embedding Gather (+ an additive position-embedding Gather) → 1–4 layers of
(norm → block → writer → residual Add) → final norm → head (its own weight or the tied
embedding, MatMul(Transpose(E)) or Gemm(transB)). Drawn per model: the width n (Hadamard
orders and not), the stream's rank (2: [T, n], Gemm writers direct; 3: [B, T, n], Gemm behind
row Reshapes), the opset (13: ReduceMean axes as an attribute, 18: as an input), the norm kind
(RMS or pre-norm LayerNorm) and per norm its form (decomposed variants, the fused one-op
forms, the Skip* forms holding the residual Add), gains/β to fold or none; per layer the
block (MLP with ReLU/GELU/SiLU-GLU, attention with heads, both in parallel reading one norm)
and the writer (MatMul, MatMul + bias Add, Gemm with transB/α/β/C). Then maybe one *poison*
(POISONS): a reader, writer or norm the rotation cannot prove, which must make it refused —
or, if it is applied anyway, leave the model exact (the test checks both).

`build(draw)` returns a Case: the model (its recipe and run-time shapes in the metadata, as
tests/differential.py reads them) and the poison's name ("" for a clean model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto

import differential as diff
from builders import GraphBuilder

WIDTHS = (8, 12, 16, 20, 24, 32)
B, T, VOCAB, POSITIONS = 2, 5, 23, 7
POISONS = ("relu_reader", "channel_mul_reader", "reducesum_reader", "slice_hidden", "stream_output",
           "norm_other_axis", "gain_cannot_fold", "weightless_norm_nonlinear", "weightless_norm_output",
           "nonconst_weight", "broadcast_bias", "eps_free_layernorm", "concat_hidden", "writer_also_read",
           "table_also_read", "skip_sum_read", "scaled_writer", "mixed_norm_kinds", "head_weight_read")


@dataclass
class Case:
    model: onnx.ModelProto
    poison: str
    recipe: str

    @property
    def rotatable(self) -> bool:
        """Nothing in it the rotation may refuse: no poison (or a harmless one) and no
        parallel block summed before its residual Add (a writer that is an Add of two
        linears: not proved today)."""
        return self.poison in ("", "eps_free_layernorm") and "parallel_sum" not in self.recipe

    def __repr__(self) -> str:
        return f"Case(poison={self.poison!r},\n{self.recipe}\n)"


class Gen:
    """One model being drawn: the builder, the draws and the recipe lines."""

    def __init__(self, draw):
        self.draw = draw
        self.lines: list[str] = []
        self.n = self.choice(WIDTHS)
        self.rank = self.choice([2, 3])
        self.opset = self.choice([13, 17, 18])
        self.kind = self.choice(["rms", "rms", "layer"])
        self.depth = draw(st.integers(1, 4))
        self.g = GraphBuilder(opset=self.opset, seed=draw(st.integers(0, 2**16)))
        self.poison = self.choice(("",) * 6 + POISONS)
        self.poison_layer = draw(st.integers(0, self.depth - 1))
        self.skip_ok = True             # the Skip* ops run on 2-D/3-D fp32 (both ranks here)
        self.note(f"n {self.n}, rank {self.rank}, opset {self.opset}, {self.kind} norms, depth {self.depth}, "
                  f"poison {self.poison or '-'} at layer {self.poison_layer}")
        self.lead = [T] if self.rank == 2 else [B, T]

    def choice(self, options):
        return self.draw(st.sampled_from(list(options)))

    def flag(self) -> bool:
        return self.draw(st.booleans())

    def note(self, text: str):
        self.lines.append(text)

    def poisoned(self, name: str, layer: int | None = None) -> bool:
        return self.poison == name and (layer is None or layer == self.poison_layer)

    def weight(self, k: int, m: int) -> str:
        return self.g.weight(k, m)

    def vec(self, m: int, scale=0.2) -> np.ndarray:
        return (scale * self.g.rng.standard_normal(m)).astype(np.float32)

    def out(self, value: str, width: int | None = None):
        self.g.output(value, shape=self.lead + [width or self.n])


# -- norms -------------------------------------------------------------------------------------------

def decomposed_norm(gen: Gen, x: str, kind: str, gain, beta, eps) -> str:
    g = gen.g
    if kind == "rms":
        square, inverse = gen.choice(["pow", "mul"]), gen.choice(["reciprocal", "div", "div_one"])
        gen.note(f"  decomposed rms ({square}, {inverse}, eps {eps})")
        y = g.rms(x, square=square, inverse=inverse, eps=eps)
    else:
        inverse = gen.choice(["div", "reciprocal"])
        gen.note(f"  decomposed layernorm ({inverse}, eps {eps})")
        if eps is None:     # GraphBuilder.layernorm always adds ε: written out here
            mean = g.reduce_mean(x)
            d = g.op("Sub", [x, mean])
            var = g.reduce_mean(g.op("Mul", [d, d]))
            y = g.op("Div", [d, g.op("Sqrt", [var])])
        else:
            y = g.layernorm(x, eps=eps, inverse=inverse)
    if gain is not None:
        y = g.op("Mul", [y, g.const(gain, "gamma")] if gen.flag() else [g.const(gain, "gamma"), y])
    if beta is not None:
        y = g.op("Add", [y, g.const(beta, "beta")])
    return y


def norm(gen: Gen, x: str, layer: int, *, kind: str | None = None, skip: tuple[str, str] | None = None,
         axis: int = -1) -> tuple[str, str | None]:
    """A norm of `x` (or of the residual sum skip = (stream, written) in one Skip* op, when
    drawn). Returns (normalized output, the stream's next value when the Skip* op made it)."""
    g, n = gen.g, gen.n
    kind = kind or gen.kind
    weightless = axis != -1 or (gen.flag() and not gen.flag())      # 1/4: nothing to fold
    gain = None if weightless else (1.0 + 0.3 * g.rng.standard_normal(n)).astype(np.float32)
    beta = None if weightless or kind == "rms" or gen.flag() else gen.vec(n)
    eps = gen.choice([1e-5, 1e-6])
    if kind == "layer" and gen.poisoned("eps_free_layernorm", layer):
        eps = None
    forms = ["decomposed", "fused"] + (["skip"] if skip is not None and axis == -1 else [])
    form = gen.choice(forms) if axis == -1 else "decomposed"
    if kind == "layer" and gen.opset < 17 and form == "fused":
        form = "decomposed"
    gen.note(f"norm {kind} {form}{' weightless' if weightless else ''}{' β' if beta is not None else ''}"
             f"{' axis ' + str(axis) if axis != -1 else ''}")
    if form == "skip":
        stream, written = skip
        if gen.flag():
            stream, written = written, stream
        op = "SkipSimplifiedLayerNormalization" if kind == "rms" else "SkipLayerNormalization"
        inputs = [stream, written, g.const(gain if gain is not None else np.ones(n, np.float32), "gamma")]
        if kind == "layer":
            inputs.append(g.const(beta, "beta") if beta is not None else "")
        if gen.flag():
            inputs.append(g.const(gen.vec(n, 0.1), "skip_bias"))
            gen.note("  skip bias")
        y, _, _, total = g.op(op, inputs, n_out=4, domain="com.microsoft", epsilon=eps or 1e-5)
        return y, total
    if skip is not None:
        x = g.op("Add", list(skip) if gen.flag() else list(skip[::-1]))
    if axis != -1:      # a norm over the token axis: Transpose, norm, Transpose back
        perm = list(range(gen.rank))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        xt = g.op("Transpose", [x], perm=perm)
        return g.op("Transpose", [decomposed_norm(gen, xt, kind, gain, beta, eps)], perm=perm), \
            (x if skip is not None else None)
    if form == "fused":
        if kind == "rms":
            y = g.op("SimplifiedLayerNormalization", [x, g.const(gain if gain is not None else np.ones(n, np.float32),
                                                              "gamma")], axis=-1, epsilon=eps)
        else:
            inputs = [x, g.const(gain if gain is not None else np.ones(n, np.float32), "gamma")]
            if beta is not None:
                inputs.append(g.const(beta, "beta"))
            y = g.op("LayerNormalization", inputs, axis=-1, epsilon=eps if eps is not None else 0.0)
    else:
        y = decomposed_norm(gen, x, kind, gain, beta, eps)
    return y, (x if skip is not None else None)


# -- linears ----------------------------------------------------------------------------------------

def to_rows(gen: Gen, x: str, width: int) -> str:
    return x if gen.rank == 2 else gen.g.op("Reshape", [x, gen.g.const(np.array([-1, width], np.int64), "shape")])


def from_rows(gen: Gen, x: str, width: int) -> str:
    return x if gen.rank == 2 else gen.g.op("Reshape", [x, gen.g.const(np.array([B, T, width], np.int64), "shape")])


def reader(gen: Gen, y: str, m: int) -> str:
    """A linear reading a norm output: MatMul, or Gemm (transB drawn, α, a bias C) on rank 2."""
    g = gen.g
    if gen.rank == 2 and gen.flag():
        trans_b = gen.flag()
        w = g.weight(gen.n, m)
        if trans_b:
            w = g.const(np.ascontiguousarray(onnx.numpy_helper.to_array(
                next(t for t in g.inits if t.name == w)).T), "Wt")
        inputs = [y, w] + ([g.const(gen.vec(m), "c")] if gen.flag() else [])
        return g.op("Gemm", inputs, transB=int(trans_b), alpha=gen.choice([1.0, 0.5]))
    h = g.op("MatMul", [y, g.weight(gen.n, m)])
    return g.op("Add", [h, g.const(gen.vec(m), "c")]) if gen.flag() else h


def writer(gen: Gen, h: str, k: int, layer: int) -> str:
    """The linear writing `h` [.., k] into the stream: MatMul, MatMul + bias, or Gemm (with
    row Reshapes on rank 3), α/β/C drawn."""
    g, n = gen.g, gen.n
    form = gen.choice(["matmul", "matmul_bias", "gemm"])
    gen.note(f"  writer {form}")
    w = g.weight(k, n)
    dynamic = gen.poisoned("nonconst_weight", layer) and "w_dynamic" not in g.shapes
    if dynamic:
        w = g.input("w_dynamic", [k, n])
        g.shapes["w_dynamic"] = [k, n]
    if form == "gemm":
        trans_b = gen.flag()
        if trans_b:     # B stored [n, k]: a Transpose node, or the transposed constant
            stored = next((t for t in g.inits if t.name == w), None)
            w = g.const(np.ascontiguousarray(onnx.numpy_helper.to_array(stored).T), "Wt") \
                if stored is not None and gen.flag() else g.op("Transpose", [w], perm=[1, 0])
        alpha, beta = gen.choice([1.0, 0.5]), gen.choice([1.0, 2.0])
        inputs = [to_rows(gen, h, k), w]
        if gen.poisoned("broadcast_bias", layer):    # C per row (rank 2) or one scalar
            gen.note("  broadcast C")
            inputs.append(g.const((0.1 * g.rng.standard_normal((T, n))).astype(np.float32) if gen.rank == 2
                                  else np.full([1], 0.3, np.float32), "C"))
        elif gen.flag():
            c = gen.vec(n, 0.1)
            inputs.append(g.const(c.reshape(1, n) if gen.flag() else c, "C"))
        out = g.op("Gemm", inputs, transB=int(trans_b), alpha=alpha, beta=beta)
        out = from_rows(gen, out, n)
    else:
        out = g.op("MatMul", [h, w])
        if form == "matmul_bias" or gen.poisoned("broadcast_bias", layer):
            bias = gen.vec(n, 0.1)
            if gen.poisoned("broadcast_bias", layer):
                bias = gen.choice(["scalar", "per_token"])
                gen.note(f"  broadcast bias {bias}")
                bias = (np.full([1], 0.3, np.float32) if bias == "scalar"
                        else (0.1 * g.rng.standard_normal((T, n))).astype(np.float32))
            b = g.const(bias, "bias", as_node=gen.flag())
            out = g.op("Add", [out, b] if gen.flag() else [b, out])
    if gen.poisoned("writer_also_read", layer):
        gen.out(g.op("Relu", [out]))
    if gen.poisoned("scaled_writer", layer):
        out = g.op("Mul", [out, g.const(np.array(0.5, np.float32), "scale")])
    return out


# -- blocks -----------------------------------------------------------------------------------------

def mlp(gen: Gen, y: str, layer: int) -> str:
    g = gen.g
    f = gen.choice([gen.n, 2 * gen.n, 16])
    act = gen.choice(["relu", "gelu", "silu_glu"])
    gen.note(f"  mlp {act} width {f}")
    up = reader(gen, y, f)
    if act == "relu":
        h = g.op("Relu", [up])
    elif act == "gelu":     # the erf form (Gelu is opset 20)
        e = g.op("Erf", [g.op("Div", [up, g.const(np.array(np.sqrt(2), np.float32))])])
        h = g.op("Mul", [g.op("Mul", [up, g.const(np.array(0.5, np.float32))]),
                         g.op("Add", [e, g.const(np.array(1.0, np.float32))])])
    else:
        gate = reader(gen, y, f)
        h = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    return writer(gen, h, f, layer)


def attention(gen: Gen, y: str, layer: int) -> str:
    g = gen.g
    heads = gen.choice([1, 2, 4])
    d = 4
    a = heads * d
    gen.note(f"  attention {heads} heads of {d}")
    q, k, v = (reader(gen, y, a) for _ in range(3))
    split = g.const(np.array(gen.lead + [heads, d], np.int64), "heads_shape")
    perm = [1, 0, 2] if gen.rank == 2 else [0, 2, 1, 3]
    q, k, v = (g.op("Transpose", [g.op("Reshape", [t, split])], perm=perm) for t in (q, k, v))
    kt_perm = [0, 2, 1] if gen.rank == 2 else [0, 1, 3, 2]
    scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=kt_perm)]),
                          g.const(np.array(d ** -0.5, np.float32), "scale")])
    ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=perm), g.const(np.array(gen.lead + [a], np.int64), "shape")])
    return writer(gen, ctx, a, layer)


def layer(gen: Gen, v: str, i: int, pending: str | None) -> tuple[str, str | None]:
    """One layer on the stream value `v`; `pending` is a writer output not yet added (the
    previous layer's, for a Skip* norm to add). Returns (stream value, pending writer output)."""
    g = gen.g
    y, total = norm(gen, v, i, skip=(v, pending) if pending else None)
    if total is not None:
        v = total
    if gen.poisoned("gain_cannot_fold", i) or gen.poisoned("weightless_norm_output", i):
        gen.out(y)
    if gen.poisoned("weightless_norm_nonlinear", i):
        gen.out(g.op("Relu", [y]))
    block = gen.choice(["mlp", "attention", "parallel"] * 2 + ["parallel_sum"])
    gen.note(f"layer {i}: {block}")
    if block in ("mlp", "attention"):
        out = (mlp if block == "mlp" else attention)(gen, y, i)
        return v, out
    a, m = attention(gen, y, i), mlp(gen, y, i)
    if block == "parallel_sum":     # Add(v, Add(a, m)): one Add of two writers
        return v, g.op("Add", [a, m])
    return g.op("Add", [v, a] if gen.flag() else [a, v]), m


def stream_poison(gen: Gen, v: str):
    """A reader of the stream value `v` that is neither a norm nor the next residual Add."""
    g, n, p = gen.g, gen.n, gen.poison
    if p == "relu_reader":
        gen.out(g.op("Relu", [v]))
    elif p == "channel_mul_reader":
        gen.out(g.op("Mul", [v, g.const(gen.vec(n) + 1, "channel")]))
    elif p == "reducesum_reader":
        axes = g.const(np.array([-1], np.int64), "axes")
        red = g.op("ReduceSum", [v, axes], keepdims=1)
        gen.out(red, 1)
    elif p == "slice_hidden":
        half = n // 2
        s = g.op("Slice", [v, g.const(np.array([0], np.int64)), g.const(np.array([half], np.int64)),
                           g.const(np.array([-1], np.int64))])
        gen.out(g.op("MatMul", [s, g.weight(half, 8)]), 8)
    elif p == "stream_output":
        gen.out(v)
    elif p == "norm_other_axis":
        y, _ = norm(gen, v, -1, axis=-2)
        gen.out(g.op("MatMul", [y, g.weight(n, 8)]), 8)
    elif p == "concat_hidden":
        c = g.op("Concat", [v, v], axis=-1)
        gen.out(g.op("MatMul", [c, g.weight(2 * n, 8)]), 8)


def build_model(gen: Gen) -> onnx.ModelProto:
    g, n = gen.g, gen.n
    g.shapes = {}
    ids = g.input("ids", gen.lead, np.int64)
    # the feeds' ids are 1..2 (differential.make_feeds): spread them over the vocabulary
    mix = g.const(g.rng.integers(1, VOCAB, gen.lead[-1:]).astype(np.int64), "mix")
    ids = g.op("Mod", [g.op("Add", [g.op("Mul", [ids, mix]), mix]), g.const(np.array(VOCAB, np.int64))])
    table = (g.rng.standard_normal((VOCAB, n)) + 8.0 * (np.arange(n) == 1)).astype(np.float32)
    table = g.const(table, "E")
    v = g.op("Gather", [table, ids], axis=0)
    if gen.flag():
        pos = g.op("Gather", [g.const((0.5 * g.rng.standard_normal((POSITIONS, n))).astype(np.float32), "P"),
                              g.const(np.arange(T, dtype=np.int64), "positions")], axis=0)
        v = g.op("Add", [v, pos] if gen.flag() else [pos, v])
        gen.note("position embedding")
    if gen.poisoned("table_also_read"):
        gen.g.output(g.op("ReduceSum", [table], keepdims=0), shape=[])
    pending = None
    for i in range(gen.depth):
        if i == gen.poison_layer:
            if pending is not None:
                v, pending = g.op("Add", [v, pending]), None
            stream_poison(gen, v)
        if gen.poisoned("mixed_norm_kinds", i):
            gen.kind, saved = ("layer" if gen.kind == "rms" else "rms"), gen.kind
            if gen.opset < 17:
                gen.kind = "rms" if saved == "layer" else "layer"
        v, pending = layer(gen, v, i, pending)
        if gen.poisoned("mixed_norm_kinds", i):
            gen.kind = saved
        if pending is not None and gen.flag() and gen.poison != "skip_sum_read":
            v, pending = g.op("Add", [v, pending] if gen.flag() else [pending, v]), None
        if pending is None and not gen.draw(st.integers(0, 5)):     # an alias step on the stream
            alias = gen.choice(["Identity", "Cast"])
            gen.note(f"  stream through {alias}")
            v = g.op(alias, [v], **({"to": TensorProto.FLOAT} if alias == "Cast" else {}))
    y, total = norm(gen, v, gen.depth, skip=(v, pending) if pending else None)
    if gen.poison == "skip_sum_read" and total is not None:
        gen.out(g.op("Relu", [total]))
    head = gen.choice(["own", "tied_transpose", "tied_gemm"] if gen.rank == 2 else ["own", "tied_transpose"])
    gen.note(f"head {head}")
    if head == "own":
        w = g.weight(n, VOCAB)
        if gen.poison == "head_weight_read":
            gen.g.output(g.op("ReduceSum", [w], keepdims=0), shape=[])
        logits = g.op("MatMul", [y, w])
    elif head == "tied_transpose":
        logits = g.op("MatMul", [y, g.op("Transpose", [table], perm=[1, 0])])
    else:
        logits = g.op("Gemm", [y, table], transB=1)
    g.outputs.insert(0, onnx.helper.make_tensor_value_info(logits, TensorProto.FLOAT, gen.lead + [VOCAB]))
    model = g.model(contrib=True)
    shapes = {"ids": gen.lead} | g.shapes
    onnx.helper.set_model_props(model, {diff.SHAPES_KEY: json.dumps(shapes), diff.RECIPE_KEY: "\n".join(gen.lines)})
    return model


@st.composite
def cases(draw) -> Case:
    gen = Gen(draw)
    model = build_model(gen)
    return Case(model, gen.poison, "\n".join(gen.lines))


__all__ = ["Case", "POISONS", "cases"]

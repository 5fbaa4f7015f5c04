"""Differential fuzzing: random graphs, every strategy and mode, checked against the
original by tests/differential.py.

A graph is: input(s) of rank 2, 3 or 4 (dynamic or fixed dims; fp32 mostly, some fp16, fp64 and
bf16-stored inputs) → a normalization of any kind and form → one to three linears → a random
downstream chain drawn from every op the scale algebra knows (and some it must stop at) →
graph outputs at the leaves. One small function per op family below (`fam_*`), each with a
docstring of what it generates; hypothesis shrinks a failure to a minimal recipe, printed with
the failure (the model is saved under $FLASHNORM_FUZZ_SAVE, default the pytest temp folder).

Generator families (GENERATORS, drawn by SHARES from one time budget): `base` (the above),
`absent_attrs` (every optional attribute sometimes absent, so the op's schema default applies;
rows down to RMS 1e-4), `gemm` (α, β, transA/transB, every C shape after every norm kind),
`opsets` (opsets 9–23, every op in its opset's signature, row moves between norm and linear),
`approx_axis` (a second norm over the feature axis or a moved one; also rewritten with
--approx). FUZZ_ONLY=gemm runs one family. The terminal summary counts graphs per family.

Budget: the `ci` profile (default) runs for FUZZ_SECONDS (default 75 s) wall time or
max_examples graphs, whichever ends first; `pytest --hypothesis-profile=long
tests/test_differential_fuzz.py` runs for FUZZ_SECONDS (default 1200 s). FUZZ_AVOID=if,loop,...
switches op families (or norm forms, dtypes) off, to look for the next bug while a known one
is being fixed. The counts go to the terminal summary (conftest.pytest_terminal_summary).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest

pytest.importorskip("hypothesis")
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import differential as diff

PROFILE_SECONDS = {"ci": 75.0, "long": 1200.0}
SHRINK_SECONDS = float(os.environ.get("FUZZ_SHRINK_SECONDS", "60"))
AVOID = {s.strip() for s in os.environ.get("FUZZ_AVOID", "").split(",") if s.strip()}
F32, F16, F64, BF16 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16)
LOCAL = "local.fuzz"       # domain of the model-local functions


def elem(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def vinfo(name: str, dtype, rank: int) -> onnx.ValueInfoProto:
    """A typed value info of known rank, dims unknown."""
    return helper.make_tensor_value_info(name, elem(dtype), [None] * rank)


@dataclass(frozen=True)
class V:
    """A value of the graph being built: name, concrete run-time shape, element dtype."""
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def rank(self) -> int:
        return len(self.shape)


class FuzzBuilder:
    """Nodes, initializers, inputs and outputs of one graph (the interface of the tests'
    GraphBuilder, kept here so the fuzzer runs against any checkout of the rewriter), with any
    float dtype, subgraphs (If/Loop bodies) and model-local functions."""

    def __init__(self, opset: int, seed: int):
        self.opset = opset
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.rng = np.random.default_rng(seed)
        self.functions: dict[str, onnx.FunctionProto] = {}
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}{self._n}"

    def const(self, array, hint: str = "c", as_node: bool = False) -> str:
        array = np.asarray(array)
        name = self.name(hint)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name)))
        else:
            self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs, n_out: int = 1, domain: str = "", **attrs):
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name(op_type),
                                           domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def input(self, name, shape, dtype=np.float32) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem(dtype) if not isinstance(dtype, int) else dtype, shape))
        return name

    def output(self, name, dtype=np.float32, shape=None):
        self.outputs.append(vinfo(name, dtype, len(shape)))

    @contextmanager
    def subgraph(self):
        """Nodes made inside the block go to a separate list (a branch or loop body)."""
        saved, self.nodes = self.nodes, []
        try:
            yield self.nodes
        finally:
            self.nodes = saved

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "fuzz", self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", self.opset), helper.make_opsetid("com.microsoft", 1)]
        if self.functions:
            opsets.append(helper.make_opsetid(LOCAL, 1))
        return helper.make_model(graph, opset_imports=opsets, ir_version=11 if self.opset >= 23 else 10,
                                 functions=list(self.functions.values()))


class Fuzz:
    """The state of one generated graph: the builder, hypothesis' `draw`, the pool of values
    the downstream chain picks from, and a readable recipe (one line per decision)."""

    def __init__(self, draw, opset: int, seed: int, family: str = "base"):
        self.draw = draw
        self.family = family               # the generator (GENERATORS) that made this graph
        self.absent = False                # optional attributes may be left out (schema defaults)
        self.g = FuzzBuilder(opset, seed)
        self.rng = self.g.rng
        self.pool: list[V] = []
        self.consumed: set[str] = set()
        self.extra_outputs: list[V] = []
        self.lines: list[str] = []
        self.x: V | None = None            # the main norm's input (residual stream)
        self.norm_out: V | None = None     # the main norm's output
        self.cond: str | None = None       # the If condition input
        self.shapes: dict[str, list[int]] = {}

    # -- drawing ----------------------------------------------------------------------------------
    def choice(self, options):
        options = [o for o in options if str(o) not in AVOID] or list(options)
        return self.draw(st.sampled_from(options))

    def flag(self) -> bool:
        return self.draw(st.booleans())

    def note(self, text: str):
        self.lines.append(text)

    @property
    def opset(self) -> int:
        return self.g.opset

    def attrs(self, op_type: str, **optional) -> dict:
        """Attributes whose value is the op's schema default or does not change the shapes the
        generator computes: with `absent` set each is left out half the time (onnxruntime then
        applies the schema default for the model's opset and domain)."""
        if not self.absent:
            return optional
        kept = {k: v for k, v in optional.items() if self.flag()}
        gone = [k for k in optional if k not in kept]
        if gone:
            self.note(f"  {op_type} without {', '.join(gone)} (schema default)")
        return kept

    def axis(self, axis: int, rank: int) -> int:
        """`axis` as an op attribute: negative half the time where the opset allows (≥ 11)."""
        axis %= rank
        return axis - rank if self.opset >= 11 and self.flag() else axis

    # -- values -----------------------------------------------------------------------------------
    def op(self, op_type, inputs, shape, dtype, domain="", n_out=1, **attrs):
        names = [i.name if isinstance(i, V) else i for i in inputs]
        for i in inputs:
            if isinstance(i, V):
                self.consumed.add(i.name)
        out = self.g.op(op_type, names, n_out=n_out, domain=domain, **attrs)
        if n_out == 1:
            return V(out, tuple(shape), np.dtype(dtype))
        return [V(o, tuple(s), np.dtype(dtype)) for o, s in zip(out, shape)]

    def const(self, array, dtype, hint="c", as_node=False) -> V:
        array = np.asarray(array).astype(dtype)
        return V(self.g.const(array, hint, as_node=as_node), array.shape, np.dtype(dtype))

    def weight(self, n, k, dtype, hint="W") -> V:
        return self.const(self.rng.standard_normal((n, k)) / np.sqrt(n), dtype, hint)

    def pick(self, accept=lambda v: True, avoid: V | None = None) -> V | None:
        """A value of the pool (newest first: shrinks toward the newest)."""
        options = [v for v in reversed(self.pool) if accept(v) and v is not avoid]
        if not options:
            return None
        return options[self.draw(st.integers(0, len(options) - 1))]

    def add(self, *values: V):
        self.pool.extend(values)


# -- norms ------------------------------------------------------------------------------------------

AXES_INPUT_SINCE = {"ReduceSum": 13}     # the other Reduce* ops take axes as an input from 18


def reduce_op(f: Fuzz, op_type: str, v: V, axes, keepdims=1) -> V:
    """A Reduce* op in the model's opset form: axes as an input (ReduceSum ≥ 13, others ≥ 18)
    or an attribute (non-negative below 11); `axes` None: no axes at all (every axis reduced);
    keepdims=1 may be absent (its default)."""
    norm_axes = list(range(v.rank)) if axes is None else sorted(a % v.rank for a in axes)
    shape = [1 if i in norm_axes else d for i, d in enumerate(v.shape)] if keepdims else \
        [d for i, d in enumerate(v.shape) if i not in norm_axes]
    attrs = f.attrs(op_type, keepdims=1) if keepdims else {"keepdims": 0}
    if axes is None:
        return f.op(op_type, [v], shape, v.dtype, **attrs)
    axes = list(axes) if f.opset >= 11 else [a % v.rank for a in axes]
    if f.opset >= AXES_INPUT_SINCE.get(op_type, 18):
        return f.op(op_type, [v, f.const(np.array(axes, np.int64), np.int64, "axes")], shape, v.dtype, **attrs)
    return f.op(op_type, [v], shape, v.dtype, axes=axes, **attrs)


def reduce_mean(f: Fuzz, v: V, axes, keepdims=1) -> V:
    """ReduceMean over `axes`; over every axis the axes are sometimes left out (absent: all)."""
    if f.absent and sorted(a % v.rank for a in axes) == list(range(v.rank)) and f.flag():
        f.note("  ReduceMean without axes (every axis)")
        axes = None
    return reduce_op(f, "ReduceMean", v, axes, keepdims)


def broadcast(a, b):
    return tuple(np.broadcast_shapes(tuple(a), tuple(b)))


def eps_add(f: Fuzz, ms: V) -> V:
    """[Add ε]: none, scalar, shape [1], shape [1]*rank (or rank+1), either operand order."""
    form = f.choice(["scalar", "none", "[1]", "[1]*rank", "[1]*(rank+1)", "eps-first", "node"])
    f.note(f"  eps {form}")
    if form == "none":
        return ms
    shape = {"[1]": (1,), "[1]*rank": (1,) * ms.rank, "[1]*(rank+1)": (1,) * (ms.rank + 1)}.get(form, ())
    eps = f.const(np.full(shape, f.choice([1e-5, 1e-6, 1e-3]), np.float64), ms.dtype, "eps", as_node=form == "node")
    out_shape = broadcast(ms.shape, shape)
    return f.op("Add", [eps, ms] if form == "eps-first" else [ms, eps], out_shape, ms.dtype)


def gain_mul(f: Fuzz, y: V, n: int, dtype) -> V:
    """[Mul gain]: none, left, right, a Constant node, Gemma's 1+w, a bf16/fp16-stored gain + Cast."""
    form = f.choice(["right", "left", "none", "node", "one_plus", "fp16_cast"] + (["bf16_cast"] if f.opset >= 13 else []))
    f.note(f"  gain {form}")
    if form == "none":
        return y
    g = (1.0 + 0.3 * f.rng.standard_normal(n))
    if form == "one_plus":
        w = f.const(g - 1, dtype, "w")
        gv = f.op("Add", [f.const(np.array(1.0), dtype, "one"), w], (n,), dtype)
    elif form in ("bf16_cast", "fp16_cast"):
        stored = f.const(g, BF16 if form == "bf16_cast" else F16, "gain")
        gv = f.op("Cast", [stored], (n,), dtype, to=elem(dtype))
    else:
        gv = f.const(g, dtype, "gain", as_node=form == "node")
    return f.op("Mul", [gv, y] if form == "left" else [y, gv], y.shape, dtype)


def norm_rms(f: Fuzz, x: V) -> V:
    """Decomposed RMSNorm: [Cast to fp32] → Pow(x,2) (exponent scalar or shape [1]) | Mul(x,x)
    → ReduceMean (last axis, or wrong axes) → [Add ε] → Sqrt → Reciprocal + Mul(x,·) | Div(1,·)
    + Mul | Div(x,·) → [Cast back] → [gain]."""
    compute = F32 if x.dtype in (F16, BF16) and f.flag() else x.dtype
    xin = f.op("Cast", [x], x.shape, compute, to=elem(compute)) if compute != x.dtype else x
    square = f.choice(["pow", "mul", "pow[1]", "pow_f32_exp"])
    axes = f.choice([[-1], [x.rank - 1], "all", [-2], [-2, -1]] if x.rank > 1 else [[-1]])
    axes = list(range(x.rank)) if axes == "all" else axes
    inverse = f.choice(["reciprocal", "div_x", "div_one", "reciprocal_left"])
    f.note(f"norm rms: compute {compute.name}, square {square}, axes {axes}, inverse {inverse}")
    if square == "mul":
        sq = f.op("Mul", [xin, xin], xin.shape, compute)
    else:
        e_shape = (1,) if square == "pow[1]" else ()
        e_dtype = F32 if square == "pow_f32_exp" and f.opset >= 12 else compute    # Pow < 12: one type
        sq = f.op("Pow", [xin, f.const(np.full(e_shape, 2.0), e_dtype, "two")], xin.shape, compute)
    ms = eps_add(f, reduce_mean(f, sq, axes))
    root = f.op("Sqrt", [ms], ms.shape, compute)
    shape = broadcast(xin.shape, root.shape)
    if inverse == "div_x":
        y = f.op("Div", [xin, root], shape, compute)
    else:
        inv = f.op("Reciprocal", [root], root.shape, compute) if inverse.startswith("reciprocal") else \
            f.op("Div", [f.const(np.array(1.0), compute, "one"), root], root.shape, compute)
        y = f.op("Mul", [inv, xin] if inverse == "reciprocal_left" else [xin, inv], shape, compute)
    if compute != x.dtype:
        y = f.op("Cast", [y], y.shape, x.dtype, to=elem(x.dtype))
    return gain_mul(f, y, x.shape[-1], x.dtype)


def norm_layer(f: Fuzz, x: V) -> V:
    """Decomposed LayerNorm: μ = ReduceMean(x) (last axis or wrong axes), d = x − μ,
    ReduceMean(Pow(d,2) | Mul(d,d)) (last axis or wrong) → Add ε → Sqrt → Div(d,·) |
    Mul(d, Reciprocal) → [γ] → [β]."""
    axes_mean = f.choice([[-1], "all", [-2], [x.rank - 1]] if x.rank > 1 else [[-1]])
    axes_var = f.choice([[-1], [-2]] if x.rank > 1 else [[-1]])
    axes_mean = list(range(x.rank)) if axes_mean == "all" else axes_mean
    square, inverse = f.choice(["pow", "mul"]), f.choice(["div", "reciprocal"])
    f.note(f"norm layer: mean axes {axes_mean}, var axes {axes_var}, square {square}, inverse {inverse}")
    mean = reduce_mean(f, x, axes_mean)
    d = f.op("Sub", [x, mean], x.shape, x.dtype)
    sq = f.op("Mul", [d, d], d.shape, x.dtype) if square == "mul" else \
        f.op("Pow", [d, f.const(np.array(2.0), x.dtype, "two")], d.shape, x.dtype)
    var = reduce_mean(f, sq, axes_var)
    root = f.op("Sqrt", [f.op("Add", [var, f.const(np.array(1e-5), x.dtype, "eps")], var.shape, x.dtype)],
                var.shape, x.dtype)
    y = f.op("Div", [d, root], x.shape, x.dtype) if inverse == "div" else \
        f.op("Mul", [d, f.op("Reciprocal", [root], root.shape, x.dtype)], x.shape, x.dtype)
    n = x.shape[-1]
    if f.flag():
        y = f.op("Mul", [y, f.const(1 + 0.3 * f.rng.standard_normal(n), x.dtype, "gamma")], y.shape, x.dtype)
        f.note("  γ")
    if f.flag():
        y = f.op("Add", [y, f.const(0.2 * f.rng.standard_normal(n), x.dtype, "beta")], y.shape, x.dtype)
        f.note("  β")
    return y


def norm_dyt(f: Fuzz, x: V) -> V:
    """DyT: Tanh(Mul(x, α)) → [Mul g] → [Add β]."""
    n = x.shape[-1]
    alpha = f.const(np.array(0.7), x.dtype, "alpha")
    t = f.op("Tanh", [f.op("Mul", [x, alpha] if f.flag() else [alpha, x], x.shape, x.dtype)], x.shape, x.dtype)
    b = f.flag()
    f.note(f"norm dyt: β {b}")
    y = f.op("Mul", [f.const(1 + 0.3 * f.rng.standard_normal(n), x.dtype, "g"), t], x.shape, x.dtype)
    if b:
        y = f.op("Add", [y, f.const(0.2 * f.rng.standard_normal(n), x.dtype, "b")], x.shape, x.dtype)
    return y


def norm_fused(f: Fuzz, x: V, form: str) -> V:
    """One-op norms: RMSNormalization (opset 23), SimplifiedLayerNormalization (ORT, ONNX domain),
    LayerNormalization (opset ≥ 17, with/without β), com.microsoft SkipSimplifiedLayerNormalization
    / SkipLayerNormalization (skip = a second input or a pool value; optional bias; residual
    output 3 used or not)."""
    n = x.shape[-1]
    gain = f.const(1 + 0.3 * f.rng.standard_normal(n), x.dtype, "gain")
    eps = f.choice([1e-5, 1e-6, 0.0])
    domain = "com.microsoft" if form.startswith("Skip") else ""
    f.note(f"norm {form} eps {eps}")
    inputs = [x]
    if form.startswith("Skip"):
        skip_name = f"skip{len(f.shapes)}"
        f.g.input(skip_name, [d if f.flag() else None for d in x.shape[:-1]] + [n], x.dtype)
        f.shapes[skip_name] = list(x.shape)
        inputs.append(V(skip_name, x.shape, x.dtype))
    inputs.append(gain)
    if form in ("LayerNormalization", "SkipLayerNormalization"):
        if f.flag():
            inputs.append(f.const(0.2 * f.rng.standard_normal(n), x.dtype, "beta"))
            f.note("  β")
        elif form == "SkipLayerNormalization":
            inputs.append("")
    if form.startswith("Skip") and f.flag():
        inputs.append(f.const(0.1 * f.rng.standard_normal(n), x.dtype, "bias"))
        f.note("  bias")
    attrs = {"epsilon": eps}
    if not form.startswith("Skip") and f.flag():
        attrs["axis"] = f.choice([-1, x.rank - 1])
    if not form.startswith("Skip") and f.absent:
        attrs["stash_type"] = 1
    attrs = f.attrs(form, **attrs)
    if form.startswith("Skip"):
        outs = f.op(form, inputs, [x.shape] * 4, x.dtype, domain=domain, n_out=4, **attrs)
        if f.flag():
            f.add(outs[3])          # the residual output feeds the chain
            f.note("  residual output used")
        return outs[0]
    return f.op(form, inputs, x.shape, x.dtype, domain=domain, **attrs)


NORM_FORMS = ["rms", "layer", "dyt", "RMSNormalization", "SimplifiedLayerNormalization",
              "LayerNormalization", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization"]


def norm(f: Fuzz, x: V, skip_allowed=True) -> V:
    """Any norm over the last axis of `x`, its form drawn among those the opset/dtype allow."""
    forms = ["rms", "layer", "dyt", "SimplifiedLayerNormalization"]
    if f.g.opset >= 23:
        forms.append("RMSNormalization")
    if f.g.opset >= 17:
        forms.append("LayerNormalization")
    if skip_allowed and x.dtype in (F32, F16) and x.rank <= 3:     # onnxruntime: 2-D or 3-D only
        forms += ["SkipSimplifiedLayerNormalization", "SkipLayerNormalization"]
    if f.absent:        # the one-op forms are the ones with optional attributes: drawn more often
        forms += [form for form in forms if form[0].isupper()] * 2
    form = f.choice(forms)
    if form == "rms":
        return norm_rms(f, x)
    if form == "layer":
        return norm_layer(f, x)
    if form == "dyt":
        return norm_dyt(f, x)
    return norm_fused(f, x, form)


# -- linears ---------------------------------------------------------------------------------------

def weight_ref(f: Fuzz, n: int, k: int, dtype, transposed: bool, shared: dict) -> V:
    """The weight as the linear reads it: an initializer, a Constant node, an initializer behind
    a Transpose, an fp16-stored initializer behind a Cast, or one shared with another linear."""
    form = f.choice(["init", "node", "transpose", "cast", "shared"])
    key = (n, k, transposed, np.dtype(dtype).name)
    if form == "shared" and key in shared:
        f.note("  weight shared")
        return shared[key]
    shape = (k, n) if transposed else (n, k)
    if form == "transpose":
        stored = f.weight(shape[1], shape[0], dtype)
        w = f.op("Transpose", [stored], shape, dtype, perm=[1, 0])
    elif form == "cast" and np.dtype(dtype) != F16:
        stored = f.const(f.rng.standard_normal(shape) / np.sqrt(n), F16, "W16")
        w = f.op("Cast", [stored], shape, dtype, to=elem(dtype))
    else:
        w = f.const(f.rng.standard_normal(shape) / np.sqrt(n), dtype, "W", as_node=form == "node")
    f.note(f"  weight {form}")
    shared[key] = w
    return w


def linear(f: Fuzz, y: V, k: int, shared: dict) -> V:
    """One projection of `y`: MatMul, MatMul + bias Add, Gemm (transB 0/1, bias, α/β; on a
    rank-2 view), FusedMatMul (transB, α); reached directly, through Identity, a same-type Cast,
    a row-merging Reshape, or (fp32) an autocast Cast to fp16 with an fp16 weight."""
    n = y.shape[-1]
    kind = f.choice(["MatMul", "Gemm", "MatMul+bias", "FusedMatMul"])
    path = f.choice(["direct", "identity", "reshape_rows", "autocast_fp16", "cast_same"])
    if kind == "Gemm":
        path = "reshape_rows" if y.rank != 2 else path
    if path == "autocast_fp16" and y.dtype != F32:
        path = "direct"
    f.note(f"linear {kind} k={k} path {path}")
    a = y
    if path == "identity":
        a = f.op("Identity", [y], y.shape, y.dtype)
    elif path == "cast_same":
        a = f.op("Cast", [y], y.shape, y.dtype, to=elem(y.dtype))
    elif path == "reshape_rows" and y.rank != 2:
        rows = int(np.prod(y.shape[:-1]))
        a = f.op("Reshape", [y, f.const(np.array([-1, n]), np.int64, "shape")], (rows, n), y.dtype)
    elif path == "autocast_fp16":
        a = f.op("Cast", [y], y.shape, F16, to=TensorProto.FLOAT16)
    dtype = a.dtype
    out_shape = a.shape[:-1] + (k,)
    if kind == "Gemm":
        trans_b = f.flag()
        w = weight_ref(f, n, k, dtype, trans_b, shared)
        inputs = [a, w]
        if f.flag() or f.opset < 11:        # C is required below opset 11
            inputs.append(f.const(0.1 * f.rng.standard_normal(k), dtype, "bias"))
        h = f.op("Gemm", inputs, out_shape, dtype, **trans_attrs(f, "Gemm", transB=trans_b),
                 **f.attrs("Gemm", alpha=f.choice([1.0, 0.5]), beta=f.choice([1.0, 2.0])))
    elif kind == "FusedMatMul":
        trans_b = f.flag()
        w = weight_ref(f, n, k, dtype, trans_b, shared)
        h = f.op("FusedMatMul", [a, w], out_shape, dtype, domain="com.microsoft",
                 **trans_attrs(f, "FusedMatMul", transB=trans_b), **f.attrs("FusedMatMul", alpha=f.choice([1.0, 0.5])))
    else:
        h = f.op("MatMul", [a, weight_ref(f, n, k, dtype, False, shared)], out_shape, dtype)
        if kind == "MatMul+bias":
            bias = f.const(0.1 * f.rng.standard_normal(k), dtype, "bias")
            h = f.op("Add", [h, bias] if f.flag() else [bias, h], out_shape, dtype)
    if path == "autocast_fp16" and f.flag():
        h = f.op("Cast", [h], h.shape, F32, to=TensorProto.FLOAT)
    return h


def trans_attrs(f: Fuzz, op_type: str, **flags) -> dict:
    """transA/transB: a 1 is always written, a 0 (the default) may be absent."""
    return {**f.attrs(op_type, **{k: 0 for k, v in flags.items() if not v}), **{k: 1 for k, v in flags.items() if v}}


def linears(f: Fuzz, y: V):
    """1–3 linears reading the norm output (widths: the same, 4, 8, 16 or 1); sometimes one more
    reader that is not a linear (graph output, residual Add), which must leave the site alone."""
    shared: dict = {}
    first_k = f.choice([8, 4, 16, 1])
    count = f.draw(st.integers(1, 3))
    for i in range(count):
        k = first_k if i == 0 else f.choice(["same", 8, 4, 16, 1])
        f.add(linear(f, y, first_k if k == "same" else k, shared))
    other = f.choice(["none"] * 6 + ["output", "residual_add"])
    if other == "output":
        f.note("norm output is also a graph output")
        f.extra_outputs.append(y)
    elif other == "residual_add" and f.x is not None and f.x.shape == y.shape and f.x.dtype == y.dtype:
        f.note("norm output also read by a residual Add")
        f.add(f.op("Add", [y, f.x], y.shape, y.dtype))


# -- downstream op families ------------------------------------------------------------------------

def fam_unary(f: Fuzz, v: V):
    """Relu, LeakyRelu, Neg, Abs, Sigmoid, Tanh, Identity."""
    kind = f.choice(["Relu", "Neg", "LeakyRelu", "Abs", "Sigmoid", "Tanh", "Identity"])
    f.note(f"{kind}")
    if kind == "LeakyRelu" and v.dtype == F16 and f.opset < 16:
        kind = "Relu"       # onnxruntime CPU: no fp16 LeakyRelu before opset 16
    attrs = f.attrs(kind, alpha=0.01) if kind == "LeakyRelu" else {}
    f.add(f.op(kind, [v], v.shape, v.dtype, **attrs))


def activation(f: Fuzz, v: V, kind: str) -> V:
    """x·σ(x) (SiLU, either order), QuickGELU x·σ(1.702x), GELU erf form
    ½x(1+erf(x/√2)), GELU tanh form, ReLU, ReLU², identity."""
    d = v.dtype
    if kind == "silu":
        s = f.op("Sigmoid", [v], v.shape, d)
        return f.op("Mul", [v, s] if f.flag() else [s, v], v.shape, d)
    if kind == "quick_gelu":
        s = f.op("Sigmoid", [f.op("Mul", [v, f.const(np.array(1.702), d)], v.shape, d)], v.shape, d)
        return f.op("Mul", [v, s], v.shape, d)
    if kind == "gelu_erf" and d != F64:        # onnxruntime CPU has no double Erf
        e = f.op("Erf", [f.op("Div", [v, f.const(np.array(math.sqrt(2)), d)], v.shape, d)], v.shape, d)
        half = f.op("Mul", [v, f.const(np.array(0.5), d)], v.shape, d)
        return f.op("Mul", [half, f.op("Add", [e, f.const(np.array(1.0), d)], v.shape, d)], v.shape, d)
    if kind in ("gelu_tanh", "gelu_erf"):
        cube = f.op("Pow", [v, f.const(np.array(3.0), d)], v.shape, d)
        inner = f.op("Add", [v, f.op("Mul", [cube, f.const(np.array(0.044715), d)], v.shape, d)], v.shape, d)
        t = f.op("Tanh", [f.op("Mul", [inner, f.const(np.array(math.sqrt(2 / math.pi)), d)], v.shape, d)], v.shape, d)
        one_t = f.op("Add", [t, f.const(np.array(1.0), d)], v.shape, d)
        return f.op("Mul", [f.op("Mul", [v, f.const(np.array(0.5), d)], v.shape, d), one_t], v.shape, d)
    if kind == "relu":
        return f.op("Relu", [v], v.shape, d)
    if kind == "relu2":
        r = f.op("Relu", [v], v.shape, d)
        return f.op("Mul", [r, r], v.shape, d)
    return v


def fam_activation(f: Fuzz, v: V):
    """A gated activation x·f(x) on one value: SiLU, QuickGELU, GELU (erf, tanh)."""
    kind = f.choice(["silu", "gelu_erf", "quick_gelu", "gelu_tanh"])
    f.note(f"activation {kind}")
    f.add(activation(f, v, kind))


def fam_glu(f: Fuzz, v: V):
    """GLU product act(gate) ⊙ up, gate and up of the same shape (another linear's output when
    there is one): SwiGLU, GeGLU, ReGLU, bilinear, squared ReLU."""
    up = f.pick(lambda w: w.shape == v.shape and w.dtype == v.dtype, avoid=v) or v
    kind = f.choice(["silu", "gelu_erf", "relu", "none", "relu2"])
    f.note(f"glu {kind}")
    gate = activation(f, v, kind)
    f.add(f.op("Mul", [gate, up] if f.flag() else [up, gate], v.shape, v.dtype))


def fam_cast(f: Fuzz, v: V):
    """Cast up and down: fp32→fp16→fp32, fp32→bf16→fp32, fp32→fp64(→fp32), fp32→fp16 (stays
    fp16), fp16→fp32, fp64→fp32."""
    options = {F32: ["fp16_roundtrip", "fp64", "fp64_roundtrip", "to_fp16"] + (["bf16_roundtrip"] if f.opset >= 13 else []),
               F16: ["to_fp32", "fp32_roundtrip"], F64: ["to_fp32", "fp32_roundtrip"]}.get(v.dtype, ["to_fp32"])
    kind = f.choice(options)
    f.note(f"cast {kind} (from {v.dtype.name})")
    mid = {"fp16_roundtrip": F16, "fp64": F64, "fp64_roundtrip": F64, "to_fp16": F16, "bf16_roundtrip": BF16,
           "to_fp32": F32, "fp32_roundtrip": F32}[kind]
    w = f.op("Cast", [v], v.shape, mid, to=elem(mid))
    if kind.endswith("roundtrip"):
        w = f.op("Cast", [w], v.shape, v.dtype, to=elem(v.dtype))
    f.add(w)


def fam_transpose(f: Fuzz, v: V):
    """Transpose by a random permutation (row axes may land on the last axis), or no perm;
    then maybe a MatMul by a constant."""
    if v.rank < 2:
        return
    perm = f.draw(st.permutations(range(v.rank)))
    default = f.flag() and f.flag()
    f.note(f"Transpose perm {'default' if default else list(perm)}")
    if default:
        f.add(f.op("Transpose", [v], v.shape[::-1], v.dtype))
    else:
        f.add(f.op("Transpose", [v], [v.shape[p] for p in perm], v.dtype, perm=list(perm)))
    then_project(f, f.pool[-1])


def fam_reshape(f: Fuzz, v: V):
    """Reshape: keep rows and split the last axis into heads, merge the last two axes, merge the
    rows, split the rows, drop a width-1 last axis, add one, move axes (reversed dims), flatten;
    the target with concrete dims or with 0 (copy) / −1 (infer); then maybe a MatMul by a
    constant."""
    s = list(v.shape)
    shapes = {      # every kind that applies to this shape -> the new shape
        "split_last": s[:-1] + [2, s[-1] // 2] if s[-1] % 2 == 0 and s[-1] >= 2 else None,
        "merge_rows": [int(np.prod(s[:-1])), s[-1]] if v.rank >= 3 else None,
        "merge_last2": s[:-2] + [s[-2] * s[-1]] if v.rank >= 2 else None,
        "split_rows": [2, s[0] // 2] + s[1:] if s[0] % 2 == 0 and s[0] >= 4 else None,
        "drop_unit": s[:-1] if v.rank >= 2 and s[-1] == 1 else None,
        "add_unit": s + [1] if v.rank <= 4 else None,
        "move_axes": s[::-1] if v.rank >= 2 and s != s[::-1] else None,
        "flatten": [int(np.prod(s))],
    }
    # dropping a width-1 axis moves a row axis last: drawn more often where it applies
    kind = f.choice([k for k, shape in shapes.items() if shape is not None for _ in range(4 if k == "drop_unit" else 1)])
    new = shapes[kind]
    target = list(new)
    style = f.choice(["concrete", "zeros", "minus_one"])
    if style == "zeros":        # 0 copies the input's dim where it is unchanged
        target = [0 if i < len(s) and new[i] == s[i] else d for i, d in enumerate(new)]
    if style in ("zeros", "minus_one") and -1 not in target:
        free = [i for i, d in enumerate(target) if d != 0]
        if free:
            target[free[-1] if style == "minus_one" else free[0]] = -1
    f.note(f"Reshape {kind} {s} -> {new} (target {target})")
    f.add(f.op("Reshape", [v, f.const(np.array(target), np.int64, "shape")], new, v.dtype))
    then_project(f, f.pool[-1])


def slice_op(f: Fuzz, v: V, starts, ends, axes, steps=None, omit_axes=False) -> V:
    """Slice in the model's opset form: attributes starts/ends/axes below 10, inputs from 10
    (steps only there; negative axes from 11); `omit_axes`: no axes (the leading axes)."""
    out = list(v.shape)
    for s, e, a, k in zip(starts, ends, axes, steps or [1] * len(axes)):
        out[a % v.rank] = len(range(*slice(s, e, k).indices(v.shape[a % v.rank])))
    axes = list(axes) if f.opset >= 11 else [a % v.rank for a in axes]
    if f.opset < 10:
        attrs = dict(starts=list(starts), ends=list(ends)) | ({} if omit_axes else dict(axes=axes))
        return f.op("Slice", [v], out, v.dtype, **attrs)
    inputs = [v, f.const(np.array(starts), np.int64, "starts"), f.const(np.array(ends), np.int64, "ends")]
    if not omit_axes or steps:
        inputs.append(f.const(np.array(axes), np.int64, "axes"))
    if steps:
        inputs.append(f.const(np.array(steps), np.int64, "steps"))
    return f.op("Slice", inputs, out, v.dtype)


def fam_slice(f: Fuzz, v: V):
    """Slice along any axis (positive or negative index; axes given, or omitted for axis 0;
    step 1 or 2), in the opset's form (attributes below 10)."""
    axes = [i for i, d in enumerate(v.shape) if d >= 2]
    if not axes:
        return
    axis = f.choice(axes)
    dim = v.shape[axis]
    start = f.draw(st.integers(0, dim - 1))
    end = f.draw(st.integers(start + 1, dim))
    step = f.choice([1, 2]) if f.opset >= 10 else 1
    negative = f.flag()
    omit_axes = axis == 0 and step == 1 and f.flag()
    ax = axis - v.rank if negative else axis
    f.note(f"Slice axis {ax} [{start}:{end}:{step}]{' (no axes)' if omit_axes else ''}")
    f.add(slice_op(f, v, [start], [end], [ax], [step] if step != 1 else None, omit_axes))


def split_op(f: Fuzz, v: V, axis: int, sizes: list[int]) -> list[V]:
    """Split in the model's opset form: sizes as the `split` attribute below 13 (absent for
    equal parts: its default), an input from 13 (absent for equal parts below 18), or
    num_outputs from 18; axis 0 may be absent (its default)."""
    shapes = [tuple(size if i == axis % v.rank else d for i, d in enumerate(v.shape)) for size in sizes]
    ax = f.axis(axis, v.rank)
    attrs = f.attrs("Split", axis=ax) if ax == 0 else {"axis": ax}
    equal = len(set(sizes)) == 1
    inputs = [v]
    if f.opset < 13:
        attrs |= f.attrs("Split", split=list(sizes)) if equal else {"split": list(sizes)}
    elif equal and f.opset >= 18 and f.flag():
        attrs["num_outputs"] = len(sizes)
    elif not (equal and f.opset < 18 and f.absent and f.flag()):
        inputs.append(f.const(np.array(sizes), np.int64, "split"))
    return f.op("Split", inputs, shapes, v.dtype, n_out=len(sizes), **attrs)


def fam_split(f: Fuzz, v: V):
    """Split into two parts along any axis, in the opset's form."""
    axes = [i for i, d in enumerate(v.shape) if d >= 2]
    if not axes:
        return
    axis = f.choice(axes)
    dim = v.shape[axis]
    first = dim // 2 if dim % 2 == 0 and f.flag() else f.draw(st.integers(1, dim - 1))
    f.note(f"Split axis {axis} [{first}, {dim - first}]")
    f.add(*split_op(f, v, axis, [first, dim - first]))


def fam_concat(f: Fuzz, v: V):
    """Concat along any axis with itself, another pool value of matching shape, or a constant."""
    axis = f.choice(list(range(v.rank)))
    other_kind = f.choice(["self", "pool", "const"])

    def fits(w: V) -> bool:
        return w.dtype == v.dtype and w.rank == v.rank and all(
            a == b for i, (a, b) in enumerate(zip(w.shape, v.shape)) if i != axis)
    w = v
    if other_kind == "pool":
        w = f.pick(fits, avoid=v) or v
    elif other_kind == "const":
        shape = list(v.shape)
        shape[axis] = 1
        w = f.const(f.rng.standard_normal(shape), v.dtype, "cat")
    out = list(v.shape)
    out[axis] += w.shape[axis]
    ax = f.axis(axis, v.rank)
    f.note(f"Concat axis {ax} with {other_kind}")
    f.add(f.op("Concat", [v, w] if f.flag() else [w, v], out, v.dtype, axis=ax))


def fam_pow(f: Fuzz, v: V):
    """Pow by 2, 3 or 1 (exponent a scalar or shape [1], in the value's dtype or fp32). (No
    fractional exponent: √ near 0 turns any rounding difference into a large relative one.)"""
    e = f.choice([2.0, 3.0, 1.0])
    shape = f.choice([(), (1,)])
    e_dtype = f.choice([v.dtype, F32]) if f.opset >= 12 else v.dtype     # Pow < 12: one type
    f.note(f"Pow {e} exponent shape {list(shape)} {np.dtype(e_dtype).name}")
    f.add(f.op("Pow", [v, f.const(np.full(shape, e), e_dtype, "exp")], v.shape, v.dtype))


def fam_const_arith(f: Fuzz, v: V):
    """Mul/Div/Add/Sub by a constant of a random broadcast shape: scalar, [1], [last], [1,last],
    per row [d₋₂, 1], the full shape, or with extra leading axes ([2,1,…,last], [1]*(rank+1));
    the constant on either side (Div: only as the divisor, positive)."""
    kind = f.choice(["Mul", "Add", "Div", "Sub"])
    shapes = {"scalar": (), "[1]": (1,), "last": (v.shape[-1],), "1,last": (1, v.shape[-1]),
              "rows": (v.shape[-2], 1) if v.rank >= 2 else (1,), "full": v.shape,
              "lead_axis": (2,) + (1,) * (v.rank - 1) + (v.shape[-1],), "ones_rank+1": (1,) * (v.rank + 1)}
    which = f.choice(list(shapes))
    shape = shapes[which]
    c = 0.5 + f.rng.random(shape) if kind == "Div" else f.rng.standard_normal(shape)
    const = f.const(c, v.dtype, "k")
    swap = kind != "Div" and f.flag()
    f.note(f"{kind} by const {which} {list(shape)}{' (const first)' if swap else ''}")
    f.add(f.op(kind, [const, v] if swap else [v, const], broadcast(v.shape, shape), v.dtype))


def fam_residual(f: Fuzz, v: V):
    """Residual Add: with the norm's input (the residual stream), another value of the same shape,
    or itself."""
    candidates = [w for w in ([f.x] if f.x is not None else []) if w.shape == v.shape and w.dtype == v.dtype]
    kind = f.choice(["stream", "pool", "self"])
    w = candidates[0] if kind == "stream" and candidates else \
        f.pick(lambda w: w.shape == v.shape and w.dtype == v.dtype, avoid=v) if kind == "pool" else None
    w = w or v
    f.note(f"residual Add with {kind if w is not v else 'self'}")
    f.add(f.op("Add", [v, w] if f.flag() else [w, v], v.shape, v.dtype))


def fam_rope(f: Fuzz, v: V):
    """RoPE rotate-half: Slice halves of the last axis, Concat(−x₂, x₁), x·cos + rot·sin
    (cos/sin per position [d₋₂, d], or [1, d], or the full shape)."""
    d = v.shape[-1]
    if d % 2 or v.rank < 2:
        return
    h = d // 2
    table = f.choice(["position", "one", "full"])
    shape = {"position": (v.shape[-2], d), "one": (1, d), "full": v.shape}[table]
    f.note(f"rope (tables {table} {list(shape)})")
    theta = f.rng.uniform(0, 2 * np.pi, shape)
    cos, sin = f.const(np.cos(theta), v.dtype, "cos"), f.const(np.sin(theta), v.dtype, "sin")
    half = list(v.shape[:-1]) + [h]
    x1 = slice_op(f, v, [0], [h], [-1])
    x2 = slice_op(f, v, [h], [d], [-1])
    rot = f.op("Concat", [f.op("Neg", [x2], half, v.dtype), x1], v.shape, v.dtype, axis=f.axis(-1, v.rank))
    out_shape = broadcast(v.shape, shape)
    f.add(f.op("Add", [f.op("Mul", [v, cos], out_shape, v.dtype), f.op("Mul", [rot, sin], out_shape, v.dtype)],
               out_shape, v.dtype))


def fam_down_proj(f: Fuzz, v: V):
    """A second linear by a constant (the down projection): MatMul by [last, m], Gemm on a
    rank-2 value (transB, bias), FusedMatMul."""
    k = v.shape[-1]
    m = f.choice([4, 8, 1])
    kind = f.choice(["MatMul", "Gemm", "FusedMatMul"])
    if kind == "Gemm" and v.rank != 2:
        kind = "MatMul"
    f.note(f"down projection {kind} {k}->{m}")
    out = v.shape[:-1] + (m,)
    if kind == "Gemm":
        t = f.flag()
        w = f.weight(m, k, v.dtype) if t else f.weight(k, m, v.dtype)
        bias = f.flag() or f.opset < 11         # C is required below opset 11
        inputs = [v, w] + ([f.const(0.1 * f.rng.standard_normal(m), v.dtype, "bias")] if bias else [])
        f.add(f.op("Gemm", inputs, out, v.dtype, **trans_attrs(f, "Gemm", transB=t)))
    elif kind == "FusedMatMul":
        f.add(f.op("FusedMatMul", [v, f.weight(k, m, v.dtype)], out, v.dtype, domain="com.microsoft",
                   **f.attrs("FusedMatMul", alpha=f.choice([1.0, 0.5]))))
    else:
        f.add(f.op("MatMul", [v, f.weight(k, m, v.dtype)], out, v.dtype))


def fam_attention(f: Fuzz, v: V):
    """MatMul of two activations: scores = q·kᵀ (k another value of q's shape, or q), [Softmax],
    [· v]."""
    if v.rank < 2:
        return
    k = f.pick(lambda w: w.shape == v.shape and w.dtype == v.dtype, avoid=v) or v
    perm = list(range(v.rank - 2)) + [v.rank - 1, v.rank - 2]
    kt = f.op("Transpose", [k], [k.shape[p] for p in perm], v.dtype, perm=perm)
    scores_shape = v.shape[:-1] + (v.shape[-2],)
    scores = f.op("MatMul", [v, kt], scores_shape, v.dtype)
    softmax, times_v = f.flag(), f.flag()
    f.note(f"attention q·kᵀ{' softmax' if softmax else ''}{' ·v' if times_v else ''}")
    if softmax:
        scores = f.op("Softmax", [scores], scores_shape, v.dtype, **f.attrs("Softmax", axis=f.axis(-1, v.rank)))
    if times_v:
        val = f.pick(lambda w: w.rank == v.rank and w.shape[:-1] == v.shape[:-1] and w.dtype == v.dtype) or v
        scores = f.op("MatMul", [scores, val], v.shape[:-1] + (val.shape[-1],), v.dtype)
    f.add(scores)


def fam_softmax(f: Fuzz, v: V):
    """Softmax along any axis (the attribute may be absent: −1 from opset 13, 1 — over the
    flattened trailing axes — below)."""
    axis = f.axis(f.choice(list(range(-1, -v.rank - 1, -1))), v.rank)
    f.note(f"Softmax axis {axis}")
    f.add(f.op("Softmax", [v], v.shape, v.dtype, **f.attrs("Softmax", axis=axis)))


def fam_norm(f: Fuzz, v: V):
    """A following norm (norm → linear → norm; QK-norm per head: Reshape to [..., 2, d/2], norm,
    Reshape back), then optionally linears reading it."""
    if v.shape[-1] < 2:
        return
    heads = v.shape[-1] % 2 == 0 and f.flag()
    f.note(f"following norm{' per head' if heads else ''}:")
    x = v
    if heads:
        x = f.op("Reshape", [v, f.const(np.array(list(v.shape[:-1]) + [2, v.shape[-1] // 2]), np.int64, "shape")],
                 v.shape[:-1] + (2, v.shape[-1] // 2), v.dtype)
    y = norm(f, x, skip_allowed=False)
    if heads:
        y = f.op("Reshape", [y, f.const(np.array(list(v.shape)), np.int64, "shape")], v.shape, v.dtype)
    if f.choice([True, True, True, False]):
        f.add(linear(f, y, f.choice([8, 4]), {}))
    else:
        f.add(y)


def fam_if(f: Fuzz, v: V):
    """An If whose branches read outer values without listing them as inputs: `v` (e.g. a
    deferred linear output) in either branch, or the norm output itself through a MatMul."""
    if f.cond is None:
        f.cond = f.g.input("cond", [], TensorProto.BOOL)
        f.shapes["cond"] = []
    reads = f.choice(["value", "norm_output"])
    if reads == "norm_output" and f.norm_out is not None:
        y = f.norm_out
        k = f.choice([8, 4])
        w1, w2 = f.weight(y.shape[-1], k, y.dtype), f.weight(y.shape[-1], k, y.dtype)
        shape, dtype = y.shape[:-1] + (k,), y.dtype
        bodies = []
        for w, act in ((w1, "Relu"), (w2, "Identity")):
            with f.g.subgraph() as nodes:
                out = f.g.op(act, [f.g.op("MatMul", [y.name, w.name])])
            bodies.append(helper.make_graph(nodes, f.g.name("branch"), [],
                                            [vinfo(out, dtype, len(shape))]))
        f.consumed.add(y.name)
    else:
        shape, dtype = v.shape, v.dtype
        c = f.const(np.array(2.0), dtype, "k")
        bodies = []
        for kind in (f.choice(["Relu", "Mul", "Identity"]), f.choice(["Neg", "Mul", "Abs"])):
            with f.g.subgraph() as nodes:
                out = f.g.op(kind, [v.name, c.name] if kind == "Mul" else [v.name])
            bodies.append(helper.make_graph(nodes, f.g.name("branch"), [],
                                            [vinfo(out, dtype, len(shape))]))
        f.consumed.add(v.name)
    f.note(f"If reading the {reads} from outer scope")
    f.add(f.op("If", [f.cond], shape, dtype, then_branch=bodies[0], else_branch=bodies[1]))


def fam_loop(f: Fuzz, v: V):
    """A Loop (2 iterations) whose body reads an outer value: acc += c·v (or += norm_out·W), and
    a scan output Relu(v) stacked on a new leading axis."""
    reads = f.choice(["value", "norm_output"])
    use_norm = reads == "norm_output" and f.norm_out is not None
    d = f.norm_out.dtype if use_norm else v.dtype
    if use_norm:
        y = f.norm_out
        w = f.weight(y.shape[-1], f.choice([8, 4]), d)
        shape = y.shape[:-1] + (w.shape[-1],)
    else:
        shape = v.shape
    acc0 = f.const(np.zeros(shape), d, "acc0")
    c = f.const(np.array(0.5), d, "k")
    scan = f.flag() and not use_norm
    with f.g.subgraph() as nodes:
        it, cin, acc = f.g.name("iter"), f.g.name("cond_in"), f.g.name("acc_in")
        term = f.g.op("MatMul", [f.norm_out.name, w.name]) if use_norm else f.g.op("Mul", [v.name, c.name])
        acc_out = f.g.op("Add", [acc, term])
        cout = f.g.op("Identity", [cin])
        outs = [cout, acc_out] + ([f.g.op("Relu", [v.name])] if scan else [])
    body = helper.make_graph(
        nodes, f.g.name("body"),
        [helper.make_tensor_value_info(it, TensorProto.INT64, []), helper.make_tensor_value_info(cin, TensorProto.BOOL, []),
         vinfo(acc, d, len(shape))],
        [helper.make_tensor_value_info(cout, TensorProto.BOOL, []),
         vinfo(acc_out, d, len(shape))]
        + ([vinfo(outs[2], d, v.rank)] if scan else []))
    f.consumed.add(f.norm_out.name if use_norm else v.name)
    f.note(f"Loop reading the {'norm output' if use_norm else 'value'} from outer scope{' + scan output' if scan else ''}")
    trip = f.const(np.array(2), np.int64, "trip")
    true = f.const(np.array(True), np.bool_, "true")    # (the reference evaluator runs no iteration without it)
    if scan:
        f.add(*f.op("Loop", [trip, true, acc0], [shape, (2,) + v.shape], d, n_out=2, body=body))
    else:
        f.add(f.op("Loop", [trip, true, acc0], shape, d, body=body))


def fam_function(f: Fuzz, v: V):
    """A call to a model-local function: SiLU, a projection MatMul(x, W) with W passed in, a
    scale by a Constant inside the function, or a whole RMSNorm (the rewriter cannot look
    inside) followed by a linear."""
    kind = f.choice(["LocalSiLU", "LocalProj", "LocalScale", "LocalRMSNorm"])
    f.note(f"local function {kind}")
    if kind not in f.g.functions:
        f.g.functions[kind] = local_function(kind, f.g.opset)
    if kind == "LocalProj":
        w = f.weight(v.shape[-1], 4, v.dtype)
        f.add(f.op(kind, [v, w], v.shape[:-1] + (4,), v.dtype, domain=LOCAL))
    elif kind == "LocalRMSNorm":
        y = f.op(kind, [v], v.shape, v.dtype, domain=LOCAL)
        f.add(f.op("MatMul", [y, f.weight(v.shape[-1], 4, v.dtype)], v.shape[:-1] + (4,), v.dtype))
    else:
        f.add(f.op(kind, [v], v.shape, v.dtype, domain=LOCAL))


def local_function(kind: str, opset: int) -> onnx.FunctionProto:
    mk = helper.make_node
    if kind == "LocalSiLU":
        nodes = [mk("Sigmoid", ["x"], ["s"]), mk("Mul", ["x", "s"], ["y"])]
        inputs = ["x"]
    elif kind == "LocalProj":
        nodes = [mk("MatMul", ["x", "w"], ["y"])]
        inputs = ["x", "w"]
    elif kind == "LocalScale":
        nodes = [mk("Constant", [], ["c"], value_float=1.5), mk("CastLike", ["c", "x"], ["cl"]),
                 mk("Mul", ["x", "cl"], ["y"])]
        inputs = ["x"]
    else:   # RMSNorm without gain, ε = 1e-5
        reduce = mk("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1) if opset >= 18 else \
            mk("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1)
        nodes = [mk("Mul", ["x", "x"], ["sq"]), mk("Constant", [], ["axes"], value_ints=[-1]), reduce,
                 mk("Constant", [], ["e"], value_float=1e-5), mk("CastLike", ["e", "ms"], ["el"]),
                 mk("Add", ["ms", "el"], ["mse"]), mk("Sqrt", ["mse"], ["r"]), mk("Div", ["x", "r"], ["y"])]
        inputs = ["x"]
    return helper.make_function(LOCAL, kind, inputs, ["y"], nodes, [helper.make_opsetid("", opset)])


def pad_op(f: Fuzz, v: V, pads: list[int], value: float, mode: str) -> V:
    """Pad in the model's opset form: attributes pads/value/mode below 11, inputs pads and
    constant_value from 11; mode "constant" and value 0 (the defaults) may be absent."""
    out = [d + pads[i] + pads[i + v.rank] for i, d in enumerate(v.shape)]
    attrs = f.attrs("Pad", mode="constant") if mode == "constant" else {"mode": mode}
    if f.opset < 11:
        attrs |= (f.attrs("Pad", value=0.0) if value == 0 else {"value": float(value)}) if mode == "constant" else {}
        return f.op("Pad", [v], out, v.dtype, pads=list(pads), **attrs)
    inputs = [v, f.const(np.array(pads), np.int64, "pads")]
    if mode == "constant" and (value != 0 or not f.absent or f.flag()):
        inputs.append(f.const(np.array(value), v.dtype, "pad_value"))
    return f.op("Pad", inputs, out, v.dtype, **attrs)


def fam_pad(f: Fuzz, v: V):
    """Pad one axis (a row axis or the last) at either end: constant 0 or a nonzero value, edge
    or reflect, in the opset's form (pads/value attributes below 11); then maybe a MatMul."""
    axis = f.choice(list(range(v.rank)))
    before, after = f.choice([(1, 0), (0, 2), (1, 1)])
    mode = f.choice(["constant", "constant", "edge", "reflect"])
    if mode == "reflect" and max(before, after) >= v.shape[axis]:
        mode = "edge"
    value = f.choice([0.0, 1.5, -0.5]) if mode == "constant" else 0.0
    pads = [0] * (2 * v.rank)
    pads[axis], pads[axis + v.rank] = before, after
    f.note(f"Pad axis {axis} ({before}, {after}) {mode}{f' value {value}' if mode == 'constant' else ''}")
    f.add(pad_op(f, v, pads, value, mode))
    then_project(f, f.pool[-1])


REDUCES = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceSumSquare", "ReduceL2"]


def fam_reduce(f: Fuzz, v: V):
    """A Reduce* over one axis (a row axis or the last), two, or every axis (axes absent),
    keepdims 1 (maybe absent) or 0, in the opset's form (axes attribute below 13/18)."""
    kind = f.choice(REDUCES)
    which = f.choice(["one", "one", "two", "all"] if v.rank >= 2 else ["one", "all"])
    axes = None if which == "all" else [f.choice(list(range(v.rank)))] if which == "one" else \
        sorted(f.draw(st.permutations(range(v.rank)))[:2])
    keepdims = f.choice([1, 0])
    if axes is not None:
        axes = [f.axis(a, v.rank) for a in axes]
    f.note(f"{kind} axes {axes if axes is not None else '(absent: all)'} keepdims {keepdims}")
    out = reduce_op(f, kind, v, axes, keepdims)
    f.add(out)
    if out.rank >= 1 and out.shape[-1] >= 1:
        then_project(f, out)


def unsqueeze_op(f: Fuzz, v: V, axis: int) -> V:
    """Unsqueeze one axis: an attribute below 13, an input from 13."""
    shape = list(v.shape)
    shape.insert(axis % (v.rank + 1), 1)
    ax = f.axis(axis, v.rank + 1)
    if f.opset < 13:
        return f.op("Unsqueeze", [v], shape, v.dtype, axes=[ax])
    return f.op("Unsqueeze", [v, f.const(np.array([ax]), np.int64, "axes")], shape, v.dtype)


def squeeze_op(f: Fuzz, v: V, axis: int | None) -> V:
    """Squeeze one unit axis (an attribute below 13, an input from 13) or, axes absent,
    every unit axis."""
    if axis is None:
        return f.op("Squeeze", [v], [d for d in v.shape if d != 1], v.dtype)
    shape = [d for i, d in enumerate(v.shape) if i != axis % v.rank]
    ax = f.axis(axis, v.rank)
    if f.opset < 13:
        return f.op("Squeeze", [v], shape, v.dtype, axes=[ax])
    return f.op("Squeeze", [v, f.const(np.array([ax]), np.int64, "axes")], shape, v.dtype)


def fam_squeeze(f: Fuzz, v: V):
    """Unsqueeze a unit axis anywhere, then maybe Squeeze it back (by axis, or with axes absent:
    every unit axis) or a MatMul by a constant."""
    if v.rank >= 5:
        return
    axis = f.choice(list(range(v.rank + 1)))
    u = unsqueeze_op(f, v, axis)
    back = f.choice(["axis", "absent", "keep"])
    f.note(f"Unsqueeze axis {axis}, then {back}")
    if back == "keep":
        f.add(u)
        then_project(f, u)
    else:
        f.add(squeeze_op(f, u, axis if back == "axis" else None))


def fam_clip(f: Fuzz, v: V):
    """Clip: to [0, ∞) (a ReLU), [−0.5, 0.5], (−∞, 1], or no bounds; min/max attributes below
    11 (absent: ±∞), optional inputs from 11."""
    lo, hi = f.choice([(0.0, None), (-0.5, 0.5), (None, 1.0), (None, None)])
    f.note(f"Clip [{lo}, {hi}]")
    if f.opset < 11:
        attrs = {k: b for k, b in (("min", lo), ("max", hi)) if b is not None}
        f.add(f.op("Clip", [v], v.shape, v.dtype, **attrs))
        return
    inputs = [v, "" if lo is None else f.const(np.array(lo), v.dtype, "min"),
              "" if hi is None else f.const(np.array(hi), v.dtype, "max")]
    while inputs[-1] == "":
        inputs.pop()
    f.add(f.op("Clip", inputs, v.shape, v.dtype))


def row_move(f: Fuzz, y: V) -> V:
    """Between the norm and its linears, an op that moves rows (the γ fold may pass it) or
    does not (it must stop there), in the opset's form: Pad (zero or nonzero value, edge;
    a row axis or the normalized one), Slice, Split (one part to the linears, the other
    to a MatMul), Concat with itself, a Transpose of two row axes, an Unsqueeze."""
    kind = f.choice(["pad", "pad", "slice", "split", "concat", "transpose", "unsqueeze"])
    axes = [i for i, d in enumerate(y.shape) if d >= 2]
    axis = f.choice(list(range(y.rank))) if kind in ("pad", "concat", "unsqueeze") else f.choice(axes)
    f.note(f"row move {kind} axis {axis} between the norm and its linears:")
    if kind == "pad":
        before, after = f.choice([(1, 0), (0, 2), (1, 1)])
        mode = f.choice(["constant", "constant", "edge"])
        value = f.choice([0.0, 1.5]) if mode == "constant" else 0.0
        pads = [0] * (2 * y.rank)
        pads[axis], pads[axis + y.rank] = before, after
        f.note(f"  Pad ({before}, {after}) {mode}{f' value {value}' if mode == 'constant' else ''}")
        return pad_op(f, y, pads, value, mode)
    if kind == "slice":
        start = f.draw(st.integers(0, y.shape[axis] - 1))
        return slice_op(f, y, [start], [y.shape[axis]], [axis])
    if kind == "split":
        first = f.draw(st.integers(1, y.shape[axis] - 1))
        parts = split_op(f, y, axis, [first, y.shape[axis] - first])
        other = parts[1]        # read by a linear too (as a graph output it would stop the site)
        f.add(f.op("MatMul", [other, f.weight(other.shape[-1], 4, other.dtype)], other.shape[:-1] + (4,), other.dtype))
        return parts[0]
    if kind == "concat":
        out = list(y.shape)
        out[axis] *= 2
        return f.op("Concat", [y, y], out, y.dtype, axis=f.axis(axis, y.rank))
    if kind == "transpose" and y.rank >= 3:
        perm = [1, 0] + list(range(2, y.rank))
        return f.op("Transpose", [y], [y.shape[p] for p in perm], y.dtype, perm=perm)
    return unsqueeze_op(f, y, min(axis, y.rank - 1))


def fam_output(f: Fuzz, v: V):
    """Make an intermediate value a graph output too (it may still have readers)."""
    f.note("intermediate graph output")
    f.extra_outputs.append(v)


def then_project(f: Fuzz, v: V):
    """Half the time, a MatMul by a constant on the value just made (its last axis contracted):
    the combination that shows whether the algebra tracked which axis carries the scale."""
    if f.flag():
        f.note("  then MatMul by a constant")
        m = f.choice([v.shape[-1], 4])
        f.add(f.op("MatMul", [v, f.weight(v.shape[-1], m, v.dtype)], v.shape[:-1] + (m,), v.dtype))


FAMILIES = {
    "unary": fam_unary, "activation": fam_activation, "glu": fam_glu, "cast": fam_cast,
    "transpose": fam_transpose, "reshape": fam_reshape, "slice": fam_slice, "split": fam_split,
    "concat": fam_concat, "pow": fam_pow, "const_arith": fam_const_arith, "residual": fam_residual,
    "rope": fam_rope, "down_proj": fam_down_proj, "attention": fam_attention, "softmax": fam_softmax,
    "norm": fam_norm, "if": fam_if, "loop": fam_loop, "function": fam_function, "output": fam_output,
    "pad": fam_pad, "reduce": fam_reduce, "squeeze": fam_squeeze, "clip": fam_clip,
}
# how often each family is drawn (the ones the algebra has rules for, more often)
WEIGHTS = {"unary": 2, "activation": 2, "glu": 3, "cast": 3, "transpose": 3, "reshape": 3, "slice": 2,
           "split": 1, "concat": 2, "pow": 3, "const_arith": 3, "residual": 2, "rope": 2, "down_proj": 3,
           "attention": 2, "softmax": 1, "norm": 2, "if": 2, "loop": 2, "function": 1, "output": 1,
           "pad": 1, "reduce": 1, "squeeze": 1, "clip": 1}
MIN_OPSET = {"function": 15}    # CastLike


# -- the whole graph --------------------------------------------------------------------------------

def downstream(f: Fuzz, draw, chains: int = 3, length: int = 5, exclude=()):
    """One to `chains` chains of up to `length` ops each (no op family in `exclude`). A chain
    starts at a linear's output (or any value made so far) and each op reads what the previous
    one made; ops with two operands (GLU, residual, attention, concat) take their partner from
    everything made so far."""
    families = [k for k in FAMILIES if k not in AVOID and k not in exclude and f.opset >= MIN_OPSET.get(k, 0)
                for _ in range(WEIGHTS[k])]
    starts = list(f.pool)           # the linears' outputs
    chains = draw(st.lists(st.lists(st.sampled_from(families), max_size=length), min_size=1, max_size=chains))
    for chain in chains:
        if not chain:
            continue
        v = starts[draw(st.integers(0, len(starts) - 1))] if f.flag() or len(f.pool) == len(starts) else \
            f.pick(lambda w: w.rank > 0)
        f.note(f"chain from {v.name}:")
        for family in chain:
            if v.rank == 0:     # a Reduce* over every axis: nothing left to chain on
                break
            before = len(f.pool)
            FAMILIES[family](f, v)
            if len(f.pool) > before:
                v = f.pool[-1]


@dataclass
class Case:
    model: onnx.ModelProto
    recipe: str
    family: str = "base"

    def __repr__(self) -> str:
        return "Case(\n" + self.recipe + "\n)"


def begin(draw, family: str, opsets, dtypes=("fp32",) * 6 + ("fp16", "fp16", "fp64", "bf16_roundtrip"),
          ranks=(3, 2, 4), widths=(8, 16, 4), lead: dict | None = None, residual=True) -> tuple[Fuzz, V]:
    """The graph's input x (rank, width, dtype, dynamic or fixed dims; opset from `opsets`),
    maybe a residual Add before the norm."""
    opset = draw(st.sampled_from(list(opsets)))
    dtypes = [d for d in dtypes if d not in AVOID and (d != "bf16_roundtrip" or opset >= 13)] or ["fp32"]
    dtype_name = draw(st.sampled_from(dtypes))
    rank = draw(st.sampled_from(list(ranks)))
    n = draw(st.sampled_from(list(widths)))
    seed = draw(st.integers(0, 2**16))
    f = Fuzz(draw, opset, seed, family)
    lead = (lead or {2: [6], 3: [2, 3], 4: [2, 2, 3]})[rank]
    names = {2: ["rows"], 3: ["batch", "seq"], 4: ["batch", "heads", "seq"]}[rank]
    sig = [name if f.flag() else d for name, d in zip(names, lead)] + [n if not f.flag() or not f.flag() else "hidden"]
    in_dtype = {"fp32": F32, "fp16": F16, "fp64": F64, "bf16_roundtrip": F32}[dtype_name]
    f.note(f"[{family}] {dtype_name} x{sig} (runs as {lead + [n]}), opset {opset}, seed {seed}")
    x = V(f.g.input("x", sig, in_dtype), tuple(lead + [n]), in_dtype)
    f.shapes["x"] = lead + [n]
    if dtype_name == "bf16_roundtrip":     # x rounded to bf16 (onnxruntime CPU has no bf16 math)
        x = f.op("Cast", [f.op("Cast", [x], x.shape, BF16, to=TensorProto.BFLOAT16)], x.shape, F32,
                 to=TensorProto.FLOAT)
    if residual and f.flag() and f.flag():
        r = V(f.g.input("r", sig, in_dtype), x.shape, in_dtype)
        f.shapes["r"] = lead + [n]
        x = f.op("Add", [x, r], x.shape, x.dtype)
        f.note("residual Add before the norm")
    f.x = x
    return f, x


def finish(f: Fuzz, **metadata) -> Case:
    """Outputs at the leaves (and the extra outputs); the recipe, run-time shapes and any
    checker settings (differential's *_KEY) in the model's metadata."""
    leaves = [v for v in f.pool if v.name not in f.consumed]
    for v in dict.fromkeys(leaves + f.extra_outputs):
        f.g.output(v.name, v.dtype, v.shape)
    model = f.g.model()
    recipe = "\n".join(f.lines)
    onnx.helper.set_model_props(model, {diff.SHAPES_KEY: json.dumps(f.shapes), diff.RECIPE_KEY: recipe,
                                        **{k: v for k, v in metadata.items() if v}})
    return Case(model, recipe, f.family)


def base_graph(draw) -> Case:
    """Input(s) → [residual Add] → norm → linears → downstream chain → outputs (opsets 17, 18, 23)."""
    f, x = begin(draw, "base", [18, 17, 23])
    f.norm_out = norm(f, x)
    linears(f, f.norm_out)
    downstream(f, draw)
    return finish(f)


SMALL_ROWS = json.dumps([1e-3, 1.0, 1e5])   # row RMS down to 1e-4: an ε default mistake shows


def absent_attrs_graph(draw) -> Case:
    """As base_graph, with every optional attribute sometimes absent (the op's schema default
    applies in onnxruntime: ε of LayerNormalization / RMSNormalization / the com.microsoft
    norms — 1e-12 for the Skip* ones —, axis, stash_type, Gemm α/β/transB, FusedMatMul α,
    Softmax axis, LeakyRelu α, Split axis/sizes, Reduce* keepdims and axes, Pad mode/value,
    Transpose perm, Squeeze axes), the one-op norms drawn more often, and inputs at row RMS
    down to 1e-4."""
    f, x = begin(draw, "absent_attrs", [13, 17, 18, 23])
    f.absent = True
    f.norm_out = norm(f, x)
    linears(f, f.norm_out)
    downstream(f, draw)
    return finish(f, **{diff.SCALES_KEY: SMALL_ROWS})


def gemm_graph(draw) -> Case:
    """A norm of any kind (LayerNorm with and without β) → one or two Gemms on its rank-2
    view: α and β random (β = 0 too), transA (a Transpose in front) and transB, C absent,
    scalar, [1], [N], [1, N], [M, 1], [M, N] or a graph input; attributes at their default
    sometimes absent; opsets 9–23 (C required below 11); then a short chain."""
    f, x = begin(draw, "gemm", [13, 17, 18, 23, 11, 9], dtypes=("fp32",) * 4 + ("fp16",), ranks=(2, 3))
    f.absent = f.flag()
    f.norm_out = y = norm(f, x)
    if y.rank != 2:
        y = f.op("Reshape", [y, f.const(np.array([-1, y.shape[-1]]), np.int64, "shape")],
                 (int(np.prod(y.shape[:-1])), y.shape[-1]), y.dtype)
    for _ in range(f.draw(st.integers(1, 2))):
        f.add(gemm(f, y))
    downstream(f, draw, chains=1, length=2)
    return finish(f, **{diff.SCALES_KEY: SMALL_ROWS if f.absent else ""})


def gemm(f: Fuzz, a: V) -> V:
    """Gemm(A, W, C) reading the rank-2 `a` [M, n] (through a Transpose when transA)."""
    m, n = a.shape
    k = f.choice([8, 4, 1, 16])
    trans_a, trans_b = f.choice([False, False, False, True]), f.flag()
    alpha, beta = f.choice([1.0, 0.5, 2.0, -1.5]), f.choice([1.0, 0.0, 0.5, -2.0])
    c_form = f.choice(["none", "scalar", "[1]", "[N]", "[1,N]", "[M,1]", "[M,N]", "input[N]"])
    if c_form == "none" and f.opset < 11:
        c_form = "[N]"
    f.note(f"Gemm k={k} transA {int(trans_a)} transB {int(trans_b)} alpha {alpha} beta {beta} C {c_form}")
    A = f.op("Transpose", [a], (n, m), a.dtype, perm=[1, 0]) if trans_a else a
    w = f.const(f.rng.standard_normal((k, n) if trans_b else (n, k)) / np.sqrt(n), a.dtype, "W")
    inputs = [A, w]
    if c_form == "input[N]":
        name = f.g.input(f"c{len(f.shapes)}", [k], elem(a.dtype))
        f.shapes[name] = [k]
        inputs.append(V(name, (k,), a.dtype))
    elif c_form != "none":
        shape = {"scalar": (), "[1]": (1,), "[N]": (k,), "[1,N]": (1, k), "[M,1]": (m, 1), "[M,N]": (m, k)}[c_form]
        inputs.append(f.const(0.3 * f.rng.standard_normal(shape), a.dtype, "C"))
    return f.op("Gemm", inputs, (m, k), a.dtype, **trans_attrs(f, "Gemm", transA=trans_a, transB=trans_b),
                **f.attrs("Gemm", alpha=alpha, beta=beta))


def opsets_graph(draw) -> Case:
    """As base_graph in opsets 9–12 (and 13, 17, 18, 23), every op in that opset's signature
    (Pad pads/value attributes below 11 — nonzero values too —, Slice attributes below 10,
    Split sizes attribute below 13, Reduce* axes attributes, Squeeze/Unsqueeze axes below 13,
    Clip min/max attributes below 11, C required by Gemm below 11, one-type Pow below 12,
    non-negative axes below 11); only the norms the opset has (LayerNormalization ≥ 17,
    RMSNormalization ≥ 23); half the time a row move (Pad, Slice, Split, Concat, Transpose,
    Unsqueeze) between the norm and its linears; attributes sometimes absent."""
    f, x = begin(draw, "opsets", [9, 10, 11, 12, 9, 10, 11, 12, 13, 17, 18, 23], dtypes=("fp32",) * 5 + ("fp16",))
    f.absent = f.flag()
    f.norm_out = norm(f, x)
    y = row_move(f, f.norm_out) if f.choice([True, True, False]) else f.norm_out
    linears(f, y)
    downstream(f, draw)
    return finish(f, **{diff.SCALES_KEY: SMALL_ROWS if f.absent else ""})


APPROX_CASES = {    # where the second norm normalizes -> whether the first norm's per-row scale is constant there
    "feature_axis": True, "per_head": True, "transposed_back": True,
    "token_axis": False, "token_and_feature_axes": False, "reduce_token_axis": False, "sum_with_input": False,
}


def approx_graph(draw) -> Case:
    """For --approx: norm → linear (per-row deferred scale s) → a second norm → MatMul, the
    second norm over the feature axis (s constant there: the cancellation is provable, exact
    with ε = 0), per head, or after a Transpose and back (legal); or over the token axis
    (Transpose(0,2,1) first), over tokens and features (axis = 1), a ReduceMean over the token
    axis, or of the linear's output plus an input (the cancellation must not be made). ε₂ is
    0 or not; the checker also rewrites with --approx (differential.APPROX_CONFIGS): strict
    unless the case is legal with ε₂ ≠ 0."""
    f, x = begin(draw, "approx_axis", [23, 18, 17], dtypes=("fp32",) * 5 + ("fp16",), ranks=(3,), widths=(8, 16),
                 lead={3: [2, 4]})
    f.norm_out = norm(f, x)
    k = f.choice([8, 4, 16])
    if f.choice(["MatMul", "MatMul", "any"]) == "MatMul":     # no bias: the scale reaches the second norm
        f.note(f"linear MatMul k={k}")
        h = f.op("MatMul", [f.norm_out, f.weight(x.shape[-1], k, x.dtype)], x.shape[:-1] + (k,), x.dtype)
    else:
        h = linear(f, f.norm_out, k, {})
    if h.rank != 3:         # a row-merging path: back to [B, T, k]
        h = f.op("Reshape", [h, f.const(np.array(list(x.shape[:-1]) + [k]), np.int64, "shape")],
                 x.shape[:-1] + (k,), h.dtype)
    case = f.choice(list(APPROX_CASES))
    eps = f.choice([0.0, 0.0, 1e-6, 1e-5])
    form = f.choice(["rms", "rms", "layer", "SimplifiedLayerNormalization"] + ["LayerNormalization"] * (f.opset >= 17)
                    + ["RMSNormalization"] * (f.opset >= 23))
    f.note(f"second norm {form} eps {eps}, {case}")
    t, axis = h, -1
    if case in ("token_axis", "transposed_back"):
        t = f.op("Transpose", [h], (h.shape[0], h.shape[2], h.shape[1]), h.dtype, perm=[0, 2, 1])
        if case == "transposed_back":
            t = f.op("Transpose", [t], h.shape, h.dtype, perm=[0, 2, 1])
    elif case == "per_head" and k >= 8:      # heads of ≥ 4 (ε = 0 over 2 values is ±1: ill-conditioned)
        t = f.op("Reshape", [h, f.const(np.array(list(h.shape[:-1]) + [2, k // 2]), np.int64, "shape")],
                 h.shape[:-1] + (2, k // 2), h.dtype)
    elif case == "sum_with_input":
        r = V(f.g.input("r2", [None, None, k], elem(h.dtype)), h.shape, h.dtype)
        f.shapes["r2"] = list(h.shape)
        t = f.op("Add", [h, r], h.shape, h.dtype)
    elif case == "token_and_feature_axes":
        axis = -2
    elif case == "reduce_token_axis":
        axis, form = -2, "rms" if form != "layer" else "layer"
    y = second_norm(f, t, form, eps, axis)
    f.add(f.op("MatMul", [y, f.weight(y.shape[-1], 4, y.dtype)], y.shape[:-1] + (4,), y.dtype))
    # no further norm (a following norm or a function holding one): the strict/loose label is
    # about the second norm alone
    downstream(f, draw, chains=1, length=2, exclude=("norm", "function"))
    loose = APPROX_CASES[case] and eps != 0
    return finish(f, **{diff.APPROX_KEY: "loose" if loose else "strict"})


def second_norm(f: Fuzz, t: V, form: str, eps: float, axis: int) -> V:
    """A norm of `t` over the axes from `axis` (−1: the last; −2: the last two, for the
    decomposed forms a ReduceMean over axis −2 only) with ε = `eps` (no Add when 0, or an Add
    of 0) and a gain."""
    d = t.dtype
    if form in ("rms", "layer"):
        axes = [-2] if axis == -2 else [-1]
        c = t
        if form == "layer":
            c = f.op("Sub", [t, reduce_mean(f, t, axes)], t.shape, d)
        ms = reduce_mean(f, f.op("Mul", [c, c], t.shape, d), axes)
        if eps or f.flag():
            ms = f.op("Add", [ms, f.const(np.array(eps), d, "eps")], ms.shape, d)
        y = f.op("Div", [c, f.op("Sqrt", [ms], ms.shape, d)], t.shape, d)
        return f.op("Mul", [y, f.const(1 + 0.3 * f.rng.standard_normal(t.shape[-1]), d, "gain")], t.shape, d)
    gain_shape = t.shape[axis:]
    inputs = [t, f.const(1 + 0.3 * f.rng.standard_normal(gain_shape), d, "gain")]
    if form == "LayerNormalization" and f.flag():
        inputs.append(f.const(0.2 * f.rng.standard_normal(gain_shape), d, "beta"))
    return f.op(form, inputs, t.shape, d, epsilon=eps, axis=axis)


GENERATORS = {"base": base_graph, "absent_attrs": absent_attrs_graph, "gemm": gemm_graph, "opsets": opsets_graph,
              "approx_axis": approx_graph}
# each family's share of the examples (the CI profile's time budget is shared, not extended)
SHARES = {"base": 7, "absent_attrs": 3, "gemm": 3, "opsets": 4, "approx_axis": 3}
ONLY = os.environ.get("FUZZ_ONLY")      # one generator family (FUZZ_ONLY=gemm), to hunt in it


@st.composite
def graphs(draw) -> Case:
    """A graph from one of GENERATORS, drawn by SHARES (FUZZ_ONLY / FUZZ_AVOID select)."""
    families = [ONLY] if ONLY else [k for k in GENERATORS if k not in AVOID for _ in range(SHARES[k])]
    return GENERATORS[draw(st.sampled_from(families))](draw)


# -- the test ---------------------------------------------------------------------------------------

def _profile() -> str:
    try:
        return settings.get_current_profile_name()
    except Exception:
        return "ci"


def _is_final() -> bool:
    """True while hypothesis replays the minimal failing example (the time guard must not hide it)."""
    try:
        from hypothesis.control import current_build_context
        return bool(current_build_context().is_final)
    except Exception:
        return False


_EXC: dict[str, type] = {}


def failure_class(failures: list[diff.Failure], generator: str = "base") -> type:
    """One exception class per kind of failure, so that hypothesis shrinks (and reports) each
    distinct bug separately: the failure kind × the strategy family that failed × the
    generator family that made the graph."""
    kinds = sorted({f.kind for f in failures})
    configs = {f.config for f in failures}
    family = "approx" if all("approx" in c for c in configs) else \
        "defer" if any("defer" in c for c in configs) else "fold"
    name = "Differential_" + "_".join(k.replace("-", "") for k in kinds) + "_" + family + "_" + generator
    if name not in _EXC:
        _EXC[name] = type(name, (AssertionError,), {})
    return _EXC[name]


def save_failure(case: Case, result: diff.Result, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(case.model.SerializeToString()).hexdigest()[:10]
    path = folder / f"fuzz_{digest}.onnx"
    onnx.save(case.model, path)
    path.with_suffix(".txt").write_text(case.recipe + "\n\n" + result.summary() + "\n")
    return path


FOCUS = os.environ.get("FUZZ_FOCUS")      # regex: only failures matching it count
IGNORE = os.environ.get("FUZZ_IGNORE")    # regex: failures matching it are ignored (known bugs)


def relevant(failures: list[diff.Failure], recipe: str) -> list[diff.Failure]:
    """The failures FUZZ_FOCUS / FUZZ_IGNORE leave (matched against 'failure || recipe')."""
    import re
    keep = []
    for failure in failures:
        text = f"{failure} || {recipe}"
        if FOCUS and not re.search(FOCUS, text, re.S):
            continue
        if IGNORE and re.search(IGNORE, text, re.S):
            continue
        keep.append(failure)
    return keep


def examine(case: Case, save_dir: Path, stats=diff.STATS) -> None:
    """Check one generated graph; raise (one exception class per kind of failure) when wrong."""
    note(case.recipe)
    if os.environ.get("FUZZ_DEBUG") == "all":     # every graph, before its check (a crash shows which)
        print(case.recipe, flush=True)
        onnx.save(case.model, Path(os.environ.get("FLASHNORM_FUZZ_SAVE") or ".") / "fuzz_last.onnx")
    family = diff.FAMILY_STATS[case.family]
    try:
        result = diff.check_model(case.model)
    except diff.InvalidOriginal as exc:
        stats["graphs discarded (original does not run)"] += 1
        family["discarded"] += 1
        if os.environ.get("FUZZ_DEBUG"):
            print("discarded:", exc, "\n", case.recipe)
        assume(False)
        return
    stats["graphs tried"] += 1
    stats["graphs with a site found"] += result.found > 0
    stats["graphs rewritten (≥ 1 site)"] += result.rewritten > 0
    stats["graphs with a refused config"] += bool(result.refused)
    family["tried"] += 1
    family["rewritten"] += result.rewritten > 0
    if os.environ.get("FUZZ_DEBUG") == "all":
        print(result.summary(), "\n", flush=True)
    failures = relevant(result.failures, case.recipe)
    if failures:
        stats["graphs found wrong"] += 1
        family["wrong"] += 1
        if _is_final():
            stats["distinct minimal failures"] += 1
            path = save_failure(case, result, save_dir)
            note(f"saved: {path}")
        raise failure_class(failures, case.family)(result.summary())


def test_differential_fuzz(tmp_path_factory):
    """Random graphs × every strategy and mode: no wrong output, no unforeseen exception."""
    budget = float(os.environ.get("FUZZ_SECONDS", PROFILE_SECONDS.get(_profile(), 75.0)))
    save_dir = Path(os.environ.get("FLASHNORM_FUZZ_SAVE") or tmp_path_factory.mktemp("fuzz_failures"))
    start = time.monotonic()
    stats = diff.STATS

    @given(case=graphs())
    def check(case: Case):
        # past the budget an example costs only its drawing (~30 ms); a failure found in time
        # is shrunk for up to SHRINK_SECONDS more, and its minimal form always replayed
        elapsed = time.monotonic() - start
        if not _is_final() and (elapsed > budget + SHRINK_SECONDS or (elapsed > budget and not stats["graphs found wrong"])):
            return
        examine(case, save_dir, stats)

    check()
    elapsed = time.monotonic() - start
    stats["fuzz seconds"] = round(elapsed)
    tried = stats["graphs tried"]
    assert tried >= 10, f"only {tried} graphs ran in {elapsed:.0f} s"
    # the mix, not one family alone (gemm's transA and non-constant C are refused by design)
    assert ONLY or stats["graphs rewritten (≥ 1 site)"] >= 0.4 * tried, \
        f"only {stats['graphs rewritten (≥ 1 site)']} of {tried} graphs had a rewritten site"

"""Differential fuzzing (issue 10): random graphs, every strategy and mode, checked against the
original by tests/differential.py.

A graph is: input(s) of rank 2, 3 or 4 (dynamic or fixed dims; fp32 mostly, some fp16, fp64 and
bf16-stored inputs) → a normalization of any kind and form → one to three linears → a random
downstream chain drawn from every op the scale algebra knows (and some it must stop at) →
graph outputs at the leaves. One small function per op family below (`fam_*`), each with a
docstring of what it generates; hypothesis shrinks a failure to a minimal recipe, printed with
the failure (the model is saved under $FLASHNORM_FUZZ_SAVE, default the pytest temp folder).

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

    def __init__(self, draw, opset: int, seed: int):
        self.draw = draw
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

def reduce_mean(f: Fuzz, v: V, axes, keepdims=1) -> V:
    """ReduceMean with `axes` as an input (opset ≥ 18) or attribute."""
    norm_axes = sorted(a % v.rank for a in axes)
    shape = [1 if i in norm_axes else d for i, d in enumerate(v.shape)] if keepdims else \
        [d for i, d in enumerate(v.shape) if i not in norm_axes]
    if f.g.opset >= 18:
        return f.op("ReduceMean", [v, f.const(np.array(axes, np.int64), np.int64, "axes")], shape, v.dtype, keepdims=keepdims)
    return f.op("ReduceMean", [v], shape, v.dtype, axes=list(axes), keepdims=keepdims)


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
    form = f.choice(["right", "left", "none", "node", "one_plus", "bf16_cast", "fp16_cast"])
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
        e_dtype = F32 if square == "pow_f32_exp" else compute
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
        if f.flag():
            inputs.append(f.const(0.1 * f.rng.standard_normal(k), dtype, "bias"))
        h = f.op("Gemm", inputs, out_shape, dtype, transB=int(trans_b), alpha=f.choice([1.0, 0.5]),
                 beta=f.choice([1.0, 2.0]))
    elif kind == "FusedMatMul":
        trans_b = f.flag()
        w = weight_ref(f, n, k, dtype, trans_b, shared)
        h = f.op("FusedMatMul", [a, w], out_shape, dtype, domain="com.microsoft", transB=int(trans_b),
                 alpha=f.choice([1.0, 0.5]))
    else:
        h = f.op("MatMul", [a, weight_ref(f, n, k, dtype, False, shared)], out_shape, dtype)
        if kind == "MatMul+bias":
            bias = f.const(0.1 * f.rng.standard_normal(k), dtype, "bias")
            h = f.op("Add", [h, bias] if f.flag() else [bias, h], out_shape, dtype)
    if path == "autocast_fp16" and f.flag():
        h = f.op("Cast", [h], h.shape, F32, to=TensorProto.FLOAT)
    return h


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
    attrs = {"alpha": 0.1} if kind == "LeakyRelu" else {}
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
    options = {F32: ["fp16_roundtrip", "fp64", "fp64_roundtrip", "to_fp16", "bf16_roundtrip"],
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


def fam_slice(f: Fuzz, v: V):
    """Slice along any axis (positive or negative index; axes given, or omitted for axis 0;
    step 1 or 2)."""
    axes = [i for i, d in enumerate(v.shape) if d >= 2]
    if not axes:
        return
    axis = f.choice(axes)
    dim = v.shape[axis]
    start = f.draw(st.integers(0, dim - 1))
    end = f.draw(st.integers(start + 1, dim))
    step = f.choice([1, 2])
    negative = f.flag()
    omit_axes = axis == 0 and step == 1 and f.flag()
    out = list(v.shape)
    out[axis] = len(range(start, end, step))
    ax = axis - v.rank if negative else axis
    f.note(f"Slice axis {ax} [{start}:{end}:{step}]{' (no axes input)' if omit_axes else ''}")
    inputs = [v, f.const(np.array([start]), np.int64, "starts"), f.const(np.array([end]), np.int64, "ends")]
    if not omit_axes:
        inputs.append(f.const(np.array([ax]), np.int64, "axes"))
        if step != 1:
            inputs.append(f.const(np.array([step]), np.int64, "steps"))
    f.add(f.op("Slice", inputs, out, v.dtype))


def fam_split(f: Fuzz, v: V):
    """Split into two parts along any axis (split sizes as an input)."""
    axes = [i for i, d in enumerate(v.shape) if d >= 2]
    if not axes:
        return
    axis = f.choice(axes)
    dim = v.shape[axis]
    first = f.draw(st.integers(1, dim - 1))
    ax = axis - v.rank if f.flag() else axis
    f.note(f"Split axis {ax} [{first}, {dim - first}]")
    shapes = []
    for size in (first, dim - first):
        s = list(v.shape)
        s[axis] = size
        shapes.append(s)
    outs = f.op("Split", [v, f.const(np.array([first, dim - first]), np.int64, "split")], shapes, v.dtype,
                n_out=2, axis=ax)
    f.add(*outs)


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
    ax = axis - v.rank if f.flag() else axis
    f.note(f"Concat axis {ax} with {other_kind}")
    f.add(f.op("Concat", [v, w] if f.flag() else [w, v], out, v.dtype, axis=ax))


def fam_pow(f: Fuzz, v: V):
    """Pow by 2, 3 or 1 (exponent a scalar or shape [1], in the value's dtype or fp32). (No
    fractional exponent: √ near 0 turns any rounding difference into a large relative one.)"""
    e = f.choice([2.0, 3.0, 1.0])
    shape = f.choice([(), (1,)])
    e_dtype = f.choice([v.dtype, F32])
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
    ax = f.const(np.array([-1]), np.int64, "axes")
    x1 = f.op("Slice", [v, f.const(np.array([0]), np.int64), f.const(np.array([h]), np.int64), ax], half, v.dtype)
    x2 = f.op("Slice", [v, f.const(np.array([h]), np.int64), f.const(np.array([d]), np.int64), ax], half, v.dtype)
    rot = f.op("Concat", [f.op("Neg", [x2], half, v.dtype), x1], v.shape, v.dtype, axis=-1)
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
        inputs = [v, w] + ([f.const(0.1 * f.rng.standard_normal(m), v.dtype, "bias")] if f.flag() else [])
        f.add(f.op("Gemm", inputs, out, v.dtype, transB=int(t)))
    elif kind == "FusedMatMul":
        f.add(f.op("FusedMatMul", [v, f.weight(k, m, v.dtype)], out, v.dtype, domain="com.microsoft",
                   alpha=f.choice([1.0, 0.5])))
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
        scores = f.op("Softmax", [scores], scores_shape, v.dtype, axis=-1)
    if times_v:
        val = f.pick(lambda w: w.rank == v.rank and w.shape[:-1] == v.shape[:-1] and w.dtype == v.dtype) or v
        scores = f.op("MatMul", [scores, val], v.shape[:-1] + (val.shape[-1],), v.dtype)
    f.add(scores)


def fam_softmax(f: Fuzz, v: V):
    """Softmax along any axis."""
    axis = f.choice(list(range(-1, -v.rank - 1, -1)))
    f.note(f"Softmax axis {axis}")
    f.add(f.op("Softmax", [v], v.shape, v.dtype, axis=axis))


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
}
# how often each family is drawn (the ones the algebra has rules for, more often)
WEIGHTS = {"unary": 2, "activation": 2, "glu": 3, "cast": 3, "transpose": 3, "reshape": 3, "slice": 2,
           "split": 1, "concat": 2, "pow": 3, "const_arith": 3, "residual": 2, "rope": 2, "down_proj": 3,
           "attention": 2, "softmax": 1, "norm": 2, "if": 2, "loop": 2, "function": 1, "output": 1}


# -- the whole graph --------------------------------------------------------------------------------

def downstream(f: Fuzz, draw):
    """One to three chains of up to five ops each. A chain starts at a linear's output (or any
    value made so far) and each op reads what the previous one made; ops with two operands
    (GLU, residual, attention, concat) take their partner from everything made so far."""
    families = [k for k in FAMILIES if k not in AVOID for _ in range(WEIGHTS[k])]
    starts = list(f.pool)           # the linears' outputs
    chains = draw(st.lists(st.lists(st.sampled_from(families), max_size=5), min_size=1, max_size=3))
    for chain in chains:
        if not chain:
            continue
        v = starts[draw(st.integers(0, len(starts) - 1))] if f.flag() or len(f.pool) == len(starts) else f.pick()
        f.note(f"chain from {v.name}:")
        for family in chain:
            before = len(f.pool)
            FAMILIES[family](f, v)
            if len(f.pool) > before:
                v = f.pool[-1]


@dataclass
class Case:
    model: onnx.ModelProto
    recipe: str

    def __repr__(self) -> str:
        return "Case(\n" + self.recipe + "\n)"


@st.composite
def graphs(draw) -> Case:
    """Input(s) → [residual Add] → norm → linears → downstream chain → outputs."""
    dtype_name = draw(st.sampled_from([d for d in ["fp32"] * 6 + ["fp16", "fp16", "fp64", "bf16_roundtrip"]
                                       if d not in AVOID] or ["fp32"]))
    rank = draw(st.sampled_from([3, 2, 4]))
    n = draw(st.sampled_from([8, 16, 4]))
    opset = draw(st.sampled_from([18, 17, 23]))
    seed = draw(st.integers(0, 2**16))
    f = Fuzz(draw, opset, seed)
    lead = {2: [6], 3: [2, 3], 4: [2, 2, 3]}[rank]
    names = {2: ["rows"], 3: ["batch", "seq"], 4: ["batch", "heads", "seq"]}[rank]
    sig = [name if f.flag() else d for name, d in zip(names, lead)] + [n if not f.flag() or not f.flag() else "hidden"]
    in_dtype = {"fp32": F32, "fp16": F16, "fp64": F64, "bf16_roundtrip": F32}[dtype_name]
    f.note(f"{dtype_name} x{sig} (runs as {lead + [n]}), opset {opset}, seed {seed}")
    x = V(f.g.input("x", sig, in_dtype), tuple(lead + [n]), in_dtype)
    f.shapes["x"] = lead + [n]
    if dtype_name == "bf16_roundtrip":     # x rounded to bf16 (onnxruntime CPU has no bf16 math)
        x = f.op("Cast", [f.op("Cast", [x], x.shape, BF16, to=TensorProto.BFLOAT16)], x.shape, F32,
                 to=TensorProto.FLOAT)
    if f.flag() and f.flag():
        r = V(f.g.input("r", sig, in_dtype), x.shape, in_dtype)
        f.shapes["r"] = lead + [n]
        x = f.op("Add", [x, r], x.shape, x.dtype)
        f.note("residual Add before the norm")
    f.x = x
    f.norm_out = norm(f, x)
    linears(f, f.norm_out)
    downstream(f, draw)
    leaves = [v for v in f.pool if v.name not in f.consumed]
    for v in dict.fromkeys(leaves + f.extra_outputs):
        f.g.output(v.name, v.dtype, v.shape)
    model = f.g.model()
    recipe = "\n".join(f.lines)
    onnx.helper.set_model_props(model, {diff.SHAPES_KEY: json.dumps(f.shapes), diff.RECIPE_KEY: recipe})
    return Case(model, recipe)


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


def failure_class(failures: list[diff.Failure]) -> type:
    """One exception class per kind of failure, so that hypothesis shrinks (and reports) each
    distinct bug separately: the failure kind × the strategy family that failed."""
    kinds = sorted({f.kind for f in failures})
    configs = {f.config for f in failures}
    family = "defer" if any("defer" in c for c in configs) else "fold"
    name = "Differential_" + "_".join(k.replace("-", "") for k in kinds) + "_" + family
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
    try:
        result = diff.check_model(case.model)
    except diff.InvalidOriginal as exc:
        stats["graphs discarded (original does not run)"] += 1
        if os.environ.get("FUZZ_DEBUG"):
            print("discarded:", exc, "\n", case.recipe)
        assume(False)
        return
    stats["graphs tried"] += 1
    stats["graphs with a site found"] += result.found > 0
    stats["graphs rewritten (≥ 1 site)"] += result.rewritten > 0
    stats["graphs with a refused config"] += bool(result.refused)
    failures = relevant(result.failures, case.recipe)
    if failures:
        stats["graphs found wrong"] += 1
        if _is_final():
            stats["distinct minimal failures"] += 1
            path = save_failure(case, result, save_dir)
            note(f"saved: {path}")
        raise failure_class(failures)(result.summary())


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
    assert stats["graphs rewritten (≥ 1 site)"] >= 0.4 * tried, \
        f"only {stats['graphs rewritten (≥ 1 site)']} of {tried} graphs had a rewritten site"

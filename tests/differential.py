"""The differential checker shared by the fuzzer (test_differential_fuzz) and the saved
regressions (test_regressions): rewrite one model with every strategy and mode, run original
and rewritten on the same inputs at several scales, and say what is wrong.

Criteria:
- fp32 graphs (onnxruntime CPU): every fp32 output within FP32_TOL relative (max |Δ| /
  max |original|) of the original — or rewriter.verify.FLOOR_K × the original's own move under 1-ulp
  weight/input changes where that is larger (an output that cancels to near zero; the judgement
  is rewriter.verify.judge, the one `verify` makes) —, finite
  where the original is finite, and — where a float64
  reference can be computed (the graph promoted to float64) — no more than F64_RATIO × the
  original's own error against it (worst over the feed sets) + a floor: the larger of
  F64_FLOOR and NOISE_FACTOR × how far the original itself moves when its weights and inputs
  move by one ulp (an exact rewrite re-rounds folded weights; an ill-conditioned graph — a norm
  over a few near-equal values, a saturated tanh — amplifies that). fp64 outputs of all-fp64
  graphs: FP64_TOL.
- graphs holding fp16/bf16 values anywhere (inputs or casts): both graphs run in the ONNX
  reference evaluator, which computes fp16 in fp16 (onnxruntime CPU computes many fp16 ops in
  fp32 and hides overflow); the rewritten graph must have no Inf/NaN where the original has
  none, and its error against an fp32 reference (the graph promoted to fp32) may be at most
  LOWP_RATIO × the original's + a floor (the larger of LOWP_FLOOR and NOISE_FACTOR × the
  original's move under fp16-ulp weight/input changes).
- a rewrite that raises a documented RewriterError (other than an internal one, exit 7) is
  fine: the rewriter refused. Any other exception, or a rewritten model that onnxruntime
  cannot load or run, is a failure.

Inputs are made from the signature (concrete sizes from the model's metadata
`flashnorm.fuzz.shapes` when present): every float input gets rows of different magnitudes
(log-uniform over two decades around the scale) with a per-row offset; bool inputs (If
conditions) are tried both ways.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rewriter.api import rewrite
from rewriter.errors import EXIT_INTERNAL, RewriterError
from rewriter.promote import promote
from rewriter.verify import judge

FP32_TOL = 1e-5         # max |Δ| / max |original|: the product's fp32 exactness bar
FP64_TOL = 1e-11        # fp64 graphs: a float64 graph must stay float64-exact
F64_RATIO = 1.5         # rewritten error vs float64 reference ≤ 1.5 × the original's ...
F64_FLOOR = 2e-7        # ... + the larger of this (relative) and
NOISE_FACTOR = 2.0      # ... this × the original's own move under 1-ulp weight/input changes
LOWP_RATIO = 2.0        # fp16/bf16: error vs fp32 reference ≤ 2 × the original's ...
LOWP_FLOOR = {np.dtype(np.float16): 4e-3, np.dtype(ml_dtypes.bfloat16): 3e-2}   # ... + this
SCALES = (1e-2, 1.0, 1e5)          # row RMS of the float inputs (fp32/fp64 graphs)
SCALES_LOWP = (1e-2, 1.0, 1e3)     # inputs that are themselves fp16/bf16 (max 65504)
SHAPES_KEY = "flashnorm.fuzz.shapes"
RECIPE_KEY = "flashnorm.fuzz.recipe"
SCALES_KEY = "flashnorm.fuzz.scales"    # the generator's row RMS scales, replacing SCALES (JSON list)
# "strict" / "loose": also rewrite with APPROX_CONFIGS. strict: every following norm a scale
# could reach either has ε = 0 over axes the scale is constant on (the cancellation is exact)
# or is one the algebra cannot prove (a moved axis, a sum): judged like any config. loose: a
# provable cancellation with ε ≠ 0, allowed to be inexact — only loading, running, shapes and
# finiteness are judged.
APPROX_KEY = "flashnorm.fuzz.approx"
LOWP = (TensorProto.FLOAT16, TensorProto.BFLOAT16)

# Every strategy, both modes, push on/off (push only matters where a scale is deferred), and the
# measured targets (a mix of strategies in one graph).
CONFIGS: tuple[dict, ...] = (
    dict(strategy="keep"),
    dict(strategy="fold"),
    dict(strategy="fold-fused"),
    dict(strategy="defer"),
    dict(strategy="defer", push_scales=False),
    dict(strategy="defer-normop"),
    dict(strategy="defer-normop", push_scales=False),
    dict(mode="defer"),
    dict(mode="fold"),
    dict(mode="defer", push_scales=False),
    dict(target="ort-cpu"),         # per-site choice from the built-in cost tables: sites of one
    dict(target="ort-cuda"),        # graph may get different strategies
)
# --approx (a deferred scale cancels in a following norm), for models with APPROX_KEY
APPROX_CONFIGS: tuple[dict, ...] = (
    dict(strategy="defer", approx=True),
    dict(strategy="defer-normop", approx=True),
    dict(mode="defer", push_scales=False, approx=True),
)

# What the fuzzer and the regressions have seen this session (printed by conftest's
# pytest_terminal_summary).
STATS: Counter = Counter()
FAMILY_STATS: defaultdict = defaultdict(Counter)    # generator family -> tried, rewritten, wrong, discarded
PRECISION_LOG: list | None = None      # (config, output, feed set, original's error, rewritten's) when a list


def config_name(config: dict) -> str:
    key = next(k for k in ("strategy", "target", "mode") if k in config)
    parts = [f"{key}={config[key]}"]
    if config.get("push_scales") is False:
        parts.append("no-push")
    if config.get("approx"):
        parts.append("approx")
    return " ".join(parts)


@dataclass
class Failure:
    config: str
    kind: str       # exception | internal-error | invalid-output | mismatch | nonfinite | precision
    detail: str

    def __str__(self) -> str:
        return f"[{self.config}] {self.kind}: {self.detail}"


@dataclass
class Result:
    failures: list[Failure] = field(default_factory=list)
    found: int = 0          # most sites any config found
    rewritten: int = 0      # most sites any config rewrote
    refused: list[str] = field(default_factory=list)    # documented errors (config: message)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        lines = [f"sites found {self.found}, rewritten {self.rewritten}"]
        lines += [f"  refused: {r}" for r in self.refused]
        lines += [f"  {f}" for f in self.failures]
        return "\n".join(lines)


class InvalidOriginal(Exception):
    """The original model does not load or run (the generator made an invalid graph)."""


# -- running models ---------------------------------------------------------------------------

def ort_session(model: onnx.ModelProto):
    import onnxruntime as ort
    ort.set_default_logger_severity(4)      # an invalid rewritten model is reported, not logged
    options = ort.SessionOptions()
    options.log_severity_level = 4
    # every fusion, but not level 3 (layout): onnxruntime 1.32 segfaults creating an fp16
    # Transpose → FusedMatMul graph at ORT_ENABLE_ALL (a valid original: the fuzzer found it)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_ort(model_or_session, feeds: dict) -> dict[str, np.ndarray]:
    sess = model_or_session if not isinstance(model_or_session, onnx.ModelProto) else ort_session(model_or_session)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _contrib_ops():
    """numpy versions of the onnxruntime ops the reference evaluator lacks. Norm statistics in
    fp32 (as onnxruntime computes them, stash_type 1), outputs in the input's dtype."""
    from onnx.reference.op_run import OpRun

    def rms(x, gain, eps):
        xf = x.astype(np.float32) if x.dtype != np.float64 else x
        inv = 1 / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + np.array(eps, xf.dtype))
        return (xf * inv * gain.astype(xf.dtype)).astype(x.dtype), inv

    def layer(x, gain, beta, eps):
        xf = x.astype(np.float32) if x.dtype != np.float64 else x
        mean = np.mean(xf, axis=-1, keepdims=True)
        inv = 1 / np.sqrt(np.mean((xf - mean) ** 2, axis=-1, keepdims=True) + np.array(eps, xf.dtype))
        y = (xf - mean) * inv * gain.astype(xf.dtype)
        if beta is not None:
            y = y + beta.astype(xf.dtype)
        return y.astype(x.dtype), mean, inv

    def eps_of(epsilon, default=1e-5):
        return default if epsilon is None else epsilon

    class SimplifiedLayerNormalization(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, scale, axis=None, epsilon=None, stash_type=None):
            y, inv = rms(x, scale, eps_of(epsilon))
            return y, inv.astype(np.float32)

    class SimplifiedLayerNormalizationOnnx(SimplifiedLayerNormalization):
        op_domain = ""

    SimplifiedLayerNormalizationOnnx.__name__ = "SimplifiedLayerNormalization"

    class SkipSimplifiedLayerNormalization(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, skip, scale, bias=None, epsilon=None):
            s = x.astype(np.float32) + skip.astype(np.float32) if x.dtype != np.float64 else x + skip
            if bias is not None:
                s = s + bias.astype(s.dtype)
            y, inv = rms(s, scale, eps_of(epsilon, 1e-12))      # the contrib schema's default
            return (y.astype(x.dtype), np.zeros_like(inv, np.float32), inv.astype(np.float32),
                    s.astype(x.dtype))

    class SkipLayerNormalization(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, skip, gamma, beta=None, bias=None, epsilon=None):
            s = x.astype(np.float32) + skip.astype(np.float32) if x.dtype != np.float64 else x + skip
            if bias is not None:
                s = s + bias.astype(s.dtype)
            y, mean, inv = layer(s, gamma, beta, eps_of(epsilon, 1e-12))    # the contrib schema's default
            return y.astype(x.dtype), mean.astype(np.float32), inv.astype(np.float32), s.astype(x.dtype)

    class FusedMatMul(OpRun):
        op_domain = "com.microsoft"

        def _run(self, a, b, alpha=None, transA=None, transB=None, transBatchA=None, transBatchB=None):
            if transA:
                a = np.swapaxes(a, -1, -2)
            if transB:
                b = np.swapaxes(b, -1, -2)
            return (np.matmul(a, b) * np.array(1.0 if alpha is None else alpha, a.dtype)).astype(a.dtype),

    def over(x, axis):
        """x reshaped so the normalized axes [axis, rank) are one last axis."""
        axis = axis % x.ndim
        return x.reshape(x.shape[:axis] + (-1,))

    class LayerNormalization(OpRun):    # the ONNX op, statistics in stash_type (fp32 by default)
        op_domain = ""

        def _run(self, x, scale, bias=None, axis=None, epsilon=None, stash_type=None):
            axis = -1 if axis is None else axis
            y, mean, inv = layer(over(x, axis), over(np.broadcast_to(scale, x.shape), axis),
                                 None if bias is None else over(np.broadcast_to(bias, x.shape), axis), eps_of(epsilon))
            keep = x.shape[:axis % x.ndim] + (1,) * (x.ndim - axis % x.ndim)
            return y.reshape(x.shape), mean.reshape(keep).astype(np.float32), inv.reshape(keep).astype(np.float32)

    class RMSNormalization(OpRun):      # opset 23, statistics in fp32
        op_domain = ""

        def _run(self, x, scale, axis=None, epsilon=None, stash_type=None):
            axis = -1 if axis is None else axis
            y, _ = rms(over(x, axis), over(np.broadcast_to(scale, x.shape), axis), eps_of(epsilon))
            return (y.reshape(x.shape),)

    return [SimplifiedLayerNormalization, SimplifiedLayerNormalizationOnnx, SkipSimplifiedLayerNormalization,
            SkipLayerNormalization, FusedMatMul, LayerNormalization, RMSNormalization]


def run_reference(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """The ONNX reference evaluator (computes each op in its own dtype: fp16 in fp16)."""
    from onnx.reference import ReferenceEvaluator
    import warnings
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        ev = ReferenceEvaluator(model, new_ops=_contrib_ops())
        outs = ev.run(None, feeds)
    return {o.name: np.asarray(v) for o, v in zip(model.graph.output, outs)}


# -- dtype promotion (the references) -----------------------------------------------------------

def _np_type(elem: int):
    return helper.tensor_dtype_to_np_dtype(elem)


def perturb(model: onnx.ModelProto, rel: float, rng) -> onnx.ModelProto:
    """A copy with every fp32/fp16 initializer or main-graph Constant of ≥ 2 elements multiplied
    by (1 + rel·N(0,1)) (scalars — exponents, ε — are left alone)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)

    def moved(t: onnx.TensorProto) -> onnx.TensorProto:
        if t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            return t
        a = numpy_helper.to_array(t)
        if a.size < 2:
            return t
        return numpy_helper.from_array((a * (1 + rel * rng.standard_normal(a.shape))).astype(a.dtype), t.name)

    inits = [moved(t) for t in m.graph.initializer]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    a.t.CopyFrom(moved(a.t))
    return m


def has_lowp(model: onnx.ModelProto) -> bool:
    """Computes in fp16/bf16 somewhere: an fp16/bf16 input or output, or a Cast to fp16/bf16 of a
    value that is not a constant (fp16-stored weights cast up to fp32 do not count)."""
    def graph(g) -> bool:
        for coll in (g.input, g.output):
            if any(v.type.tensor_type.elem_type in LOWP for v in coll):
                return True
        return nodes(g.node, {t.name for t in g.initializer})

    def nodes(ns, consts) -> bool:
        for n in ns:
            if n.op_type == "Constant":
                consts.update(n.output)
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i in LOWP and n.input[0] not in consts:
                    return True
                if a.type == onnx.AttributeProto.GRAPH and graph(a.g):
                    return True
        return False

    return graph(model.graph) or any(nodes(f.node, set()) for f in model.functions)


def is_pure_f64(model: onnx.ModelProto) -> bool:
    """Every float input is fp64 and nothing but constants is cast to a narrower float: its
    fp64 outputs must be fp64-exact."""
    narrow = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    floats = [i for i in model.graph.input if i.type.tensor_type.elem_type in narrow + (TensorProto.DOUBLE,)]
    if not floats or any(i.type.tensor_type.elem_type != TensorProto.DOUBLE for i in floats):
        return False

    def graph(g, consts) -> bool:
        consts = consts | {t.name for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant":
                consts.update(n.output)
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i in narrow and n.input[0] not in consts:
                    return False
                if a.type == onnx.AttributeProto.GRAPH and not graph(a.g, consts):
                    return False
        return True

    return graph(model.graph, set())


# -- inputs -------------------------------------------------------------------------------------

def input_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Concrete input shapes: the generator's (metadata), else the signature (batch 2, others 3)."""
    for prop in model.metadata_props:
        if prop.key == SHAPES_KEY:
            return {k: list(v) for k, v in json.loads(prop.value).items()}
    shapes = {}
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        shapes[inp.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (2 if i == 0 else 3)
                            for i, d in enumerate(dims)]
    return shapes


def make_feeds(model: onnx.ModelProto, scale: float, seed: int, cond: bool | None = None) -> dict:
    """Float inputs: rows (every axis but the last) of RMS ≈ scale·10^U(−1,1), with a per-row
    offset (so mean-centering is exercised); bool inputs: `cond`; ints: small positives."""
    rng = np.random.default_rng(seed)
    shapes = input_shapes(model)
    feeds = {}
    for inp in model.graph.input:
        elem = inp.type.tensor_type.elem_type
        shape = shapes[inp.name]
        dtype = _np_type(elem)
        if elem == TensorProto.BOOL:
            feeds[inp.name] = np.full(shape, bool(cond), np.bool_)
        elif np.issubdtype(dtype, np.integer):
            feeds[inp.name] = rng.integers(1, 3, size=shape).astype(dtype)
        else:
            rows = tuple(shape[:-1]) + (1,) if shape else ()
            magnitude = scale * 10 ** rng.uniform(-1, 1, size=rows)
            offset = rng.uniform(-0.7, 0.7, size=rows)
            value = magnitude * (rng.standard_normal(shape) + offset)
            feeds[inp.name] = value.astype(dtype)
    return feeds


def feed_sets(model: onnx.ModelProto, seed: int = 0) -> list[dict]:
    lowp_inputs = any(i.type.tensor_type.elem_type in LOWP for i in model.graph.input)
    has_bool = any(i.type.tensor_type.elem_type == TensorProto.BOOL for i in model.graph.input)
    conds = (True, False) if has_bool else (None,)
    scales = json.loads(metadata(model, SCALES_KEY) or "null") or (SCALES_LOWP if lowp_inputs else SCALES)
    return [make_feeds(model, scale, seed + i, cond) for i, scale in enumerate(scales) for cond in conds]


# -- comparing ------------------------------------------------------------------------------------

def rel_error(ref: np.ndarray, got: np.ndarray) -> float:
    """max |Δ| / max |ref| over the positions where both are finite."""
    a, b = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if a.shape != b.shape:
        return float("inf")
    both = np.isfinite(a) & np.isfinite(b)
    if not both.any():
        return 0.0
    scale = float(np.max(np.abs(a[both])))
    return float(np.max(np.abs(a[both] - b[both]))) / max(scale, 1e-30)


def new_nonfinite(orig: np.ndarray, got: np.ndarray) -> int:
    """Positions where the rewritten value is Inf/NaN and the original's is finite."""
    a, b = np.asarray(orig, np.float64), np.asarray(got, np.float64)
    if a.shape != b.shape:
        return a.size
    return int(np.sum(np.isfinite(a) & ~np.isfinite(b)))


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception:
        return None


class Checker:
    """Runs the original once per feed set, then judges each rewritten model against it."""

    def __init__(self, model: onnx.ModelProto, seed: int = 0):
        self.model = model
        self.lowp = has_lowp(model)
        self.pure_f64 = is_pure_f64(model)
        try:
            self.session = ort_session(model)
            self.feeds = feed_sets(model, seed)
            with np.errstate(all="ignore"):
                self.orig = [run_ort(self.session, f) for f in self.feeds]
        except Exception as exc:
            raise InvalidOriginal(f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        self.f64 = None         # float64 reference outputs per feed set (fp32 graphs)
        self.noise: dict[str, float] = {}   # fp32 graphs: per output, the original's 1-ulp sensitivity
        self.ref32 = None       # fp32 reference outputs (low-precision graphs)
        self.orig_eval = None   # the original under the reference evaluator (low precision)
        if self.lowp:
            try:
                self.orig_eval = [run_reference(model, f) for f in self.feeds]
            except Exception as exc:
                raise InvalidOriginal(f"reference evaluator: {type(exc).__name__}: {str(exc)[:300]}") from exc
            promoted = promote(model, {TensorProto.FLOAT16: TensorProto.FLOAT, TensorProto.BFLOAT16: TensorProto.FLOAT})
            self.ref32 = _try(self._run_any, promoted, {np.float16: np.float32, ml_dtypes.bfloat16: np.float32})
            self.noise = _try(self._noise) or {}
        else:
            promoted = promote(model, {TensorProto.FLOAT: TensorProto.DOUBLE})
            self.f64 = _try(self._run_any, promoted, {np.float32: np.float64})
            self.noise = {} if self.pure_f64 else (_try(self._noise) or {})

    def _noise(self) -> dict[str, float]:
        """Per output, how far the original moves when its weights and inputs move by ~1 ulp
        (max over the feed sets): the rounding noise any exact rewrite may add (re-rounded
        folded weights), large where the graph is ill-conditioned (a norm over a few
        near-equal values, a saturated tanh). Low-precision graphs: an fp16 ulp, under the
        reference evaluator."""
        rng = np.random.default_rng(12345)
        rel = 2.0 ** -10 if self.lowp else 2.0 ** -23
        moved_model = perturb(self.model, rel, rng)
        if self.lowp:
            run, originals = (lambda f: run_reference(moved_model, f)), self.orig_eval
        else:
            sess = ort_session(moved_model)
            run, originals = (lambda f: run_ort(sess, f)), self.orig
        noise: dict[str, float] = {}
        for feeds, orig in zip(self.feeds, originals):
            moved = {k: (v * (1 + rel * rng.standard_normal(v.shape))).astype(v.dtype)
                     if v.dtype.kind == "f" else v for k, v in feeds.items()}
            with np.errstate(all="ignore"):
                got = run(moved)
            for out, a in orig.items():
                if a.dtype.kind == "f":
                    noise[out] = max(noise.get(out, 0.0), rel_error(a, got[out]))
        return noise

    def _run_any(self, model, cast):
        feeds = [{k: v.astype(cast.get(v.dtype.type, v.dtype)) for k, v in f.items()} for f in self.feeds]
        try:
            sess = ort_session(model)
            return [run_ort(sess, f) for f in feeds]
        except Exception:
            return [run_reference(model, f) for f in feeds]

    # -- one rewritten model --------------------------------------------------------------------
    def judge(self, name: str, rewritten: onnx.ModelProto) -> list[Failure]:
        """fp32/fp64 graphs: parity per feed set under onnxruntime, then precision against the
        float64 reference (worst feed set of the original vs worst of the rewritten, per output).
        Low-precision graphs: finiteness per feed set and precision against the fp32 reference,
        both under the reference evaluator."""
        try:
            sess = ort_session(rewritten)
            with np.errstate(all="ignore"):
                outs = [run_ort(sess, f) for f in self.feeds]
        except Exception as exc:
            return [Failure(name, "invalid-output", f"onnxruntime cannot run the rewritten model: "
                                                    f"{type(exc).__name__}: {str(exc)[:300]}")]
        if self.lowp:
            try:
                outs = [run_reference(rewritten, f) for f in self.feeds]
            except Exception as exc:
                return [Failure(name, "invalid-output", f"reference evaluator cannot run the rewritten "
                                                        f"model: {type(exc).__name__}: {str(exc)[:300]}")]
        originals, reference = (self.orig_eval, self.ref32) if self.lowp else (self.orig, self.f64)
        failures: list[Failure] = []
        worst: dict[str, list] = {}         # output -> [original's error, rewritten's, feed set]
        for i, (orig, got) in enumerate(zip(originals, outs)):
            where = f"inputs #{i} ({self._describe(i)}{', reference evaluator' if self.lowp else ''})"
            for out, a in orig.items():
                b = got.get(out)
                if b is None or b.shape != a.shape:
                    failures.append(Failure(name, "mismatch", f"{out}: missing or shape "
                                            f"{None if b is None else b.shape} != {a.shape}"))
                    continue
                floating = a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16
                if not floating:
                    if not np.array_equal(a, b):
                        failures.append(Failure(name, "mismatch", f"{out} ({a.dtype}) differs, {where}"))
                    continue
                bad = new_nonfinite(a, b)
                if bad:
                    failures.append(Failure(name, "nonfinite", f"{out} ({a.dtype}): {bad} Inf/NaN where the "
                                            f"original is finite, {where}"))
                    continue
                if not self.lowp:       # rewriter.verify.judge, its floor the original's 1-ulp move
                    exact = a.dtype == np.float64 and self.pure_f64
                    (v,) = judge({out: a}, {out: b}, FP64_TOL if exact else FP32_TOL,
                                 None if exact else {out: (self.noise.get(out, 0.0), "1-ulp move")})
                    if not v.ok:
                        failures.append(Failure(name, "mismatch", f"{out} ({a.dtype}): max rel {v.max_rel:.3e} > "
                                                f"{v.bound:.0e}, {where}"))
                        continue
                    if a.dtype != np.float32:
                        continue
                if reference is None or out not in reference[i]:
                    continue
                ref = reference[i][out]
                e_orig, e_new = rel_error(ref, a), rel_error(ref, b)
                if PRECISION_LOG is not None:
                    PRECISION_LOG.append((name, out, i, e_orig, e_new, self.noise.get(out)))
                w = worst.setdefault(out, [0.0, 0.0, 0, str(a.dtype)])
                w[0] = max(w[0], e_orig)
                if e_new > w[1]:
                    w[1], w[2] = e_new, i
            if failures:
                return failures     # one feed set is enough to show it
        for out, (e_orig, e_new, i, dtype) in worst.items():
            if self.lowp:
                floor = LOWP_FLOOR.get(np.dtype(dtype), LOWP_FLOOR[np.dtype(np.float16)])
                ratio, floor = LOWP_RATIO, max(floor, NOISE_FACTOR * self.noise.get(out, 0.0))
                against = "fp32 reference (reference evaluator)"
            else:
                ratio, floor, against = F64_RATIO, max(F64_FLOOR, NOISE_FACTOR * self.noise.get(out, 0.0)), \
                    "float64 reference"
            if e_new > ratio * e_orig + floor:
                failures.append(Failure(name, "precision", f"{out} ({dtype}): error vs {against} {e_new:.3e} "
                                        f"(inputs #{i}: {self._describe(i)}) > {ratio} × the original's "
                                        f"{e_orig:.3e} + {floor:.1e}"))
        return failures

    def _describe(self, i: int) -> str:
        parts = []
        for k, v in self.feeds[i].items():
            if v.dtype.kind == "f" and v.size:
                rms = np.sqrt(np.mean(np.square(v.astype(np.float64)), axis=-1))
                parts.append(f"{k} row RMS {rms.min():.1e}..{rms.max():.1e}")
            elif v.dtype == np.bool_:
                parts.append(f"{k}={bool(v.all())}")
        return ", ".join(parts)


def check_model(model: onnx.ModelProto, configs=CONFIGS, seed: int = 0) -> Result:
    """Rewrite `model` with every config and judge each result. Raises InvalidOriginal when
    the original itself does not load or run."""
    checker = Checker(model, seed)
    result = Result()
    seen: dict[bytes, list[Failure]] = {model.SerializeToString(): []}
    approx = metadata(model, APPROX_KEY)
    if approx:
        configs = tuple(configs) + APPROX_CONFIGS
    for config in configs:
        name = config_name(config)
        try:
            out, report = rewrite(model, **config)
        except RewriterError as exc:
            if getattr(exc, "exit_code", None) == EXIT_INTERNAL:
                result.failures.append(Failure(name, "internal-error", f"{type(exc).__name__}: {exc}"))
            else:
                result.refused.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        except Exception as exc:
            import traceback
            where = traceback.extract_tb(exc.__traceback__)[-1]
            result.failures.append(Failure(name, "exception", f"{type(exc).__name__}: {str(exc)[:300]} "
                                           f"(at {where.filename.split('/')[-1]}:{where.lineno})"))
            continue
        result.found = max(result.found, report.found)
        result.rewritten = max(result.rewritten, report.rewritten)
        key = out.SerializeToString()
        if key not in seen:
            seen[key] = checker.judge(name, out)
            STATS["rewritten models run"] += 1
        failures = seen[key]
        if config.get("approx") and approx == "loose":    # inexact allowed: it must still run
            failures = [f for f in failures if f.kind in ("invalid-output", "nonfinite") or "missing or shape" in f.detail]
        result.failures += [Failure(name, f.kind, f.detail) for f in failures]
    return result


def metadata(model: onnx.ModelProto, key: str) -> str:
    for prop in model.metadata_props:
        if prop.key == key:
            return prop.value
    return ""


def recipe(model: onnx.ModelProto) -> str:
    return metadata(model, RECIPE_KEY)

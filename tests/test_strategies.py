"""Every strategy (rewriter.plan.STRATEGIES) proven by execution, on every site form.

Each case rewrites one small graph with `strategy=...`, runs original and rewritten under
onnxruntime CPU and asserts three things together: the numbers (fp32 ≤ 1e-5 relative), the
counters (report.rewritten, the strategy recorded per site after `applicable()`), and the
structure the strategy promises. A second group loads what onnxruntime itself runs
(ORT_ENABLE_ALL, optimized_model_filepath) to check that the rewrite survives its optimizer.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from builders import GraphBuilder
from parity import FP32_TOL, assert_exact, op_types, rewrite_and_run
from rewriter.patterns.rmsnorm import DEFERRED
from rewriter import rewrite_file
from rewriter.plan import DEFERRING, STRATEGIES
from rewriter.verify import TOLERANCE, judge, run
from test_api_cli import llama_like_block
from test_fused_forms import fused      # one fused norm op feeding two linears

N, K = 16, 12
FUSED_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
             "SkipLayerNormalization", "RMSNormalization")


# -- the site forms -----------------------------------------------------------------------
def decomposed_rms(dtype=np.float32, residual=False, n=N, k=K, seed=0):
    """Dynamo-style Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul → gain, read by two MatMuls; fp16
    with the Cast to fp32 and back that exporters emit."""
    g = GraphBuilder(seed=seed)
    x = g.input("x", [None, None, n], dtype)
    if residual:
        x = g.op("Add", [x, g.input("r", [None, None, n], dtype)])
    cast = TensorProto.FLOAT16 if dtype == np.float16 else None
    y = g.rms(x, gain=g.gain(n, dtype), cast=cast)
    for _ in range(2):
        g.output(g.op("MatMul", [y, g.weight(n, k, dtype)]), dtype)
    return g.model()


def decomposed_layernorm():
    g = GraphBuilder()
    x = g.input("x", [None, None, N])
    y = g.layernorm(x, gain=g.gain(N), beta=(0.3 * g.rng.standard_normal(N)).astype(np.float32))
    for _ in range(2):
        g.output(g.op("MatMul", [y, g.weight(N, K)]))
    return g.model()


def dyt():
    g = GraphBuilder()
    x = g.input("x", [None, None, N])
    y = g.dyt(x, gain=g.gain(N), beta=(0.2 * g.rng.standard_normal(N)).astype(np.float32))
    for _ in range(2):
        g.output(g.op("MatMul", [y, g.weight(N, K)]))
    return g.model()


# name -> (builder, site kind, site form, fused op fold-fused should produce, dtype)
FORMS = {
    "rms-dynamo-fp32": (decomposed_rms, "rms", "decomposed", "SimplifiedLayerNormalization"),
    "rms-dynamo-fp32+residual": (lambda: decomposed_rms(residual=True), "rms", "decomposed",
                                 "SkipSimplifiedLayerNormalization"),
    "rms-dynamo-fp16-casts": (lambda: decomposed_rms(np.float16), "rms", "decomposed",
                              "SimplifiedLayerNormalization"),
    "layernorm-decomposed-beta": (decomposed_layernorm, "layer", "decomposed", "LayerNormalization"),
    "SimplifiedLayerNormalization": (lambda: fused("SimplifiedLayerNormalization"), "rms",
                                     "SimplifiedLayerNormalization", None),
    "SkipSimplifiedLayerNormalization+residual-out": (
        lambda: fused("SkipSimplifiedLayerNormalization", domain="com.microsoft", residual_used=True),
        "rms", "SkipSimplifiedLayerNormalization", None),
    "LayerNormalization-opset17": (lambda: fused("LayerNormalization", opset=17, with_beta=True), "layer",
                                   "LayerNormalization", None),
    "dyt": (dyt, "dyt", "decomposed", None),
}


def expected_strategy(strategy: str, kind: str, form: str, fp16: bool = False) -> str:
    """What the plan must record (written out here, not taken from plan.applicable)."""
    if kind == "dyt" and strategy != "keep":
        return "fold"                       # no 1/RMS to defer, no fused DyT kernel
    if fp16 and strategy in DEFERRING:
        return "fold"                       # an fp16 linear's un-normalized output may overflow
    if strategy == "fold-fused" and form != "decomposed":
        return "fold"                       # already one fused kernel
    return strategy


# -- graph helpers ------------------------------------------------------------------------
def producers(proto) -> dict:
    return {o: n for n in proto.graph.node for o in n.output}


def readers(proto, name: str) -> list:
    return [n for n in proto.graph.node if name in n.input]


def is_used(proto, name: str) -> bool:
    return bool(readers(proto, name)) or name in {o.name for o in proto.graph.output}


def ancestors(proto, name: str) -> list:
    """Every node `name` depends on (stopping at graph inputs and initializers)."""
    prod, seen, stack = producers(proto), {}, [name]
    while stack:
        node = prod.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(node.input)
    return list(seen.values())


def deferred_scale_muls(proto) -> list:
    """The Muls applying a deferred 1/RMS: one input straight from a MatMul."""
    prod = producers(proto)
    return [n for n in proto.graph.node if n.op_type == "Mul"
            and any(prod.get(i) is not None and prod[i].op_type == "MatMul" for i in n.input)]


def scale_input(proto, mul) -> str:
    prod = producers(proto)
    return next(i for i in mul.input if prod.get(i) is None or prod[i].op_type != "MatMul")


def through_casts(proto, name: str) -> str:
    """The value `name` is a Cast (chain) of."""
    prod = producers(proto)
    while name in prod and prod[name].op_type == "Cast":
        name = prod[name].input[0]
    return name


def initializers(proto) -> dict:
    return {i.name: numpy_helper.to_array(i).tobytes() for i in proto.graph.initializer}


def assert_structure(strategy: str, kind: str, form: str, fused_op, proto, out, report):
    before, after = Counter(op_types(proto)), Counter(op_types(out))
    deferred = report.count(action="defer")
    if strategy == "keep":
        assert after == before and initializers(out) == initializers(proto)
        return
    assert after["MatMul"] == before["MatMul"]          # one MatMul per linear, always
    assert initializers(out) != initializers(proto)     # gains folded into the weights
    if strategy in ("fold", "fold-fused") or kind == "dyt":
        assert deferred == 0 and after["ReduceSumSquare"] == 0
    if strategy == "fold-fused" and form == "decomposed" and kind != "dyt":
        # the decomposed norm became exactly one weightless fused kernel
        assert sum(after[o] for o in FUSED_OPS) == 1 and after[fused_op] == 1
        assert after["ReduceMean"] == after["Pow"] == after["Sqrt"] == 0
        node = next(n for n in out.graph.node if n.op_type == fused_op)
        gain = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}[node.input[-1]]
        assert np.all(gain == 1)
    elif strategy == "fold" and kind != "dyt":
        # the norm is still there (same kernels), only weightless
        for op_type in ("ReduceMean", "Sqrt", *FUSED_OPS):
            assert after[op_type] == before[op_type], op_type
        if form == "decomposed" and kind == "layer":   # γ's Mul and β's Add stay, at 1 and 0
            assert after["Mul"] == before["Mul"] and after["Add"] == before["Add"] + after["MatMul"]   # + β's biases
            assert unit_affine(proto, out)
        elif form == "decomposed":                      # exactly the gain Mul is gone
            assert after["Mul"] == before["Mul"] - 1
    if kind == "dyt":
        assert after["Tanh"] == 1
        return
    if strategy == "defer":
        # 1/sqrt(mean(x·x) + ε): one mean of squares per site (LayerNorm: and the centering's
        # two means, x − m and its correction)
        assert deferred == 1 and after["ReduceSumSquare"] == 0
        assert after["Reciprocal"] == deferred and sum(after[o] for o in FUSED_OPS) == 0
        assert after["ReduceMean"] == (3 if kind == "layer" else 1)
        muls = deferred_scale_muls(out)
        assert len(muls) == 2
        roots = {scale_input(out, m) for m in muls}
        assert len(roots) == 1                          # both linears share the one 1/RMS
        path = Counter(n.op_type for n in ancestors(out, roots.pop()))
        assert path["Sqrt"] == path["Reciprocal"] == 1 and path["ReduceSumSquare"] == path["Div"] == 0
    if strategy == "defer-normop":
        norm_op = "LayerNormalization" if kind == "layer" else "SimplifiedLayerNormalization"
        stat = 2 if kind == "layer" else 1
        assert deferred == 1 and after["ReduceSumSquare"] == 0 and after["ReduceMean"] == 0
        assert after["Reciprocal"] == 0 and sum(after[o] for o in FUSED_OPS) == 1
        node = next(n for n in out.graph.node if n.op_type == norm_op)
        assert not is_used(out, node.output[0])         # its normalized output is not used
        muls = deferred_scale_muls(out)
        assert len(muls) == 2 and all(through_casts(out, scale_input(out, m)) == node.output[stat]
                                      for m in muls)
    if kind == "layer" and strategy in DEFERRING:
        assert_reads_centered(strategy, proto, out)


def unit_affine(proto, out) -> bool:
    """The decomposed LayerNorm's last Mul and Add (γ, β) read ones and zeros in `out` where
    they read γ and β in `proto` (rewriter.transform.Rewriter.unit_affine: the original's kernels)."""
    def affine(model):
        values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        div = next(n for n in model.graph.node if n.op_type == "Div")
        mul = next(n for n in model.graph.node if n.op_type == "Mul" and div.output[0] in n.input)
        add = next(n for n in model.graph.node if n.op_type == "Add" and mul.output[0] in n.input)
        return [next(values[i] for i in node.input if i in values) for node in (mul, add)]
    (gamma, beta), (one, zero) = affine(proto), affine(out)
    return not np.all(gamma == 1) and np.any(beta) and np.all(one == 1) and not np.any(zero) \
        and one.shape == gamma.shape and zero.shape == beta.shape


def assert_reads_centered(strategy: str, proto, out):
    """A deferred LayerNorm's linears read x − mean(x) — with defer-normop the mean is the Mean
    output of the LayerNormalization giving 1/σ; with defer, ReduceMean's, corrected by a second
    pass (c − mean(c), c = x − mean(x)) — and their weights are diag(γ)·W, not centered over
    the input axis (exact either way; centering in the weights leaves the fp32 linear to cancel
    x's common mean: tests/test_layernorm_precision.py)."""
    prod = producers(out)
    matmuls = [n for n in out.graph.node if n.op_type == "MatMul"]
    for matmul in matmuls:
        sub = prod[through_casts(out, matmul.input[0])]
        assert sub.op_type == "Sub", sub
        mean = prod[sub.input[1]]
        if strategy == "defer-normop":
            assert sub.input[0] == "x" and mean.op_type == "LayerNormalization" and sub.input[1] == mean.output[1]
            continue
        first = prod[sub.input[0]]
        assert mean.op_type == "ReduceMean" and mean.input[0] == first.output[0]
        assert first.op_type == "Sub" and first.input[0] == "x"
        assert prod[first.input[1]].op_type == "ReduceMean" and prod[first.input[1]].input[0] == "x"
    weights = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    fused_norm = next((n for n in proto.graph.node if n.op_type == "LayerNormalization"), None)
    if fused_norm is not None:
        gamma = original[fused_norm.input[1]]
    else:       # the decomposed form: γ is the constant operand of the Mul after the Div
        div = next(n for n in proto.graph.node if n.op_type == "Div")
        mul = next(n for n in proto.graph.node if n.op_type == "Mul" and div.output[0] in n.input)
        gamma = next(original[i] for i in mul.input if i in original)
    for matmul, source in zip(matmuls, [n for n in proto.graph.node if n.op_type == "MatMul"]):
        folded, w = weights[matmul.input[1]], original[source.input[1]]
        np.testing.assert_array_equal(folded, (gamma.astype(np.float64)[:, None] * w).astype(np.float32))
        assert np.abs(folded.mean(axis=0)).max() > 1e-3        # not centered over the input axis


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("form_name", FORMS)
def test_every_strategy_on_every_form(form_name, strategy, tmp_path):
    build, kind, form, fused_op = FORMS[form_name]
    proto = build()
    report, diffs, out = rewrite_and_run(proto, tmp_path, strategy=strategy)
    want = expected_strategy(strategy, kind, form, fp16="fp16" in form_name)
    assert report.found == 1 and report.sites[0].kind == kind
    assert report.sites[0].strategy == want
    assert report.rewritten == (want != "keep")
    if want == "keep":
        assert report.sites[0].action == "skip" and "kept as exported" in report.sites[0].reason
        assert_exact(diffs, tol=0)
    else:
        assert report.sites[0].action == ("defer" if want in DEFERRING else "fold")
        assert report.weights_changed == 2
        fp16 = "fp16" in form_name
        assert_exact(diffs, tol=TOLERANCE["float16"] if fp16 else FP32_TOL)
    assert_structure(want, kind, form, fused_op, proto, out, report)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_on_a_llama_like_block(strategy, tmp_path):
    """Three sites: one on the graph input, two on residual sums (Skip* candidates)."""
    proto = llama_like_block()
    report, diffs, out = rewrite_and_run(proto, tmp_path, strategy=strategy)
    assert report.found == 3 and [s.strategy for s in report.sites] == [strategy] * 3
    assert_exact(diffs, tol=0 if strategy == "keep" else FP32_TOL)
    ops = Counter(op_types(out))
    assert ops["MatMul"] == 6
    if strategy == "keep":
        assert report.rewritten == 0 and ops == Counter(op_types(proto))
        return
    assert report.rewritten == 3 and report.weights_changed == 5
    if strategy == "fold-fused":
        assert (ops["SimplifiedLayerNormalization"], ops["SkipSimplifiedLayerNormalization"]) == (1, 2)
        assert ops["ReduceMean"] == ops["Pow"] == ops["Sqrt"] == 0
    elif strategy == "defer":
        assert ops["ReduceSumSquare"] == 0 and ops["Reciprocal"] == ops["ReduceMean"] == 3
    elif strategy == "defer-normop":
        norms = [n for n in out.graph.node if n.op_type == "SimplifiedLayerNormalization"]
        assert len(norms) == 3 and ops["ReduceSumSquare"] == ops["ReduceMean"] == ops["Reciprocal"] == 0
        assert all(not is_used(out, n.output[0]) and is_used(out, n.output[1]) for n in norms)
    else:
        assert ops["ReduceMean"] == 3 and ops["ReduceSumSquare"] == 0


# -- a second run: deferred scales are recognized, never rewritten ---------------------------
SECOND_RUN_FORMS = ("rms-dynamo-fp32", "rms-dynamo-fp32+residual",
                    "layernorm-decomposed-beta", "SimplifiedLayerNormalization",
                    "SkipSimplifiedLayerNormalization+residual-out", "LayerNormalization-opset17")


@pytest.mark.parametrize("strategy", DEFERRING)
@pytest.mark.parametrize("form_name", SECOND_RUN_FORMS)
def test_second_run_on_deferred_output_rewrites_nothing(form_name, strategy, tmp_path):
    src, once, twice = tmp_path / "m.onnx", tmp_path / "once.onnx", tmp_path / "twice.onnx"
    onnx.save(FORMS[form_name][0](), src)
    first = rewrite_file(src, once, strategy=strategy)
    assert first.rewritten == 1
    second = rewrite_file(once, twice, strategy=strategy)
    assert second.rewritten == 0 and second.found == 1
    assert second.skipped == {DEFERRED: 1}
    assert onnx.load(once).graph.SerializeToString() == onnx.load(twice).graph.SerializeToString()


@pytest.mark.parametrize("first_strategy", DEFERRING)
@pytest.mark.parametrize("second_strategy", STRATEGIES)
def test_second_run_on_deferred_block_any_strategy(first_strategy, second_strategy, tmp_path):
    src, once, twice = tmp_path / "m.onnx", tmp_path / "once.onnx", tmp_path / "twice.onnx"
    onnx.save(llama_like_block(), src)
    assert rewrite_file(src, once, strategy=first_strategy).rewritten == 3
    second = rewrite_file(once, twice, strategy=second_strategy)
    assert second.rewritten == 0 and second.skipped == {DEFERRED: 3}
    assert onnx.load(once).graph.SerializeToString() == onnx.load(twice).graph.SerializeToString()


# -- what onnxruntime actually runs --------------------------------------------------------
def ort_optimized(path: Path) -> onnx.ModelProto:
    """The graph a CPU session runs after ORT_ENABLE_ALL (its optimized_model_filepath)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    out = path.with_suffix(".ort.onnx")
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(out))


def rewritten_and_optimized(proto, tmp_path, strategy):
    src, dst = tmp_path / "m.onnx", tmp_path / f"m.{strategy}.onnx"
    onnx.save(proto, src)
    report = rewrite_file(src, dst, strategy=strategy)
    return report, ort_optimized(dst)


@pytest.mark.parametrize("strategy", DEFERRING)
def test_ort_keeps_the_deferred_form(strategy, tmp_path):
    """ORT does not undo the rewrite: one MatMul per linear (no MatMul+Mul fusion into a
    FusedMatMul: the scale is per row, not a scalar) and the 1/RMS path is the kernels we
    emitted — Mul(x, x), ReduceMean, Add, Sqrt, Reciprocal, or one SimplifiedLayerNormalization."""
    report, opt = rewritten_and_optimized(decomposed_rms(), tmp_path, strategy)
    assert report.rewritten == 1
    ops = Counter(op_types(opt))
    assert ops["MatMul"] == 2 and ops["FusedMatMul"] == 0 and ops["Mul"] == (3 if strategy == "defer" else 2)
    matmuls = [n for n in opt.graph.node if n.op_type == "MatMul"]
    assert all(n.input[0] == "x" for n in matmuls)      # the linears read the raw input
    muls = deferred_scale_muls(opt)
    assert len(muls) == 2 and len({scale_input(opt, m) for m in muls}) == 1
    path = sorted(n.op_type for n in ancestors(opt, scale_input(opt, muls[0])))
    if strategy == "defer":
        assert path == ["Add", "Mul", "Reciprocal", "ReduceMean", "Sqrt"]
        assert ops["SimplifiedLayerNormalization"] == 0     # ORT did not re-fuse the mean of squares
    else:
        assert path == ["SimplifiedLayerNormalization"]
    assert sum(ops.values()) == 2 + 2 + len(path)


def test_ort_keeps_the_deferred_form_in_a_block(tmp_path):
    report, opt = rewritten_and_optimized(llama_like_block(), tmp_path, "defer")
    assert report.rewritten == 3
    ops = Counter(op_types(opt))
    assert ops["MatMul"] == 6 and ops["FusedMatMul"] == 0
    assert ops["ReduceMean"] == ops["Sqrt"] == ops["Reciprocal"] == 3
    assert sum(ops[o] for o in FUSED_OPS) == 0 and ops["ReduceSumSquare"] == ops["Div"] == 0


@pytest.mark.parametrize("form_name", ["rms-dynamo-fp32", "rms-dynamo-fp32+residual",
                                       "layernorm-decomposed-beta"])
def test_ort_runs_the_fused_norm(form_name, tmp_path):
    build, _, _, fused_op = FORMS[form_name]
    report, opt = rewritten_and_optimized(build(), tmp_path, "fold-fused")
    assert report.rewritten == 1 and report.sites[0].strategy == "fold-fused"
    ops = Counter(op_types(opt))
    assert ops[fused_op] == 1 and ops["MatMul"] == 2
    assert ops["ReduceMean"] == ops["Pow"] == ops["Sqrt"] == ops["ReduceSumSquare"] == 0


def test_ort_fuses_a_folded_decomposed_layernorm_as_it_fused_the_original(tmp_path):
    """Observed onnxruntime behaviour: ORT fuses the exported decomposed LayerNorm (γ, β) into
    one LayerNormalization by itself; its LayerNormFusion needs the γ Mul and the β Add, so
    `fold` keeps them at 1 and 0 and ORT fuses the rewrite alike (the bare norm it left
    decomposed, with a less accurate fp32 mean: tests/test_layernorm_precision.py)."""
    src = tmp_path / "m.onnx"
    onnx.save(decomposed_layernorm(), src)
    assert Counter(op_types(ort_optimized(src)))["LayerNormalization"] == 1
    report, opt = rewritten_and_optimized(decomposed_layernorm(), tmp_path, "fold")
    assert report.rewritten == 1
    ops = Counter(op_types(opt))
    assert ops["LayerNormalization"] == 1 and ops["ReduceMean"] == 0


# -- fp16: every strategy within fp16 tolerance, and no worse than 2× the original ----------
def as_fp32(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with the same (fp16-representable) weights computed in fp32."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for init in out.graph.initializer:
        if init.data_type == TensorProto.FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    for value in list(out.graph.input) + list(out.graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in out.graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.FLOAT
    return out


@pytest.mark.parametrize("residual", [False, True])
def test_fp16_every_strategy_against_fp32_reference(residual, tmp_path):
    n = 64
    proto = decomposed_rms(np.float16, residual=residual, n=n, k=n, seed=3)
    src, ref_path = tmp_path / "m16.onnx", tmp_path / "m32.onnx"
    onnx.save(proto, src)
    onnx.save(as_fp32(proto), ref_path)
    rng = np.random.default_rng(0)
    feeds = {i.name: (3 * rng.standard_normal((2, 5, n)) + 0.5).astype(np.float16) for i in proto.graph.input}
    reference = run(ref_path, {k: v.astype(np.float32) for k, v in feeds.items()}, provider="cpu")
    original = run(src, feeds, provider="cpu")
    base_err = max(d.max_rel for d in judge(reference, original))
    assert 0 < base_err < TOLERANCE["float16"]
    for strategy in STRATEGIES:
        dst = tmp_path / f"m16.{strategy}.onnx"
        report = rewrite_file(src, dst, strategy=strategy)
        assert report.rewritten == (strategy != "keep")
        assert report.sites[0].strategy == expected_strategy(strategy, "rms", "decomposed", fp16=True)
        got = run(dst, feeds, provider="cpu")
        assert all(d.max_rel <= TOLERANCE["float16"] for d in judge(original, got)), strategy
        err = max(d.max_rel for d in judge(reference, got))
        assert err <= 2 * base_err, f"{strategy}: {err:.2e} vs fp32, original fp16 {base_err:.2e}"

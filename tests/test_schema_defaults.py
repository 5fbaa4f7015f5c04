"""Attributes read as the op defines them, and ops read by the signature of the model's opset.

1. An attribute left out takes the default of the op's own schema at the model's opset (onnx's
   schemas; onnxruntime's for its contrib ops, via rewriter.patterns.schema.CONTRIB_DEFAULTS),
   never a default of ours: a Skip*Norm without `epsilon` runs with 1e-12, which matters where
   the input's RMS is small.
2. Older opsets took some of today's inputs as attributes (Pad's pads and fill value before 11,
   Slice's starts/axes before 10, Split's sizes before 13, Reduce* axes before 18): each is read
   by its own signature, or the opset is refused (below 7: exit 4).

Each positive case is compared under onnxruntime (parity.assert_exact); each must-not-fire case
is left alone with its reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import GraphBuilder
from parity import assert_exact, rewrite_and_run
from rewriter import patterns, rewrite_file
from rewriter.errors import Unsupported
from rewriter.patterns.graph import attr, pad_spec, reduce_axes, reshape_target, slice_axes
from rewriter.patterns.schema import CONTRIB_DEFAULTS, SchemaUnknown

N, K = 16, 12
SKIP_NORMS = ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization")


def feeds_at(rms: float, *names: str, shape=(2, 5, N), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {name: (rms * rng.standard_normal(shape)).astype(np.float32) for name in names}


def sites_of(proto: onnx.ModelProto):
    return patterns.find_sites(ir.from_proto(proto).graph)


# -- 1. the contrib table is onnxruntime's -------------------------------------------------------

def test_contrib_defaults_are_onnxruntimes():
    """Every default in CONTRIB_DEFAULTS is the one the installed onnxruntime's schema declares
    (None where it declares none: a required attribute)."""
    from onnxruntime.capi import _pybind_state
    if not hasattr(_pybind_state, "get_all_operator_schema"):
        pytest.skip("this onnxruntime build does not expose its operator schemas")
    registered: dict = {}
    for schema in _pybind_state.get_all_operator_schema():
        key = (schema.domain, schema.name)
        if key not in registered or schema.since_version < registered[key].since_version:
            registered[key] = schema            # the contrib registration (ORT's LayerNormalization: 1)
    for (domain, op_type), defaults in CONTRIB_DEFAULTS.items():
        schema = registered[(domain, op_type)]
        for name, ours in defaults.items():
            proto = onnx.AttributeProto.FromString(schema.attributes[name]._default_value)
            theirs = helper.get_attribute_value(proto) if proto.type else None
            if ours is None:
                assert theirs is None, (op_type, name, theirs)
            else:
                assert np.float32(ours) == np.float32(theirs), (op_type, name, ours, theirs)


def _node(op_type: str, opset: int, domain: str = "", **attrs) -> ir.Node:
    g = GraphBuilder(opset)
    x = g.input("x", [2, 5, N])
    g.output(g.op(op_type, [x], domain=domain, **attrs))
    return next(iter(ir.from_proto(g.model()).graph))


def test_absent_attributes_take_the_schema_default_of_the_models_opset():
    assert attr(_node("SkipSimplifiedLayerNormalization", 18, "com.microsoft"), "epsilon") == float(np.float32(1e-12))
    assert attr(_node("SimplifiedLayerNormalization", 18), "epsilon") == float(np.float32(1e-5))
    assert attr(_node("LayerNormalization", 13), "axis") == -1       # ORT's contrib op before opset 17
    assert attr(_node("FusedMatMul", 18, "com.microsoft"), "alpha") == 1.0
    assert attr(_node("Pad", 10), "mode") == "constant" and attr(_node("Pad", 10), "value") == 0.0
    assert attr(_node("Transpose", 18), "perm") is None                # no default: the caller decides
    assert attr(_node("Gemm", 18, transB=1), "transB") == 1           # as written


# (op, attribute) pairs the patterns, the scale algebra and the input maker read without
# checking the opset first: each must have a schema entry at every opset the loader accepts
READ_ANYWHERE = [("Gemm", a) for a in ("alpha", "beta", "transA", "transB")] + [
    ("Concat", "axis"), ("Gather", "axis"), ("Split", "axis"), ("Transpose", "perm"), ("Conv", "group"),
    ("Conv", "pads"), ("Conv", "auto_pad"), ("ReduceMean", "keepdims"), ("Pad", "mode"), ("Cast", "to"),
    ("SimplifiedLayerNormalization", "axis"), ("SimplifiedLayerNormalization", "epsilon"),
    ("LayerNormalization", "axis"), ("LayerNormalization", "epsilon")]


@pytest.mark.parametrize("opset", [7, 9, 10, 11, 13, 17, 18, onnx.defs.onnx_opset_version()])
def test_every_attribute_read_has_a_default_or_none_at_every_accepted_opset(opset):
    for op_type, name in READ_ANYWHERE:
        node = ir.node(op_type, [])
        ir.Graph([], [], nodes=[node], opset_imports={"": opset})
        attr(node, name)        # raises SchemaUnknown where no schema declares it


def test_an_attribute_no_known_schema_declares_is_refused_not_guessed():
    with pytest.raises(SchemaUnknown, match="axes"):
        attr(_node("ReduceMean", 18), "axes")          # an input from opset 18
    with pytest.raises(SchemaUnknown, match="epsilon"):
        attr(_node("SkipGroupNorm", 18, "com.microsoft"), "epsilon")     # not in CONTRIB_DEFAULTS


def test_a_nested_body_reads_at_its_enclosing_opset(tmp_path):
    """If/Loop bodies import no opsets: find_sites binds them to the model's, so a Reshape-5
    target built by Unsqueeze-11 (axes an attribute) inside a branch folds at opset 11."""
    target = [helper.make_node("Unsqueeze", ["then_rows"], ["then_rows1"], axes=[0]),
              helper.make_node("Concat", ["then_rows1", "then_n"], ["then_shape"], axis=0),
              helper.make_node("Reshape", ["then_y", "then_shape"], ["then_flat"])]
    g = GraphBuilder(11)
    x = g.input("x", [2, 5, N])
    g.inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    y = g.rms(x, gain=g.gain(N))
    norm_nodes, g.nodes = g.nodes, []
    w = g.weight(N, K)
    body_nodes = list(norm_nodes)
    for n in body_nodes:        # the norm's output is the branch's then_y
        n.output[:] = ["then_y" if o == y else o for o in n.output]
    body = helper.make_graph(
        body_nodes + target + [helper.make_node("MatMul", ["then_flat", w], ["then_out"])], "then", [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(10, np.int64), "then_rows"),
         numpy_helper.from_array(np.array([N], np.int64), "then_n")])
    other = helper.make_graph([helper.make_node("Reshape", [x, "then_shape_else"], ["x_flat_else"]),
                               helper.make_node("MatMul", ["x_flat_else", w], ["else_out"])],
                              "else", [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([10, N], np.int64), "then_shape_else")])
    g.nodes.append(helper.make_node("If", ["cond"], ["out"], then_branch=body, else_branch=other))
    g.outputs.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, [10, K]))
    proto = g.model(contrib=False)
    model = ir.from_proto(proto)
    then = next(iter(model.graph)).attributes["then_branch"].value
    with pytest.raises(SchemaUnknown, match="nested body"):
        attr(next(n for n in then if n.op_type == "Reshape"), "allowzero")
    for flag in (True, False):
        feeds = {**feeds_at(3.0, "x"), "cond": np.array(flag)}
        report, diffs, _ = rewrite_and_run(proto, tmp_path, feeds=feeds)
        assert report.rewritten == 1, report.table()
        assert_exact(diffs)


# -- 1. absent attributes end to end --------------------------------------------------------------

def skip_norm(op_type: str, **attrs) -> onnx.ModelProto:
    """x + skip → Skip*Norm (γ, and β for SkipLayerNormalization) → MatMul, `attrs` as given."""
    g = GraphBuilder(18)
    x, skip = g.input("x", [2, 5, N]), g.input("skip", [2, 5, N])
    inputs = [x, skip, g.const(g.gain(N), "gain")]
    if op_type == "SkipLayerNormalization":
        inputs.append(g.const((0.2 * g.rng.standard_normal(N)).astype(np.float32), "beta"))
    outs = g.op(op_type, inputs, n_out=4, domain="com.microsoft", **attrs)
    g.output(g.op("MatMul", [outs[0], g.weight(N, K)]))
    return g.model()


@pytest.mark.parametrize("rms", [1.0, 1e-2, 1e-3])
@pytest.mark.parametrize("op_type", SKIP_NORMS)
def test_skip_norm_without_epsilon_uses_onnxruntimes_default(op_type, rms, tmp_path):
    """Was: ε = 1e-5 assumed, rel 0.06 at RMS 1e-2 and 0.63-0.79 at 1e-3 (ORT runs 1e-12)."""
    proto = skip_norm(op_type)
    (site,), _ = sites_of(proto)
    assert site.eps == float(np.float32(1e-12))
    for strategy in ("defer", "defer-normop"):
        report, diffs, _ = rewrite_and_run(proto, tmp_path, feeds=feeds_at(rms, "x", "skip"), strategy=strategy)
        assert report.rewritten == 1, report.table()
        assert_exact(diffs)


@pytest.mark.parametrize("op_type", SKIP_NORMS)
def test_skip_norm_with_epsilon_written_keeps_it(op_type, tmp_path):
    proto = skip_norm(op_type, epsilon=1e-5)
    (site,), _ = sites_of(proto)
    assert site.eps == float(np.float32(1e-5))
    report, diffs, _ = rewrite_and_run(proto, tmp_path, feeds=feeds_at(1e-3, "x", "skip"))
    assert report.rewritten == 1
    assert_exact(diffs)


@pytest.mark.parametrize("op_type,opset", [("SimplifiedLayerNormalization", 18), ("LayerNormalization", 13),
                                           ("LayerNormalization", 17), ("RMSNormalization", 23)])
def test_single_op_norm_without_attributes_into_fused_matmul(op_type, opset, tmp_path):
    """No axis, epsilon or stash_type on the norm, no alpha or trans* on the FusedMatMul: each
    takes its op's default (LayerNormalization at opset 13 is onnxruntime's contrib op)."""
    g = GraphBuilder(opset)
    x = g.input("x", [2, 5, N])
    inputs = [x, g.const(g.gain(N), "gain")]
    if op_type == "LayerNormalization":
        inputs.append(g.const((0.2 * g.rng.standard_normal(N)).astype(np.float32), "beta"))
    y = g.op(op_type, inputs)
    g.output(g.op("FusedMatMul", [y, g.weight(N, K)], domain="com.microsoft"))
    g.output(g.op("MatMul", [y, g.weight(N, K)]))
    proto = g.model()
    (site,), _ = sites_of(proto)
    assert site.eps == float(np.float32(1e-5))
    report, diffs, _ = rewrite_and_run(proto, tmp_path, feeds=feeds_at(1e-3, "x"))
    assert report.rewritten == 1, report.table()
    assert_exact(diffs)


def test_reduce_without_axes_is_no_per_row_norm():
    """Absent axes reduce every axis (opset 13), or nothing with noop_with_empty_axes (18): no
    RMSNorm either way, nothing matched."""
    for opset, extra in ((13, {}), (18, {"noop_with_empty_axes": 1})):
        g = GraphBuilder(opset)
        x = g.input("x", [2, 5, N])
        ms = g.op("ReduceMean", [g.op("Mul", [x, x])], keepdims=1, **extra)
        y = g.op("Div", [x, g.op("Sqrt", [g.op("Add", [ms, g.const(np.array(1e-5, np.float32))])])])
        g.output(g.op("MatMul", [g.op("Mul", [y, g.const(g.gain(N))]), g.weight(N, K)]))
        model = ir.from_proto(g.model(contrib=False))
        reduce = next(n for n in model.graph if n.op_type == "ReduceMean")
        assert reduce_axes(reduce, 3) == ([0, 1, 2] if opset == 13 else [])
        assert sites_of(g.model(contrib=False)) == ([], [])


# -- 2. legacy opset forms -------------------------------------------------------------------------

def rms_then(opset: int, between, n_in: int = N) -> onnx.ModelProto:
    """RMSNorm(x) → between(g, y) → MatMul(W [n_in, K]) for each output of `between`."""
    g = GraphBuilder(opset)
    x = g.input("x", [2, 5, N])
    moved = between(g, g.rms(x, gain=g.gain(N)))
    for value in moved if isinstance(moved, list) else [moved]:
        g.output(g.op("MatMul", [value, g.weight(n_in, K)]))
    return g.model(contrib=False)


def pad_rows(value=None, **attrs):
    """Pad-2 (opset < 11): pads and the fill value as attributes; one row before, two after."""
    extra = {} if value is None else {"value": value}
    return lambda g, y: g.op("Pad", [y], pads=[0, 1, 0, 0, 2, 0], **extra, **attrs)


def _single_site(report):
    assert report.found == 1, report.table()
    return report.sites[0]


@pytest.mark.parametrize("opset", [7, 10])
def test_legacy_pad_of_zero_rows_folds(opset, tmp_path):
    proto = rms_then(opset, pad_rows())
    pad = next(n for n in ir.from_proto(proto).graph if n.op_type == "Pad")
    pads, value, mode = pad_spec(pad, 3)
    assert (pads.tolist(), value, mode) == ([[0, 1, 0], [0, 2, 0]], 0.0, "constant")
    report, diffs, _ = rewrite_and_run(proto, tmp_path, feeds=feeds_at(3.0, "x"))
    assert _single_site(report).action == "fold"
    assert_exact(diffs)


@pytest.mark.parametrize("opset", [7, 10])
def test_legacy_pad_with_a_fill_value_is_not_folded(opset, tmp_path):
    """Was: the value attribute unread, rows of 1.5 taken for zeros and γ folded (rel 0.19-0.31)."""
    report, diffs, _ = rewrite_and_run(rms_then(opset, pad_rows(1.5)), tmp_path, feeds=feeds_at(3.0, "x"))
    site = _single_site(report)
    assert site.action == "skip" and "fill value 1.5" in site.reason and "Pad" in site.at
    assert_exact(diffs, tol=0)


def test_legacy_pad_reflecting_rows_is_not_folded(tmp_path):
    report, _, _ = rewrite_and_run(rms_then(10, pad_rows(mode="reflect")), tmp_path, feeds=feeds_at(3.0, "x"))
    assert "mode reflect" in _single_site(report).reason


def test_pad_axes_input_places_the_pads(tmp_path):
    """Pad-18's axes input: pads for the named axes only (rows: folded; the normalized axis: not)."""
    def pad(axes):
        return lambda g, y: g.op("Pad", [y, g.const(np.array([1, 2], np.int64)), g.const(np.array(0.0, np.float32)),
                                         g.const(np.array(axes, np.int64))])
    report, diffs, _ = rewrite_and_run(rms_then(18, pad([1])), tmp_path, feeds=feeds_at(3.0, "x"))
    assert _single_site(report).action == "fold"
    assert_exact(diffs)
    report, _, _ = rewrite_and_run(rms_then(18, pad([-1]), n_in=N + 3), tmp_path, feeds=feeds_at(3.0, "x"))
    assert "pads the normalized axis" in _single_site(report).reason


def test_legacy_slice_of_rows_defers(tmp_path):
    """Slice-1 (opset < 10): starts/ends/axes attributes (was: IndexError, exit 7)."""
    proto = rms_then(9, lambda g, y: g.op("Slice", [y], starts=[1], ends=[4], axes=[1]))
    assert slice_axes(next(n for n in ir.from_proto(proto).graph if n.op_type == "Slice")) == [1]
    report, diffs, _ = rewrite_and_run(proto, tmp_path, feeds=feeds_at(3.0, "x"))
    assert _single_site(report).action == "defer"
    assert_exact(diffs)


def test_legacy_slice_without_axes_cuts_the_leading_axes(tmp_path):
    proto = rms_then(9, lambda g, y: g.op("Slice", [y], starts=[0, 1], ends=[1, 4]))
    report, diffs, _ = rewrite_and_run(proto, tmp_path, feeds=feeds_at(3.0, "x"))
    assert _single_site(report).action == "defer"
    assert_exact(diffs)


def test_legacy_slice_of_features_is_not_folded(tmp_path):
    proto = rms_then(9, lambda g, y: g.op("Slice", [y], starts=[0], ends=[8], axes=[2]), n_in=8)
    report, diffs, _ = rewrite_and_run(proto, tmp_path, feeds=feeds_at(3.0, "x"))
    site = _single_site(report)
    assert site.action == "skip" and "Slice along the normalized axis" in site.reason
    assert_exact(diffs, tol=0)


def test_legacy_split_of_rows_defers(tmp_path):
    """Split-11: sizes as the `split` attribute; the parts are rows, each part's linear defers."""
    proto = rms_then(11, lambda g, y: g.op("Split", [y], n_out=2, axis=1, split=[2, 3]))
    report, diffs, _ = rewrite_and_run(proto, tmp_path, feeds=feeds_at(3.0, "x"))
    assert _single_site(report).action == "defer"
    assert_exact(diffs)


def test_legacy_reduce_axes_and_clip_after_the_linear(tmp_path):
    """ReduceMean-11 (axes attribute) in the norm, Clip-10 (min/max attributes) after the
    linear: the scale stops before the Clip, every value exact."""
    g = GraphBuilder(10)
    x = g.input("x", [2, 5, N])
    h = g.op("MatMul", [g.rms(x, gain=g.gain(N)), g.weight(N, K)])
    g.output(g.op("Clip", [h], min=-0.5, max=0.5))
    report, diffs, _ = rewrite_and_run(g.model(contrib=False), tmp_path, feeds=feeds_at(3.0, "x"))
    assert _single_site(report).action == "defer"
    assert_exact(diffs)


def test_reshape_allowzero_zero_is_not_a_copied_dim():
    g = GraphBuilder(14)
    x = g.input("x", [2, 5, N])
    g.output(g.op("Reshape", [x, g.const(np.array([0, N], np.int64))], allowzero=1))
    g.output(g.op("Reshape", [x, g.const(np.array([0, 5, N], np.int64))]))
    first, second = ir.from_proto(g.model()).graph
    assert reshape_target(first) is None and reshape_target(second).tolist() == [0, 5, N]


def test_opset_below_7_is_refused(tmp_path):
    """onnxruntime supports opset 7 and later (Mul-6 broadcasts by attributes: no kernel)."""
    g = GraphBuilder(6)
    x = g.input("x", [2, 5, N])
    g.output(g.op("MatMul", [g.op("Relu", [x]), g.weight(N, K)]))
    src, dst = tmp_path / "old.onnx", tmp_path / "old_flash.onnx"
    onnx.save(g.model(contrib=False), src)
    with pytest.raises(Unsupported, match="opset 6"):
        rewrite_file(src, dst)
    assert not dst.exists()


@pytest.mark.parametrize("opset", [9, 13])
def test_scale_through_a_computed_reshape_is_emitted_in_the_models_opset(opset, tmp_path):
    """A Reshape whose target is computed (a Concat of constants): the deferred 1/RMS is reshaped
    alike with a Slice of the reshaped value's shape, written as the opset's Slice (attributes
    before opset 10)."""
    g = GraphBuilder(opset)
    x = g.input("x", [2, 5, N])
    target = g.op("Concat", [g.const(np.array([-1], np.int64)), g.const(np.array([N], np.int64))], axis=0)
    flat = g.op("Reshape", [g.rms(x, gain=g.gain(N)), target])
    g.output(g.op("Relu", [g.op("MatMul", [flat, g.weight(N, K)])]), shape=[10, K])
    report, diffs, out = rewrite_and_run(g.model(contrib=False), tmp_path, feeds=feeds_at(3.0, "x"), push_scales=False)
    assert _single_site(report).action == "defer", report.table()
    assert_exact(diffs)
    assert "Slice" in [n.op_type for n in out.graph.node]
    onnx.checker.check_model(out)


@pytest.mark.parametrize("opset", [9, 10, 11])
def test_gemm_c_taken_out_for_the_scale_stays_a_required_input(opset, tmp_path):
    """Deferring past a Gemm moves its C after the scale; Gemm-7..10 require a C (a zero one
    stays; was: an invalid model, exit 7)."""
    g = GraphBuilder(opset)
    x = g.input("x", [10, N])
    c = g.const(g.rng.standard_normal(K).astype(np.float32), "C")
    g.output(g.op("Gemm", [g.rms(x, gain=g.gain(N)), g.weight(N, K), c], beta=0.5), shape=[10, K])
    report, diffs, out = rewrite_and_run(g.model(contrib=False), tmp_path, feeds=feeds_at(3.0, "x", shape=(10, N)))
    assert _single_site(report).action == "defer"
    assert_exact(diffs)
    onnx.checker.check_model(out)


def test_simplified_layernorm_in_com_microsoft_is_no_known_op():
    """onnxruntime registers SimplifiedLayerNormalization in the ONNX domain only: in com.microsoft
    no runtime defines it (nor its defaults), so it is not taken for a norm."""
    g = GraphBuilder(18)
    x = g.input("x", [2, 5, N])
    y = g.op("SimplifiedLayerNormalization", [x, g.const(g.gain(N))], domain="com.microsoft")
    g.output(g.op("MatMul", [y, g.weight(N, K)]))
    assert sites_of(g.model()) == ([], [])

"""onnxruntime's fused norm kernels are emitted only where their op takes the site: Skip* on a
residual Add of rank 2 or 3 whose operands both have the sum's shape
(contrib_ops/cpu/skip_layer_norm_helper.h), the plain kernel elsewhere (any rank), a gated
group norm's kernel per group with the merging Reshape after it; fold-fused / defer-normop
fall back to fold / defer where no kernel fits, and the report says why. And a model the
rewriter writes must load and run in onnxruntime before it is renamed into place: a writer bug
that breaks that exits 7 with nothing written."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from builders import GraphBuilder
from parity import assert_exact, op_types, rewrite_and_run
from test_reach import _gated_feeds, gated_graph

from rewriter import rewrite_file
from rewriter.cli import main
from rewriter.errors import EXIT_INTERNAL, EXIT_VERIFY_FAILED, InternalError

N, K = 16, 24
SKIP = "SkipSimplifiedLayerNormalization"
PLAIN = "SimplifiedLayerNormalization"


def residual_site(shape, other_shape=None, swap=False):
    """x (shape) + r (other_shape, default the same) → RMSNorm(γ) → MatMul; `swap`: Add(r, x)."""
    g = GraphBuilder()
    x = g.input("x", shape)
    r = g.input("r", other_shape or shape)
    s = g.op("Add", [r, x] if swap else [x, r])
    g.output(g.op("MatMul", [g.rms(s, gain=g.gain(N)), g.weight(N, K)]), shape=[*shape[:-1], K])
    return g.model()


@pytest.mark.parametrize("choice", [{"strategy": "fold-fused"}, {"target": "ort-cuda"}])
def test_rank4_residual_gets_the_plain_kernel(choice, tmp_path):
    """Skip* takes rank 2 or 3 only: a 4-D residual sum is normalized by the plain kernel."""
    report, diffs, out = rewrite_and_run(residual_site([2, 3, 5, N]), tmp_path, **choice)
    ops = op_types(out)
    assert report.sites[0].strategy == "fold-fused" and SKIP not in ops and ops.count(PLAIN) == 1, ops
    assert_exact(diffs)


@pytest.mark.parametrize("shape", [[2, 5, N], [10, N]])
def test_rank3_and_rank2_residual_still_skip_fused(shape, tmp_path):
    report, diffs, out = rewrite_and_run(residual_site(shape), tmp_path, strategy="fold-fused")
    assert op_types(out).count(SKIP) == 1 and PLAIN not in op_types(out)
    assert_exact(diffs)


@pytest.mark.parametrize("swap", [False, True])
def test_broadcasting_residual_add_is_not_skip_fused(swap, tmp_path):
    """x [2, 5, N] + r [1, 5, N]: the Skip kernel's output takes its first input's shape, so a
    broadcast (either operand order) gets the plain kernel on the sum."""
    report, diffs, out = rewrite_and_run(residual_site([2, 5, N], [1, 5, N], swap=swap), tmp_path,
                                         strategy="fold-fused")
    assert SKIP not in op_types(out) and op_types(out).count(PLAIN) == 1
    assert_exact(diffs)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("choice", [{"strategy": "fold-fused"}, {"target": "ort-cuda"}])
def test_gated_group_norm_fuses_per_group(groups, choice, tmp_path):
    """Mamba2's gated norm over [.., G, n]: one kernel with a gain of n, then the Reshape merging
    the groups (the linear reads [.., G·n] as before)."""
    report, diffs, out = rewrite_and_run(gated_graph(groups), tmp_path, feeds=_gated_feeds(), **choice)
    assert report.sites[0].strategy == "fold-fused"
    kernel = next(n for n in out.graph.node if n.op_type == PLAIN)
    gain = next(i for i in out.graph.initializer if i.name == kernel.input[1])
    assert list(gain.dims) == [16 // groups]
    assert_exact(diffs)


def unknown_width_site():
    """A norm over an axis of unknown size with a scalar gain: no kernel gain can be sized."""
    g = GraphBuilder()
    x = g.input("x", [2, 5, "d"])
    y = g.rms(x, gain=np.array(1.5, np.float32))
    g.output(g.op("MatMul", [y, g.weight(N, K)]))
    return g.model()


def test_no_kernel_without_the_width_and_the_report_says_why(tmp_path):
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, N)).astype(np.float32)}
    for strategy, fallback in (("fold-fused", "fold"), ("defer-normop", "defer")):
        report, diffs, out = rewrite_and_run(unknown_width_site(), tmp_path, feeds=feeds, strategy=strategy,
                                             name=strategy)
        site = report.sites[0]
        assert site.strategy == fallback, report.table()
        assert f"{strategy} not possible: the normalized axis' size is unknown" in site.reason, site.reason
        assert PLAIN not in op_types(out)
        assert_exact(diffs)


# -- every written model loads and runs ------------------------------------------------------

def _lenient_skip(x):
    """The rank test the writer had: any residual Add, whatever its rank."""
    add = x.producer()
    return tuple(add.inputs) if add is not None and add.op_type == "Add" else None


def test_output_that_fails_at_run_time_is_not_written(tmp_path, monkeypatch):
    """A writer that puts a Skip kernel on a 4-D sum (it loads, then fails when run): exit 7,
    nothing written."""
    src = tmp_path / "m.onnx"
    onnx.save(residual_site([2, 3, 5, N]), src)
    monkeypatch.setattr("rewriter.kernels.skip_operands", _lenient_skip)
    with pytest.raises(InternalError, match="does not run in onnxruntime where the input does"):
        rewrite_file(src, tmp_path / "out.onnx", strategy="fold-fused")
    assert main([str(src), "-o", str(tmp_path / "out.onnx"), "--strategy", "fold-fused", "--quiet"]) == EXIT_INTERNAL
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


@pytest.mark.parametrize("large", [False, True])
def test_output_that_does_not_load_is_not_written(large, tmp_path, monkeypatch, capsys):
    """A writer that drops the Reshape merging a group norm's groups (the linear then reads
    [.., G, n]: MatMul's dims do not match): exit 7 with one line, nothing written — for a large
    model (weights past RUN_CHECK_BYTES) from its weightless skeleton alone."""
    if large:
        monkeypatch.setattr("rewriter.api.RUN_CHECK_BYTES", 0)
    src = tmp_path / "m.onnx"
    onnx.save(gated_graph(2), src)
    from rewriter.kernels import NormKernels
    real = NormKernels.fuse_norm
    monkeypatch.setattr(NormKernels, "fuse_norm", lambda self, *a, merge=None, **k: real(self, *a, **k))
    code = main([str(src), "-o", str(tmp_path / "out.onnx"), "--strategy", "fold-fused", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_INTERNAL and len(err) == 1 and "does not load in onnxruntime" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_input_that_onnxruntime_cannot_load_is_not_held_against_the_rewrite(tmp_path):
    """An input onnxruntime's CPU provider refuses (Acosh has no float64 kernel there), after
    the norm's linear: the rewrite is written, and the report says the output went unchecked."""
    g = GraphBuilder()
    y = g.op("MatMul", [g.rms(g.input("x", [2, 5, N]), gain=g.gain(N)), g.weight(N, K)])
    g.output(g.op("Acosh", [g.op("Cast", [y], to=onnx.TensorProto.DOUBLE)]), np.float64, shape=[2, 5, K])
    src = tmp_path / "m.onnx"
    onnx.save(g.model(), src)
    report = rewrite_file(src, tmp_path / "out.onnx")
    assert report.rewritten == 1 and (tmp_path / "out.onnx").exists()
    assert any("does not load in onnxruntime (CPU) either" in n for n in report.notes), report.notes


# -- Mamba2 from a transformers config (models/reach.py: dynamo export, random weights) ------

@pytest.mark.parametrize("name", [pytest.param("mamba2", marks=pytest.mark.slow), "mamba2-1g"])   # ~7 s each
def test_mamba2_for_ort_cuda_loads_runs_and_is_exact(name, tmp_path):
    """Both gated-norm variants: the block's, the gated (per group) and the final RMSNorm as
    fused kernels; the output loads and runs (was: not loadable with 2 groups, a Skip kernel
    fed 4-D at run time with 1) and matches the original."""
    pytest.importorskip("torch", reason="exports with torch (the models extra); the core-deps job has none")
    from models.reach import export, feeds
    src = export(name, tmp_path / f"{name}.onnx")
    report, diffs, out = rewrite_and_run(src, tmp_path, feeds=feeds(name), name=name, target="ort-cuda")
    assert (report.found, report.rewritten) == (3, 3)
    assert [s.strategy for s in report.sites] == ["fold-fused"] * 3, report.table()
    assert op_types(out).count(PLAIN) + op_types(out).count(SKIP) == 3
    assert_exact(diffs)


def layernorm_site(opset: int, shape=(2, 5, N)):
    """x → decomposed LayerNorm(γ, β) → MatMul at `opset`."""
    g = GraphBuilder(opset=opset)
    x = g.input("x", list(shape))
    y = g.layernorm(x, gain=g.gain(N), beta=g.gain(N) - 1)
    g.output(g.op("MatMul", [y, g.weight(N, K)]), shape=[*shape[:-1], K])
    return g.model()


@pytest.mark.parametrize("strategy,fallback,op_type", [("fold-fused", "fold", "LayerNormalization"),
                                                       ("defer-normop", "defer", "LayerNormalization")])
@pytest.mark.parametrize("opset", [16, 17])
def test_a_layernorm_kernel_needs_opset_17_and_the_report_says_so(opset, strategy, fallback, op_type, tmp_path):
    """LayerNormalization (a LayerNorm's fused kernel, and defer-normop's centered statistics)
    is an ONNX op from opset 17: below it the site takes the fallback, and the report names the
    strategy it took and why; from 17 the kernel is emitted and reported."""
    report, diffs, out = rewrite_and_run(layernorm_site(opset), tmp_path, strategy=strategy)
    assert_exact(diffs)
    (site,) = report.sites
    emitted = op_type in op_types(out)
    if opset < 17:
        assert site.strategy == fallback and not emitted, (site.strategy, op_types(out))
        assert ("not possible: a LayerNorm's kernel is LayerNormalization, an ONNX op from opset 17; "
                "the model imports opset 16") in site.reason, site.reason
        assert report.table().count(f"{fallback}: 1"), report.table()
    else:
        assert site.strategy == strategy and emitted, (site.strategy, op_types(out))
        assert "not possible" not in site.reason, site.reason


def test_the_rms_kernel_needs_no_opset_but_skip_needs_contrib_version_1():
    """SimplifiedLayerNormalization is onnxruntime's op in the ONNX domain at every opset (no
    opset refusal for an RMSNorm); SkipSimplifiedLayerNormalization is com.microsoft version 1."""
    from rewriter.patterns import find_sites
    from rewriter.plan import Strategy, kernel_contract
    import onnx_ir as ir
    model = ir.from_proto(residual_site([2, 5, N]))
    from rewriter.passes import infer_shapes
    infer_shapes(model)
    (site,), _ = find_sites(model.graph)
    assert kernel_contract(site, Strategy.FOLD_FUSED, {"": 13, "com.microsoft": 1}) == ""
    assert kernel_contract(site, Strategy.DEFER_NORMOP, {"": 9}) == ""
    refusal = kernel_contract(site, Strategy.FOLD_FUSED, {"": 18, "com.microsoft": 2})
    assert "SkipSimplifiedLayerNormalization, is com.microsoft version 1; the model imports version 2" in refusal
    assert kernel_contract(site, Strategy.FOLD_FUSED, {"": 18}) == ""     # imported where emitted


def test_output_that_runs_but_differs_is_not_written(tmp_path, monkeypatch, capsys):
    """Without --verify too: a writer that folds the gain twice (the output loads and runs, its
    values are wrong) is caught by the run check, which runs the input on the same inputs and
    judges the two: exit 1, one line, nothing written."""
    import rewriter.fold
    real = rewriter.fold.folded_weight
    monkeypatch.setattr(rewriter.fold, "folded_weight",
                        lambda ref, gain, dtype: real(ref, None if gain is None else gain * gain, dtype))
    src = tmp_path / "m.onnx"
    g = GraphBuilder()
    g.output(g.op("MatMul", [g.rms(g.input("x", [2, 5, N]), gain=g.gain(N)), g.weight(N, K)]))
    onnx.save(g.model(), src)
    code = main([str(src), "-o", str(tmp_path / "out.onnx"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_VERIFY_FAILED and len(err) == 1 and "verification failed" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    monkeypatch.setattr(rewriter.fold, "folded_weight", real)      # the same run, writer intact: written
    assert main([str(src), "-o", str(tmp_path / "out.onnx"), "--quiet"]) == 0

"""Cases found by trying to break the closed classes (attribute defaults, Gemm scaling, legacy
opsets, --approx axes, fused kernel contracts, file safety, verify's floor) with graphs the
class tests do not build. One test per finding; each fails on the code before its fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from builders import GraphBuilder
from parity import assert_exact, rewrite_and_run
from test_api_cli import llama_like_block
from test_faults import cli, digests, save_external

N, K, B, T = 16, 12, 2, 5


# -- a Skip* norm whose skip is larger than its input ---------------------------------------------

def skip_wider_than_input(op_type: str) -> onnx.ModelProto:
    """Skip*Norm(input [1, T, N], skip [B, T, N]) → MatMul. onnxruntime runs it and keeps the
    input's shape (it reads skip's first batch only); the Add a rewrite writes broadcasts to
    [B, T, N]: another output shape and other values (was: exit 0, rel 1.2)."""
    g = GraphBuilder(18)
    x, skip = g.input("x", [1, T, N]), g.input("skip", [B, T, N])
    inputs = [x, skip, g.const(g.gain(N), "gain")]
    if op_type == "SkipLayerNormalization":
        inputs.append(g.const((0.2 * g.rng.standard_normal(N)).astype(np.float32), "beta"))
    y = g.op(op_type, inputs, domain="com.microsoft", epsilon=1e-5)
    g.output(g.op("MatMul", [y, g.weight(N, K)]))
    return g.model()


@pytest.mark.parametrize("options", [{"mode": "defer"}, {"strategy": "defer-normop"}, {"target": "ort-cuda"}])
@pytest.mark.parametrize("op_type", ["SkipSimplifiedLayerNormalization", "SkipLayerNormalization"])
def test_skip_wider_than_its_input_is_not_rewritten(op_type, options, tmp_path):
    report, diffs, _ = rewrite_and_run(skip_wider_than_input(op_type), tmp_path, **options)
    assert report.rewritten == 0
    assert "skip is larger than the input" in report.sites[0].reason, report.table()
    assert_exact(diffs, tol=0)


def test_skip_broadcast_into_its_input_still_rewrites(tmp_path):
    """The must-not-fire side: skip [1, T, N] (or [T, N]) added to input [B, T, N] is the Add."""
    g = GraphBuilder(18)
    x, skip = g.input("x", [B, T, N]), g.input("skip", [1, T, N])
    y = g.op("SkipSimplifiedLayerNormalization", [x, skip, g.const(g.gain(N), "gain")], domain="com.microsoft",
             epsilon=1e-5)
    g.output(g.op("MatMul", [y, g.weight(N, K)]))
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path)
    assert report.rewritten == 1, report.table()
    assert_exact(diffs)


# -- --report on another name (a hard link) of a file of the run ------------------------------------

@pytest.fixture
def linked(tmp_path):
    """An external-data model, a genai folder holding the same, and the report name to link."""
    single = tmp_path / "single.onnx"
    onnx.save(llama_like_block(), single)
    ext = tmp_path / "ext"
    ext.mkdir()
    save_external(llama_like_block(), ext / "model.onnx")
    gen = tmp_path / "gen"
    gen.mkdir()
    save_external(llama_like_block(), gen / "model.onnx")
    (gen / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
    return tmp_path


@pytest.mark.parametrize("model, linked_file", [
    ("single.onnx", "single.onnx"),
    ("ext/model.onnx", "ext/model.onnx.data"),
    ("ext/model.onnx", "ext/model.onnx"),
    ("gen", "gen/genai_config.json"),
    ("gen", "gen/model.onnx.data"),
])
def test_report_on_a_hard_link_of_an_input_file_leaves_the_input(model, linked_file, linked):
    """The report is renamed into place like every output: the hard link's name gets the report,
    the input keeps its bytes (was: exit 0 and the input's model, weights or config truncated
    to the JSON report — open(path, "w") writes through the shared inode)."""
    root = linked
    report = root / "report.json"
    os.link(root / linked_file, report)
    before = digests(root / Path(linked_file).parts[0]) if "/" in linked_file else \
        {linked_file: digests(root)[linked_file]}
    code, _, err = cli(root / model, "-o", root / "out.onnx" if model.endswith(".onnx") else root / "out",
                       "--report", report)
    assert code == 0, err
    after = digests(root / Path(linked_file).parts[0]) if "/" in linked_file else \
        {linked_file: digests(root)[linked_file]}
    assert after == before
    assert json.loads(report.read_text())["sites"]
    assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]


# -- the verbs that write something other than a model: never over the model they read ----------

@pytest.mark.parametrize("target", ["ext/model.onnx", "ext/./model.onnx.data", "link.onnx"])
@pytest.mark.parametrize("verb", [("calibrate", "{m}", "--provider", "cpu", "-o", "{t}"),
                                  ("bench", "{m}", "--tokens", "1", "--json", "{t}"),
                                  ("bench", "{m}", "--tokens", "1", "--plot", "{t}")])
def test_non_model_outputs_never_replace_the_model_read(verb, target, linked):
    """`calibrate M -o M`, `bench M --json M` / `--plot M` (or its data file, or another hard link
    of it) are exit 5 before anything is measured (were exit 0: the model replaced by the cost
    table, the JSON or the PNG)."""
    root = linked
    os.link(root / "ext/model.onnx", root / "link.onnx")
    before = digests(root / "ext")
    code, _, err = cli(*[a.format(m=root / "ext/model.onnx", t=root / target) for a in verb])
    assert code == 5 and "refusing to write over it" in err, err
    assert digests(root / "ext") == before


# -- inputs and outputs declared without a shape (rank unknown) ----------------------------------

@pytest.mark.parametrize("external", [False, True])
def test_unknown_rank_input_and_output_rewrite(external, tmp_path):
    """onnxruntime runs a model whose graph input and output declare no shape; onnx.checker
    insists on the field (was: exit 4 "Field 'shape' of 'type' is required"), and inputs made
    from the signature fed it a scalar (the output check: exit 7). Now: rewritten, load-checked
    only (no feed of unknown rank is made), exact at ranks 2-4."""
    g = GraphBuilder(18)
    x = g.input("x", None)
    y = g.rms(x, gain=g.gain(N))
    g.outputs.append(onnx.helper.make_tensor_value_info(g.op("MatMul", [y, g.weight(N, K)]), onnx.TensorProto.FLOAT,
                                                         None))
    src = tmp_path / "m.onnx"
    if external:
        save_external(g.model(), src)
    else:
        onnx.save(g.model(), src)
    for shape in [(B, T, N), (T, N), (B, 3, T, N)]:
        feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        report, diffs, _ = rewrite_and_run(src, tmp_path, feeds=feeds)
        assert report.rewritten == 1, report.table()
        assert any("load-checked only" in note for note in report.notes), report.notes
        assert_exact(diffs)


# -- Gemm with beta = 0 does not read C ------------------------------------------------------------

@pytest.mark.parametrize("options", [{"mode": "defer"}, {"mode": "fold"}, {"target": "ort-cpu"}])
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_gemm_beta_zero_ignores_a_non_finite_c(value, options, tmp_path):
    """LayerNorm(γ, β) → Gemm(beta = 0, C with one inf/NaN entry): onnxruntime skips C, the
    output is finite; the rewrite wrote β·C = 0·inf = NaN into its bias (was: exit 0, NaN
    outputs)."""
    g = GraphBuilder(18)
    x = g.input("x", [T, N])
    y = g.layernorm(x, gain=g.gain(N), beta=(0.3 * g.rng.standard_normal(N)).astype(np.float32))
    c = np.zeros(K, np.float32)
    c[3] = value
    g.output(g.op("Gemm", [y, g.weight(N, K), g.const(c, "C")], alpha=2.0, beta=0.0), shape=[T, K])
    report, diffs, _ = rewrite_and_run(g.model(), tmp_path, **options)
    assert report.rewritten == 1, report.table()
    assert_exact(diffs)


@pytest.mark.parametrize("name", ["w.data/", "./w.data", "sub/"])
def test_data_name_with_a_separator_is_a_usage_error(name, linked):
    """A data name ending in a separator passed as a plain name (was exit 5: "cannot write (No
    such file or directory)" after the rewrite); "./w.data" is a path like any other."""
    root = linked
    code, _, err = cli(root / "ext/model.onnx", "-o", root / "o.onnx", "--external-data", name)
    assert code == 2 and "give a file name" in err, err
    assert not (root / "o.onnx").exists()

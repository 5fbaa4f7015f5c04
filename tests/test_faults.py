"""Faults and bad input: one `error: ...` line, the documented exit code, no traceback, the
input byte-identical afterwards and nothing written (no output, no temporary files).
Also: atomic save (a failure while writing leaves nothing), --overwrite, CLI idempotency,
metadata kept."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import rewriter.io as rio
from builders import GraphBuilder
from parity import assert_exact, random_feeds
from rewriter.cli import main
from rewriter.errors import (EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_NOTHING, EXIT_OK,
                             EXIT_OUTPUT, EXIT_UNSUPPORTED, EXIT_USAGE)
from rewriter.verify import judge, run, session
from test_api_cli import llama_like_block


# -- helpers ------------------------------------------------------------------------------------

def cli(*args) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (the input model and its external data)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_error(code: int, err: str, expected_code: int, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert code == expected_code, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert pattern.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err


def save_external(proto: onnx.ModelProto, path: Path, location: str | None = "model.onnx.data",
                  one_file: bool = True) -> None:
    # size_threshold compares sys.getsizeof(raw_data) (33 bytes of overhead): 64 sends weights
    # and gains out and keeps the int64 axes inline, which onnxruntime must read at load time
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=one_file,
                    location=location, size_threshold=64)


# -- bad input: one case per fault ----------------------------------------------------------------

def _model(mutate=None) -> onnx.ModelProto:
    proto = llama_like_block()
    if mutate:
        mutate(proto)
    return proto


def _no_norm() -> onnx.ModelProto:
    g = GraphBuilder()
    x = g.input("x", [None, None, 16])
    g.output(g.op("MatMul", [g.op("Relu", [x]), g.weight(16, 8)]))
    return g.model()


def _write(kind: str, folder: Path) -> Path:
    """Make the faulty input `kind` in `folder`; return the path to hand the CLI."""
    path = folder / "model.onnx"
    good = llama_like_block().SerializeToString()
    if kind == "text":
        path.write_text("this is not an onnx model\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "no_graph":
        path.write_bytes(onnx.ModelProto(producer_name="x", ir_version=10).SerializeToString())
    elif kind == "missing_file":
        return folder / "nope.onnx"
    elif kind == "directory":
        (folder / "adir.onnx").mkdir()
        return folder / "adir.onnx"
    elif kind == "missing_data":
        save_external(_model(), path)
        (folder / "model.onnx.data").unlink()
    elif kind == "short_data":
        save_external(_model(), path)
        data = folder / "model.onnx.data"
        data.write_bytes(data.read_bytes()[:100])
    elif kind == "escaping_data":
        save_external(_model(), path)
        proto = onnx.load(str(path), load_external_data=False)
        for t in proto.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "../model.onnx.data"
        onnx.save(proto, str(path))
    elif kind == "bad_external_length":
        save_external(_model(), path)
        proto = onnx.load(str(path), load_external_data=False)
        t = next(t for t in proto.graph.initializer if t.external_data)
        lengths = [e for e in t.external_data if e.key == "length"]
        if lengths:
            lengths[0].value = "-4"
        else:
            t.external_data.add(key="length", value="-4")
        onnx.save(proto, str(path))
    elif kind == "opset":
        onnx.save(_model(lambda p: p.opset_import[0].__setattr__("version", 99)), path)
    elif kind == "domain":
        onnx.save(_model(lambda p: p.graph.node[2].__setattr__("domain", "my.custom")), path)
    elif kind == "unknown_op":
        onnx.save(_model(lambda p: p.graph.node[3].__setattr__("op_type", "Sqrtt")), path)
    elif kind == "no_norm":
        onnx.save(_no_norm(), path)
    elif kind == "dangling":
        onnx.save(_model(lambda p: p.graph.node[3].input.__setitem__(0, "nowhere")), path)
    elif kind == "renamed_input":
        onnx.save(_model(lambda p: p.graph.input[0].__setattr__("name", "x_renamed")), path)
    elif kind == "cycle":
        def cycle(p):
            p.graph.node[0].input[0] = p.graph.node[5].output[0]      # Pow reads a later Mul
        onnx.save(_model(cycle), path)
    elif kind == "wrong_dtype":
        def dtype(p):
            next(t for t in p.graph.initializer if t.name.startswith("W")).data_type = TensorProto.INT32
        onnx.save(_model(dtype), path)
    elif kind == "data_size":
        def size(p):
            next(t for t in p.graph.initializer if t.name.startswith("gain")).data_type = TensorProto.DOUBLE
        onnx.save(_model(size), path)
    elif kind == "shape_conflict":
        def shape(p):
            p.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 99
        onnx.save(_model(shape), path)
    elif kind == "duplicate_output":
        onnx.save(_model(lambda p: p.graph.node.add().CopyFrom(p.graph.node[3])), path)
    else:
        raise AssertionError(kind)
    return path


FAULTS = [
    # kind, exit code, message fragment
    ("text", EXIT_BAD_INPUT, "not an ONNX model"),
    ("empty", EXIT_BAD_INPUT, "not an ONNX model (empty file"),
    ("truncated", EXIT_BAD_INPUT, "not an ONNX model or truncated"),
    ("no_graph", EXIT_BAD_INPUT, "no graph"),
    ("missing_file", EXIT_BAD_INPUT, "no such file"),
    ("directory", EXIT_BAD_INPUT, "a directory"),
    ("missing_data", EXIT_BAD_INPUT, "'model.onnx.data' of tensor"),
    ("short_data", EXIT_BAD_INPUT, "is shorter than tensor"),
    ("escaping_data", EXIT_BAD_INPUT, "not a relative path inside the model's folder"),
    ("bad_external_length", EXIT_UNSUPPORTED, "External data length must be non-negative"),
    ("opset", EXIT_UNSUPPORTED, "opset 99 is newer"),
    ("domain", EXIT_UNSUPPORTED, "unknown domain 'my.custom'"),
    ("unknown_op", EXIT_UNSUPPORTED, "No Op registered for Sqrtt"),
    ("no_norm", EXIT_NOTHING, "no normalization found"),
    ("dangling", EXIT_UNSUPPORTED, "input 'nowhere' of node"),
    ("renamed_input", EXIT_UNSUPPORTED, "input 'x' of node"),
    ("cycle", EXIT_UNSUPPORTED, "contains a cycle"),
    ("wrong_dtype", EXIT_UNSUPPORTED, "inconsistent type tensor(int32)"),
    ("data_size", EXIT_UNSUPPORTED, "data does not match its type and shape"),
    ("duplicate_output", EXIT_UNSUPPORTED, "invalid model (ValueError: Output 'sqrt10' is redeclared"),
]


@pytest.mark.parametrize("kind,code,message", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_is_one_line_and_writes_nothing(kind, code, message, dirs):
    src, out = dirs
    path = _write(kind, src)
    before = digests(src)
    got, stdout, err = cli(path, "-o", out / "flash.onnx", "--report", out / "r.json")
    assert_error(got, err, code, message)
    assert digests(src) == before                       # input (and its data) byte-identical
    assert list(out.iterdir()) == []                    # no output, no report, no temp folder


def test_debug_shows_the_traceback(dirs):
    src, out = dirs
    path = _write("dangling", src)
    before = digests(src)
    code, _, err = cli(path, "-o", out / "flash.onnx", "--debug")
    assert code == EXIT_UNSUPPORTED and digests(src) == before
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: invalid graph")
    assert list(out.iterdir()) == []


def test_graph_out_of_topological_order_is_sorted_not_refused(dirs):
    src, out = dirs
    proto = llama_like_block()
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(nodes))
    onnx.save(proto, src / "m.onnx")
    code, _, err = cli(src / "m.onnx", "-o", out / "flash.onnx", "--quiet", "--verify")
    assert code == EXIT_OK, err


# -- output faults ------------------------------------------------------------------------------

def test_missing_output_directory(dirs):
    src, out = dirs
    onnx.save(llama_like_block(), src / "m.onnx")
    before = digests(src)
    code, _, err = cli(src / "m.onnx", "-o", out / "no" / "flash.onnx")
    assert_error(code, err, EXIT_OUTPUT, "output directory does not exist")
    assert digests(src) == before and list(out.iterdir()) == []


def test_report_directory_missing_writes_nothing(dirs):
    src, out = dirs
    onnx.save(llama_like_block(), src / "m.onnx")
    before = digests(src)
    code, _, err = cli(src / "m.onnx", "-o", out / "flash.onnx", "--report", out / "no" / "r.json")
    assert_error(code, err, EXIT_OUTPUT, "report directory does not exist")
    assert list(out.iterdir()) == [] and digests(src) == before


@pytest.mark.parametrize("name", ["sub/w.data", "../w.data", "/abs/w.data"])    # the output's name: exit 5
def test_bad_external_data_name_is_a_usage_error(name, dirs):
    src, out = dirs
    onnx.save(llama_like_block(), src / "m.onnx")
    before = digests(src)
    code, _, err = cli(src / "m.onnx", "-o", out / "flash.onnx", "--external-data", name)
    assert_error(code, err, EXIT_USAGE, "--external-data")
    assert list(out.iterdir()) == [] and digests(src) == before


def test_writing_over_the_input_is_refused_without_overwrite(dirs):
    src, _ = dirs
    save_external(llama_like_block(), src / "model.onnx")
    before = digests(src)
    code, _, err = cli(src / "model.onnx", "-o", src / "model.onnx")
    assert_error(code, err, EXIT_OUTPUT, "refusing to write over the input (pass --overwrite")
    assert digests(src) == before


def test_writing_over_the_inputs_external_data_is_refused(dirs):
    """A different output name, but its weights would land on the input's data file."""
    src, _ = dirs
    save_external(llama_like_block(), src / "model.onnx", location="weights.bin")
    before = digests(src)
    for extra in ([], ["--overwrite"]):
        code, _, err = cli(src / "model.onnx", "-o", src / "flash.onnx", "--external-data", "weights.bin",
                           *extra)
        assert_error(code, err, EXIT_OUTPUT, "is a file of the input model")
        code, _, err = cli(src / "model.onnx", "-o", src / "weights.bin", *extra)
        assert_error(code, err, EXIT_OUTPUT, "is one of the input's files")
    assert digests(src) == before
    assert sorted(p.name for p in src.iterdir()) == ["model.onnx", "weights.bin"]


def _reference(proto: onnx.ModelProto):
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 5, 16)).astype(np.float32)}
    return feeds, run(proto.SerializeToString(), feeds, provider="cpu")


@pytest.mark.parametrize("external", [False, True])
def test_overwrite_replaces_the_input_atomically(external, dirs):
    src, _ = dirs
    proto = llama_like_block()
    path = src / "model.onnx"
    feeds, expected = _reference(proto)
    if external:
        save_external(proto, path)          # model.onnx.data: the default output data name too
    else:
        onnx.save(proto, path)
    code, _, err = cli(path, "-o", path, "--overwrite", "--quiet")
    assert code == EXIT_OK, err
    names = sorted(p.name for p in src.iterdir())
    assert names == (["model.onnx", "model.onnx.data"] if external else ["model.onnx"])
    rewritten = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in rewritten.graph.initializer) == external
    assert_exact(judge(expected, run(path, feeds, provider="cpu")))
    code, stdout, err = cli(path, "-o", path, "--overwrite")      # and again: nothing to do
    assert code == EXIT_OK and "rewritten             0" in stdout, err
    assert_exact(judge(expected, run(path, feeds, provider="cpu")))


# -- interrupted runs leave nothing -------------------------------------------------------------

def _failing_save(exc: BaseException, real=ir.save):
    def save(model, path, *args, **kwargs):
        real(model, path, *args, **kwargs)                    # the files are there, complete
        Path(path).write_bytes(Path(path).read_bytes()[:50])  # then a partial rewrite
        raise exc
    return save


@pytest.mark.parametrize("exc,code,message", [
    (RuntimeError("simulated crash in the writer"), EXIT_OUTPUT, "cannot serialize"),
    (OSError(28, "No space left on device"), EXIT_OUTPUT, "No space left on device"),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted (nothing written)"),
], ids=["crash", "disk_full", "ctrl_c"])
@pytest.mark.parametrize("external", [False, True])
def test_failure_while_saving_leaves_nothing(exc, code, message, external, dirs, monkeypatch):
    src, out = dirs
    if external:
        save_external(llama_like_block(), src / "model.onnx")
    else:
        onnx.save(llama_like_block(), src / "model.onnx")
    before = digests(src)
    monkeypatch.setattr(rio.ir, "save", _failing_save(exc))                    # external data
    monkeypatch.setattr(rio, "write_inline", _failing_save(exc, rio.write_inline))  # weights inline
    got, _, err = cli(src / "model.onnx", "-o", out / "flash.onnx")
    assert_error(got, err, code, message)
    assert list(out.iterdir()) == []
    assert digests(src) == before


def test_sigterm_while_saving_leaves_nothing(dirs, monkeypatch):
    import signal
    src, out = dirs
    save_external(llama_like_block(), src / "model.onnx")
    before = digests(src)
    real = ir.save

    def save(model, path, *args, **kwargs):
        real(model, path, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)        # `kill <pid>` in the middle of the write
    monkeypatch.setattr(rio.ir, "save", save)
    code, _, err = cli(src / "model.onnx", "-o", out / "flash.onnx")
    assert_error(code, err, EXIT_INTERRUPTED, "interrupted (nothing written)")
    assert list(out.iterdir()) == [] and digests(src) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_failure_while_renaming_restores_what_was_there(dirs, monkeypatch):
    """Data renamed into place, then the model rename fails: the old data file comes back."""
    src, out = dirs
    save_external(llama_like_block(), src / "model.onnx")
    (out / "flash.onnx").write_bytes(b"old model")
    (out / "flash.onnx.data").write_bytes(b"old data")
    before_in, before_out = digests(src), digests(out)
    real = os.replace

    def replace(a, b):
        if Path(b).name == "flash.onnx" and ".tmp" in str(a):
            raise OSError(5, "Input/output error")
        return real(a, b)
    monkeypatch.setattr(rio.os, "replace", replace)
    code, _, err = cli(src / "model.onnx", "-o", out / "flash.onnx")
    assert_error(code, err, EXIT_OUTPUT, "Input/output error")
    assert digests(out) == before_out and sorted(p.name for p in out.iterdir()) == ["flash.onnx",
                                                                                     "flash.onnx.data"]
    assert digests(src) == before_in


def test_an_invalid_rewrite_is_not_written(dirs, monkeypatch):
    """If a rule ever produced an invalid graph, save() refuses before writing a byte: a bug,
    exit 7 (not 5: nothing is wrong with where the output goes)."""
    src, out = dirs
    onnx.save(llama_like_block(), src / "model.onnx")
    import rewriter.api as api
    real = api.rewrite_ir

    def broken(model, options):
        report = real(model, options)
        node = next(iter(model.graph))
        node.replace_input_with(0, ir.Value(name="lost"))     # a dangling edge
        return report
    monkeypatch.setattr(api, "rewrite_ir", broken)
    before = digests(src)
    code, _, err = cli(src / "model.onnx", "-o", out / "flash.onnx")
    assert_error(code, err, EXIT_INTERNAL, "rewritten model is invalid")
    assert list(out.iterdir()) == [] and digests(src) == before


# -- idempotency and metadata -------------------------------------------------------------------

def test_cli_second_run_reports_zero_rewrites_and_same_graph(dirs):
    src, out = dirs
    onnx.save(llama_like_block(), src / "m.onnx")
    code, _, err = cli(src / "m.onnx", "-o", out / "once.onnx", "--report", out / "r1.json", "--quiet")
    assert code == EXIT_OK, err
    code, stdout, err = cli(out / "once.onnx", "-o", out / "twice.onnx", "--report", out / "r2.json")
    assert code == EXIT_OK, err
    assert "rewritten             0" in stdout
    assert json.loads((out / "r1.json").read_text())["rewritten"] == 3
    assert json.loads((out / "r2.json").read_text())["rewritten"] == 0
    once, twice = onnx.load(str(out / "once.onnx")), onnx.load(str(out / "twice.onnx"))
    assert once.SerializeToString() == twice.SerializeToString()


def _with_metadata() -> onnx.ModelProto:
    g = GraphBuilder()
    x = g.input("tokens_in", [None, None, 16])
    h = g.op("Relu", [x])                        # untouched: keeps its value_info and doc string
    y = g.rms(h, gain=g.gain(16))
    out = g.op("Add", [g.op("MatMul", [y, g.weight(16, 16)]), h])
    g.output(out)
    proto = g.model()
    proto.graph.output[0].name = "logits_out"
    proto.graph.node[-1].output[0] = "logits_out"
    proto.producer_name, proto.producer_version = "unit-test-exporter", "4.5.6"
    proto.doc_string, proto.graph.doc_string = "model doc", "graph doc"
    proto.domain, proto.model_version = "org.example", 7
    proto.graph.node[0].doc_string = "relu doc"
    proto.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    helper.set_model_props(proto, {"author": "me", "license": "MIT"})
    proto.graph.value_info.append(helper.make_tensor_value_info(h, TensorProto.FLOAT, ["batch", "seq", 16]))
    return proto


def test_metadata_is_kept(dirs):
    src, out = dirs
    proto = _with_metadata()
    onnx.save(proto, src / "m.onnx")
    code, _, err = cli(src / "m.onnx", "-o", out / "flash.onnx", "--quiet", "--verify")
    assert code == EXIT_OK, err
    new = onnx.load(str(out / "flash.onnx"))
    assert {(o.domain, o.version) for o in new.opset_import} == {(o.domain, o.version) for o in proto.opset_import}
    assert (new.producer_name, new.producer_version) == ("unit-test-exporter", "4.5.6")
    assert (new.doc_string, new.graph.doc_string, new.domain, new.model_version) == \
        ("model doc", "graph doc", "org.example", 7)
    assert {p.key: p.value for p in new.metadata_props} == {"author": "me", "license": "MIT"}
    assert [i.name for i in new.graph.input] == ["tokens_in"]
    assert [o.name for o in new.graph.output] == ["logits_out"]
    assert new.graph.input[0] == proto.graph.input[0]
    # the output keeps its name and type; shape inference may only refine its unknown dims
    old_t, new_t = proto.graph.output[0].type.tensor_type, new.graph.output[0].type.tensor_type
    assert new_t.elem_type == old_t.elem_type and len(new_t.shape.dim) == len(old_t.shape.dim)
    assert all(not o.HasField("dim_value") or o.dim_value == n.dim_value
               for o, n in zip(old_t.shape.dim, new_t.shape.dim))
    kept = {v.name: v for v in new.graph.value_info}
    assert kept[proto.graph.value_info[0].name] == proto.graph.value_info[0]
    relu = next(n for n in new.graph.node if n.op_type == "Relu")
    assert relu.doc_string == "relu doc"
    sess = session(out / "flash.onnx", "cpu")
    assert [i.name for i in sess.get_inputs()] == ["tokens_in"]
    feeds = random_feeds(sess)
    assert_exact(judge(run(src / "m.onnx", feeds, provider="cpu"), run(out / "flash.onnx", feeds, provider="cpu")))


def test_string_initializer_with_raw_bytes_is_bad_input(tmp_path):
    """A large initializer declared STRING but holding raw bytes (a mutation the CLI fuzzer
    makes) is an invalid model, exit 4 — not an internal error in the lazy reader's size check."""
    proto = llama_like_block()
    big = next(t for t in proto.graph.initializer if len(t.raw_data) > 1024)
    big.data_type = TensorProto.STRING
    onnx.save(proto, tmp_path / "model.onnx")
    before = digests(tmp_path)
    code, _, err = cli(tmp_path / "model.onnx", "-o", tmp_path / "flash.onnx")
    assert_error(code, err, EXIT_UNSUPPORTED, "STRING data stored as raw bytes")
    assert digests(tmp_path) == before


def test_large_packed_int4_initializer_is_read_as_it_is(tmp_path):
    """A large INT4 initializer (two values a byte) inline in the file is parsed as the proto
    it is, not read as a span of fixed-width bytes: its values are the ones onnx reads."""
    values = np.resize(np.arange(-8, 8, dtype=np.int8), (64, 96))
    nibbles = (values.flatten() & 0xF).astype(np.uint8)
    packed = (nibbles[0::2] | nibbles[1::2] << 4).tobytes()          # low nibble first
    weight = helper.make_tensor("w", TensorProto.INT4, values.shape, packed, raw=True)
    assert len(weight.raw_data) > 1024
    node = helper.make_node("Identity", ["w"], ["y"])
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.INT4, values.shape)],
                              initializer=[weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(proto, tmp_path / "model.onnx")
    model = rio.load_path(tmp_path / "model.onnx")
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy().astype(np.int8), values)

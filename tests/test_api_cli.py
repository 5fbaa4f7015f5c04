"""The edges: Python API for every model kind, the CLI, idempotency, the report JSON."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import rewriter
from builders import GraphBuilder
from parity import assert_exact
from rewriter.verify import judge, run

N, K = 16, 12


def llama_like_block():
    """residual stream → norm → q/k/v, + residual → norm → up → down, final norm → head."""
    g = GraphBuilder()
    x = g.input("x", [None, None, N])
    y = g.rms(x, gain=g.gain(N))
    qkv = [g.op("MatMul", [y, g.weight(N, N)]) for _ in range(3)]
    h = g.op("Add", [x, g.op("Mul", [g.op("Add", [qkv[0], qkv[1]]), qkv[2]])])
    y2 = g.rms(h, gain=g.gain(N), inverse="div_one")
    h2 = g.op("Add", [h, g.op("MatMul", [g.op("Relu", [g.op("MatMul", [y2, g.weight(N, 2 * N)])]),
                                         g.weight(2 * N, N)])])
    g.output(g.op("MatMul", [g.rms(h2, gain=g.gain(N)), g.weight(N, K)]))
    return g.model()


def feeds():
    return {"x": np.random.default_rng(1).standard_normal((2, 5, N)).astype(np.float32) * 3}


def outputs(model):
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    return run(proto.SerializeToString(), feeds(), provider="cpu")


@pytest.mark.parametrize("kind", ["proto", "ir", "graphsurgeon", "path"])
def test_api_returns_the_same_kind(kind, tmp_path):
    proto = llama_like_block()
    before = proto.SerializeToString()
    if kind == "proto":
        arg = proto
    elif kind == "ir":
        arg = ir.from_proto(proto)
    elif kind == "graphsurgeon":
        import onnx_graphsurgeon as gs
        arg = gs.import_onnx(proto)
    else:
        arg = tmp_path / "m.onnx"
        onnx.save(proto, arg)
    out, report = rewriter.rewrite(arg, mode="defer")
    assert report.found == 3 and report.rewritten == 3 and report.weights_changed == 5
    expected = {"proto": onnx.ModelProto, "ir": ir.Model, "path": ir.Model}
    if kind == "graphsurgeon":
        import onnx_graphsurgeon as gs
        assert isinstance(out, gs.Graph)
        out = gs.export_onnx(out)
    else:
        assert isinstance(out, expected[kind])
    assert proto.SerializeToString() == before          # the caller's proto is untouched
    assert_exact(judge(outputs(proto), outputs(out)))


@pytest.mark.parametrize("mode", ["defer", "fold"])
def test_second_run_rewrites_nothing_and_writes_the_same_graph(mode, tmp_path):
    src, once, twice = tmp_path / "m.onnx", tmp_path / "once.onnx", tmp_path / "twice.onnx"
    onnx.save(llama_like_block(), src)
    first = rewriter.rewrite_file(src, once, mode=mode)
    assert first.rewritten == 3
    second = rewriter.rewrite_file(once, twice, mode=mode)
    assert second.rewritten == 0
    a, b = onnx.load(once), onnx.load(twice)
    assert a.graph.SerializeToString() == b.graph.SerializeToString()


def test_cli_rewrite_report_and_verify(tmp_path):
    src, dst, rep = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(llama_like_block(), src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    done = subprocess.run([sys.executable, "-m", "rewriter", str(src), "-o", str(dst), "--report", str(rep),
                           "--verify"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "sites found           3" in done.stdout and "max rel" in done.stdout
    data = json.loads(rep.read_text())
    assert data["rewritten"] == 3 and len(data["sites"]) == 3
    assert all(s["action"] == "defer" and s["consumers"] for s in data["sites"])
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    verify = subprocess.run([sys.executable, "-m", "rewriter", "verify", str(src), str(dst)],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stdout.startswith("verified: 1 of 1 output(s) within bound")


def test_cli_verify_fails_on_different_models(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(llama_like_block(), a)
    proto = llama_like_block()
    proto.graph.initializer[-1].raw_data = (np.frombuffer(proto.graph.initializer[-1].raw_data, np.float32)
                                            * 1.01).tobytes()
    onnx.save(proto, b)
    done = subprocess.run([sys.executable, "-m", "rewriter", "verify", str(a), str(b)], capture_output=True, text=True)
    assert done.returncode == 1 and "NO" in done.stdout

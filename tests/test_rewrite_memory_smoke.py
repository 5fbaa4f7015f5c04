"""CPU smoke test of benchmarks/rewrite_memory.py on the tiny preset (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_rewrite_memory_tiny(tmp_path):
    out_json, out_txt = tmp_path / "r.json", tmp_path / "r.txt"
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rewrite_memory.py"), "--preset", "tiny",
                           "--workdir", str(work), "--json", str(out_json), "--table", str(out_txt),
                           "--no-drop-caches", "--interval", "0.5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out_json.read_text())
    assert {"machine", "caches", "settings", "results"} <= set(doc)
    assert "warm" in doc["caches"]
    (r,) = doc["results"]
    assert r["preset"] == "tiny" and r["dtype"] == "fp16"
    assert {"largest_tensor_bytes", "data_bytes", "copy", "rewrite", "ratio", "targets", "pass",
            "checks"} <= set(r)
    for op in ("copy", "rewrite"):
        assert {"seconds", "synced_s", "peak_rss_bytes", "rc", "timeline"} <= set(r[op])
        assert r[op]["rc"] == 0 and r[op]["peak_rss_bytes"] > 0
    assert {"rss_limit_bytes", "time_limit_s"} <= set(r["targets"])
    assert {"rss", "time"} <= set(r["pass"])
    checks = r["checks"]
    assert checks["checker"] == "ok"
    assert checks["norms"] == {"expected": 5, "found": 5, "rewritten": 5, "ok": True}
    assert checks["data_file"]["ok"]
    assert checks["data_file"]["bytes_added"] == 0         # tiny is tied: the head stays shared
    assert checks["verify"]["ok"] and checks["verify"]["max_rel"] < 1e-2
    assert "tiny" in out_txt.read_text() and "tiny" in proc.stdout
    assert not (work / "tiny-fp16").exists()                # big files deleted without --keep


def _single_file_model(folder: Path) -> Path:
    from models.synth_llama import synthesize
    path = folder / "model.onnx"
    synthesize(str(path), preset="tiny", dtype="fp32", external_data=False, progress=False)
    return path


def test_single_file_serialized_once(tmp_path, monkeypatch):
    """A single-file model is read without parsing its weights and written with one
    serialization of its structure (weights streamed into place): no ModelProto holding the
    weights is built, no second serializer runs, the written file is not re-read whole."""
    import onnx
    import onnx_ir as ir

    from rewriter import api, inline
    from rewriter.patterns.graph import weight_bytes

    src = _single_file_model(tmp_path)
    weights = weight_bytes(api.io.load(src)[0])
    calls: dict[str, list] = {"serialize": [], "ir.save": [], "onnx.save": [], "onnx.load": [], "checker": []}

    def counting(name, fn, record=lambda *a, **k: a[:1]):
        def wrapped(*a, **k):
            result = fn(*a, **k)
            calls[name].append(result.ByteSize() if name == "serialize" else record(*a, **k))
            return result
        return wrapped

    monkeypatch.setattr(ir.serde, "serialize_model", counting("serialize", ir.serde.serialize_model))
    monkeypatch.setattr(ir, "save", counting("ir.save", ir.save))
    monkeypatch.setattr(onnx, "save_model", counting("onnx.save", onnx.save_model))
    monkeypatch.setattr(onnx, "load", counting("onnx.load", onnx.load))
    monkeypatch.setattr(onnx.checker, "check_model", counting("checker", onnx.checker.check_model))
    dst = tmp_path / "out.onnx"
    report = api.rewrite_file(src, dst)
    assert report.rewritten == 5
    assert calls["ir.save"] == [] and calls["onnx.save"] == []
    assert str(src) not in {str(a[0]) for a in calls["onnx.load"]}     # the input is not parsed whole
    assert str(dst) not in {str(a[0]) for a in calls["checker"]}
    # every serialization (the skeletons checked, the written structure) leaves the weights out
    assert calls["serialize"] and max(calls["serialize"]) < weights / 4
    model = api.io.load(dst)[0]
    spans = [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, inline.SpanTensor)]
    assert sum(t.nbytes for t in spans) > 0.9 * weights              # read back as spans of the file


def test_inline_writer_matches_protobuf(tmp_path):
    """write_inline writes the bytes protobuf writes for the whole model (folded, unchanged
    and in-memory tensors alike)."""
    import numpy as np
    import onnx_ir as ir

    from rewriter import inline, io
    from rewriter.api import rewrite_ir
    from rewriter.plan import Options

    src = _single_file_model(tmp_path)
    model, _ = io.load(src)
    assert any(isinstance(v.const_value, inline.SpanTensor) for v in model.graph.initializers.values())
    rewrite_ir(model, Options())
    extra = ir.Value(name="extra", const_value=ir.tensor(np.arange(4096, dtype=np.float32), name="extra"))
    model.graph.register_initializer(extra)
    assert inline.write_inline(model, tmp_path / "streamed.onnx")
    ir.save(model, tmp_path / "whole.onnx", format="protobuf")
    assert (tmp_path / "streamed.onnx").read_bytes() == (tmp_path / "whole.onnx").read_bytes()


def test_inline_writer_fixes_lengths_through_subgraphs(tmp_path):
    """A large tensor in an If branch is streamed too: every enclosing length (initializer,
    graph, attribute, node, model) is recomputed, and the bytes are protobuf's."""
    import numpy as np
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from rewriter import inline

    def branch(name, scale):
        weight = helper.make_tensor(f"{name}_w", TensorProto.FLOAT, [64, 64], np.full(64 * 64, scale, np.float32))
        return helper.make_graph([helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 64])],
                                 initializer=[weight])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0))],
        "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        initializer=[helper.make_tensor("big", TensorProto.FLOAT, [300], np.ones(300, np.float32))])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    for sub in model.graphs():
        for value in sub.initializers.values():     # in-memory tensors: the writer streams them
            value.const_value = ir.tensor(value.const_value.numpy() * 3, name=value.name)
    assert inline.write_inline(model, tmp_path / "streamed.onnx")
    ir.save(model, tmp_path / "whole.onnx", format="protobuf")
    assert (tmp_path / "streamed.onnx").read_bytes() == (tmp_path / "whole.onnx").read_bytes()
    onnx.checker.check_model(str(tmp_path / "streamed.onnx"))

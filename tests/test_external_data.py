"""External data in every layout exporters produce: loaded lazily, rewritten, written with
external data (the name the user chooses, or `OUTPUT.data`), outputs equal under onnxruntime,
the input and its data files byte-identical afterwards."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto

import rewriter.io as rio
from parity import assert_exact
from rewriter.errors import EXIT_OK
from rewriter.verify import judge, run
from test_api_cli import llama_like_block
from test_faults import cli, digests, save_external

LAYOUTS = {
    "one_file": dict(location="weights.bin", one_file=True),
    "one_file_per_tensor": dict(location=None, one_file=False),
    "sibling_data": dict(location="model.data", one_file=True),
    "optimum_onnx_data": dict(location="model.onnx_data", one_file=True),
}


def feeds():
    return {"x": (3 * np.random.default_rng(7).standard_normal((2, 5, 16))).astype(np.float32)}


def external_locations(path) -> dict[str, str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {t.name: next(e.value for e in t.external_data if e.key == "location")
            for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL}


def make(layout: str, folder):
    proto = llama_like_block()
    expected = run(proto.SerializeToString(), feeds(), provider="cpu")
    save_external(proto, folder / "model.onnx", **LAYOUTS[layout])
    return folder / "model.onnx", expected


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_loads_lazily(layout, dirs):
    path, _ = make(layout, dirs[0])
    external = set(external_locations(path))
    assert len(external) >= 9          # 6 weights, 3 gains
    model, _ = rio.load(path)
    for value in model.graph.initializers.values():
        assert isinstance(value.const_value, ir.ExternalTensor) == (value.name in external)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_rewrites_to_external_data_with_parity(layout, dirs):
    src, out = dirs
    path, expected = make(layout, src)
    before = digests(src)
    code, _, err = cli(path, "-o", out / "flash.onnx", "--quiet", "--verify")
    assert code == EXIT_OK, err
    assert digests(src) == before
    assert sorted(p.name for p in out.iterdir()) == ["flash.onnx", "flash.onnx.data"]
    locations = external_locations(out / "flash.onnx")
    assert locations and set(locations.values()) == {"flash.onnx.data"}
    assert_exact(judge(expected, run(out / "flash.onnx", feeds(), provider="cpu")))


@pytest.mark.parametrize("layout", ["one_file_per_tensor", "optimum_onnx_data"])
def test_external_data_name_is_the_users(layout, dirs):
    src, out = dirs
    path, expected = make(layout, src)
    code, _, err = cli(path, "-o", out / "flash.onnx", "--external-data", "weights.custom", "--quiet")
    assert code == EXIT_OK, err
    assert sorted(p.name for p in out.iterdir()) == ["flash.onnx", "weights.custom"]
    assert set(external_locations(out / "flash.onnx").values()) == {"weights.custom"}
    assert_exact(judge(expected, run(out / "flash.onnx", feeds(), provider="cpu")))


def test_output_beside_the_input_with_relative_paths(dirs, monkeypatch):
    src, _ = dirs
    make("optimum_onnx_data", src)
    before = digests(src)
    monkeypatch.chdir(src)
    code, _, err = cli("model.onnx", "-o", "flash.onnx", "--quiet")
    assert code == EXIT_OK, err
    assert sorted(p.name for p in src.iterdir()) == ["flash.onnx", "flash.onnx.data", "model.onnx",
                                                     "model.onnx_data"]
    assert {k: v for k, v in digests(src).items() if k in before} == before


def test_inline_input_stays_inline_unless_asked(dirs):
    src, out = dirs
    proto = llama_like_block()
    onnx.save(proto, src / "m.onnx")
    expected = run(proto.SerializeToString(), feeds(), provider="cpu")
    code, _, err = cli(src / "m.onnx", "-o", out / "inline.onnx", "--quiet")
    assert code == EXIT_OK, err
    assert external_locations(out / "inline.onnx") == {}
    code, _, err = cli(src / "m.onnx", "-o", out / "ext.onnx", "--external-data", "ext.bin", "--quiet")
    assert code == EXIT_OK, err
    assert set(external_locations(out / "ext.onnx").values()) == {"ext.bin"}
    assert sorted(p.name for p in out.iterdir()) == ["ext.bin", "ext.onnx", "inline.onnx"]
    for name in ("inline.onnx", "ext.onnx"):
        assert_exact(judge(expected, run(out / name, feeds(), provider="cpu")))


def test_model_past_the_protobuf_limit_gets_external_data(dirs, monkeypatch):
    """Stand-in for a > 2 GiB model: lower the limit instead of writing gigabytes."""
    src, out = dirs
    onnx.save(llama_like_block(), src / "m.onnx")
    monkeypatch.setattr(rio, "PROTOBUF_LIMIT", 1000)
    code, _, err = cli(src / "m.onnx", "-o", out / "big.onnx", "--quiet")
    assert code == EXIT_OK, err
    assert set(external_locations(out / "big.onnx").values()) == {"big.onnx.data"}


@pytest.mark.parametrize("layout", ["optimum_onnx_data", "sibling_data"])
def test_overwrite_reuses_the_inputs_data_file(layout, dirs):
    src, _ = dirs
    path, expected = make(layout, src)
    data_name = LAYOUTS[layout]["location"]
    code, _, err = cli(path, "-o", path, "--overwrite", "--quiet")
    assert code == EXIT_OK, err
    assert sorted(p.name for p in src.iterdir()) == sorted(["model.onnx", data_name])
    assert set(external_locations(path).values()) == {data_name}
    assert_exact(judge(expected, run(path, feeds(), provider="cpu")))

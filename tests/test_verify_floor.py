"""`verify` judges a rewrite against the original's own noise floor (rewriter.verify.judge): an
exact rewrite of an ill-conditioned graph, whose original itself moves by more than the 1e-5
tolerance (between onnxruntime's optimized and unoptimized runs, and against a float64 run of
it), passes; a rewrite that is really wrong — a gain folded twice, a perturbed weight — still
fails, and the CLI prints both numbers (exit 1)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import fixtures_onnxscript as F
from builders import GraphBuilder
from rewriter import rewrite, rewrite_file
from rewriter import verify as V
from rewriter.cli import main


def ill_conditioned(n: int = 256, layers: int = 2, seed: int = 0) -> onnx.ModelProto:
    """RMSNorm → MatMul blocks whose weights are all ≈ 1 (1 + 0.01·N): every output column is
    nearly the same sum, so the final LayerNorm cancels a common mean ~100× its spread and
    amplifies fp32 rounding (the original's error against float64 is ~3e-4)."""
    g = GraphBuilder(opset=18, seed=seed)
    h = g.input("x", [1, None, n])
    for _ in range(layers):
        y = g.rms(h, gain=(0.5 + g.rng.random(n)).astype(np.float32))
        h = g.op("MatMul", [y, g.const((1 + 0.01 * g.rng.standard_normal((n, n))).astype(np.float32), "W")])
    g.output(g.layernorm(h))
    return g.model()


def folded_twice(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> onnx.ModelProto:
    """`rewritten` with every weight the rewrite changed changed once more the same way
    (W' = W ∘ r → W ∘ r²: each gain folded twice)."""
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    out = onnx.ModelProto.FromString(rewritten.SerializeToString())
    changed = 0
    for i, t in enumerate(out.graph.initializer):
        old, new = before.get(t.name), numpy_helper.to_array(t)
        if old is not None and old.shape == new.shape and old.dtype.kind == "f" and not np.array_equal(old, new):
            ratio = np.divide(new, old, out=np.ones_like(new), where=old != 0)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array((new * ratio).astype(new.dtype), t.name))
            changed += 1
    assert changed, "the rewrite changed no weight"
    return out


def perturbed(model: onnx.ModelProto, rel: float = 1e-3, seed: int = 1) -> onnx.ModelProto:
    """`model` with its largest weight multiplied by (1 + rel·N(0, 1))."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    i = max(range(len(out.graph.initializer)), key=lambda j: np.prod(out.graph.initializer[j].dims))
    w = numpy_helper.to_array(out.graph.initializer[i])
    moved = w * (1 + rel * np.random.default_rng(seed).standard_normal(w.shape))
    out.graph.initializer[i].CopyFrom(numpy_helper.from_array(moved.astype(w.dtype), out.graph.initializer[i].name))
    return out


def cli_verify(a, b, capsys) -> tuple[int, str, str]:
    """`python -m rewriter verify A B`, in this process: (exit code, stdout, stderr)."""
    code = main(["verify", str(a), str(b)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("floor")
    proto = ill_conditioned()
    out, report = rewrite(proto)
    assert report.rewritten == 2
    paths = {"original": folder / "m.onnx", "flash": folder / "m_flash.onnx",
             "twice": folder / "m_twice.onnx", "perturbed": folder / "m_perturbed.onnx"}
    onnx.save(proto, paths["original"])
    onnx.save(out, paths["flash"])
    onnx.save(folded_twice(proto, out), paths["twice"])
    onnx.save(perturbed(out), paths["perturbed"])
    return paths


def test_exact_rewrite_of_an_ill_conditioned_graph_passes(synthetic, capsys):
    plain = V.verify(synthetic["original"], synthetic["flash"], provider="cpu", floor=False)
    (v,) = V.verify(synthetic["original"], synthetic["flash"], provider="cpu")
    assert not plain[0].ok and plain[0].max_rel > 1e-5       # the 1e-5 bar alone calls it wrong
    assert v.ok and v.max_rel == plain[0].max_rel
    assert v.floor_by == "float64+ort-opt" and v.floor > 1e-5
    assert v.bound == V.FLOOR_K * v.floor
    code, out, err = cli_verify(synthetic["original"], synthetic["flash"], capsys)
    assert code == 0, out + err
    (line,) = out.strip().splitlines()                         # one line on success, both numbers
    assert line.startswith("verified: 1 of 1") and "original's own floor" in line and "max rel" in line


@pytest.mark.parametrize("wrong", ["twice", "perturbed"])
def test_a_wrong_rewrite_still_fails(synthetic, wrong, capsys):
    (v,) = V.verify(synthetic["original"], synthetic[wrong], provider="cpu")
    assert not v.ok and v.floor_by and v.max_rel > V.FLOOR_K * v.floor
    code, out, err = cli_verify(synthetic["original"], synthetic[wrong], capsys)
    assert code == 1
    header, row = out.strip().splitlines()                     # the table: rewritten vs floor per output
    assert "max rel" in header and "floor" in header and "bound" in header
    assert f"{v.max_rel:.3e}" in row and f"{v.floor:.2e}" in row and row.split()[-1] == "NO"
    assert "verification failed" in err and "the original's own floor" in err


def test_within_tolerance_measures_no_floor(tmp_path):
    """A well-conditioned rewrite is judged by the tolerance alone: no extra runs."""
    g = GraphBuilder(opset=18, seed=0)
    y = g.rms(g.input("x", [1, None, 64]), gain=(0.5 + g.rng.random(64)).astype(np.float32))
    g.output(g.op("MatMul", [y, g.weight(64, 32)]))
    onnx.save(g.model(), tmp_path / "m.onnx")
    rewrite_file(tmp_path / "m.onnx", tmp_path / "f.onnx")
    (v,) = V.verify(tmp_path / "m.onnx", tmp_path / "f.onnx", provider="cpu")
    assert v.ok and v.floor_by == "" and v.bound == v.tolerance == 1e-5


def test_large_models_take_the_cheaper_floor(synthetic, monkeypatch):
    """Over F64_MAX_WEIGHT_BYTES of weights no float64 copy is made: the floor is the
    original's move between onnxruntime's optimized and unoptimized runs."""
    monkeypatch.setattr(V, "F64_MAX_WEIGHT_BYTES", V.float_weight_bytes(synthetic["original"]) - 1)
    (v,) = V.verify(synthetic["original"], synthetic["flash"], provider="cpu")
    assert v.floor_by == "ort-opt"
    (bad,) = V.verify(synthetic["original"], synthetic["twice"], provider="cpu")
    assert not bad.ok


@pytest.mark.parametrize("wrong", ["twice", "perturbed"])
def test_without_a_float64_run_the_floor_is_one_ulp(synthetic, wrong, monkeypatch):
    """Where no float64 run is possible (onnxruntime's contrib ops have no double kernels: a
    genai decoder), the floor is the original's move when each weight and input moves one ulp:
    the exact rewrite of the ill-conditioned graph is within it; the wrong ones are not."""
    monkeypatch.setattr(V, "_float64_runs", lambda *args, **kwargs: None)
    (v,) = V.verify(synthetic["original"], synthetic["flash"], provider="cpu")
    assert v.ok and "ulp" in v.floor_by and v.floor > 1e-5, v
    (bad,) = V.verify(synthetic["original"], synthetic[wrong], provider="cpu")
    assert not bad.ok and "ulp" in bad.floor_by and bad.max_rel > V.FLOOR_K * bad.floor, bad


def test_judge_holds_each_output_to_its_own_bound():
    a = {"y": np.array([1.0, 2.0, np.inf], np.float32), "z": np.array([1.0, 1.0], np.float32)}
    b = {"y": np.array([1.0, 2.0 + 2e-4, np.inf], np.float32), "z": np.array([1.0, np.nan], np.float32)}
    y, z = V.judge(a, b, floor={"y": (1e-4, "test")})
    assert y.ok and y.bound == pytest.approx(V.FLOOR_K * 1e-4) and y.max_rel == pytest.approx(1e-4, rel=1e-3)
    assert not z.ok and z.max_rel == np.inf         # NaN where the original is finite: never within
    (y,) = V.judge({"y": a["y"]}, {"y": b["y"]})
    assert not y.ok and y.bound == 1e-5             # no floor: the tolerance alone


# -- onnxscript's own fixtures, random weights as the fixture draws them (all positive) --------
def fixture_case(name: str, folder):
    src = F.build(name, folder, weights="fixture", storage="initializers")
    dst = folder / f"{name}_flash.onnx"
    report = rewrite_file(src, dst)
    assert report.rewritten > 0
    return src, dst


def test_whisper_encoder_fixture(tmp_path):
    src, dst = fixture_case("whisper_encoder", tmp_path)
    verdicts = V.verify(src, dst, provider="cpu")
    assert any(v.max_rel > v.tolerance for v in verdicts)                # beyond 1e-5 ...
    assert all(v.ok for v in verdicts), V.format_verdicts(verdicts)     # ... within its own floor
    # float64 where measured: onnxruntime has no double Conv, the reference evaluator runs it
    assert all("float64" in v.floor_by for v in verdicts if v.max_rel > v.tolerance)


@pytest.mark.slow
def test_phi2_fixture(tmp_path):
    """1.3 GB of weights: over F64_MAX_WEIGHT_BYTES, so the floor is the optimized vs
    unoptimized move; a prefill and two decode steps."""
    src, dst = fixture_case("phi2lm", tmp_path)
    verdicts = V.verify(src, dst, provider="cpu")
    assert any(v.max_rel > v.tolerance for v in verdicts)
    assert all(v.ok for v in verdicts), V.format_verdicts(verdicts)
    assert {v.floor_by for v in verdicts if v.max_rel > v.tolerance} == {"ort-opt"}
    wrong = tmp_path / "wrong.onnx"
    onnx.save(perturbed(onnx.load(str(dst))), wrong)
    assert not all(v.ok for v in V.verify(src, wrong, provider="cpu"))

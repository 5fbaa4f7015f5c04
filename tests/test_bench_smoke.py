"""CPU smoke tests of the benchmark tooling (tiny sizes, no timing assertions)."""

from __future__ import annotations

import json

import numpy as np
import pytest

FAST = ["--provider", "cpu", "--warmup", "1", "--rounds", "2", "--min-rounds", "1", "--budget", "0",
        "--min-sample-ms", "0.1", "--quiet"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from models.synth_llama import synthesize
    path = tmp_path_factory.mktemp("bench") / "tiny.onnx"
    synthesize(path, preset="tiny", dtype="fp32", external_data=False, progress=False)
    return path


def test_bench_cli_writes_json_and_plot(tiny, tmp_path):
    from rewriter.cli import main
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["bench", str(tiny), "--tokens", "1,8", "--baselines", "--json", str(out_json),
               "--plot", str(out_png), "--workdir", str(tmp_path / "work"), *FAST])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert {"method", "provider", "device", "onnxruntime", "settings", "variants", "shapes"} <= set(result)
    assert "interleaved" in result["method"] and "IOBinding" in result["method"]
    assert {"raw", "rewritten", "best-fused", "rewritten-fold", "norm-free"} <= set(result["variants"])
    assert [r["shape"]["tokens"] for r in result["shapes"]] == [1, 8]
    for row in result["shapes"]:
        assert {"shape", "variants", "ratios", "verdicts"} <= set(row)
        for name in ("raw", "rewritten"):
            assert {"median_ms", "p10_ms", "p90_ms", "p25_ms", "p75_ms", "n"} <= set(row["variants"][name])
        assert "raw/rewritten" in row["ratios"]
    assert out_png.stat().st_size > 1000


def test_bench_with_given_rewritten(tiny, tmp_path):
    from rewriter.api import rewrite_file
    from rewriter.bench import run_bench
    flash = tmp_path / "flash.onnx"
    rewrite_file(tiny, flash)
    from rewriter.bench import Settings
    result = run_bench(tiny, flash, tokens=(4,), provider="cpu",
                       settings=Settings(warmup=1, min_rounds=1, max_rounds=2, budget_s=0, min_sample_ms=0.1))
    assert result["variants"]["rewritten"]["info"] == {"source": "as given"}
    assert "median_ms" in result["shapes"][0]["variants"]["rewritten"]


def test_norm_free_and_hand_fused_graphs(tiny, tmp_path):
    from rewriter.bench import count_norms, make_hand_fused, make_norm_free
    from rewriter.verify import compare, make_inputs, run
    nf, hf = tmp_path / "nf.onnx", tmp_path / "hf.onnx"
    assert make_norm_free(tiny, nf)["removed"] == 5
    fused = make_hand_fused(tiny, hf)["fused"]
    assert fused == {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4}
    assert count_norms(nf) == {"fused": {}, "decomposed": 0}
    feeds = make_inputs(tiny, seq=8)
    ref = run(tiny, feeds, "cpu")
    assert all(d.ok for d in compare(ref, run(hf, feeds, "cpu"), tolerance=1e-4))
    assert np.isfinite(run(nf, feeds, "cpu")["logits"]).all()


def test_op_level_smoke(tmp_path):
    from benchmarks import op_level
    assert op_level.main(["--smoke", "--provider", "cpu", "--out", str(tmp_path), "--quiet"]) == 0
    result = json.loads((tmp_path / "op_level.json").read_text())
    assert set(result["cases"]) == {"64->96", "64->64"}
    assert {r["case"] for r in result["shapes"]} == {"64->96", "64->64"}
    assert (tmp_path / "op_level.png").stat().st_size > 1000
    assert "| shape |" in (tmp_path / "op_level.md").read_text()


def test_zero_loss_tiny_random_llama(tmp_path):
    from benchmarks import zero_loss
    rc = zero_loss.main(["--model", "synth:tiny", "--tokens", "96", "--ctx", "32", "--gen", "4",
                         "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    result = json.loads((tmp_path / "zero_loss.json").read_text())
    rows = result["results"]
    assert {"fp32/original", "fp32/defer", "fp32/fold", "fp16/original", "fp16/defer"} <= set(rows)
    for key in ("fp32/defer", "fp32/fold"):
        assert rows[key]["rel_logit_diff"] < 1e-5
        assert rows[key]["top1_agreement"] == 1.0
        assert rows[key]["generation_identical_to_same_dtype_original"]
    assert "vs_same_dtype_original" in rows["fp16/defer"]

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
    from rewriter.bench.cli import run_bench
    flash = tmp_path / "flash.onnx"
    rewrite_file(tiny, flash)
    from rewriter.bench.timing import Settings
    result = run_bench(tiny, flash, tokens=(4,), provider="cpu",
                       settings=Settings(warmup=1, min_rounds=1, max_rounds=2, budget_s=0, min_sample_ms=0.1))
    assert result["variants"]["rewritten"]["info"] == {"source": "as given"}
    assert "median_ms" in result["shapes"][0]["variants"]["rewritten"]


def test_norm_free_and_hand_fused_graphs(tiny, tmp_path):
    from rewriter.bench.passes import count_norms
    from rewriter.bench.variants import make_hand_fused, make_norm_free
    from rewriter.verify import judge, make_inputs, run
    nf, hf = tmp_path / "nf.onnx", tmp_path / "hf.onnx"
    assert make_norm_free(tiny, nf)["removed"] == 5
    fused = make_hand_fused(tiny, hf)["fused"]
    assert fused == {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4}
    assert count_norms(nf) == {"fused": {}, "decomposed": 0}
    feeds = make_inputs(tiny, seq=8)
    ref = run(tiny, feeds, "cpu")
    assert all(d.ok for d in judge(ref, run(hf, feeds, "cpu"), tolerance=1e-4))
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


def test_hand_fused_layernorm_keeps_gain_rewriter_unit_gain(tmp_path):
    """bench's FuseNorms pass and the rewriter's fold-fused emit through Rewriter.fuse_norm: the
    baseline keeps γ/β and fuses the residual Add (SkipLayerNormalization, even without
    inferred shapes), the rewriter a weightless LayerNormalization. The residual sum is also
    a graph output: Skip*'s output 3 takes its place."""
    import onnx

    from builders import GraphBuilder
    from rewriter.api import rewrite_file
    from rewriter.bench.passes import op_counts
    from rewriter.bench.variants import make_hand_fused
    from rewriter.verify import judge, make_inputs, run

    g = GraphBuilder()
    h = g.op("Add", [g.input("x", ["B", "S", 16]), g.input("r", ["B", "S", 16])])
    h2 = g.op("Add", [h, g.op("MatMul", [g.layernorm(h, gain=g.gain(16), beta=g.gain(16) - 1), g.weight(16, 16)])])
    g.output(h)
    g.output(g.op("MatMul", [g.layernorm(h2, gain=g.gain(16), beta=g.gain(16) - 1), g.weight(16, 8)]))
    src, hf, rw = tmp_path / "ln.onnx", tmp_path / "hf.onnx", tmp_path / "rw.onnx"
    onnx.save(g.model(), src)

    assert make_hand_fused(src, hf) == {"fused": {"SkipLayerNormalization": 2}, "kept": []}
    rewrite_file(src, rw, strategy="fold-fused")
    norms = {"LayerNormalization", "SkipLayerNormalization", "ReduceMean"}
    assert {k: v for k, v in op_counts(hf).items() if k in norms} == {"SkipLayerNormalization": 2}
    assert {k: v for k, v in op_counts(rw).items() if k in norms} == {"LayerNormalization": 2}
    feeds = make_inputs(src, seq=8)
    ref = run(src, feeds, "cpu")
    assert all(d.ok for d in judge(ref, run(hf, feeds, "cpu"), tolerance=1e-5))
    assert all(d.ok for d in judge(ref, run(rw, feeds, "cpu"), tolerance=1e-5))


def test_norm_free_keeps_a_norm_output_that_is_a_graph_output(tmp_path):
    """BERT's last_hidden_state is a LayerNormalization output: norm-free returns its input
    under the same name."""
    import onnx

    from builders import GraphBuilder
    from rewriter.bench.variants import make_norm_free
    from rewriter.verify import make_inputs, run

    g = GraphBuilder(opset=17)
    x = g.op("Add", [g.input("x", ["B", "S", 16]), g.input("r", ["B", "S", 16])])
    g.op("LayerNormalization", [x, g.const(g.gain(16), "gamma"), g.const(g.gain(16) - 1, "beta")], axis=-1)
    g.nodes[-1].output[0] = "last_hidden_state"
    g.output("last_hidden_state")
    g.output(g.op("MatMul", ["last_hidden_state", g.weight(16, 8)]))
    src, nf = tmp_path / "ln.onnx", tmp_path / "nf.onnx"
    onnx.save(g.model(), src)
    assert make_norm_free(src, nf) == {"removed": 1, "kept": []}
    feeds = make_inputs(src, seq=4)
    out = run(nf, feeds, "cpu")
    np.testing.assert_array_equal(out["last_hidden_state"], feeds["x"] + feeds["r"])


def test_bench_run_has_the_peers(tiny):
    """--baselines times both peers as they come (onnxscript's optimize_for_ort, onnxruntime's
    transformers optimizer) and builds best-fused from optimize_for_ort plus the rewriter's own
    emitter: every norm fused, no second matcher."""
    from rewriter.bench.cli import run_bench
    from rewriter.bench.timing import Settings
    result = run_bench(tiny, tokens=(4,), provider="cpu", baselines=True,
                       settings=Settings(warmup=1, min_rounds=1, max_rounds=2, budget_s=0, min_sample_ms=0.1))
    variants = result["variants"]
    for peer in ("onnxscript", "ort-optimizer"):
        assert variants[peer]["error"] is None, variants[peer]["error"]
        assert variants[peer]["info"]["norms_after"]["decomposed"] == 0
        assert "median_ms" in result["shapes"][0]["variants"][peer]
        assert f"raw/{peer}" in result["shapes"][0]["ratios"]
    assert variants["onnxscript"]["info"]["onnxscript"]["fusions"]
    assert variants["ort-optimizer"]["info"]["ort_optimizer"]["fused_operator_statistics"]
    best = variants["best-fused"]["info"]
    assert best["method"] == "auto" and best["onnxscript"]["ok"] and "hand_fusion" in best
    assert best["norms_after"] == {"fused": {"SimplifiedLayerNormalization": 3, "SkipSimplifiedLayerNormalization": 2},
                                   "decomposed": 0}


def test_variant_builders_are_passes_in_a_pass_manager(tiny):
    """FuseNorms and NormFree are onnx_ir in-place passes: they run in a PassManager with
    onnx_ir's own passes and report through PassResult.modified and `info`."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

    from rewriter.bench.passes import FuseNorms, NormFree, count_norms
    from rewriter.verify import judge, make_inputs, run

    feeds = make_inputs(tiny, seq=8)
    ref = run(tiny, feeds, "cpu")
    fuse, free = FuseNorms(), NormFree()
    fused = ir.load(str(tiny))
    result = ir.passes.PassManager([fuse, RemoveUnusedNodesPass(), TopologicalSortPass()])(fused)
    assert result.modified and fuse.info == {"fused": {"SimplifiedLayerNormalization": 1,
                                                       "SkipSimplifiedLayerNormalization": 4}, "kept": []}
    assert count_norms(fused)["decomposed"] == 0
    assert all(d.ok for d in judge(ref, run(ir.to_proto(fused).SerializeToString(), feeds, "cpu"), tolerance=1e-4))
    again = FuseNorms()
    assert not again(fused).modified and again.info == {"fused": {}, "kept": []}     # nothing left to fuse

    freed = ir.load(str(tiny))
    assert ir.passes.PassManager([free, RemoveUnusedNodesPass(), TopologicalSortPass()])(freed).modified
    assert free.info == {"removed": 5, "kept": []}
    assert count_norms(freed) == {"fused": {}, "decomposed": 0}


def test_end_to_end_one_graph_with_kv_cache_and_peers(tmp_path):
    """benchmarks/end_to_end.py on a given graph with a KV cache (a GroupQueryAttention decoder
    shaped like onnxruntime-genai's, as --preset real-cpu runs smollm2-genai): one graph gives
    prefill rows (past 0) and decode rows (1 token, past N), every peer and target is timed,
    the peer table names the best peer and ORT's transformers optimizer's outcome is recorded."""
    import onnx
    from test_kv_verify import gqa_decoder

    from benchmarks import end_to_end
    src = tmp_path / "gqa.onnx"
    onnx.save(gqa_decoder(), src)
    out = tmp_path / "out"
    rc = end_to_end.main(["--models", str(src), "--prefill", "1,4", "--decode", "4", "--dtype", "fp32",
                          "--variants", end_to_end.REAL_VARIANTS, "--threads", "1", "--out", str(out),
                          "--name", "e2e", *FAST])
    assert rc == 0
    result = json.loads((out / "e2e.json").read_text())
    assert set(result["cases"]) == {"gqa prefill", "gqa decode"}
    shapes = [(r["case"], r["shape"]["tokens"], r["shape"]["past"]) for r in result["shapes"]]
    assert shapes == [("gqa prefill", 1, 0), ("gqa prefill", 4, 0), ("gqa decode", 1, 4)]
    assert result["settings"]["threads"] == 1
    for row in result["shapes"]:
        for name in ("raw", "onnxscript", "ort-cpu", "ort-cuda", "norm-free"):
            assert "median_ms" in row["variants"][name], (row["case"], name, row["variants"].get(name))
        assert row["best_peer"] in end_to_end.PEERS
        assert {"raw/ort-cpu", "best-peer/ort-cpu", "norm-free/ort-cpu"} <= set(row["ratios"])
    opt = result["cases"]["gqa prefill"]["variants"]["ort-optimizer"]
    assert opt["error"] or "median_ms" in result["shapes"][0]["variants"]["ort-optimizer"]
    md = (out / "e2e.md").read_text()
    assert "best peer÷ort-cpu" in md
    assert (out / "e2e.png").stat().st_size > 1000


def test_end_to_end_presets_parse():
    """--preset real-cpu / real-cuda: the same models, rows and variants; CPU with one thread."""
    from benchmarks import end_to_end
    cpu, cuda = end_to_end.PRESETS["real-cpu"], end_to_end.PRESETS["real-cuda"]
    for key in ("models", "prefill", "decode", "variants", "dtype"):
        assert cpu[key] == cuda[key]
    assert cpu["threads"] == 1 and cpu["provider"] == "cpu" and cuda["provider"] == "cuda"
    assert set(cpu["variants"].split(",")) == {"raw", "ort-optimizer", "onnxscript", "ort-cpu", "ort-cuda",
                                               "norm-free"}

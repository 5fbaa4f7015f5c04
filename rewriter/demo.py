"""`python -m rewriter demo`: the main job on a built-in default model.

Exports a SmolLM2-135M-shaped Llama (random weights, norm gains perturbed away from 1) with
torch, rewrites it, verifies it against the original under onnxruntime and times three graphs:
the original, the peer's best (onnxscript's optimize_for_ort) and the rewritten one (about two
minutes on 2 CPU cores). Every variant at more token counts: `python -m rewriter bench`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rewriter.api import rewrite_file
from rewriter.bench.cli import run_bench
from rewriter.bench.present import compare_table, plot, speedup, write_json
from rewriter.bench.timing import Settings
from rewriter.args import int_list
from rewriter.errors import EXIT_OK, EXIT_VERIFY_FAILED, UsageError
from rewriter.verify import format_verdicts, verify


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rewriter demo", description=__doc__)
    p.add_argument("--workdir", default="out/demo", help="where the models and reports go")
    p.add_argument("--size", default="full", help="models.zoo llama size: full (SmolLM2-135M shape), "
                   "small or tiny")
    p.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"))
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--mode", default="defer", choices=("defer", "fold"))
    p.add_argument("--tokens", default="1,128", help="token counts to benchmark (default 1,128)")
    p.add_argument("--budget", type=float, default=4.0, help="seconds of timed rounds per token count")
    p.add_argument("--no-bench", action="store_true")
    args = p.parse_args(argv)
    tokens = int_list(args.tokens)

    try:    # repo tooling (torch exporters): not installed with the package
        from models.export import export_onnx
        from models.zoo import build
    except ImportError as exc:
        raise UsageError("the demo exports its model with the repo's models/ tooling: run it from a checkout "
                         f"with the models extra installed ({exc})") from exc

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    opset = args.opset or (17 if args.exporter == "torchscript" else 18)
    src = work / f"llama-{args.size}-{args.exporter}.onnx"
    dst = work / f"llama-{args.size}-{args.exporter}-flash.onnx"

    start = time.perf_counter()
    step(f"1/4 export a SmolLM2-shaped Llama ({args.size}, random weights) with the {args.exporter} exporter")
    t = time.perf_counter()
    if src.exists():
        print(f"    reusing {src} (delete it to export again)")
    else:
        export_onnx(build("llama", args.size), src, exporter=args.exporter, opset=opset, check=False)
    print(f"    {src} ({src.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - t:.0f} s)")

    step(f"2/4 rewrite (mode {args.mode})")
    t = time.perf_counter()
    report = rewrite_file(src, dst, mode=args.mode)
    report.to_json(work / "report.json")
    print(report.table())
    print(f"    {dst} ({time.perf_counter() - t:.1f} s; per-site report: {work / 'report.json'})")

    step("3/4 verify: same inputs through both models under onnxruntime")
    diffs = verify(src, dst, seq=64)
    print(format_verdicts(diffs))
    ok = all(d.ok for d in diffs)

    if not args.no_bench:
        benchmark(src, dst, work, tokens, args.budget)
    print(f"\ndemo {'passed' if ok else 'FAILED verification'} in {time.perf_counter() - start:.0f} s; "
          f"files in {work}/")
    return EXIT_OK if ok else EXIT_VERIFY_FAILED


SHOWN = ("raw", "onnxscript", "rewritten")      # the original, the peer's best, ours


def benchmark(src: Path, dst: Path, work: Path, tokens: list[int], budget: float) -> None:
    step(f"4/4 benchmark under onnxruntime CPU: the original, onnxscript's optimize_for_ort on it "
         f"(the peer) and the rewritten graph, at {', '.join(map(str, tokens))} tokens")
    result = run_bench(src, dst, tokens=tokens, provider="cpu", baselines=True, only=SHOWN,
                       settings=Settings(warmup=2, min_rounds=3, budget_s=budget), workdir=work / "bench",
                       log=lambda msg: print("    " + msg, flush=True))
    for name, v in result["variants"].items():
        if v["error"]:
            print(f"    {name}: not measured: {v['error']}")
    peer = "onnxscript/rewritten"           # the peer is no baseline of bench's: its ratio is added here
    for row in result["shapes"]:
        measured = speedup(row["variants"].get("onnxscript"), row["variants"].get("rewritten"))
        if measured is not None:
            row["ratios"][peer] = measured[0]
    write_json(result, work / "bench.json")
    plot(result, work / "bench.png", title=src.name, ratios=("raw/rewritten", peer))
    print()
    print(compare_table(result, SHOWN))
    print("(median ms [p10-p90]; ours: the rewritten graph, faster where a ratio > 1; ≈: within noise)")
    print(f"plot: {work / 'bench.png'}\nevery variant, more token counts: python -m rewriter bench {src} {dst} "
          "--baselines")


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)
    sys.stdout.flush()

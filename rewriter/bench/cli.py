"""`python -m rewriter bench ORIGINAL [REWRITTEN]`: latency of the original and the rewritten
graph (and, with --baselines, of reference variants and peers) under onnxruntime, per token count.

    python -m rewriter bench model.onnx                          # rewrites on the fly (defer)
    python -m rewriter bench model.onnx model_flash.onnx --tokens 1,512 --json r.json --plot r.png
    python -m rewriter bench model.onnx --baselines --cuda-graph

Variants (the names used in the table, the JSON and the plot; rewriter/bench/variants.py):
    raw             the original as given
    rewritten       REWRITTEN, or rewrite_file(ORIGINAL, mode=--mode) (default defer)
    --baselines adds
    best-fused      the strongest norm fusion for onnxruntime, by --best-fused:
                    auto (default): onnxscript's optimize_for_ort, then the rewriter's fused-norm
                    emitter (Rewriter.fuse_norm) on every norm it left decomposed; onnxscript:
                    optimize_for_ort alone; ort: onnxruntime's transformers optimizer alone;
                    hand: the emitter alone
    onnxscript      the peer: optimize_for_ort on the original, as it comes
    ort-optimizer   a second peer: onnxruntime's transformers optimizer (--model-type,
                    --fuse-opt-level), as it comes
    rewritten-fold  rewrite_file(ORIGINAL, mode="fold"): gains folded, a weightless norm kept
    ort-cuda        rewrite_file(ORIGINAL, target="ort-cuda"): the rewriter's CUDA recipe (gains
                    folded, each norm one weightless fused ORT kernel)
    norm-free       every normalization replaced by identity (not a usable model: the floor
                    any normalization trick can reach)
    --stacked fold,defer adds fused+fold / fused+defer: the rewriter run on best-fused.

The timing harness (rewriter/bench/timing.py) is shared with calibrate and benchmarks/.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from rewriter.bench.present import add_ratios, plot, table, variants_json, write_json
from rewriter.bench.timing import (Settings, Shape, device_name, log_to_stderr, measure, method_text, quiet_log,
                                   resolve_provider)
from rewriter.bench.variants import BEST_FUSED, prepare_variants
from rewriter.args import ArgumentParser, int_list, positive_int
from rewriter.errors import BadInput, UsageError
from rewriter.files import check_not_a_model_file
from rewriter.verify import OPT_LEVELS

DEFAULT_TOKENS = "1,128,512,2048,4096"


def run_bench(original, rewritten=None, *, tokens=(1, 128, 512, 2048, 4096), batch: int = 1,
              past=(0,), provider=None, settings: Settings | None = None, mode: str = "defer",
              baselines: bool = False, stacked=(), best_fused: str = "auto", model_type: str = "gpt2",
              fuse_opt_level: int = 0, workdir=None, only: tuple[str, ...] | None = None,
              log=quiet_log) -> dict:
    """Prepare the variants (`only`: these names of VARIANTS), time them and return the full
    result (JSON-able)."""
    settings = settings or Settings()
    provider = resolve_provider(provider)
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="flashnorm-bench-")
        workdir = tmp
    try:
        variants = prepare_variants(original, rewritten, workdir=workdir, mode=mode, baselines=baselines,
                                    stacked=tuple(stacked), best_fused=best_fused, model_type=model_type,
                                    opt_level=fuse_opt_level, use_gpu=provider == "cuda", only=only, log=log)
        shapes = [Shape(int(t), batch, int(p)) for p in past for t in tokens]
        result = measure(variants, shapes, provider=provider, settings=settings, log=log)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["device"] = device_name(provider)
    result["original"] = str(original)
    result["variants"] = variants_json(variants)
    add_ratios(result)
    result["method"] = method_text(result)
    return result


def add_timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", choices=("cuda", "cpu"), help="default: CUDA when available")
    p.add_argument("--cuda-graph", action="store_true", help="ORT CUDA graph mode (falls back, with a note)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=30, help="max interleaved rounds per shape")
    p.add_argument("--min-rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=10.0, help="seconds of timed rounds per shape")
    p.add_argument("--min-sample-ms", type=float, default=5.0)
    p.add_argument("--ort-opt", choices=OPT_LEVELS, default="all",
                   help="session graph optimization level (default all)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT default)")


def settings_from(args) -> Settings:
    return Settings(warmup=args.warmup, min_rounds=min(args.min_rounds, args.rounds), max_rounds=args.rounds,
                    budget_s=args.budget, min_sample_ms=args.min_sample_ms, opt_level=args.ort_opt,
                    cuda_graph=args.cuda_graph, threads=args.threads)


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m rewriter bench", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("original")
    p.add_argument("rewritten", nargs="?", help="default: rewrite ORIGINAL on the fly (--mode)")
    p.add_argument("--tokens", default=DEFAULT_TOKENS, help=f"token counts (default {DEFAULT_TOKENS})")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--past", default="0", help="KV-cache lengths for graphs with past inputs (comma list)")
    p.add_argument("--mode", choices=("defer", "fold"), default="defer")
    p.add_argument("--baselines", action="store_true",
                   help="add best-fused, the peers (onnxscript, ort-optimizer), rewritten-fold and norm-free")
    p.add_argument("--stacked", default="", help="also rewrite best-fused: 'fold', 'defer' or 'fold,defer'")
    p.add_argument("--best-fused", choices=tuple(BEST_FUSED), default="auto")
    p.add_argument("--model-type", default="gpt2", help="ORT transformers optimizer model_type (gpt2, bert)")
    p.add_argument("--fuse-opt-level", type=int, default=0, help="ORT transformers optimizer opt_level")
    p.add_argument("--workdir", help="keep the derived models here (default: a temporary folder)")
    p.add_argument("--json", help="write the full result here")
    p.add_argument("--plot", help="write a PNG plot here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--debug", action="store_true")
    add_timing_args(p)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    tokens, past = int_list(args.tokens), int_list(args.past, "--past", least=0)
    if not tokens or not past:
        raise UsageError("--tokens and --past need at least one value each")
    for path in (args.original, args.rewritten):
        if path is not None and not Path(path).is_file():
            raise BadInput(f"{path}: no such file")
    for what in ("json", "plot"):
        if getattr(args, what):
            check_not_a_model_file(Path(getattr(args, what)), (args.original, args.rewritten), f"--{what}")
    log = quiet_log if args.quiet else log_to_stderr
    stacked = tuple(s for s in args.stacked.split(",") if s)
    if stacked and not args.baselines:
        args.baselines = True
    result = run_bench(args.original, args.rewritten, tokens=tokens, batch=args.batch,
                       past=past, provider=args.provider, settings=settings_from(args),
                       mode=args.mode, baselines=args.baselines, stacked=stacked,
                       best_fused=args.best_fused, model_type=args.model_type,
                       fuse_opt_level=args.fuse_opt_level, workdir=args.workdir, log=log)
    print(f"# {args.original} on {result['device']} ({result['provider']})")
    for n, v in result["variants"].items():
        if v["error"]:
            print(f"# {n}: not measured: {v['error']}")
    print(table(result))
    print()
    print("Method: " + result["method"])
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot, title=Path(args.original).name)
        print(f"wrote {args.plot}")
    return 0


__all__ = ["add_timing_args", "int_list", "main", "parser", "run_bench", "settings_from"]

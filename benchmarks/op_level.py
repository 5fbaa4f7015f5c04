"""Op-level benchmark: chains of norm -> projection at the paper's shapes, under onnxruntime.

    python benchmarks/op_level.py                       # full: 5 shapes x tokens 1..8192, fp16
    python benchmarks/op_level.py --quick               # GPU budget run (3 token counts)
    python benchmarks/op_level.py --smoke               # seconds on a CPU (CI)
    python benchmarks/op_level.py --shapes 576x960 --tokens 1,512 --dtype fp32 --provider cpu

Graph per shape d -> d_out (built here with rewriter.bench.graphs.GraphBuilder, L layers,
default 8), input h0 of shape [batch, tokens, d]:

    h_{i+1} = h_i + MatMul(MatMul(RMSNorm_i(h_i), W_i), V_i)     W_i: [d, d_out], V_i: [d_out, d]
    h_{i+1} = h_i + MatMul(RMSNorm_i(h_i), W_i)                  when d_out == d (no V_i)

The projection to d_out is followed by a projection back to d (no activation between) so that
the chain composes; only W_i reads the norm, so the FlashNorm rewrite touches W_i (and the
deferred 1/RMS is a Mul on the [tokens, d_out] product). The V_i MatMul is the same in every
variant: it adds the same time to every column. RMSNorm_i is the dynamo-export form: Cast to
fp32, Pow 2, ReduceMean (axes input, opset 18), Add eps, Sqrt, Reciprocal, Mul, Cast back,
Mul(gain); gains are 1 + 0.1 N(0, 1) and differ per layer. Weights are N(0, 1/d); to keep
building fast the layers share the same random values (separate initializers, so nothing is
shared in the graph).

Variants (rewriter/bench/variants.py): raw, best-fused (SkipSimplifiedLayerNormalization /
SimplifiedLayerNormalization from the rewriter's fused-norm emitter by default; `--best-fused
auto` runs onnxscript's optimize_for_ort first), rewritten (defer), rewritten-fold, norm-free,
fused+fold (the fold rewrite of best-fused); the peers onnxscript and ort-optimizer by name
(--variants). Writes op_level.json, op_level.png and op_level.md into --out.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from rewriter.bench.cli import add_timing_args, int_list, settings_from  # noqa: E402
from rewriter.bench.graphs import GraphBuilder, tensor_type  # noqa: E402
from rewriter.bench.present import merge_cases, plot, table, variants_json, write_json  # noqa: E402
from rewriter.bench.timing import Shape, log_to_stderr, measure, quiet_log, resolve_provider  # noqa: E402
from rewriter.bench.variants import BEST_FUSED, prepare_variants  # noqa: E402

PAPER_SHAPES = "576x960,576x3072,4096x4096,4096x12288,4096x22016"
FULL_TOKENS = "1,16,128,512,2048,8192"
QUICK_TOKENS = "1,512,4096"
DEFAULT_VARIANTS = "raw,best-fused,rewritten,rewritten-fold,ort-cuda,norm-free,fused+fold"


def build_chain(path, d: int, d_out: int, layers: int = 8, dtype: str = "fp16", seed: int = 0,
                eps: float = 1e-5, opset: int = 18) -> dict:
    """Write the L-layer norm -> projection chain (see the module doc) to `path`."""
    np_dt = {"fp16": np.float16, "fp32": np.float32}[dtype]
    g = GraphBuilder(opset=opset, seed=seed, sep="_")
    w_up = (g.rng.standard_normal((d, d_out), dtype=np.float32) / np.sqrt(d)).astype(np_dt)
    w_down = None
    if d_out != d:
        w_down = (g.rng.standard_normal((d_out, d), dtype=np.float32) / np.sqrt(d_out)).astype(np_dt)
    h = g.input("h0", ["batch", "seq", d], np_dt)
    for i in range(layers):
        gain = (1.0 + 0.1 * g.rng.standard_normal(d)).astype(np_dt)
        y = g.rms(h, eps=eps, gain=gain, cast=tensor_type(np_dt) if dtype != "fp32" else None)
        out = g.op("MatMul", [y, g.const(w_up, f"l{i}.up.weight")])
        if w_down is not None:
            out = g.op("MatMul", [out, g.const(w_down, f"l{i}.down.weight")])
        h = g.op("Add", [h, out], hint=f"h{i + 1}")
    g.output(h, np_dt, ["batch", "seq", d])
    nbytes = g.save(path, g.model(contrib=False, name=f"chain_{d}x{d_out}", producer_name="flashnorm-op-level"))
    return {"d": d, "d_out": d_out, "layers": layers, "dtype": dtype, "weight_bytes": nbytes,
            "form": "h + MatMul(MatMul(RMSNorm(h), W[d,d_out]), V[d_out,d])" if w_down is not None
            else "h + MatMul(RMSNorm(h), W[d,d])"}


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.replace(" ", "").split(","):
        if item:
            a, b = item.lower().replace("->", "x").split("x")
            out.append((int(a), int(b)))
    return out


PRESETS = {
    "smoke": dict(shapes="64x96,64x64", tokens="1,8", layers=2, warmup=1, rounds=3, min_rounds=2,
                  budget=0.2, min_sample_ms=1.0),
    "quick": dict(tokens=QUICK_TOKENS, time_limit=420, warmup=3, rounds=15, min_rounds=5, budget=1.5, min_sample_ms=5.0),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/op_level.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=PAPER_SHAPES, help=f"d x d_out list (default {PAPER_SHAPES})")
    p.add_argument("--tokens", default=FULL_TOKENS, help=f"default {FULL_TOKENS} (--quick: {QUICK_TOKENS})")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--best-fused", choices=tuple(BEST_FUSED), default="hand")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, seconds on a CPU (CI)")
    p.add_argument("--quick", action="store_true", help="3 token counts, short budget (GPU runs)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/op_level-<provider>)")
    p.add_argument("--workdir", help="where the chain models are written (default: temporary, deleted)")
    p.add_argument("--time-limit", type=float, default=0,
                   help="seconds; shapes not started by then are skipped (0: none; --quick: 420)")
    p.add_argument("--quiet", action="store_true")
    add_timing_args(p)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    for name, preset in PRESETS.items():
        if f"--{name}" in argv:
            p.set_defaults(**preset)
    args = p.parse_args(argv)
    log = quiet_log if args.quiet else log_to_stderr
    provider = resolve_provider(args.provider)
    settings = settings_from(args)
    wanted = tuple(v for v in args.variants.split(",") if v)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"op_level-{provider}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="flashnorm-oplevel-")
    workroot = Path(args.workdir or tmp)
    tokens = int_list(args.tokens)
    parts = []
    t_all = time.perf_counter()

    def write(final: bool):
        result = merge_cases(parts, provider, settings)
        result["benchmark"] = "op_level"
        result["complete"] = final
        result["config"] = {"shapes": args.shapes, "tokens": tokens, "layers": args.layers,
                            "batch": args.batch, "dtype": args.dtype, "variants": list(wanted),
                            "best_fused": args.best_fused, "time_limit_s": args.time_limit,
                            "graph": __doc__.split("Graph per shape", 1)[1].split("Variants", 1)[0].strip()}
        result["wall_s"] = round(time.perf_counter() - t_all, 1)
        write_json(result, out / "op_level.json")
        md = [f"# Op-level: norm -> projection chains ({args.dtype}, L={args.layers}, batch {args.batch})", "",
              f"Device: {result['device']}, onnxruntime {result['onnxruntime']} ({provider})"
              + (", CUDA graph" if args.cuda_graph else "") + f". Wall time {result['wall_s']} s"
              + ("" if final else " (INCOMPLETE: written after each shape)") + ".", "",
              "Cells: median ms per call [p10-p90]. Ratios: t(base) / t(variant), > 1 = variant faster.", "",
              table(result, markdown=True), "", "Graph: " + result["config"]["graph"], "",
              "Method: " + result["method"], ""]
        for case, entry in result["cases"].items():
            for name, v in entry["variants"].items():
                if v.get("error"):
                    md.append(f"- {case} {name}: not measured: {v['error']}")
        (out / "op_level.md").write_text("\n".join(md) + "\n")
        if final:
            plot(result, out / "op_level.png", title=f"op level: L={args.layers} norm->projection "
                       f"chains, {args.dtype}, batch {args.batch}")
        return result

    try:
        for d, d_out in _shapes(args.shapes):
            case = f"{d}->{d_out}"
            if args.time_limit and time.perf_counter() - t_all > args.time_limit:
                log(f"{case}: skipped (--time-limit {args.time_limit:.0f} s reached)")
                parts.append((case, None, {"raw": {"error": f"skipped: --time-limit {args.time_limit:.0f} s reached"}}))
                continue
            work = workroot / f"c{d}x{d_out}"
            work.mkdir(parents=True, exist_ok=True)
            src = work / f"chain_{d}x{d_out}.onnx"
            t0 = time.perf_counter()
            try:
                info = build_chain(src, d, d_out, args.layers, args.dtype)
            except Exception as exc:
                log(f"{case}: cannot build ({type(exc).__name__}: {exc})")
                parts.append((case, None, {"raw": {"error": f"build: {exc}"}}))
                continue
            log(f"{case}: chain built in {time.perf_counter() - t0:.1f} s "
                f"({info['weight_bytes'] / 2**20:.0f} MiB of weights)")
            variants = prepare_variants(
                src, workdir=work, baselines=True,
                stacked=tuple(n.split("+", 1)[1] for n in wanted if n.startswith("fused+")),
                best_fused=args.best_fused, use_gpu=provider == "cuda", only=wanted, log=log)
            variants = {k: v for k, v in variants.items() if k in wanted}
            shapes = [Shape(t, args.batch) for t in tokens]
            res = measure(variants, shapes, provider=provider, settings=settings, log=log)
            vj = variants_json(variants)
            vj["raw"]["info"] = info
            parts.append((case, res, vj))
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
            write(final=False)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result = write(final=True)
    print(table(result))
    print("\nMethod: " + result["method"])
    print(f"wrote {out / 'op_level.json'}, op_level.png, op_level.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

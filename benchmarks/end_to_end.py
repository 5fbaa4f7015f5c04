"""End-to-end benchmark: whole Llama-shaped decoders, prefill and decode, under onnxruntime.

    python benchmarks/end_to_end.py                 # full
    python benchmarks/end_to_end.py --quick         # GPU budget run: prefill only (truncated layers)
    python benchmarks/end_to_end.py --quick --models smollm2-135m --prefill "" --decode 512,1024,2048,4096
                                                    # decode rows alone (a torch export: minutes)
    python benchmarks/end_to_end.py --smoke         # tiny model, CPU, about a minute (decode export)

Models (shapes of the real ones, random weights):
    smollm2-135m   SmolLM2-135M (576 hidden, 30 layers, vocab 49152, tied)
    llama-3.2-1b   Llama-3.2-1B (2048 hidden, 16 layers, vocab 128256, tied)
    llama-3.1-8b   Llama-3.1-8B (4096 hidden, 32 layers, vocab 128256); by default 8 layers: all
                   variants are loaded at once (five or six copies of the weights on the GPU)
`--layers name:L,...` truncates a model (embedding and lm_head kept); the layer count is in the
row label.

Prefill rows: models.synth_llama.synthesize (the dynamo-export form, no KV cache, fp16) at
`--prefill` tokens; the 1-token row is a decode proxy (all per-token work, no attention over a
cache). Decode rows (one new token, KV cache of `--decode` lengths): a graph with past key/value
inputs, exported from a random-init transformers LlamaForCausalLM of the same shape with
models.export.export_decoder_with_past ("wrapper" exporter, else "transformers"); a model
whose decode graph cannot be made gets a "not available" row with the reason.

Variants per row (rewriter/bench/variants.py): raw, best-fused, rewritten (defer), rewritten-fold,
ort-cuda (rewrite_file target="ort-cuda"), norm-free (+ fused+fold and the peers onnxscript and
ort-optimizer with --variants). Writes end_to_end.json, .png and .md into --out.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rewriter.bench.cli import add_timing_args, int_list, settings_from  # noqa: E402
from rewriter.bench.present import merge_cases, plot, table, variants_json, write_json  # noqa: E402
from rewriter.bench.timing import Shape, log_to_stderr, measure, quiet_log, resolve_provider  # noqa: E402
from rewriter.bench.variants import BEST_FUSED, prepare_variants  # noqa: E402

DEFAULT_VARIANTS = "raw,best-fused,rewritten,rewritten-fold,ort-cuda,norm-free"
PRESETS = {
    "full": dict(models="smollm2-135m,llama-3.2-1b,llama-3.1-8b", layers="llama-3.1-8b:8",
                 prefill="1,512,1024,2048,4096", decode="512,1024,2048,4096", decode_models="all"),
    "quick": dict(models="smollm2-135m,llama-3.2-1b,llama-3.1-8b",
                  layers="llama-3.2-1b:4,llama-3.1-8b:2", prefill="1,512,4096", decode="",
                  decode_models="smollm2-135m", time_limit=420, warmup=3, rounds=15, min_rounds=5, budget=1.5,
                  best_fused="hand"),
    "smoke": dict(models="tiny", layers="", prefill="1,16", decode="16", decode_models="tiny",
                  warmup=1, rounds=3, min_rounds=2, budget=0.2, min_sample_ms=1.0, best_fused="hand"),
}


def _layers_map(text: str) -> dict[str, int]:
    out = {}
    for item in (text or "").replace(" ", "").split(","):
        if item:
            name, n = item.rsplit(":", 1)
            out[name] = int(n)
    return out


def hf_overrides(preset: str, layers: int) -> dict:
    """transformers LlamaConfig fields for a synth_llama preset (rope scaling left out)."""
    from models.synth_llama import PRESETS as SP
    c = SP[preset]
    return dict(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                num_hidden_layers=layers, num_attention_heads=c["heads"],
                num_key_value_heads=c["kv_heads"], head_dim=c["hidden"] // c["heads"],
                max_position_embeddings=8192, rms_norm_eps=c["eps"],
                tie_word_embeddings=c["tied"], rope_theta=c["rope_theta"])


def make_prefill(path, preset: str, layers: int, dtype: str, log) -> dict:
    from models.synth_llama import synthesize
    info = synthesize(path, preset=preset, dtype=dtype, layers=layers, progress=False, workers=8)
    info.pop("weights", None)
    log(f"{preset}: synthesized {layers} layers, {info['params'] / 1e6:.0f} M params in {info['seconds']:.1f} s")
    return {"source": "models.synth_llama", "params": info["params"], "layers": layers}


def make_decode(folder, preset: str, layers: int, dtype: str, log, timeout: float = 600) -> tuple[str, dict]:
    """A with-past decode graph, made in a child process (torch export is slow and memory
    hungry; a timeout turns into "not available"), or an exception saying why there is none."""
    import json
    import subprocess
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_make-decode",
           json.dumps({"folder": str(folder), "preset": preset, "layers": layers, "dtype": dtype})]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"decode graph export took more than {timeout:.0f} s (--export-timeout)") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("DECODE_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        raise RuntimeError(f"decode graph export failed: {tail}")
    out = json.loads(lines[-1][len("DECODE_RESULT "):])
    if out.get("error"):
        raise RuntimeError(out["error"])
    log(f"{preset}: decode graph ready in {time.perf_counter() - t0:.1f} s ({out['info']['source']})")
    return out["path"], out["info"]


def _make_decode_inproc(folder, preset: str, layers: int, dtype: str, log) -> tuple[str, dict]:
    """A with-past decode graph, or an exception saying why there is none."""
    import inspect

    from models import synth_llama
    sig = inspect.signature(synth_llama.synthesize)
    if any(k in sig.parameters for k in ("past", "kv_cache", "with_past")):
        key = next(k for k in ("with_past", "kv_cache", "past") if k in sig.parameters)
        path = Path(folder) / "decode.onnx"
        synth_llama.synthesize(path, preset=preset, dtype=dtype, layers=layers, progress=False,
                               **{key: True})
        return str(path), {"source": f"models.synth_llama ({key}=True)"}
    from models import export as mexport
    from models.zoo import build
    if not hasattr(mexport, "export_decoder_with_past"):
        raise RuntimeError("models.export has no export_decoder_with_past")
    t0 = time.perf_counter()
    model = build("llama", "full", perturb=True, **hf_overrides(preset, layers))
    log(f"{preset}: torch model built in {time.perf_counter() - t0:.1f} s; exporting with past")
    errors = []
    for exporter in ("wrapper", "transformers"):
        t0 = time.perf_counter()
        try:
            if exporter == "wrapper":
                path = Path(folder) / "decode_wrapper.onnx"
                mexport.export_decoder_with_past(model, path, exporter="wrapper", dtype=dtype, check=False)
                out = str(path)
            else:
                files = mexport.export_decoder_with_past(model, Path(folder) / "tf", exporter="transformers",
                                                         dtype=dtype, check=False)
                out = next(f for f in files if Path(f).name.startswith("decode"))
            log(f"{preset}: decode graph exported ({exporter}) in {time.perf_counter() - t0:.1f} s")
            return out, {"source": f"models.export.export_decoder_with_past(exporter={exporter!r})",
                         "layers": layers, "export_s": round(time.perf_counter() - t0, 1),
                         "earlier_errors": errors}
        except Exception as exc:
            errors.append(f"{exporter}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            log(f"{preset}: export ({exporter}) failed: {errors[-1]}")
        finally:
            gc.collect()
    raise RuntimeError("; ".join(errors))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/end_to_end.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=PRESETS["full"]["models"])
    p.add_argument("--layers", default=PRESETS["full"]["layers"], help="name:L,... truncations")
    p.add_argument("--prefill", default=PRESETS["full"]["prefill"], help="prefill token counts")
    p.add_argument("--decode", default=PRESETS["full"]["decode"], help="KV-cache lengths ('' = no decode)")
    p.add_argument("--decode-models", default="all", help="models that get decode rows ('all' or a list)")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--best-fused", choices=tuple(BEST_FUSED), default="auto")
    p.add_argument("--export-timeout", type=float, default=600, help="seconds for one decode-graph export")
    p.add_argument("--time-limit", type=float, default=0,
                   help="seconds; cases not started by then are skipped (0: none; --quick: 420)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None, help="default benchmarks/results/end_to_end-<provider>")
    p.add_argument("--workdir", help="keep the models here (default: temporary, deleted per model)")
    p.add_argument("--quiet", action="store_true")
    add_timing_args(p)
    return p


def _child_make_decode(spec: str) -> int:
    import json
    a = json.loads(spec)
    try:
        path, info = _make_decode_inproc(a["folder"], a["preset"], a["layers"], a["dtype"],
                                         lambda m: print(m, file=sys.stderr, flush=True))
        print("DECODE_RESULT " + json.dumps({"path": path, "info": info}), flush=True)
    except Exception as exc:
        print("DECODE_RESULT " + json.dumps({"error": f"{type(exc).__name__}: {str(exc)[:400]}"}), flush=True)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_make-decode"]:
        return _child_make_decode(argv[1])
    p = parser()
    for name in ("quick", "smoke"):
        if f"--{name}" in argv:
            p.set_defaults(**PRESETS[name])
    args = p.parse_args(argv)
    log = quiet_log if args.quiet else log_to_stderr
    provider = resolve_provider(args.provider)
    settings = settings_from(args)
    wanted = tuple(v for v in args.variants.split(",") if v)
    stacked = tuple(n.split("+", 1)[1] for n in wanted if n.startswith("fused+"))
    layers_map = _layers_map(args.layers)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"end_to_end-{provider}")
    out.mkdir(parents=True, exist_ok=True)
    workroot = Path(args.workdir or tempfile.mkdtemp(prefix="flashnorm-e2e-"))
    prefill = int_list(args.prefill)
    decode = int_list(args.decode)
    decode_models = None if args.decode_models == "all" else set(args.decode_models.split(","))
    from models.synth_llama import PRESETS as SP
    parts = []
    t_all = time.perf_counter()

    def run_case(case, src, shapes, info, work):
        variants = prepare_variants(src, workdir=work, baselines=True, stacked=stacked,
                                          best_fused=args.best_fused, use_gpu=provider == "cuda",
                                          only=wanted, log=log)
        variants = {k: v for k, v in variants.items() if k in wanted}
        res = measure(variants, shapes, provider=provider, settings=settings, log=log)
        vj = variants_json(variants)
        vj["raw"]["info"] = info
        parts.append((case, res, vj))
        gc.collect()

    def write(final: bool):
        result = merge_cases(parts, provider, settings)
        result["benchmark"] = "end_to_end"
        result["complete"] = final
        result["config"] = {"models": args.models,
                            "layers": {m: layers_map.get(m, SP[m]["layers"]) for m in args.models.split(",") if m in SP},
                            "prefill": prefill, "decode": decode, "decode_models": args.decode_models,
                            "dtype": args.dtype, "batch": args.batch, "variants": list(wanted),
                            "best_fused": args.best_fused, "time_limit_s": args.time_limit}
        result["wall_s"] = round(time.perf_counter() - t_all, 1)
        missing = [f"{case}: {e['variants']['raw']['error']}" for case, e in result["cases"].items()
                   if e["variants"].get("raw", {}).get("error")]
        write_json(result, out / "end_to_end.json")
        md = [f"# End to end ({args.dtype}, batch {args.batch})", "",
              f"Device: {result['device']}, onnxruntime {result['onnxruntime']} ({provider})"
              + (", CUDA graph" if args.cuda_graph else "") + f". Wall time {result['wall_s']} s"
              + ("" if final else " (INCOMPLETE: written after each case)") + ".", "",
              "Cells: median ms per forward [p10-p90]. Ratios: t(base) / t(variant), > 1 = variant faster. "
              "Prefill t1 = a 1-token forward without KV cache (decode proxy); decode rows: 1 new token, "
              "KV cache of `past` tokens. `L` = decoder layers in the graph (embedding and lm_head kept).",
              "", table(result, markdown=True), ""]
        md += [f"- {m}" for m in missing]
        for case, entry in result["cases"].items():
            for vname, v in entry["variants"].items():
                if v.get("error") and vname != "raw":
                    md.append(f"- {case} {vname}: not measured: {v['error']}")
        md += ["", "Method: " + result["method"], ""]
        (out / "end_to_end.md").write_text("\n".join(md) + "\n")
        if final:
            plot(result, out / "end_to_end.png", title=f"end to end, {args.dtype}, batch {args.batch}")
        return result, missing

    def over_time(case) -> bool:
        if args.time_limit and time.perf_counter() - t_all > args.time_limit:
            log(f"{case}: skipped (--time-limit {args.time_limit:.0f} s reached)")
            parts.append((case, None, {"raw": {"error": f"skipped: --time-limit {args.time_limit:.0f} s reached"}}))
            return True
        return False

    try:
        for name in [m for m in args.models.split(",") if m]:
            if name not in SP:
                parts.append((name, None, {"raw": {"error": f"not available: unknown model {name!r}"}}))
                continue
            layers = layers_map.get(name, SP[name]["layers"])
            tag = f"{name} L{layers}"
            if prefill and not over_time(f"{tag} prefill"):
                work = workroot / f"{name}-prefill"
                work.mkdir(parents=True, exist_ok=True)
                case = f"{tag} prefill"
                try:
                    src = work / "model.onnx"
                    info = make_prefill(src, name, layers, args.dtype, log)
                    run_case(case, src, [Shape(t, args.batch) for t in prefill], info, work)
                except Exception as exc:
                    log(f"{case}: not available ({type(exc).__name__}: {exc})")
                    parts.append((case, None, {"raw": {"error": f"not available: {type(exc).__name__}: {exc}"}}))
                if not args.workdir:
                    shutil.rmtree(work, ignore_errors=True)
                write(final=False)
            if decode and (decode_models is None or name in decode_models) and not over_time(f"{tag} decode"):
                work = workroot / f"{name}-decode"
                work.mkdir(parents=True, exist_ok=True)
                case = f"{tag} decode"
                try:
                    src, info = make_decode(work, name, layers, args.dtype, log, args.export_timeout)
                    run_case(case, src, [Shape(1, args.batch, p_) for p_ in decode], info, work)
                except Exception as exc:
                    msg = f"not available: {type(exc).__name__}: {str(exc)[:400]}"
                    log(f"{case}: {msg}")
                    parts.append((case, None, {"raw": {"error": msg}}))
                if not args.workdir:
                    shutil.rmtree(work, ignore_errors=True)
                write(final=False)
    finally:
        if not args.workdir:
            shutil.rmtree(workroot, ignore_errors=True)
    result, missing = write(final=True)
    print(table(result))
    for m in missing:
        print("# " + m)
    print("\nMethod: " + result["method"])
    print(f"wrote {out / 'end_to_end.json'}, end_to_end.png, end_to_end.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

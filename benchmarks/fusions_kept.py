"""Zero fusions lost: the peer's fusions on each original and on our rewrite of it.

    python benchmarks/fusions_kept.py                  # zoo × 3 exports, ORT-optimized inputs, real SmolLM2
    python benchmarks/fusions_kept.py --exports dynamo18 --no-real        # quick (rows replace
                                                                          # the same rows of the JSON)

The peer is onnxscript's `optimize_for_ort` (attention/GQA/MHA, rotary, skip norms, GELU). For
each model, its fused ops on the original are counted — none when onnxruntime cannot load what
it made without its shape declarations (it made no fusion anyone can run: on GPT-2 graphs
those declarations let the graph load, then its Gemm fails at run time) — and compared with our output for each config:
`--target ort-cpu|ort-cuda` and the portable modes `defer` and `fold`: the peer is run on our
output (a target's output already carries its fusions — except where the target measured them
slower, e.g. attention on KV-cache graphs on ORT CPU — the JSON keeps what it holds as
written). A fusion is lost when the peer's count of that op on our output is below its count
on the original: the rewrite blocked it. In the portable modes the norm itself is rewritten (folded,
deferred), so a lost *norm* fusion there is the rewrite, not a blocked fusion: the table keeps
the two apart. Real graphs: SmolLM2-135M (dynamo prefill and KV-cache decode exports, the genai
builder's fp32 model) where benchmarks/end_to_end.py has cached them (~/.cache/flashnorm).
Writes fusions_kept.json and .md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

NORMS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
         "SkipLayerNormalization")
OTHERS = ("MultiHeadAttention", "GroupQueryAttention", "Attention", "RotaryEmbedding", "FastGelu",
          "Gelu", "BiasGelu")
CONFIGS = {"ort-cpu": {"target": "ort-cpu"}, "ort-cuda": {"target": "ort-cuda"},
           "defer": {"mode": "defer"}, "fold": {"mode": "fold"}}
EXPORTS = {"dynamo18": ("dynamo", 18, False), "torchscript17": ("torchscript", 17, False),
           "dynamo23": ("dynamo", 23, False), "ort-optimized": ("dynamo", 18, True)}
CACHE = Path(os.environ.get("FLASHNORM_MODEL_CACHE") or Path.home() / ".cache" / "flashnorm")
REAL = {"smollm2 dynamo prefill": CACHE / "e2e" / "smollm2-real" / "prefill.onnx",
        "smollm2 dynamo decode (KV cache)": CACHE / "e2e" / "smollm2-real" / "decode.onnx",
        "smollm2 genai fp32": CACHE / "genai" / "smollm2-fp32" / "model.onnx"}


def fused(model) -> Counter:
    return Counter(n.op_type for n in model.graph.all_nodes() if n.op_type in NORMS + OTHERS)


def peer_fusions(path) -> tuple[Counter, str]:
    """(fused ops after the peer, '' or why none count: onnxruntime cannot load its result)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from rewriter.compose import ort_load_error
    model, _ = optimize_for_ort(ir.load(str(path)))
    error = ort_load_error(model)
    if error:
        return Counter(), f"the peer's result does not load ({error[:120]})"
    return fused(model), ""


def compare(src: Path, workdir: Path) -> dict:
    import onnx_ir as ir

    from rewriter.api import rewrite_file
    before, why = peer_fusions(src)
    row = {"peer_on_original": dict(before), "peer_note": why, "configs": {}}
    for name, options in CONFIGS.items():
        dst = workdir / f"{src.stem}-{name}.onnx"
        t0 = time.perf_counter()
        report = rewrite_file(src, dst, overwrite=True, **options)
        written = fused(ir.load(str(dst)))
        after = peer_fusions(dst)[0]        # what the ecosystem still makes on our output
        lost = {op: before[op] - after[op] for op in before if after[op] < before[op]}
        row["configs"][name] = {"ours": dict(after), "as_written": dict(written), "lost": lost,
                                "rewritten": report.rewritten,
                                "notes": [n for n in report.notes if "ORT fusions" in n],
                                "seconds": round(time.perf_counter() - t0, 1)}
        for f in workdir.glob(f"{src.stem}-{name}.onnx*"):
            f.unlink()
    return row


def cell(config: dict) -> str:
    norm = {op: n for op, n in config["lost"].items() if op in NORMS}
    other = {op: n for op, n in config["lost"].items() if op not in NORMS}
    if not norm and not other:
        return "none"
    parts = [f"**{op} −{n}**" for op, n in other.items()] + [f"{op} −{n} (norm rewritten)" for op, n in norm.items()]
    return ", ".join(parts)


def markdown(rows: dict) -> str:
    lines = ["| model | peer's fusions on the original | " + " | ".join(f"lost: {c}" for c in CONFIGS) + " |",
             "|---|---|" + "---|" * len(CONFIGS)]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error']} |" + " |" * len(CONFIGS))
            continue
        peer = ", ".join(f"{op} {n}" for op, n in sorted(row["peer_on_original"].items())) or row["peer_note"] or "none"
        lines.append(f"| {name} | {peer} | " + " | ".join(cell(row["configs"][c]) for c in CONFIGS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exports", default=",".join(EXPORTS), help=f"of {', '.join(EXPORTS)}")
    parser.add_argument("--families", default="", help="zoo families (default: all of tests/test_zoo.py)")
    parser.add_argument("--no-real", action="store_true", help="skip the real SmolLM2 graphs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu"))
    parser.add_argument("--fresh", action="store_true", help="start a new fusions_kept.json (default: "
                        "the rows of this run replace the same rows of the existing one)")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLASHNORM_TEST_CACHE", str(Path(tempfile.gettempdir()) / "flashnorm-fusions-kept"))
    Path(os.environ["FLASHNORM_TEST_CACHE"]).mkdir(parents=True, exist_ok=True)
    from models_cache import exported
    from test_zoo import EXPECTED
    families = [f for f in (args.families.split(",") if args.families else EXPECTED) if f]
    sources = {f"{family} ({export})": (lambda fam=family, e=export: exported(fam, *EXPORTS[e][:2], ort_opt=EXPORTS[e][2]))
               for export in args.exports.split(",") if export for family in families}
    if not args.no_real:
        sources.update({name: (lambda p=path: p) for name, path in REAL.items() if path.exists()})
    out = Path(args.out)
    existing = out / "fusions_kept.json"
    rows = json.loads(existing.read_text()) if existing.exists() and not args.fresh else {}
    with tempfile.TemporaryDirectory(prefix="fusions-kept-") as work:
        for name, source in sources.items():
            stage = "making the input"      # a model that cannot be made or rewritten is a row too
            try:
                path = Path(source())
                stage = "comparing"
                rows[name] = compare(path, Path(work))
            except Exception as exc:    # noqa: BLE001
                rows[name] = {"error": f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            print(f"{name}: " + (rows[name].get("error") or
                                 "; ".join(f"{c} {cell(v)}" for c, v in rows[name]["configs"].items())), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusions_kept.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "fusions_kept.md").write_text(markdown(rows))
    print(markdown(rows))
    blocked = [(n, c) for n, r in rows.items() if "configs" in r for c, v in r["configs"].items()
               if any(op not in NORMS for op in v["lost"]) or (c.startswith("ort-") and v["lost"])]
    print(f"fusions lost (non-norm in any config, or any in an ort-* target): {blocked or 'none'}")
    return 1 if blocked else 0


if __name__ == "__main__":
    sys.exit(main())

"""CLI: build (or load) a model and export it to ONNX.

  python -m models llama --size full -o smollm2_shape.onnx
  python -m models smollm2 --real --exporter torchscript -o smollm2.onnx
  python -m models qwen3 --exporter dynamo --opset 23 --dtype fp16 -o q.onnx --check
  python -m models llama --ort-opt -o llama_opt.onnx      # raw export kept as llama_opt.raw.onnx
  python -m models llama --with-past -o llama_past.onnx    # KV-cache decode graph
  python -m models list
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REAL = {"smollm2": "smollm2", "minilm": "minilm", "llama": "smollm2", "bert": "minilm"}


def main(argv=None):
    from . import zoo
    ap = argparse.ArgumentParser(prog="python -m models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", help=f"one of {', '.join(zoo.FAMILIES)}, smollm2, minilm, or "
                                   f"'list'")
    ap.add_argument("--size", default="tiny", help="tiny | small | full (see `list`)")
    ap.add_argument("--real", action="store_true",
                    help="real weights (smollm2 / llama -> SmolLM2-135M-Instruct, "
                         "minilm / bert -> all-MiniLM-L6-v2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    ap.add_argument("--opset", type=int, default=None,
                    help="default 18 (dynamo) / 17 (torchscript)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=8)
    ap.add_argument("--attention-mask", dest="mask", default=None,
                    choices=["auto", "yes", "no"], help="attention_mask input (auto)")
    ap.add_argument("--ort-opt", action="store_true",
                    help="run onnxruntime.transformers optimizer; -o gets the optimized graph")
    ap.add_argument("--with-past", nargs="?", const="wrapper", default=None,
                    choices=["wrapper", "transformers", "transformers-cpu"],
                    help="decode graph with KV cache (decoders); 'transformers' writes a dir")
    ap.add_argument("--no-optimize", action="store_true",
                    help="dynamo: skip the onnxscript optimizer (faster export, rawer graph)")
    ap.add_argument("--check", action="store_true", help="compare ORT output with torch")
    ap.add_argument("--chains", action="store_true", help="print the norm op chains")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args(argv)

    if a.family == "list":
        print(zoo.describe())
        print("real: smollm2 (SmolLM2-135M-Instruct GGUF), minilm (all-MiniLM-L6-v2)")
        return 0

    from .export import (compare_with_torch, export_decoder_with_past, export_onnx,
                         ort_model_type, ort_optimize)
    from .norm_chains import summarize

    fam = a.family
    real = a.real or fam in ("smollm2", "minilm")
    t0 = time.perf_counter()
    if real:
        if fam not in REAL:
            ap.error(f"--real is available for {sorted(REAL)}")
        mod = __import__(f"models.{REAL[fam]}", fromlist=["load"])
        model, _ = mod.load(with_tokenizer=False)
        fam = "bert" if REAL[fam] == "minilm" else "llama"
        tag = REAL[a.family]
    else:
        if fam not in zoo.FAMILIES:
            ap.error(f"unknown family {fam!r}")
        model = zoo.build(fam, a.size, a.seed)
        tag = f"{fam}_{a.size}"
    print(f"model {tag}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"built/loaded in {time.perf_counter() - t0:.1f}s")

    opset = a.opset or (18 if a.exporter == "dynamo" else 17)
    out = Path(a.output or f"{tag}_{a.exporter}{opset}_{a.dtype}.onnx")

    if a.with_past:
        if a.with_past == "wrapper":
            export_decoder_with_past(model, out, "wrapper", opset=opset, dtype=a.dtype)
        else:
            export_decoder_with_past(model, out, "transformers", opset=opset, dtype=a.dtype,
                                     ort_fusions="cpu" if a.with_past.endswith("cpu") else None)
        return 0

    mask = {None: None, "auto": None, "yes": True, "no": False}[a.mask]
    raw = out.with_suffix(".raw.onnx") if a.ort_opt else out
    r = export_onnx(model, raw, exporter=a.exporter, opset=opset, dtype=a.dtype,
                    batch=a.batch, seq=a.seq, with_attention_mask=mask,
                    optimize=not a.no_optimize)
    print(r.summary())
    final = raw
    if a.ort_opt:
        from .zoo import num_heads_hidden
        heads, hidden = num_heads_hidden(model)
        t1 = time.perf_counter()
        ort_optimize(raw, out, ort_model_type(fam), heads, hidden)
        print(f"ort-optimized -> {out} in {time.perf_counter() - t1:.1f}s")
        final = out
    if a.check:
        print(f"max|ORT - torch fp32| = {compare_with_torch(model, final, seq=a.seq):.3e}")
    if a.chains:
        print(summarize(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())

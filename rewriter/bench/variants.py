"""What `bench` times: the VARIANTS table, and the model file behind each (prepare_variants).

Each variant's file is the original run through passes (rewriter/bench/passes.py) or through
the rewriter itself (rewrite_file); a failure is recorded on its Variant and never stops the
others.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from rewriter import io
from rewriter.api import rewrite_file
from rewriter.bench.passes import (FuseNorms, NormFree, OnnxscriptFusions, OrtTransformersOptimizer, count_norms,
                                   op_counts, tidy, transform_file)
from rewriter.bench.timing import Variant, error_text, quiet_log


@dataclass(frozen=True)
class Kind:
    role: str       # "baseline": a ratio's numerator; "peer" / "rewriter": its denominator
    doc: str
    target: str | None = None       # rewrite_file(target=...) for the rewriter's runtime targets


VARIANTS: dict[str, Kind] = {       # in table and plot order
    "raw": Kind("baseline", "the original as given"),
    "best-fused": Kind("baseline", "the strongest norm fusion available for onnxruntime (--best-fused, "
                                   "BEST_FUSED)"),
    "onnxscript": Kind("peer", "onnxscript's optimize_for_ort on the original, as it comes"),
    "ort-optimizer": Kind("peer", "onnxruntime's transformers optimizer on the original, as it comes"),
    "rewritten": Kind("rewriter", "REWRITTEN, or rewrite_file(ORIGINAL, mode=--mode)"),
    "rewritten-fold": Kind("rewriter", 'rewrite_file(ORIGINAL, mode="fold"): gains folded, a weightless '
                                       "norm kept"),
    "ort-cuda": Kind("rewriter", 'rewrite_file(ORIGINAL, target="ort-cuda"): the rewriter\'s CUDA recipe',
                     target="ort-cuda"),
    "ort-cpu": Kind("rewriter", 'rewrite_file(ORIGINAL, target="ort-cpu") (by name only)', target="ort-cpu"),
    "norm-free": Kind("baseline", "every normalization replaced by identity: the floor (not a usable model)"),
    "fused+fold": Kind("rewriter", "the fold rewrite of best-fused (--stacked)"),
    "fused+defer": Kind("rewriter", "the defer rewrite of best-fused (--stacked)"),
}
BASES = tuple(n for n, k in VARIANTS.items() if k.role == "baseline")
CONTENDERS = tuple(n for n, k in VARIANTS.items() if k.role != "baseline")

BEST_FUSED = {                      # --best-fused METHOD: how best-fused is built
    "auto": "onnxscript's optimize_for_ort, then the rewriter's fused-norm emitter (Rewriter.fuse_norm) "
            "on every norm it left decomposed",
    "onnxscript": "onnxscript's optimize_for_ort alone",
    "ort": "onnxruntime's transformers optimizer alone (--model-type, --fuse-opt-level)",
    "hand": "the rewriter's fused-norm emitter alone, at every norm patterns.find_sites finds",
}


def make_norm_free(src, dst) -> dict:
    return transform_file(src, dst, NormFree())


def make_hand_fused(src, dst) -> dict:
    return transform_file(src, dst, FuseNorms())


def make_best_fused(src, dst, *, method: str = "auto", model_type: str = "gpt2", opt_level: int = 0,
                    use_gpu: bool = False, log=quiet_log) -> dict:
    """best-fused (or a peer: method "onnxscript" / "ort") written to `dst`; see BEST_FUSED.
    With "auto" a failed optimize_for_ort is recorded and the emitter runs alone."""
    if method not in BEST_FUSED:
        raise ValueError(f"unknown best-fused method {method!r} (choose from {', '.join(BEST_FUSED)})")
    model = io.load_path(src)       # counted in memory: a file is parsed once (seconds at 600 MB)
    ops_before = op_counts(model)
    info: dict = {"method": method, "model_type": model_type, "opt_level": opt_level,
                  "norms_before": count_norms(model)}
    with tempfile.TemporaryDirectory(dir=Path(dst).parent, prefix=".bench-") as scratch:
        steps = {"auto": [("onnxscript", OnnxscriptFusions())], "onnxscript": [("onnxscript", OnnxscriptFusions())],
                 "ort": [("ort_optimizer", OrtTransformersOptimizer(scratch, model_type=model_type,
                                                                     opt_level=opt_level, use_gpu=use_gpu))],
                 "hand": []}[method]
        for key, step in steps:
            try:
                model = step(model).model
            except Exception as exc:        # record why; "auto" goes on with the emitter alone
                info[key] = {"ok": False, "error": error_text(exc)}
                log(f"{key}: failed ({info[key]['error'][:120]})")
                if method != "auto":
                    raise
                model = io.load_path(src)   # the pass may have stopped halfway
                continue
            info[key] = dict(step.info, ok=True)
            log(f"{key}: {step.info}")
        if method in ("auto", "hand"):
            fuse = FuseNorms()
            model = fuse(model).model
            info["hand_fusion"] = fuse.info
            log(f"fused-norm emitter: {fuse.info['fused'] or 'nothing left to fuse'}")
        model = ir.passes.Sequential(*tidy())(model).model
        info["op_delta"] = _op_delta(ops_before, op_counts(model))
        info["norms_after"] = count_norms(model)
        io.save(model, dst, overwrite=True, check=False)
    return info


def _op_delta(a: dict, b: dict) -> dict:
    keys = sorted(set(a) | set(b))
    return {k: b.get(k, 0) - a.get(k, 0) for k in keys if b.get(k, 0) != a.get(k, 0)}


def prepare_variants(original, rewritten=None, *, workdir, mode: str = "defer", baselines: bool = False,
                     stacked: tuple[str, ...] = (), best_fused: str = "auto", model_type: str = "gpt2",
                     opt_level: int = 0, use_gpu: bool = False, only: tuple[str, ...] | None = None,
                     targets: tuple[str, ...] = ("ort-cuda", "ort-cpu"), log=quiet_log) -> dict[str, Variant]:
    """Write every variant's model into `workdir` (`only`: these names; `baselines`: best-fused,
    the peers, rewritten-fold, the runtime `targets` and norm-free besides raw and rewritten)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stem = Path(original).stem
    out: dict[str, Variant] = {"raw": Variant("raw", str(original), {"source": "as given"})}

    def want(name):
        return only is None or name in only

    def build(name, fn, **info):
        if not want(name):
            return
        t0 = time.perf_counter()
        v = Variant(name, None, dict(info))
        try:
            path, extra = fn()
            v.path = str(path)
            v.info.update(extra or {})
        except Exception as exc:
            v.error = error_text(exc)
            log(f"{name}: FAILED ({v.error})")
        v.seconds = round(time.perf_counter() - t0, 2)
        if v.error is None:
            log(f"{name}: ready in {v.seconds:.1f} s")
        out[name] = v

    def file_for(name):
        return workdir / f"{stem}.{name.replace('+', '_')}.onnx"

    def rewrite(src, name, m, **opts):
        report = rewrite_file(src, file_for(name), overwrite=True, **(opts or {"mode": m}))
        return file_for(name), {"sites_found": report.found, "sites_rewritten": report.rewritten,
                                "skipped": dict(report.skipped),
                                "op_delta": _op_delta(op_counts(src), op_counts(file_for(name)))}

    def fused(name, method):
        return file_for(name), make_best_fused(original, file_for(name), method=method, model_type=model_type,
                                               opt_level=opt_level, use_gpu=use_gpu, log=log)

    if rewritten is not None:
        out["rewritten"] = Variant("rewritten", str(rewritten), {"source": "as given"})
    else:
        build("rewritten", lambda: rewrite(original, "rewritten", mode), mode=mode)
    if baselines:
        build("best-fused", lambda: fused("best-fused", best_fused))
        build("onnxscript", lambda: fused("onnxscript", "onnxscript"))
        build("ort-optimizer", lambda: fused("ort-optimizer", "ort"))
        if mode != "fold" or rewritten is not None:
            build("rewritten-fold", lambda: rewrite(original, "rewritten-fold", "fold"), mode="fold")
        for target in targets:          # the rewriter's per-site choice from measured costs
            if target == "ort-cpu" and only is None:
                continue                # asked for by name only (the CPU table's choice)
            build(target, lambda target=target: rewrite(original, target, None, target=target),
                  target=target)
        build("norm-free", lambda: (file_for("norm-free"), make_norm_free(original, file_for("norm-free"))))
    bf = out.get("best-fused")
    for m in stacked:
        name = f"fused+{m}"
        if bf is None or bf.path is None:
            if want(name):
                out[name] = Variant(name, None, error="best-fused is not available")
            continue
        build(name, lambda m=m, name=name: rewrite(bf.path, name, m), mode=m, source="best-fused")
    order = list(VARIANTS)
    return {k: out[k] for k in sorted(out, key=lambda n: order.index(n) if n in order else len(order))}


__all__ = ["BASES", "BEST_FUSED", "CONTENDERS", "VARIANTS", "Kind", "make_best_fused", "make_hand_fused",
           "make_norm_free", "prepare_variants"]

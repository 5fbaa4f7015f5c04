"""`python -m rewriter bench ORIGINAL [REWRITTEN]`: latency of the original and the rewritten
graph (and, with --baselines, of reference variants) under onnxruntime, per token count.

    python -m rewriter bench model.onnx                          # rewrites on the fly (defer)
    python -m rewriter bench model.onnx model_flash.onnx --tokens 1,512 --json r.json --plot r.png
    python -m rewriter bench model.onnx --baselines --cuda-graph

Variants (the names used in the table, the JSON and the plot):
    raw             the original as given
    rewritten       REWRITTEN, or rewrite_file(ORIGINAL, mode=--mode) (default defer)
    --baselines adds
    best-fused      onnxruntime's transformers optimizer on the original (`--best-fused ort`),
                    topped up by a hand fusion into SimplifiedLayerNormalization /
                    SkipSimplifiedLayerNormalization of every norm it left unfused (`auto`,
                    the default: the optimizer fuses nothing in fp16 dynamo exports), or the
                    hand fusion alone (`hand`)
    rewritten-fold  rewrite_file(ORIGINAL, mode="fold"): gains folded, a weightless norm kept
    ort-cuda        rewrite_file(ORIGINAL, target="ort-cuda"): the rewriter's CUDA recipe (gains
                    folded, each norm one weightless fused ORT kernel)
    norm-free       every normalization replaced by identity (not a usable model: the floor
                    any normalization trick can reach)
    --stacked fold,defer adds fused+fold / fused+defer: the rewriter run on best-fused.

The timing core (`measure`) is shared with benchmarks/op_level.py and benchmarks/end_to_end.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io as _io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rewriter.cli import ArgumentParser, positive_int
from rewriter.errors import BadInput, UsageError

METHOD = (
    "onnxruntime {ort} ({provider}), graph optimization level {opt}. Each variant is its own "
    "InferenceSession, all loaded together; inputs come from the model's signature "
    "(rewriter.verify.make_inputs, seed 0: random token ids, ones for masks) and are the same "
    "for every variant. IOBinding with inputs and outputs on the device ({device} OrtValues; "
    "outputs pre-allocated by a first run and re-bound, so no copies are timed){graph}. Per "
    "shape: {warmup} warm-up runs per variant, then rounds of interleaved runs (A, B, C, ... "
    "with the order rotated every round), each sample the mean of `inner` back-to-back runs "
    "(inner chosen so a sample lasts >= {min_sample_ms} ms), at least {min_rounds} and at most "
    "{max_rounds} rounds or until {budget_s} s per shape. Reported: median per run, spread "
    "p10-p90 (and IQR in the JSON) over the rounds. Ratios are baseline time / variant time: "
    "> 1 means the variant is faster."
)

NORM_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
            "SkipLayerNormalization", "RMSNormalization"}
DEFAULT_TOKENS = "1,128,512,2048,4096"
VARIANT_ORDER = ("raw", "best-fused", "rewritten", "rewritten-fold", "ort-cuda", "ort-cpu", "norm-free", "fused+fold",
                 "fused+defer")


def log_to_stderr(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _quiet_log(msg: str) -> None:
    pass


# =============================================================================================
# Shapes and statistics
# =============================================================================================

@dataclass(frozen=True)
class Shape:
    tokens: int
    batch: int = 1
    past: int = 0

    @property
    def label(self) -> str:
        s = f"b{self.batch} t{self.tokens}"
        return s + (f" past{self.past}" if self.past else "")


def stats(samples_s: list[float]) -> dict:
    a = np.asarray(samples_s, dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0}
    p10, p25, p50, p75, p90 = np.percentile(a, [10, 25, 50, 75, 90])
    return {"median_ms": float(p50), "p10_ms": float(p10), "p90_ms": float(p90),
            "p25_ms": float(p25), "p75_ms": float(p75), "mean_ms": float(a.mean()),
            "min_ms": float(a.min()), "n": int(a.size)}


# =============================================================================================
# Graph transforms for the baselines (onnx_ir)
# =============================================================================================

_BOOL_OPS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
             "IsNaN", "IsInf"}
_INT_OPS = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero"}


def _dtype(value, _depth: int = 0):
    """The element type of `value` from its type, its constant or (graphs without value_info)
    the op that makes it."""
    import onnx_ir as ir
    if value is None:
        return None
    if value.dtype is not None:
        return value.dtype
    if value.const_value is not None:
        return value.const_value.dtype
    node = value.producer()
    if node is None or _depth > 400:
        return None
    if node.op_type == "Cast":
        return ir.DataType(node.attributes["to"].value)
    if node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().dtype
    if node.op_type in _BOOL_OPS:
        return ir.DataType.BOOL
    if node.op_type in _INT_OPS:
        return ir.DataType.INT64
    if node.op_type == "Where":
        sources = node.inputs[1:]
    elif node.op_type in ("Gather", "GatherElements", "GatherND", "Expand", "Reshape", "Slice"):
        sources = node.inputs[:1]
    else:
        sources = node.inputs
    for src in sources:
        d = _dtype(src, _depth + 1)
        if d is not None:
            return d
    return None


def _replace_value(graph, old, new) -> None:
    """Every use of `old` (graph outputs included, keeping their names: through an Identity,
    as `new` may be a graph input or output itself) now reads `new`."""
    import onnx_ir as ir
    for i, out in enumerate(list(graph.outputs)):
        if out is old:
            name = old.name
            old.name = f"{name}__bench_dead"
            node = ir.node("Identity", [new], name=f"bench/keep_{name}")
            node.outputs[0].name = name
            node.outputs[0].dtype = old.dtype
            node.outputs[0].shape = old.shape
            graph.append(node)
            graph.outputs[i] = node.outputs[0]
    ir.convenience.replace_all_uses_with(old, new)      # raises while `old` is a graph output


def _as_dtype(editor, value, dtype):
    """`value` in `dtype`: through a Cast that produced it when possible, else a new Cast."""
    if dtype is None or _dtype(value) == dtype:
        return value
    prod = value.producer()
    if prod is not None and prod.op_type == "Cast" and _dtype(prod.inputs[0]) == dtype:
        return prod.inputs[0]
    out = editor.op1("Cast", value, to=int(dtype))
    out.dtype = dtype
    return out


def _trailing_output(value):
    """After a normalized value: [Cast] [Mul(const)] [Cast] [Add(const)] [Cast] -> the end value."""
    from rewriter.patterns.graph import const_array, users
    while True:
        uses = users(value)
        if len(uses) != 1 or value.is_graph_output():
            return value
        node = uses[0][0]
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Cast", "Mul", "Add"):
            return value
        if node.op_type != "Cast":
            other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
            if const_array(other) is None:
                return value
        value = node.outputs[0]


def _fused_spec(node):
    from rewriter.patterns.fused import FUSED_NORMS
    domain = "" if node.domain == "ai.onnx" else node.domain
    return FUSED_NORMS.get((domain, node.op_type))


def _skip_sum(editor, node, spec):
    """input + skip (+ bias) of a Skip* fused norm."""
    dtype = _dtype(node.inputs[0])
    total = editor.op1("Add", node.inputs[0], node.inputs[spec.skip], hint="nf_sum")
    total.dtype = dtype
    if spec.bias is not None and spec.bias < len(node.inputs) and node.inputs[spec.bias] is not None:
        total = editor.op1("Add", total, node.inputs[spec.bias], hint="nf_bias")
        total.dtype = dtype
    return total


def norm_free_ir(model) -> dict:
    """Replace every normalization in `model` (onnx_ir, in place) by identity. Returns
    {"removed": n, "kept": [[name, reason], ...]}."""
    from rewriter import patterns
    from rewriter.patterns.rmsnorm import match_inverse_rms
    from rewriter.patterns.graph import GraphEditor, is_used

    graph = model.graph
    editor = GraphEditor(graph, prefix="bench_nf")
    sites, misses = patterns.find_sites(graph)
    removed, kept = 0, []
    anchors = [(s.anchor, s) for s in sites] + [(m.anchor, m) for m in misses]
    done = set()
    for anchor, found in anchors:
        if id(anchor) in done:
            continue
        done.add(id(anchor))
        spec = _fused_spec(anchor)
        if spec is not None:                                   # one fused op, matched or not
            out0 = anchor.outputs[0]
            if spec.skip is not None:
                total = _skip_sum(editor, anchor, spec)
                if is_used(out0):
                    _replace_value(graph, out0, _as_dtype(editor, total, _dtype(out0)))
                if spec.residual_out is not None and spec.residual_out < len(anchor.outputs) \
                        and is_used(anchor.outputs[spec.residual_out]):
                    _replace_value(graph, anchor.outputs[spec.residual_out], total)
            else:
                _replace_value(graph, out0, _as_dtype(editor, anchor.inputs[0], _dtype(out0)))
            removed += 1
            continue
        if getattr(found, "x", None) is not None and hasattr(found, "output"):   # decomposed Site
            x, out = found.x, found.output
        else:                                                  # decomposed Miss: re-walk it
            m = match_inverse_rms(anchor) if anchor.op_type == "ReduceMean" else None
            if not isinstance(m, tuple):
                kept.append([found.name, getattr(found, "reason", "not a recognized norm")])
                continue
            x, out = m[0], _trailing_output(m[2])
        _replace_value(graph, out, _as_dtype(editor, x, _dtype(out)))
        removed += 1
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    RemoveUnusedNodesPass()(model)
    graph.sort()
    return {"removed": removed, "kept": kept}


def hand_fuse_ir(model) -> dict:
    """Replace each decomposed RMSNorm/LayerNorm (as found by the matcher, linear consumers or
    not) by ORT's fused op with its own γ/β, through the rewriter's `fuse_norm`: Skip* when its
    input is a residual Add (SkipLayerNormalization too, and Adds of unknown shape count: the
    graph is not shape-inferred), else SimplifiedLayerNormalization / LayerNormalization.
    In place. Returns {"fused": {op: n}, "kept": [[name, reason], ...]}."""
    from rewriter import patterns
    from rewriter.patterns.rmsnorm import match_inverse_rms
    from rewriter.patterns.graph import const_array, last_dim, users
    from rewriter.transform import Rewriter

    graph = model.graph
    rw = Rewriter(model)
    rw.edit.prefix = "bench_fuse"                            # names of what it adds
    sites, misses = patterns.find_sites(graph)
    fused: dict[str, int] = {}
    kept: list = []
    for found in [*sites, *misses]:
        if _fused_spec(found.anchor) is not None:
            continue                                           # already a fused op
        kind = found.kind
        if hasattr(found, "output") and found.x is not None:
            x, out, eps, gain, beta = found.x, found.output, found.eps, found.gain, found.beta
        else:
            m = match_inverse_rms(found.anchor) if found.anchor.op_type == "ReduceMean" else None
            if not isinstance(m, tuple) or kind != "rms":
                kept.append([found.name, getattr(found, "reason", "")])
                continue
            x, eps = m[0], m[1]
            out, gain, beta = _trailing_output(m[2]), None, None
            # a Miss: recover the gain from the trailing Mul when it is a constant
            v = m[2]
            while v is not out:
                node = users(v)[0][0]
                if node.op_type == "Mul":
                    gain = const_array(node.inputs[1] if node.inputs[0] is v else node.inputs[0])
                elif node.op_type == "Add":
                    break
                v = node.outputs[0]
            if v is not out:
                kept.append([found.name, "bias after a Miss norm"])
                continue
        if kind not in ("rms", "layer"):
            kept.append([found.name, f"kind {kind}"])
            continue
        out_dtype = _dtype(out)
        if out_dtype is None:
            kept.append([found.name, "unknown output dtype"])
            continue
        np_dtype = out_dtype.numpy()
        xin = _as_dtype(rw.edit, rw.current(x), out_dtype)
        if gain is None or np.asarray(gain).size == 1:
            n = last_dim(out) or last_dim(xin)
            if n is None:
                kept.append([found.name, "unknown hidden size"])
                continue
            gain = np.full(n, 1.0 if gain is None else float(np.asarray(gain).reshape(-1)[0]))
        gain = np.asarray(gain, np.float64).reshape(-1)
        gain_v = rw.edit.initializer(gain.astype(np_dtype), "gain")
        beta_v = None
        if kind == "layer":
            b = np.zeros(gain.size) if beta is None else np.asarray(beta, np.float64).reshape(-1)
            beta_v = rw.edit.initializer(b.astype(np_dtype), "beta")
        op_type = rw.fuse_norm(xin, out, kind, eps, gain_v, beta_v, skip_layernorm=True,
                               trust_unknown_shapes=True)
        fused[op_type] = fused.get(op_type, 0) + 1
    if fused.get("LayerNormalization") and rw.edit.opset < 17:
        kept.append(["*", "LayerNormalization needs opset 17"])
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    RemoveUnusedNodesPass()(model)
    graph.sort()
    return {"fused": fused, "kept": kept}


def _transform_file(src, dst, fn) -> dict:
    """Load with onnx_ir (no validation: baselines may hold ORT contrib ops), transform, save
    (external data when the source had it or the weights pass 2 GiB)."""
    import onnx_ir as ir
    model = ir.load(str(src))
    info = fn(model)
    big = sum(int(v.const_value.nbytes) for v in model.graph.initializers.values()
              if v.const_value is not None) > 2**31 - 2**26
    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    ir.save(model, str(dst), external_data=Path(dst).name + ".data" if (big or external) else None)
    return info


def make_norm_free(src, dst) -> dict:
    return _transform_file(src, dst, norm_free_ir)


def make_hand_fused(src, dst) -> dict:
    return _transform_file(src, dst, hand_fuse_ir)


def op_counts(path) -> dict[str, int]:
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def count_norms(path) -> dict:
    """Fused norm ops and decomposed norm chains (ReduceMean anchors the matcher accepts)."""
    counts = op_counts(path)
    fused = {k: v for k, v in counts.items() if k in NORM_OPS}
    decomposed = 0
    try:
        from rewriter import patterns
        from rewriter import io
        model, _ = io.load(path)
        sites, misses = patterns.find_sites(model.graph)
        decomposed = sum(1 for x in list(sites) + list(misses) if _fused_spec(x.anchor) is None)
    except Exception:
        pass
    return {"fused": fused, "decomposed": decomposed}


def _has_external_data(path) -> bool:
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == 1 for t in m.graph.initializer) or Path(path).stat().st_size > 2**31 - 2**26


def make_best_fused(src, dst, *, method: str = "auto", model_type: str = "gpt2", opt_level: int = 0,
                    use_gpu: bool = False, log=_quiet_log) -> dict:
    """The strongest norm fusion onnxruntime offers, written to `dst`. See the module doc."""
    info: dict = {"method": method, "model_type": model_type, "opt_level": opt_level}
    before = count_norms(src)
    info["norms_before"] = before
    ort_ok = False
    if method in ("auto", "ort"):
        t0 = time.perf_counter()
        try:
            import logging
            from onnxruntime.transformers import optimizer
            logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
            with warnings.catch_warnings(), contextlib.redirect_stdout(_io.StringIO()):
                warnings.simplefilter("ignore")
                opt = optimizer.optimize_model(str(src), model_type=model_type, num_heads=0,
                                               hidden_size=0, opt_level=opt_level, use_gpu=use_gpu)
                stats_ = {}
                with contextlib.suppress(Exception):
                    stats_ = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
                opt.save_model_to_file(str(dst), use_external_data_format=_has_external_data(src),
                                       all_tensors_to_one_file=True)
            _fix_ir_version(dst)
            info["ort_optimizer"] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1),
                                     "fused_operator_statistics": stats_,
                                     "op_delta": _op_delta(op_counts(src), op_counts(dst))}
            ort_ok = True
            log(f"best-fused: ORT optimizer in {time.perf_counter() - t0:.1f} s, fused {stats_ or 'nothing'}")
        except Exception as exc:        # record why, go on with the hand fusion
            info["ort_optimizer"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log(f"best-fused: ORT optimizer failed ({type(exc).__name__}: {str(exc)[:120]})")
            if method == "ort":
                raise
    if method == "hand" or (method == "auto" and (not ort_ok or count_norms(dst)["decomposed"] > 0)):
        base = dst if ort_ok else src
        if ort_ok:      # hand-fuse what the optimizer left, in place of its output
            tmp = Path(dst).with_name(Path(dst).stem + ".ortopt.onnx")
            _move_model(dst, tmp)
            base = tmp
        info["hand_fusion"] = make_hand_fused(base, dst)
        if ort_ok:
            _remove_model(base)
        log(f"best-fused: hand fusion {info['hand_fusion']['fused']}")
    info["norms_after"] = count_norms(dst)
    return info


def _op_delta(a: dict, b: dict) -> dict:
    keys = sorted(set(a) | set(b))
    return {k: b.get(k, 0) - a.get(k, 0) for k in keys if b.get(k, 0) != a.get(k, 0)}


def _fix_ir_version(path, max_ir: int = 10) -> None:
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    if m.ir_version > max_ir:
        m.ir_version = max_ir
        onnx.save(m, str(path))


def _data_files(path) -> list[Path]:
    import onnx
    path = Path(path)
    m = onnx.load(str(path), load_external_data=False)
    locs = set()
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                locs.add(e.value)
    return [path.parent / loc for loc in sorted(locs)]


def _move_model(src, dst) -> None:
    """Move a model and its external data (the same file names kept, model renamed)."""
    import onnx
    src, dst = Path(src), Path(dst)
    datas = _data_files(src)
    if not datas:
        shutil.move(str(src), str(dst))
        return
    m = onnx.load(str(src), load_external_data=False)
    new_loc = dst.name + ".data"
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = new_loc
    if len(datas) != 1:
        raise RuntimeError("several external data files")
    shutil.move(str(datas[0]), str(dst.parent / new_loc))
    onnx.save(m, str(dst))
    src.unlink()


def _remove_model(path) -> None:
    with contextlib.suppress(Exception):
        for d in _data_files(path):
            d.unlink(missing_ok=True)
    Path(path).unlink(missing_ok=True)


# =============================================================================================
# Variants
# =============================================================================================

@dataclass
class Variant:
    name: str
    path: str | None
    info: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


def prepare_variants(original, rewritten=None, *, workdir, mode: str = "defer", baselines: bool = False,
                     stacked: tuple[str, ...] = (), best_fused: str = "auto", model_type: str = "gpt2",
                     opt_level: int = 0, use_gpu: bool = False, only: tuple[str, ...] | None = None,
                     targets: tuple[str, ...] = ("ort-cuda", "ort-cpu"), log=_quiet_log) -> dict[str, Variant]:
    """Write every variant's model into `workdir`; a failure is recorded in its Variant and
    never stops the others."""
    from rewriter.api import rewrite_file
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
            if extra:
                v.info.update(extra)
        except Exception as exc:
            v.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            log(f"{name}: FAILED ({v.error})")
        v.seconds = round(time.perf_counter() - t0, 2)
        if v.error is None:
            log(f"{name}: ready in {v.seconds:.1f} s")
        out[name] = v

    def rewrite(src, name, m, **opts):
        dst = workdir / f"{stem}.{name.replace('+', '_')}.onnx"
        report = rewrite_file(src, dst, overwrite=True, **(opts or {"mode": m}))
        return dst, {"sites_found": report.found, "sites_rewritten": report.rewritten,
                     "skipped": dict(report.skipped)}

    if rewritten is not None:
        out["rewritten"] = Variant("rewritten", str(rewritten), {"source": "as given"})
    else:
        build("rewritten", lambda: rewrite(original, "rewritten", mode), mode=mode)
    if baselines:
        def fused():
            dst = workdir / f"{stem}.best-fused.onnx"
            return dst, make_best_fused(original, dst, method=best_fused, model_type=model_type,
                                        opt_level=opt_level, use_gpu=use_gpu, log=log)
        build("best-fused", fused)
        if mode != "fold" or rewritten is not None:
            build("rewritten-fold", lambda: rewrite(original, "rewritten-fold", "fold"), mode="fold")
        for target in targets:          # the rewriter's per-site choice from measured costs
            if target == "ort-cpu" and only is None:
                continue                # asked for by name only (the CPU table's choice)
            build(target, lambda target=target: rewrite(original, target, None, target=target),
                  target=target)

        def free():
            dst = workdir / f"{stem}.norm-free.onnx"
            return dst, make_norm_free(original, dst)
        build("norm-free", free)
    bf = out.get("best-fused")
    for m in stacked:
        name = f"fused+{m}"
        if bf is None or bf.path is None:
            if want(name):
                out[name] = Variant(name, None, error="best-fused is not available")
            continue
        build(name, lambda m=m, name=name: rewrite(bf.path, name, m), mode=m, source="best-fused")
    return {k: out[k] for k in sorted(out, key=lambda n: VARIANT_ORDER.index(n)
                                      if n in VARIANT_ORDER else 99)}


# =============================================================================================
# Timing core
# =============================================================================================

@dataclass
class Settings:
    warmup: int = 5
    min_rounds: int = 5
    max_rounds: int = 30
    budget_s: float = 10.0          # per shape, all variants together, after warm-up
    min_sample_ms: float = 5.0
    opt_level: str = "all"          # ORT session graph optimization: all | extended | basic | disable
    cuda_graph: bool = False
    threads: int = 0                # intra-op threads (0 = ORT default)


_PRELOADED = False


def resolve_provider(provider: str | None) -> str:
    """"cuda" or "cpu" (None: CUDA when this onnxruntime has it). For CUDA, loads the CUDA
    libraries of the nvidia-* wheels first (onnxruntime.preload_dlls), as ORT_GPU.md asks."""
    global _PRELOADED
    import onnxruntime as ort
    available = ort.get_available_providers()
    if provider in (None, "auto"):
        provider = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if provider == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeError("CUDAExecutionProvider is not available in this onnxruntime "
                           f"({ort.__version__}, {available})")
    if provider == "cuda" and not _PRELOADED and hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):
            ort.preload_dlls()
        _PRELOADED = True
    return provider


def open_session(path, provider: str, settings: Settings):
    """(session, note). CUDA graph mode falls back to a plain CUDA session, with the reason."""
    import onnxruntime as ort
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = levels[settings.opt_level]
    if settings.threads:
        so.intra_op_num_threads = settings.threads
    if provider == "cpu":
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), None
    cuda = {"device_id": "0", "arena_extend_strategy": "kSameAsRequested"}
    if settings.cuda_graph:
        try:
            opts = dict(cuda, enable_cuda_graph="1")
            return ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", opts),
                                                                  "CPUExecutionProvider"]), "cuda-graph"
        except Exception as exc:
            note = f"cuda graph refused at load: {str(exc).splitlines()[0][:200]}"
            return ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", cuda),
                                                                  "CPUExecutionProvider"]), note
    return ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", cuda),
                                                          "CPUExecutionProvider"]), None


class Bound:
    """One session bound to one shape's inputs and outputs on the device."""

    def __init__(self, sess, feeds: dict, device: str, graph_id: int | None = None):
        import onnxruntime as ort
        self.sess = sess
        self.device = device
        self.io = sess.io_binding()
        self.keep = []
        for name, arr in feeds.items():
            ov = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), device, 0)
            self.keep.append(ov)
            self.io.bind_ortvalue_input(name, ov)
        self.run_options = ort.RunOptions()
        if graph_id is not None:
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        names = [o.name for o in sess.get_outputs()]
        for name in names:
            self.io.bind_output(name, device)
        sess.run_with_iobinding(self.io, self.run_options)       # allocates the outputs
        outs = self.io.get_outputs()
        self.io.clear_binding_outputs()
        for name, ov in zip(names, outs):                       # fixed addresses from now on
            self.io.bind_ortvalue_output(name, ov)
        self.keep.extend(outs)

    def run(self, n: int = 1) -> float:
        """Seconds per run, averaged over `n` back-to-back runs (synchronized at the end)."""
        sess, io_, ro = self.sess, self.io, self.run_options
        t0 = time.perf_counter()
        for _ in range(n):
            sess.run_with_iobinding(io_, ro)
        io_.synchronize_outputs()
        return (time.perf_counter() - t0) / n

    def close(self):
        self.io.clear_binding_inputs()
        self.io.clear_binding_outputs()
        self.keep.clear()


def shape_feeds(path, sess, shape: Shape) -> dict:
    from rewriter.verify import make_inputs
    return make_inputs(path, batch=shape.batch, seq=shape.tokens, past=shape.past, sess=sess)


def measure(variants: dict[str, Variant], shapes: list[Shape], *, provider: str | None = None,
            settings: Settings | None = None, log=_quiet_log) -> dict:
    """Time every ready variant at every shape, interleaved. Returns the JSON-able result:
    {"provider", "settings", "sessions": {name: note}, "shapes": [{"shape", "variants":
    {name: stats | {"error"}}}]}."""
    settings = settings or Settings()
    provider = resolve_provider(provider)
    device = "cuda" if provider == "cuda" else "cpu"
    sessions: dict = {}
    notes: dict = {}
    for name, v in variants.items():
        if v.path is None:
            continue
        t0 = time.perf_counter()
        try:
            sess, note = open_session(v.path, provider, settings)
            sessions[name] = sess
            notes[name] = {"load_s": round(time.perf_counter() - t0, 2), "note": note,
                           "providers": sess.get_providers()}
            log(f"session {name}: {time.perf_counter() - t0:.1f} s" + (f" ({note})" if note else ""))
        except Exception as exc:
            v.error = f"session: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            notes[name] = {"error": v.error}
            log(f"session {name}: FAILED {v.error}")
    ref_name = next(iter(sessions), None)
    results = []
    for si, shape in enumerate(shapes):
        row: dict = {"shape": asdict(shape), "variants": {}}
        results.append(row)
        if ref_name is None:
            continue
        try:
            base_feeds = shape_feeds(variants[ref_name].path, sessions[ref_name], shape)
        except Exception as exc:
            row["error"] = f"inputs: {type(exc).__name__}: {exc}"
            continue
        bound: dict[str, Bound] = {}
        for name, sess in sessions.items():
            try:
                want = {i.name for i in sess.get_inputs()}
                feeds = {k: v for k, v in base_feeds.items() if k in want}
                if want - set(feeds):
                    extra = shape_feeds(variants[name].path, sess, shape)
                    feeds.update({k: extra[k] for k in want - set(feeds)})
                gid = si + 1 if notes[name].get("note") == "cuda-graph" else None
                bound[name] = Bound(sess, feeds, device, gid)
            except Exception as exc:
                row["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                log(f"{shape.label} {name}: FAILED {row['variants'][name]['error']}")
        names = list(bound)
        samples: dict[str, list[float]] = {n: [] for n in names}
        inner: dict[str, int] = {}

        def failed(name, exc):
            row["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            log(f"{shape.label} {name}: FAILED {row['variants'][name]['error']}")

        for name in list(names):                                 # warm-up (graph capture too)
            try:
                ts = [bound[name].run() for _ in range(max(1, settings.warmup))]
            except Exception as exc:
                failed(name, exc)
                names.remove(name)
                continue
            one = float(np.median(ts))
            inner[name] = int(min(1000, max(1, math.ceil(settings.min_sample_ms / 1e3 / max(one, 1e-7)))))
        t_start = time.perf_counter()
        for r in range(settings.max_rounds):
            if not names:
                break
            k = r % len(names)
            for name in names[k:] + names[:k]:                   # A, B, C, ... rotated each round
                try:
                    samples[name].append(bound[name].run(inner[name]))
                except Exception as exc:
                    failed(name, exc)
                    names.remove(name)
                    samples[name] = []
            if r + 1 >= settings.min_rounds and time.perf_counter() - t_start > settings.budget_s:
                break
        names = list(bound)
        for name in names:
            if samples[name]:
                row["variants"][name] = dict(stats(samples[name]), inner=inner.get(name, 1))
            with contextlib.suppress(Exception):
                bound[name].close()
        bound.clear()
        parts = [f"{n} {row['variants'][n]['median_ms']:.3g}" for n in names if "median_ms" in row["variants"].get(n, {})]
        log(f"{shape.label}: " + ", ".join(parts) + " ms")
    sessions.clear()
    import gc
    gc.collect()
    import onnxruntime as ort
    return {"provider": provider, "onnxruntime": ort.__version__, "settings": asdict(settings),
            "sessions": notes, "shapes": results}


# =============================================================================================
# Ratios, table, plot, JSON
# =============================================================================================

TARGETS = ("rewritten", "rewritten-fold", "ort-cuda", "ort-cpu", "fused+fold", "fused+defer")
BASES = ("raw", "best-fused", "norm-free")


def add_ratios(result: dict) -> None:
    """ratios[f"{base}/{target}"] = t(base) / t(target) (> 1: the target is faster), with a
    verdict per pair: faster, slower, or within noise (p10-p90 ranges overlap)."""
    for row in result["shapes"]:
        v = row["variants"]
        ratios, verdicts = {}, {}
        for target in TARGETS:
            for base in BASES:
                a, b = v.get(base, {}), v.get(target, {})
                if "median_ms" in a and "median_ms" in b:
                    key = f"{base}/{target}"
                    ratios[key] = a["median_ms"] / b["median_ms"]
                    overlap = not (a["p90_ms"] < b["p10_ms"] or b["p90_ms"] < a["p10_ms"])
                    verdicts[key] = "within noise" if overlap else (
                        "faster" if ratios[key] > 1 else "SLOWER")
        row["ratios"], row["verdicts"] = ratios, verdicts


def _cell(s: dict | None) -> str:
    if not s:
        return "-"
    if "error" in s:
        return "failed"
    if "median_ms" not in s:
        return "-"
    return f"{_fmt(s['median_ms'])} [{_fmt(s['p10_ms'])}-{_fmt(s['p90_ms'])}]"


def _fmt(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def table(result: dict, markdown: bool = False) -> str:
    """One row per shape: each variant's median ms [p10-p90], the rewritten graph's speed-up
    over raw and best-fused (t_base / t_rewritten), and a note where it is slower."""
    names = [n for n in VARIANT_ORDER if any(n in r["variants"] for r in result["shapes"])]
    names += sorted({n for r in result["shapes"] for n in r["variants"]} - set(names))
    ratio_cols = [k for k in ("raw/rewritten", "best-fused/rewritten", "best-fused/rewritten-fold",
                              "best-fused/ort-cuda",
                              "best-fused/fused+fold")
                  if any(k in r.get("ratios", {}) for r in result["shapes"])]
    head = ["shape"] + [f"{n} ms" for n in names] + [k.replace("/", "÷") for k in ratio_cols] + ["note"]
    rows = []
    for r in result["shapes"]:
        s = Shape(**r["shape"])
        cells = [(r["case"] + " " if r.get("case") else "") + s.label] + [_cell(r["variants"].get(n)) for n in names]
        cells += [f"{r['ratios'][k]:.2f}" if k in r.get("ratios", {}) else "-" for k in ratio_cols]
        note = []
        for k in ("raw/rewritten", "best-fused/rewritten", "best-fused/rewritten-fold", "best-fused/ort-cuda"):
            verdict = r.get("verdicts", {}).get(k)
            if verdict == "SLOWER":
                base, target = k.split("/")
                note.append(f"{target} SLOWER than {base} (×{r['ratios'][k]:.2f})")
            elif verdict == "within noise" and r["ratios"].get(k, 1) < 1:
                base, target = k.split("/")
                note.append(f"{target} ≈ {base} (within noise)")
        if r.get("error"):
            note.append(r["error"][:80])
        cells.append("; ".join(note))
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c) + " |" for c in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda cs: "  ".join(c.ljust(w) for c, w in zip(cs, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in rows])


def method_text(result: dict) -> str:
    st = result["settings"]
    graph = ""
    if st.get("cuda_graph"):
        graph = "; ORT CUDA graph mode (enable_cuda_graph, one gpu_graph_id per shape)"
    return METHOD.format(ort=result.get("onnxruntime", "?"), provider=result["provider"],
                         opt=st["opt_level"], device=result["provider"], graph=graph,
                         warmup=st["warmup"], min_sample_ms=st["min_sample_ms"],
                         min_rounds=st["min_rounds"], max_rounds=st["max_rounds"],
                         budget_s=st["budget_s"])


STYLES = {"raw": "C3", "best-fused": "C0", "rewritten": "C2", "rewritten-fold": "C8", "ort-cuda": "C1", "ort-cpu": "C6",
          "norm-free": "C7", "fused+fold": "C4", "fused+defer": "C5"}
PLOT_RATIOS = ("raw/rewritten", "best-fused/rewritten", "best-fused/rewritten-fold", "best-fused/ort-cuda",
               "norm-free/rewritten", "best-fused/fused+fold")


def _plot_case(ax1, ax2, rows, title: str) -> None:
    decode = len({r["shape"]["past"] for r in rows}) > 1 and len({r["shape"]["tokens"] for r in rows}) == 1
    xkey = "past" if decode else "tokens"
    groups: dict = {}
    for r in rows:
        key = (r["shape"]["batch"], r["shape"]["past"] if not decode else r["shape"]["tokens"])
        groups.setdefault(key, []).append(r)
    names = [n for n in VARIANT_ORDER if any(n in r["variants"] for r in rows)]
    for gi, (key, rs) in enumerate(sorted(groups.items())):
        rs = sorted(rs, key=lambda r: r["shape"][xkey])
        suffix = "" if len(groups) == 1 else f" (b{key[0]}, {'t' if decode else 'past'}{key[1]})"
        style = "-" if gi == 0 else "--"
        for n in names:
            pts = [(max(r["shape"][xkey], 1), r["variants"][n]) for r in rs
                   if "median_ms" in r["variants"].get(n, {})]
            if not pts:
                continue
            x = [p[0] for p in pts]
            ax1.plot(x, [p[1]["median_ms"] for p in pts], marker="o", color=STYLES.get(n),
                     label=n + suffix, linestyle=style, lw=2 if n == "rewritten" else 1.2)
            ax1.fill_between(x, [p[1]["p10_ms"] for p in pts], [p[1]["p90_ms"] for p in pts],
                             color=STYLES.get(n), alpha=0.15)
        for k in PLOT_RATIOS:
            pts = [(max(r["shape"][xkey], 1), r["ratios"][k]) for r in rs if k in r.get("ratios", {})]
            if pts:
                ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k + suffix,
                         linestyle=style)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV-cache length (decode, 1 new token)" if decode else "tokens")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("ms per call (median, p10-p90)")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_yscale("log", base=2)
    ax2.set_ylabel("t(base) / t(variant)  (>1: variant faster)")
    ax1.set_title(title, fontsize=9)
    ax2.set_title(title + ": speed-ups", fontsize=9)
    ax1.legend(fontsize=6)
    ax2.legend(fontsize=6)


def plot(result: dict, path, title: str = "") -> None:
    """Latency vs tokens (log-log, p10-p90 band) for every variant, and the ratios; one pair
    of panels per case (rows carrying a "case" key: op-level shapes, end-to-end models)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["shapes"] if r["variants"]]
    cases: dict = {}
    for r in rows:
        cases.setdefault(r.get("case", ""), []).append(r)
    if not cases:
        cases[""] = []
    ncol = min(3, len(cases))
    nrow = math.ceil(len(cases) / ncol)
    fig, axes = plt.subplots(2 * nrow, ncol, figsize=(6.5 * ncol, 4.6 * 2 * nrow), squeeze=False)
    for i, (case, rs) in enumerate(cases.items()):
        r0, c0 = 2 * (i // ncol), i % ncol
        _plot_case(axes[r0][c0], axes[r0 + 1][c0], rs, case or "latency")
    for j in range(len(cases), nrow * ncol):
        axes[2 * (j // ncol)][j % ncol].axis("off")
        axes[2 * (j // ncol) + 1][j % ncol].axis("off")
    fig.suptitle((title + "\n" if title else "") + f"onnxruntime {result.get('onnxruntime', '')} "
                 f"{result['provider']} on {result.get('device', '?')}"
                 + (" cuda-graph" if result["settings"].get("cuda_graph") else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)


def device_name(provider: str) -> str:
    if provider == "cuda":
        with contextlib.suppress(Exception):
            import subprocess
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            if out:
                return out.splitlines()[0]
        return "cuda"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def variants_json(variants: dict[str, Variant]) -> dict:
    return {n: {"path": v.path, "error": v.error, "prepare_s": v.seconds, "info": v.info}
            for n, v in variants.items()}


def run_bench(original, rewritten=None, *, tokens=(1, 128, 512, 2048, 4096), batch: int = 1,
              past=(0,), provider=None, settings: Settings | None = None, mode: str = "defer",
              baselines: bool = False, stacked=(), best_fused: str = "auto", model_type: str = "gpt2",
              fuse_opt_level: int = 0, workdir=None, log=_quiet_log) -> dict:
    """Prepare the variants, time them and return the full result (JSON-able)."""
    settings = settings or Settings()
    provider = resolve_provider(provider)
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="flashnorm-bench-")
        workdir = tmp
    try:
        variants = prepare_variants(original, rewritten, workdir=workdir, mode=mode, baselines=baselines,
                                    stacked=tuple(stacked), best_fused=best_fused, model_type=model_type,
                                    opt_level=fuse_opt_level, use_gpu=provider == "cuda", log=log)
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


def merge_cases(parts: list[tuple[str, dict, dict]], provider: str, settings: Settings) -> dict:
    """Combine per-case measurements [(case, measure() result or None, variants_json)] into one
    result whose rows carry their case (the table and the plot split on it)."""
    import onnxruntime as ort
    merged = {"provider": provider, "onnxruntime": ort.__version__, "settings": asdict(settings),
              "device": device_name(provider), "cases": {}, "shapes": []}
    for case, res, variants in parts:
        entry = {"variants": variants}
        if res is not None:
            entry["sessions"] = res.get("sessions", {})
            for row in res["shapes"]:
                merged["shapes"].append(dict(row, case=case))
        merged["cases"][case] = entry
    add_ratios(merged)
    merged["method"] = method_text(merged)
    return merged


def write_json(result: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


# =============================================================================================
# CLI
# =============================================================================================

def _ints(text: str, option: str = "--tokens", least: int = 1) -> list[int]:
    """"1,128,512" -> [1, 128, 512] ("" -> []); UsageError naming `option` unless each is >= `least`."""
    items = [t for t in str(text).replace(" ", "").split(",") if t]
    if not all(t.isdigit() and int(t) >= least for t in items):
        raise UsageError(f"{option} {text!r}: want integers >= {least} separated by commas")
    return [int(t) for t in items]


def add_timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", choices=("cuda", "cpu"), help="default: CUDA when available")
    p.add_argument("--cuda-graph", action="store_true", help="ORT CUDA graph mode (falls back, with a note)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=30, help="max interleaved rounds per shape")
    p.add_argument("--min-rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=10.0, help="seconds of timed rounds per shape")
    p.add_argument("--min-sample-ms", type=float, default=5.0)
    p.add_argument("--ort-opt", choices=("all", "extended", "basic", "disable"), default="all",
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
                   help="add best-fused, rewritten-fold and norm-free variants")
    p.add_argument("--stacked", default="", help="also rewrite best-fused: 'fold', 'defer' or 'fold,defer'")
    p.add_argument("--best-fused", choices=("auto", "ort", "hand"), default="auto")
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
    tokens, past = _ints(args.tokens), _ints(args.past, "--past", least=0)
    if not tokens or not past:
        raise UsageError("--tokens and --past need at least one value each")
    for path in (args.original, args.rewritten):
        if path is not None and not Path(path).is_file():
            raise BadInput(f"{path}: no such file")
    log = _quiet_log if args.quiet else log_to_stderr
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

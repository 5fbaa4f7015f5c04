"""The variant builders, each an onnx_ir pass over the original model (`info` on the pass says
what it did; run `tidy()` after it, as `transform_file` does):

    NormFree              every normalization replaced by identity: the floor no normalization
                          trick can pass (not a usable model)
    FuseNorms             every decomposed RMSNorm/LayerNorm that patterns.find_sites finds (with
                          linear consumers or not) replaced by onnxruntime's fused op with its own
                          γ/β, through the rewriter's own emitter (NormKernels.fuse_norm)
    OnnxscriptFusions     onnxscript's optimize_for_ort: the peer that fuses for onnxruntime
    OrtTransformersOptimizer  onnxruntime.transformers' optimizer: a second peer

onnxscript and onnxruntime.transformers are imported when their pass runs: they are optional
(the `models` extra), and the other variants do not need them.
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from rewriter import io
from rewriter.patterns import Site, find_sites
from rewriter.patterns.fused import FUSED_NORMS
from rewriter.kernels import NormKernels
from rewriter.patterns.graph import GraphEditor, dtype_of, is_used, set_dtype

NORM_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
            "SkipLayerNormalization", "RMSNormalization"}
MAX_IR_VERSION = 10     # onnxruntime 1.32 reads IR <= 11; 10 stays loadable on older builds


def tidy() -> tuple:
    """What runs after a builder: dead nodes out, then a topological order."""
    return (RemoveUnusedNodesPass(), TopologicalSortPass())


def fused_spec(node: ir.Node):
    """The FUSED_NORMS row of a one-node norm, or None."""
    return FUSED_NORMS.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))


def _norm_site(found) -> Site | None:
    """The norm itself: a Site, or the one a Miss carries (its consumers are not linears)."""
    return found if isinstance(found, Site) else getattr(found, "site", None)


def _editor(model: ir.Model, prefix: str) -> NormKernels:
    """The rewriter's plumbing and norm kernels on the main graph; new names start with `prefix`."""
    return NormKernels(model.graph, GraphEditor(model.graph, prefix, main=model.graph))


def _substitute(rw: NormKernels, old: ir.Value, new: ir.Value) -> None:
    """Plumbing.redirect, but a graph output never takes over a graph input or another output:
    then it reads `new` through an Identity (BERT's last_hidden_state is a norm output)."""
    if old.is_graph_output() and (new.is_graph_input() or new.is_graph_output()):
        new = rw.edit.op1("Identity", new, hint="keep_output")
    rw.redirect(old, new)


class _Reporting(ir.passes.InPlacePass):
    """An in-place pass that says what it did in `info` (JSON-able), next to its PassResult."""

    def __init__(self):
        super().__init__()
        self.info: dict = {}


class NormFree(_Reporting):
    """Every normalization replaced by identity. info: {"removed": n, "kept": [[name, why]]}."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rw = _editor(model, "bench_nf")
        sites, misses = find_sites(model.graph)
        removed, kept = 0, []
        for found in (*sites, *misses):
            spec = fused_spec(found.anchor)
            if spec is not None:                           # one fused op, matched or not
                self._drop_fused(rw, found.anchor, spec)
                removed += 1
                continue
            site = _norm_site(found)
            if site is None or site.x is None:
                kept.append([found.name, str(getattr(found, "reason", "not a recognized norm"))])
                continue
            _substitute(rw, site.output, rw.narrow_source(rw.current(site.x), dtype_of(site.output)))
            removed += 1
        self.info = {"removed": removed, "kept": kept}
        return ir.passes.PassResult(model, modified=removed > 0)

    @staticmethod
    def _drop_fused(rw: NormKernels, node: ir.Node, spec) -> None:
        out = node.outputs[0]
        if spec.skip is None:
            _substitute(rw, out, rw.narrow_source(node.inputs[0], dtype_of(out)))
            return
        dtype = dtype_of(node.inputs[0])                   # input + skip (+ bias)
        total = rw.edit.op1("Add", node.inputs[0], node.inputs[spec.skip], hint="nf_sum")
        set_dtype(total, dtype)
        if spec.bias is not None and spec.bias < len(node.inputs) and node.inputs[spec.bias] is not None:
            total = rw.edit.op1("Add", total, node.inputs[spec.bias], hint="nf_bias")
            set_dtype(total, dtype)
        if is_used(out):
            _substitute(rw, out, rw.narrow_source(total, dtype_of(out)))
        residual = node.outputs[spec.residual_out] if spec.residual_out < len(node.outputs) else None
        if is_used(residual):
            _substitute(rw, residual, total)


class FuseNorms(_Reporting):
    """Each decomposed RMSNorm/LayerNorm → onnxruntime's fused op with its own γ/β
    (NormKernels.fuse_norm): Skip* when its input is a residual Add (SkipLayerNormalization too,
    and Adds of unknown shape count: the graph is not shape-inferred), else
    SimplifiedLayerNormalization / LayerNormalization. Norms already fused are left alone.
    info: {"fused": {op type: n}, "kept": [[name, why]]}."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rw = _editor(model, "bench_fuse")                  # names of what it adds
        sites, misses = find_sites(model.graph)
        fused: dict[str, int] = {}
        kept: list = []
        for found in (*sites, *misses):
            if fused_spec(found.anchor) is not None:
                continue
            site = _norm_site(found)
            op_type, why = (None, str(getattr(found, "reason", ""))) if site is None else self._fuse(rw, site)
            if op_type is None:
                kept.append([found.name, why])
            else:
                fused[op_type] = fused.get(op_type, 0) + 1
        if fused.get("LayerNormalization") and rw.edit.opset < 17:
            kept.append(["*", "LayerNormalization needs opset 17"])
        self.info = {"fused": fused, "kept": kept}
        return ir.passes.PassResult(model, modified=bool(fused))

    @staticmethod
    def _fuse(rw: NormKernels, site: Site) -> tuple[str | None, str]:
        """(op type emitted, "") or (None, why not)."""
        if site.kind not in ("rms", "layer"):
            return None, f"kind {site.kind}"
        if site.kind == "rms" and site.beta is not None:
            return None, "β after an RMSNorm: no fused op takes it"
        dtype = dtype_of(site.output)
        if dtype is None:
            return None, "unknown output dtype"
        gain = site.gain
        if gain is None or gain.size == 1:
            if site.size is None:
                return None, "unknown hidden size"
            gain = np.full(site.size, 1.0 if gain is None else float(gain.reshape(-1)[0]))
        gain = np.asarray(gain, np.float64).reshape(-1)
        beta_v = None
        if site.kind == "layer":
            beta = np.zeros(gain.size) if site.beta is None else np.broadcast_to(site.beta.reshape(-1), gain.shape)
            beta_v = rw.edit.initializer(beta.astype(dtype.numpy()), "beta")
        x = rw.narrow_source(rw.current(site.x), dtype)
        gain_v = rw.edit.initializer(gain.astype(dtype.numpy()), "gain")
        return rw.fuse_norm(x, site.output, site.kind, site.eps, gain_v, beta_v, skip_layernorm=True,
                            trust_unknown_shapes=True), ""


class OnnxscriptFusions(_Reporting):
    """onnxscript.rewriter.ort_fusions.optimize_for_ort. info: {"fusions": {name: n}}."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort     # optional: the models extra
        t0 = time.perf_counter()
        model, counts = optimize_for_ort(model)
        self.info = {"seconds": round(time.perf_counter() - t0, 1),
                     "fusions": {k: int(v) for k, v in counts.items() if v}}
        return ir.passes.PassResult(model, modified=bool(self.info["fusions"]))


class OrtTransformersOptimizer(ir.passes.FunctionalPass):
    """onnxruntime.transformers' optimizer (`model_type`, `opt_level`: its own options). It
    works on files: the model is written to `scratch` and the result read back from there
    (keep the folder until the result is saved). info: ort_optimize's."""

    def __init__(self, scratch, *, model_type: str = "gpt2", opt_level: int = 0, use_gpu: bool = False):
        super().__init__()
        self.scratch = Path(scratch)
        self.options = dict(model_type=model_type, opt_level=opt_level, use_gpu=use_gpu)
        self.info: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        src, dst = self.scratch / "ort-optimizer.in.onnx", self.scratch / "ort-optimizer.out.onnx"
        io.save(model, src, overwrite=True, check=False)
        self.info = ort_optimize(src, dst, **self.options)
        return ir.passes.PassResult(io.load_path(dst), modified=True)


@contextlib.contextmanager
def _quiet(logger_name: str):
    """The library's warnings, log lines and prints held back; its logger level restored after."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def ort_optimize(src, dst, *, model_type: str = "gpt2", num_heads: int = 0, hidden: int = 0,
                 opt_level: int = 0, use_gpu: bool = False, fp16: bool = False, fallback: bool = False,
                 external_data: bool | None = None) -> dict:
    """onnxruntime.transformers.optimizer.optimize_model(src) saved to `dst` (IR version
    clamped to MAX_IR_VERSION). opt_level 0: its Python fusions only, so the result is plain
    ONNX + com.microsoft fused ops. `fallback`: a failing "gpt2" run is retried as "bert" (gpt2's
    postprocess assumes every Gemm has a bias; "bert" fuses the same norms). `external_data`:
    default as the source. Returns what it did (model type, seconds, fused operator counts)."""
    from onnxruntime.transformers import optimizer      # optional: the models extra
    t0 = time.perf_counter()
    with _quiet("onnxruntime.transformers"):
        def optimize(kind):
            return optimizer.optimize_model(str(src), model_type=kind, num_heads=num_heads, hidden_size=hidden,
                                            opt_level=opt_level, use_gpu=use_gpu)
        try:
            opt = optimize(model_type)
        except Exception:
            if model_type != "gpt2" or not fallback:
                raise
            model_type = "bert"
            opt = optimize(model_type)
        if fp16:
            opt.convert_float_to_float16(keep_io_types=True)
        fused = {}
        with contextlib.suppress(Exception):
            fused = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        if external_data is None:
            external_data = file_needs_external_data(src)
        opt.save_model_to_file(str(dst), use_external_data_format=external_data, all_tensors_to_one_file=True)
    fix_ir_version(dst)
    return {"model_type": model_type, "seconds": round(time.perf_counter() - t0, 1),
            "fused_operator_statistics": fused}


def fix_ir_version(path, max_ir: int = MAX_IR_VERSION) -> int:
    """Clamp the file's ir_version to `max_ir` in place (onnxruntime refuses newer IR)."""
    m = onnx.load(str(path), load_external_data=False)
    if m.ir_version > max_ir:
        m.ir_version = max_ir
        onnx.save(m, str(path))
    return m.ir_version


def file_needs_external_data(path) -> bool:
    """The model file keeps its weights outside, or is too big to hold them."""
    m = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer) \
        or Path(path).stat().st_size > io.PROTOBUF_LIMIT


def transform_file(src, dst, builder: _Reporting) -> dict:
    """Load `src` (rewriter.io.load_path: no validation, baselines hold ORT contrib ops), run
    `builder` then tidy(), save to `dst` (rewriter.io.save, unchecked: external data when the
    source had it or the weights pass rewriter.io.PROTOBUF_LIMIT). Returns builder.info."""
    model = ir.passes.Sequential(builder, *tidy())(io.load_path(src)).model
    io.save(model, dst, overwrite=True, check=False)
    return builder.info


def op_counts(path_or_model) -> dict[str, int]:
    """{op type: n} of a model file (weights not read) or an onnx_ir model."""
    if isinstance(path_or_model, ir.Model):
        types = [n.op_type for n in path_or_model.graph]
    else:
        types = [n.op_type for n in onnx.load(str(path_or_model), load_external_data=False).graph.node]
    counts: dict[str, int] = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    return counts


def count_norms(path_or_model) -> dict:
    """Fused norm ops and decomposed norms (those patterns.find_sites anchors at other ops)."""
    fused = {k: v for k, v in op_counts(path_or_model).items() if k in NORM_OPS}
    decomposed = 0
    with contextlib.suppress(Exception):
        model = path_or_model if isinstance(path_or_model, ir.Model) else io.load_path(path_or_model)
        sites, misses = find_sites(model.graph)
        decomposed = sum(1 for x in (*sites, *misses) if fused_spec(x.anchor) is None)
    return {"fused": fused, "decomposed": decomposed}


__all__ = ["MAX_IR_VERSION", "NORM_OPS", "FuseNorms", "NormFree", "OnnxscriptFusions",
           "OrtTransformersOptimizer", "count_norms", "fix_ir_version", "file_needs_external_data", "fused_spec",
           "op_counts", "ort_optimize", "tidy", "transform_file"]

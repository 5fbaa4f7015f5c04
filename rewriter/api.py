"""The Python API for export pipelines.

    from rewriter import rewrite
    model_flash, report = rewrite("model.onnx", mode="defer")        # onnx_ir.Model
    proto_flash, report = rewrite(model_proto)                       # onnx.ModelProto
    graph_flash, report = rewrite(gs_graph)                          # onnx_graphsurgeon.Graph
    report = rewrite_file("model.onnx", "model_flash.onnx")

A path loads lazily and returns an `onnx_ir.Model`; an `onnx_ir.Model` is rewritten in
place; a ModelProto or graphsurgeon Graph is converted and returned as a new object of the
same kind (the argument is left unchanged).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

import patterns
from rewriter import io
from rewriter.errors import NothingToRewrite
from rewriter.plan import Options, make_plan
from rewriter.report import Report
from rewriter.transform import apply_plan


def infer_shapes(model: ir.Model) -> None:
    """Fill in missing shapes (TorchScript exports carry few): the scale walker reads them.
    Weights are not serialized for this; on failure the model is left as it was."""
    import logging
    logging.getLogger("onnx_ir.passes.common.shape_inference").setLevel(logging.ERROR)
    ShapeInferencePass(strict_mode=False, data_prop=True)(model)


def rewrite_ir(model: ir.Model, options: Options) -> Report:
    """Match, plan and rewrite `model` in place."""
    sites, misses = patterns.find_sites(model.graph)
    plan = make_plan(sites, misses, options)
    if any(d.rewritten for d in plan):      # a model left alone is written back unchanged
        if options.mode == "defer" and options.push_scales:
            infer_shapes(model)
        apply_plan(model, plan, push_scales=options.push_scales)
        infer_shapes(model)
    return Report.from_plan(options.mode, plan)


def rewrite(model, *, mode: str = "defer", clone_shared: bool = True, push_scales: bool = True):
    """Rewrite `model` (path, ModelProto, onnx_ir.Model or graphsurgeon Graph).

    Returns (rewritten model of the same kind — an onnx_ir.Model for a path —, Report)."""
    options = Options(mode=mode, clone_shared=clone_shared, push_scales=push_scales)
    loaded, kind = io.load(model)
    report = rewrite_ir(loaded, options)
    return io.to_kind(loaded, kind), report


def rewrite_file(src, dst, *, mode: str = "defer", clone_shared: bool = True, push_scales: bool = True,
                 overwrite: bool = False, external_data: str | None = None,
                 require_norms: bool = True, progress=None) -> Report:
    """Rewrite the model at `src` into `dst` (atomic; `src` is never modified)."""
    options = Options(mode=mode, clone_shared=clone_shared, push_scales=push_scales)
    model, _ = io.load(src)
    report = rewrite_ir(model, options)
    if require_norms and report.found == 0:
        raise NothingToRewrite(f"{src}: no normalization found (nothing to rewrite, nothing written)")
    io.save(model, dst, external_data=external_data, overwrite=overwrite, source=src, progress=progress)
    return report

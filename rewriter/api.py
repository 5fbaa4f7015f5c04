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

import patterns
from rewriter import io
from rewriter.errors import NothingToRewrite
from rewriter.plan import Options, make_plan
from rewriter.report import Report
from rewriter.transform import apply_plan


def rewrite_ir(model: ir.Model, options: Options) -> Report:
    """Match, plan and rewrite `model` in place."""
    sites, misses = patterns.find_sites(model.graph)
    plan = make_plan(sites, misses, options)
    apply_plan(model, plan)
    return Report.from_plan(options.mode, plan)


def rewrite(model, *, mode: str = "defer", clone_shared: bool = True):
    """Rewrite `model` (path, ModelProto, onnx_ir.Model or graphsurgeon Graph).

    Returns (rewritten model of the same kind — an onnx_ir.Model for a path —, Report)."""
    options = Options(mode=mode, clone_shared=clone_shared)
    loaded, kind = io.load(model)
    report = rewrite_ir(loaded, options)
    return io.to_kind(loaded, kind), report


def rewrite_file(src, dst, *, mode: str = "defer", clone_shared: bool = True,
                 overwrite: bool = False, external_data: str | None = None,
                 require_norms: bool = True, progress=None) -> Report:
    """Rewrite the model at `src` into `dst` (atomic; `src` is never modified)."""
    options = Options(mode=mode, clone_shared=clone_shared)
    model, _ = io.load(src)
    report = rewrite_ir(model, options)
    if require_norms and report.found == 0:
        raise NothingToRewrite(f"{src}: no normalization found (nothing to rewrite, nothing written)")
    io.save(model, dst, external_data=external_data, overwrite=overwrite, source=src, progress=progress)
    return report

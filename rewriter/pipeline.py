"""The pipeline the CLI and the API run (`run_pipeline`):

    FlashNormPass (shape inference, the rewrite) → [if modified: unused-node removal (to a
    fixed point) → shape inference] → [--rotate: the residual stream rotated, rewriter/rotate]
    → [ort-* targets: onnxscript's ORT fusions, rewriter/compose.py] → the producer's
    declarations restored

The output does not keep the inferred shapes: it keeps the value_info its producer declared
(where the value still exists) and adds none, so a run that rewrites nothing writes the graph
it read, and onnxruntime fuses the output as it would have fused the input.
"""

from __future__ import annotations


import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from rewriter.errors import RewriterError
from rewriter.io import DECLARED
from rewriter.patterns.graph import initializers
from rewriter.plan import Options
from rewriter.rotate import rotate_residual_stream
from rewriter.passes import FlashNormPass, shape_inference
from rewriter.compose import compose


def cleanup() -> ir.passes.PassManager:
    return ir.passes.PassManager([
        # the walker may leave a Mul in front of a replaced (dead) norm: remove to a fixed point
        ir.passes.PassManager([RemoveUnusedNodesPass()], steps=8, early_stop=True),
        shape_inference(),      # types and shapes of what the rewrite made, for the checks on save
    ])


def _declarations(model: ir.Model) -> tuple[dict[ir.Value, tuple], list[tuple]]:
    """(shape, type) the producer declared for each intermediate value (its value_info), and
    for each output of the main graph, by position."""
    values = {value: (value.shape, value.type) for graph in model.graphs() for node in graph
              for value in node.outputs if not value.is_graph_output()}
    return values, [(value.shape, value.type) for value in model.graph.outputs]


def _restore(model: ir.Model, declared: tuple[dict[ir.Value, tuple], list[tuple]]) -> None:
    """Values get back what their producer declared; new intermediate ones declare nothing,
    nor do initializers the producer gave no value_info (when the loader knows which)."""
    values, outputs = declared
    for graph in model.graphs():
        for node in graph:
            for value in node.outputs:
                if not value.is_graph_output():
                    value.shape, value.type = values.get(value, (None, None))
    names = model.meta.get(DECLARED)
    if names is not None:
        for value in initializers(model):
            if value.name not in names and not value.is_graph_input() and not value.is_graph_output():
                value.shape, value.type = None, None
    for value, (shape, type_) in zip(model.graph.outputs, outputs):
        value.shape, value.type = shape, type_


def run_pipeline(model: ir.Model, options: Options) -> FlashNormPass:
    """Rewrite `model` in place; returns the pass (its report, plan and trace). The errors a
    pass raises come out as themselves (onnx_ir wraps them in PassError)."""
    flash = FlashNormPass(options)
    declared = _declarations(model)
    try:
        if ir.passes.PassManager([flash])(model).modified and flash.report.rewritten:
            cleanup()(model)
        if options.rotate:
            rotate_residual_stream(model, options.rotate_seed, flash.report, online=options.rotate_online,
                                   heads=options.rotate_heads)
        if options.measured and options.compose is not False:
            flash.report.notes.append(compose(model, options, declared))
    except ir.passes.PassError as exc:
        raise _original(exc) from exc
    finally:
        _restore(model, declared)
    return flash


def _original(exc: BaseException) -> BaseException:
    """The first RewriterError in the chain of causes, else the innermost exception."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RewriterError):
            return exc
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            return exc
        exc = inner
    return exc


__all__ = ["run_pipeline"]

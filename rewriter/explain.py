"""`python -m rewriter explain MODEL NAME`: why the normalization that NAME (a node or value
of it, or of a linear it feeds) belongs to was or was not rewritten, step by step — the
pattern matched, the consumers found, the decision, and every op the deferred 1/RMS met."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewriter import io
from rewriter.errors import NothingToRewrite
from rewriter.passes import FlashNormPass
from rewriter.pipeline import run_pipeline
from rewriter.patterns import Site
from rewriter.plan import Action, Decision, Options
from rewriter.rotate import RotationResult


def _names(decision: Decision) -> set[str]:
    site = decision.site or decision.miss.site
    names = {(decision.site or decision.miss).anchor.name}
    if site is not None:
        names |= {n.name for n in site.nodes} | {n.node.name for n in site.linears}
        names |= {v.name for v in (site.x, site.output, *site.skip_inputs) if v is not None}
    return names - {None, ""}


def _node(node: ir.Node | None) -> str:
    return "graph output" if node is None else f'{node.op_type} "{node.name}"'


def _value(value: ir.Value | None) -> str:
    if value is None:
        return "?"
    shape = "" if value.shape is None else f" {list(value.shape)}"
    dtype = "" if value.dtype is None else f" {value.dtype.name.lower()}"
    return f'"{value.name}"{dtype}{shape}'


def _vector(values: np.ndarray | None) -> str:
    if values is None:
        return "none"
    v = values.astype(np.float64)
    return f"{v.size} value(s) in [{v.min():.4g}, {v.max():.4g}]"


def describe_site(site: Site) -> list[str]:
    lines = [f"  input:   {_value(site.x) if site.x is not None else 'input + skip of the fused op'}",
             f"  output:  {_value(site.output)}",
             f"  ε = {site.eps:g};  gain: {_vector(site.gain)};  β: {_vector(site.beta)}",
             "  nodes:   " + " → ".join(_node(n) for n in site.nodes)]
    for linear in site.linears:
        via = "".join(f" via {_node(n)}" for n in linear.path)
        lines.append(f"  linear:  {_node(linear.node)}, weight {_value(linear.weight.source)}{via}")
    if site.defer_blocker is not None:
        lines.append(f"  defer is not exact here: {site.defer_blocker} ({site.defer_blocker.where})")
    return lines


def scale_steps(flash: FlashNormPass, site: Site) -> list[str]:
    """The walker's steps that this site's factor took: from its linears' outputs on."""
    reach = {linear.output for linear in site.linears}
    lines = [f"  {_node(linear.node)}: 1/RMS deferred to its output" for linear in site.linears]
    for step in flash.trace:
        if not any(v in reach for v in step.scaled):
            continue
        lines.append(f"  {_node(step.node)}: {step.verdict}")
        if step.passed and step.node is not None:
            reach.update(step.node.outputs)
    return lines


def _rotation(result: dict | None) -> list[str]:
    """The residual-stream rotation (--rotate): what was rotated, or why nothing was."""
    if result is None:
        return []
    if not result["applied"]:
        return [f"residual stream not rotated: {result['reason']}" + (f" (at {result['at']})" if result["at"] else "")]
    return [f"residual stream rotated: width {result['size']}, {result['matrix']} Q, seed {result['seed']}; "
            f"{result['norms']} {result['norm_kind']} norms read it, {result['writers']} linears write it, "
            f"{result['readers']} read its norms; {result['constants']} constants rotated",
            RotationResult(**result).head_line()]


def explain(path, name: str, options: Options | None = None) -> str:
    model, _ = io.load(path)
    flash = run_pipeline(model, options or Options())
    found = [d for d in flash.plan if name in _names(d)]
    rotation = _rotation(flash.report.rotation)
    if not found and rotation:
        return "\n".join(rotation)
    if not found:
        anchors = ", ".join(sorted({(d.site or d.miss).anchor.name or "?" for d in flash.plan})[:8])
        raise NothingToRewrite(f"{name}: no normalization in {path} has a node or value of that name"
                               + (f" (its norms: {anchors}{', ...' if len(flash.plan) > 8 else ''})"
                                  if anchors else " (it has no normalization)"))
    out = rotation
    for decision in found:
        source = decision.site or decision.miss
        site = decision.site or decision.miss.site
        out.append(f"{source.kind}/{source.op or source.form} normalization at {_node(source.anchor)}")
        if site is not None:
            out += describe_site(site)
        if decision.rewritten:
            out.append(f"decision: {decision.strategy} — {decision.reason}")
            if decision.action == Action.DEFER:
                out.append("deferred 1/RMS (the scale algebra, in graph order):")
                out += scale_steps(flash, site)
        else:
            where = decision.miss.failure.where if decision.miss else ""
            out.append(f"not rewritten: {decision.reason}" + (f" (at {where})" if where else ""))
    return "\n".join(out)

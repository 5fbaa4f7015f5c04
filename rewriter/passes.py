"""The rewrite in onnx_ir's pass protocol.

`FlashNormPass` matches, plans and rewrites every norm → linear site of a model in place and
returns a `FlashNormResult` (a `PassResult` whose `modified` says whether a site was rewritten,
with the report attached). The matcher and the scale walker need inferred shapes (a Reshape
whose target is computed from Shape, as TorchScript writes them, is otherwise unknown), so the
pass runs onnx's shape inference first (`infer_shapes=False`: the caller already did). It
leaves a valid, sorted graph; nodes it made dead stay until an unused-node removal. What the
CLI and the API run around it is rewriter/pipeline.py.

Inside an export pipeline, compose it with other passes:

    ir.passes.PassManager([FlashNormPass(mode="defer"), RemoveUnusedNodesPass(), ...])(model)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, ShapeInferencePass

from rewriter.costs import chooser_for
from rewriter.io import check_weights
from rewriter.patterns import RULES, find_sites
from rewriter.plan import Decision, Options, agreeing_weights, make_plan
from rewriter.report import Report
from rewriter.scale_walker import Step
from rewriter.transform import apply_plan


@dataclass
class FlashNormResult(ir.passes.PassResult):
    report: Report | None = None


class FlashNormPass(ir.passes.InPlacePass):
    """FlashNorm (fold gains, defer 1/RMS) on every site the patterns prove; `options` are
    rewriter.Options or its fields as keywords. Shapes are inferred first unless
    `infer_shapes=False`; `modified` counts the rewrite only. The report of the last run is
    `self.report`."""

    def __init__(self, options: Options | None = None, *, infer_shapes: bool = True, **fields):
        super().__init__()
        self.options = options if options is not None else Options(**fields)
        self.infer_shapes = infer_shapes
        self.report: Report | None = None
        self.plan: list[Decision] = []          # the last run's decisions (`explain` reads them)
        self.trace: list[Step] = []             # and every op a deferred scale met

    def call(self, model: ir.Model) -> FlashNormResult:
        options = self.options
        if self.infer_shapes:
            shape_inference()(model)
        check_weights(model)        # missing weights: BadInput now, not an OSError mid-rewrite
        notes = []
        inlined = inline_norm_functions(model)
        if inlined:
            notes.append(f"inlined {inlined} call(s) of model-local functions holding a norm "
                         "(as onnxruntime does when it loads the model)")
        self.plan, self.trace, cancelled, kept = [], [], 0, {}
        opsets = dict(model.opset_imports)       # the kernel strategies need their ops' opsets
        chooser = chooser_for(options, opsets)
        graphs = list(model.graphs())
        found = [find_sites(graph) for graph in graphs]
        # weights that only sites with the same gain read, across scopes, are folded once
        agreed = agreeing_weights([site for sites, _ in found for site in sites])
        folded_once: dict = {}
        changed = False
        # the main graph, then every subgraph (If branches, Loop/Scan bodies): each is its own scope
        for index, graph in enumerate(graphs):
            # matched again once an enclosing scope was rewritten: its values may have moved
            sites, misses = find_sites(graph) if changed else found[index]
            plan = make_plan(sites, misses, options, chooser=chooser, agreed=agreed, opsets=opsets)
            self.plan += plan
            if any(d.rewritten for d in plan):
                rewriter = apply_plan(model, plan, push_scales=options.push_scales, approx=options.approx,
                                      graph=graph, prefix="flashnorm" if index == 0 else f"flashnorm/sub{index}",
                                      folded_once=folded_once)
                self.trace += rewriter.scales.trace
                cancelled += len(rewriter.scales.cancelled)
                kept.update(rewriter.scales.kept)
                changed = True
        if options.approx and any(d.rewritten for d in self.plan):
            notes.append(f"--approx: {cancelled} deferred scale(s) cancelled in a following norm "
                         "(exact only for ε = 0; see the measured error below)")
            if kept:
                notes.append(f"--approx: {len(kept)} scale(s) applied before a following norm instead: not "
                             f"constant over its normalized axis (e.g. at {next(iter(kept.values()))})")
        # a reader left unrewritten keeps the original; readers folding differently get a copy each
        copies = Counter(weight for weight, _ in folded_once)
        extra = sorted({w.name for w, n in copies.items() if n > 1 or w.uses()})
        if extra:
            notes.append(f"{len(extra)} weight(s) shared by sites are held twice or more: their readers were not "
                         f"all rewritten alike (e.g. {extra[0]!r})")
        self.report = Report.from_plan(options.target or options.default_strategy, self.plan)
        self.report.notes += notes
        return FlashNormResult(model, self.report.rewritten > 0 or inlined > 0, self.report)


NORM_ANCHORS = {anchor for rule in RULES for anchor in rule.anchors}


def inline_norm_functions(model: ir.Model) -> int:
    """Inline the model-local functions whose body holds a norm candidate (onnxruntime inlines
    every function when it loads a model, so the graph it runs is the inlined one). Returns
    how many calls were inlined."""
    def holds_a_norm(function: ir.Function) -> bool:
        return any(node.op_type in NORM_ANCHORS for node in function.all_nodes())
    if not any(holds_a_norm(f) for f in model.functions.values()):
        return 0
    calls = sum(1 for node in model.graph.all_nodes() if (node.domain, node.op_type, node.overload) in
                model.functions and holds_a_norm(model.functions[(node.domain, node.op_type, node.overload)]))
    InlinePass(criteria=holds_a_norm)(model)
    return calls


def shape_inference() -> ShapeInferencePass:
    """Fill in missing shapes (TorchScript exports carry few): the matcher and the scale walker
    read them. Weights are not serialized for this; on failure the model is left as it was."""
    return ShapeInferencePass(strict_mode=False, data_prop=True)


def infer_shapes(model: ir.Model) -> None:
    shape_inference()(model)


__all__ = ["FlashNormPass", "FlashNormResult", "infer_shapes", "inline_norm_functions", "shape_inference"]

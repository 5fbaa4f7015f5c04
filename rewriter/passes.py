"""The rewrite in onnx_ir's pass protocol.

`FlashNormPass` matches, plans and rewrites every norm → linear site of a model in place and
returns a `FlashNormResult` (a `PassResult` whose `modified` says whether a site was rewritten,
with the report attached). The matcher and the scale walker need inferred shapes (a Reshape
whose target is computed from Shape, as TorchScript writes them, is otherwise unknown), so the
pass runs onnx's shape inference first (`infer_shapes=False`: the caller already did). It
leaves a valid, sorted graph; nodes it made dead stay until an unused-node removal.
`run_pipeline()` is what the CLI and the API run:

    FlashNormPass (shape inference, the rewrite) → [if modified: unused-node removal (to a
    fixed point) → shape inference] → [ort-* targets: onnxscript's ORT fusions] → the
    producer's declarations restored

The output of the pipeline does not keep the inferred shapes: it keeps the value_info its
producer declared (where the value still exists) and adds none, so a run that rewrites nothing
writes the graph it read, and onnxruntime fuses the output as it would have fused the input.

Inside an export pipeline, compose it with other passes:

    ir.passes.PassManager([FlashNormPass(mode="defer"), RemoveUnusedNodesPass(), ...])(model)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, RemoveUnusedNodesPass, ShapeInferencePass

from rewriter.costs import chooser_for
from rewriter.errors import RewriterError, first_line
from rewriter.io import DECLARED, check_weights
from rewriter.patterns import RULES, find_sites
from rewriter.patterns.graph import initializers
from rewriter.feeds import signature
from rewriter.plan import TARGETS, Decision, Options, agreeing_weights, make_plan
from rewriter.report import Report
from rewriter.rotate import rotate_residual_stream
from rewriter.scale_walker import Step
from rewriter.transform import apply_plan
from rewriter.validate import skeleton
from rewriter.verify import session


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
        chooser = chooser_for(options)
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
            plan = make_plan(sites, misses, options, chooser=chooser, agreed=agreed)
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
        copies = Counter(weight for weight, _, _ in folded_once)
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
            rotate_residual_stream(model, options.rotate_seed, flash.report)
        if options.measured and options.compose is not False:
            flash.report.notes.append(_compose(model, options, declared))
    except ir.passes.PassError as exc:
        raise _original(exc) from exc
    finally:
        _restore(model, declared)
    return flash


ORT_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


def _compose(model: ir.Model, options: Options, declared) -> str:
    """The peer's fusions where the target composes (TARGETS: not on a KV-cache graph on CPU)."""
    if options.compose is None and not TARGETS[options.target]["compose_kv_cache"] and signature(model).has_past:
        return ("onnxscript's ORT fusions not applied: a graph with a KV cache on ORT CPU, where its "
                "MultiHeadAttention made decoding slower (see TARGETS; `--compose always` applies "
                "them, --measure times both)")
    return ort_fusions(model, declared)


def ort_fusions(model: ir.Model, declared=None) -> str:
    """The ecosystem's fusions for onnxruntime on top of the rewrite (onnxscript's
    optimize_for_ort: attention/GQA/MHA, rotary embedding, skip norms, GELU), in place.
    Returns the report's note. Where the peer fails, leaves an op onnxruntime does not register
    (its intermediate ai.onnxruntime._fusion ops) or a graph onnxruntime cannot load (e.g. its
    MultiHeadAttention on GPT-2 feeding a rank-2 Gemm), the model is put back as it was."""
    backup = model.clone()          # structure only: the tensors are shared
    copies = {old: new for old_graph, new_graph in zip(model.graphs(), backup.graphs())
              for old_node, new_node in zip(old_graph, new_graph)
              for old, new in zip(old_node.outputs, new_node.outputs)}
    allowed = ORT_DOMAINS | {node.domain for node in model.graph.all_nodes()}
    try:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort   # only ort-* targets: a slow import
        _, counts = optimize_for_ort(model)
        problem = _new_unregistered_op(model, allowed) or _ort_cannot_load(model, unless_also=backup)
        if problem:
            raise RuntimeError(problem)
    except Exception as exc:    # noqa: BLE001 - the peer's bug must not cost the user the rewrite
        _put_back(model, backup, copies, declared)
        return f"onnxscript's ORT fusions not applied: {first_line(exc, 200)}"
    made = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()) if n) or "none"
    return f"then onnxscript's ORT fusions (optimize_for_ort): {made}"


def _new_unregistered_op(model: ir.Model, allowed: set[str]) -> str:
    """The first node outside the `allowed` domains (onnxruntime's and the model's own), local
    functions excepted."""
    for node in model.graph.all_nodes():
        if node.domain not in allowed and node.op_identifier() not in model.functions:
            return f"it left {node.domain}:{node.op_type}, which onnxruntime does not register"
    return ""


def ort_load_error(model: ir.Model) -> str:
    """Why onnxruntime cannot load `model`'s graph, or ''. Weights become typed inputs (nothing
    is read) and value_info is dropped: declarations that contradict the graph can let a broken
    one load (onnxscript's MultiHeadAttention on GPT-2: it loads, then its Gemm fails)."""
    proto = skeleton(model, for_checker=False)
    proto.graph.ClearField("value_info")
    try:
        # its optimizers re-check shapes; not level "all": onnxruntime 1.32 crashes the process
        # (SIGSEGV) creating a session of some valid fp16 Transpose → FusedMatMul graphs there
        session(proto.SerializeToString(), "cpu", opt_level="extended")
    except Exception as exc:    # noqa: BLE001 - any refusal is the answer
        return first_line(exc, 200)
    return ""


def _ort_cannot_load(model: ir.Model, unless_also: ir.Model) -> str:
    """Why onnxruntime cannot load `model`, or '' — also when it cannot load `unless_also`
    either (the reason is not the peer's)."""
    problem = ort_load_error(model)
    return f"onnxruntime cannot load the result ({problem})" if problem and not ort_load_error(unless_also) else ""


def _put_back(model: ir.Model, backup: ir.Model, copies: dict, declared) -> None:
    """`model` becomes its clone `backup`; the producer's declarations move to the `copies` of
    their values."""
    model.graph = backup.graph
    model.functions.clear()
    model.functions.update(backup.functions)
    if declared is not None:
        values, _ = declared
        for old in [v for v in values if v in copies]:
            values[copies[old]] = values.pop(old)


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


__all__ = ["FlashNormPass", "FlashNormResult", "infer_shapes", "ort_load_error", "run_pipeline"]

"""The ort-* targets compose with the ecosystem: onnxscript's ORT fusions (optimize_for_ort:
attention, rotary, skip norms, GELU) run on the rewritten graph where the target's
measurements say so (plan.TARGETS; a KV-cache graph, from feeds.signature, not on ORT CPU),
and are undone where the peer fails or leaves a graph onnxruntime cannot load
(`ort_load_error`, also the load check of every written model)."""

from __future__ import annotations


import onnx_ir as ir

from rewriter.errors import first_line
from rewriter.feeds import signature
from rewriter.plan import TARGETS, Options
from rewriter.validate import skeleton
from rewriter.verify import session


ORT_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


def compose(model: ir.Model, options: Options, declared) -> str:
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


__all__ = ["compose", "ort_fusions", "ort_load_error"]

"""The ort-* targets compose with the ecosystem: onnxscript's ORT fusions (optimize_for_ort:
attention, rotary, skip norms, GELU) run on the rewritten graph where the target's
measurements say so (plan.TARGETS; a KV-cache graph, from feeds.signature, not on ORT CPU),
and are undone where the peer fails, leaves a graph onnxruntime cannot load (`ort_load_error`,
also the load check of every written model) or — models with weights under RUN_CHECK_BYTES —
one that does not run on inputs from the signature or whose outputs the rewrite alone does not
match (verify.run_check, verify.judge_runs: the output check's run and the one verdict)."""

from __future__ import annotations


import onnx_ir as ir

from rewriter.errors import first_line
from rewriter.feeds import signature
from rewriter.plan import TARGETS, Options
from rewriter.patterns.graph import weight_bytes
from rewriter.validate import skeleton
from rewriter.verify import RUN_CHECK_BYTES, RunCheckFailed, badness, judge_runs, run_check, session


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
    MultiHeadAttention on GPT-2 feeding a rank-2 Gemm) or one that fails `_runs_as_before`,
    the model is put back as it was."""
    backup = model.clone()          # structure only: the tensors are shared
    copies = {old: new for old_graph, new_graph in zip(model.graphs(), backup.graphs())
              for old_node, new_node in zip(old_graph, new_graph)
              for old, new in zip(old_node.outputs, new_node.outputs)}
    allowed = ORT_DOMAINS | {node.domain for node in model.graph.all_nodes()}
    try:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort   # only ort-* targets: a slow import
        _, counts = optimize_for_ort(model)
        problem = (_new_unregistered_op(model, allowed) or _ort_cannot_load(model, unless_also=backup)
                   or _runs_as_before(model, backup))
        if problem:
            raise RuntimeError(problem)
    except Exception as exc:    # noqa: BLE001 - the peer's bug must not cost the user the rewrite
        _put_back(model, backup, copies, declared)
        return f"onnxscript's ORT fusions not applied: {first_line(exc, 200)}"
    made = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()) if n) or "none"
    checked = ("" if weight_bytes(model) < RUN_CHECK_BYTES else
               f" (load-checked only: weights of {RUN_CHECK_BYTES >> 30} GiB or more are not run)")
    return f"then onnxscript's ORT fusions (optimize_for_ort): {made}{checked}"


def _runs_as_before(composed: ir.Model, rewrite: ir.Model) -> str:
    """Why the peer's result `composed` cannot replace the `rewrite` it was made from, or '':
    with weights under RUN_CHECK_BYTES both run once on the same inputs from the signature
    (verify.run_check) and each output of `composed` is judged against the rewrite's
    (verify.judge_runs, the rewrite's own noise floor included). Where the rewrite alone does not
    run either, nothing shows the peer's result right: it is not kept."""
    if weight_bytes(rewrite) >= RUN_CHECK_BYTES:
        return ""
    reference = _serialized(rewrite)
    try:
        feeds, expected = run_check(reference, signature_of=rewrite)
    except RunCheckFailed as exc:
        return f"the rewrite alone could not be run to check them against ({exc})"
    try:
        _, got = run_check(_serialized(composed), feeds)
    except RunCheckFailed as exc:
        return f"onnxruntime cannot {exc.stage} the result ({exc.problem})"
    verdicts = judge_runs(reference, [(feeds, expected, got, "")])
    bad = [v for v in verdicts if not v.ok]
    if bad:
        worst = max(bad, key=badness)
        return (f"the result does not match the rewrite alone: {len(bad)} of {len(verdicts)} output(s) differ, "
                f"worst {worst.name!r} {worst.max_rel:.3e} relative (bound {worst.bound:.1e})")
    return ""


def _serialized(model: ir.Model) -> bytes:
    """`model` with its weights, as bytes onnxruntime loads (external weights read)."""
    copy = model.clone()        # its values hold the tensors: loading them leaves `model`'s as they were
    ir.external_data.load_to_model(copy)
    return ir.to_proto(copy).SerializeToString()


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
        session(proto.SerializeToString(), "cpu")     # its optimizers re-check shapes (verify.CHECK_LEVEL)
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

"""Differential fuzzing of `--rotate` / `--rotate-online` (rewriter.rotate) on random
residual-stream models (tests/rotate_fuzz.py), and the adversarial graphs found by reading
rewriter/rotate/stream.py for gaps.

Per model: rewrite with rotate=True and with rotate_online=True, rotate_heads=True. Applied: every output exact by
the project's standard, judged by tests/differential.py's Checker (≤ 1e-5 relative to the
original, ≤ 1.5× the original's error against the float64 reference + its noise floor).
Refused: a reason and the node or value at fault (one the graph has), and the output is the
non-rotating fold's (the same constants) and exact. Anything but a documented RewriterError is a
failure. Counts (applied, refused by reason) go to the terminal summary (differential.STATS).

Budget: the `ci` profile runs ROTATE_FUZZ_EXAMPLES (default 100) models or ROTATE_FUZZ_SECONDS
(default 45 s), whichever ends first; `--hypothesis-profile=long` runs 3000 models or 1200 s.
"""

from __future__ import annotations

import json
import os
import re
import time

import numpy as np
import onnx
import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, note, settings

import differential as diff
from builders import GraphBuilder
from rewriter import rewrite
from rewriter.errors import EXIT_INTERNAL, RewriterError
from rotate_fuzz import cases

LONG = settings.get_current_profile_name() == "long"
EXAMPLES = int(os.environ.get("ROTATE_FUZZ_EXAMPLES", 3000 if LONG else 100))
SECONDS = float(os.environ.get("ROTATE_FUZZ_SECONDS", 1200 if LONG else 45))
STATS = diff.STATS


def _initializers(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def _names(*models: onnx.ModelProto) -> set[str]:
    """Node, value, input and initializer names of the models' graphs and their subgraphs."""
    names: set[str] = set()

    def graph(gr: onnx.GraphProto):
        names.update(i.name for i in gr.input)
        names.update(t.name for t in gr.initializer)
        for node in gr.node:
            names.add(node.name)
            names.update(node.output)
            for a in node.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    graph(sub)
    for m in models:
        graph(m.graph)
    return names


def check_rotation(model: onnx.ModelProto, checker: diff.Checker | None = None, seed: int = 0,
                   label: str = "model", must_apply: bool = False) -> list[str]:
    """Rotate `model` both ways and judge it; returns the failures (empty: fine). Counts go
    to STATS under `label` (the poison's name, or clean)."""
    checker = checker or diff.Checker(model)
    failures: list[str] = []
    try:
        folded, _ = rewrite(model, mode="fold")     # what rotate does first (rewriter.plan.Options)
    except RewriterError as exc:
        STATS[f"rotation: fold refused ({type(exc).__name__})"] += 1
        return [] if getattr(exc, "exit_code", None) != EXIT_INTERNAL else [f"fold: internal error {exc}"]
    for online in (False, True):     # the second also with the head-wise V/O rotation (R2)
        name = "rotate-online+heads" if online else "rotate"
        try:
            out, report = rewrite(model, rotate=True, rotate_online=online, rotate_heads=online, rotate_seed=seed)
        except RewriterError as exc:
            if getattr(exc, "exit_code", None) == EXIT_INTERNAL:
                failures.append(f"[{name}] internal error: {type(exc).__name__}: {exc}")
            STATS[f"rotation: rewrite refused ({type(exc).__name__})"] += 1
            continue
        except Exception as exc:        # noqa: BLE001 (any other exception is the failure)
            import traceback
            where = traceback.extract_tb(exc.__traceback__)[-1]
            failures.append(f"[{name}] {type(exc).__name__}: {str(exc)[:300]} "
                            f"(at {where.filename.split('/')[-1]}:{where.lineno})")
            continue
        rot = report.rotation or {}
        if online:
            STATS[f"rotate-online: applied, {rot.get('online', 0) and 'with' or 'no'} online Hadamards"
                  if rot.get("applied") else "rotate-online: refused"] += 1
        else:
            reason = re.sub(r"\[.*?\]|\d+", "#", rot.get("reason", "?"))
            STATS[f"rotate {label}: " + ("applied" if rot.get("applied") else f"refused: {reason}")] += 1
        if must_apply and not rot.get("applied"):
            failures.append(f"[{name}] a model the rotation can prove was refused: {rot}")
        if not rot.get("applied"):
            quoted = re.findall(r'"([^"]*)"', rot.get("at") or "")
            nothing_at_fault = rot.get("reason", "").startswith("no RMSNorm or LayerNorm")  # no norm matched at all
            if not rot.get("reason") or not (quoted or nothing_at_fault) or not set(quoted) <= _names(model, folded):
                failures.append(f"[{name}] refused without a reason or a node the graph has: {rot}")
            if _initializers(out) != _initializers(folded):
                failures.append(f"[{name}] refused, but the constants differ from the fold's: {rot}")
        failures += [f"[{name}{' applied' if rot.get('applied') else ' refused'}] {f}"
                     for f in checker.judge(name, out)]
    return failures


_began: list[float] = []      # when the fuzzer's first draw ran


@settings(max_examples=EXAMPLES, suppress_health_check=list(HealthCheck), deadline=None)
@given(case=cases())
def test_rotation_fuzz(case):
    if not _began:
        _began.append(time.monotonic())
    if time.monotonic() - _began[0] > SECONDS:
        return          # the time budget is spent (the remaining draws pass trivially)
    note(repr(case))
    try:
        checker = diff.Checker(case.model)
    except diff.InvalidOriginal as exc:        # the generator's bug: shown, not skipped
        raise AssertionError(f"the generator made a model onnxruntime cannot run: {exc}") from exc
    failures = check_rotation(case.model, checker, label=case.poison or "clean", must_apply=case.rotatable)
    if failures and os.environ.get("ROTATE_FUZZ_SAVE"):
        onnx.save(case.model, os.path.join(os.environ["ROTATE_FUZZ_SAVE"], f"rot-{abs(hash(repr(case)))}.onnx"))
    assert not failures, f"{case!r}\n" + "\n".join(failures)


# -- adversarial graphs (read from rewriter/rotate/stream.py's gaps), each a minimal repro ------------

N, VOCAB = 16, 23


def _start(rank: int = 3, opset: int = 17):
    g = GraphBuilder(opset=opset, seed=1)
    g.lead = [2, 5] if rank == 3 else [5]
    ids = g.input("ids", g.lead, np.int64)
    table = g.const((g.rng.standard_normal((VOCAB, N)) + 5 * (np.arange(N) == 2)).astype(np.float32), "E")
    return g, g.op("Gather", [table, ids], axis=0)


def _mlp_writer(g, y, w_down=None, gemm=False):
    h = g.op("Relu", [g.op("MatMul", [y, g.weight(N, 8)])])
    return g.op("Gemm" if gemm else "MatMul", [h, w_down or g.weight(8, N)])


def _model(g, v, final=None) -> onnx.ModelProto:
    y = final(v) if final else g.rms(v, gain=g.gain(N))
    g.output(g.op("MatMul", [y, g.weight(N, VOCAB)], hint="logits"), shape=g.lead + [VOCAB])
    model = g.model()
    onnx.helper.set_model_props(model, {diff.SHAPES_KEY: json.dumps({"ids": g.lead})})
    return model


def _rotated_exactly(model: onnx.ModelProto) -> dict:
    failures = check_rotation(model, must_apply=True)
    assert not failures, "\n".join(failures)
    return rewrite(model, rotate_online=True)[1].rotation


def _refused(model: onnx.ModelProto, reason: str) -> dict:
    assert not check_rotation(model)
    rot = rewrite(model, rotate=True)[1].rotation
    assert not rot["applied"] and reason in rot["reason"] and rot["at"], rot
    return rot


def test_online_weight_shared_by_a_matmul_and_a_gemm_writer():
    """Bug (fixed): one down-projection weight written through a MatMul in one layer and a
    Gemm in the next (rank 2). --rotate-online folded Rᵀ into the shared weight but rotated only
    the MatMul's input at run time: logits off by 0.31. Now R goes on every writer that reads
    the weight, or on none (a writer whose input cannot be rotated: none)."""
    g, v = _start(rank=2)
    shared = g.weight(8, N)
    for gemm in (False, True):
        v = g.op("Add", [v, _mlp_writer(g, g.rms(v, gain=g.gain(N)), shared, gemm)])
    rot = _rotated_exactly(_model(g, v))
    assert rot["online"] == 2, rot      # R on both writers of the shared weight (Gemm writers rotate online too)


def test_fused_norm_outputs_without_shapes():
    """Bug (fixed): onnx's shape inference has no schema for SimplifiedLayerNormalization (onnx
    domain, onnxruntime's fusion): every value after the first one was shapeless and a clean
    model was refused ("the residual stream's width is unknown", "written by Reshape")."""
    g, v = _start()
    for _ in range(2):
        y = g.op("SimplifiedLayerNormalization", [v, g.const(g.gain(N))], axis=-1, epsilon=1e-6)
        h = g.op("Reshape", [g.op("Relu", [g.op("MatMul", [y, g.weight(N, 8)])]), g.const(np.array([-1, 8]))])
        w = g.op("Reshape", [g.op("Gemm", [h, g.weight(8, N), g.const(g.gain(N))]), g.const(np.array([2, 5, N]))])
        v = g.op("Add", [v, w])
    _rotated_exactly(_model(g, v, lambda x: g.op("SimplifiedLayerNormalization", [x, g.const(g.gain(N))],
                                                 axis=-1, epsilon=1e-6)))


def test_plain_residual_add_after_a_skip_norm_sum():
    """Bug (fixed): a Skip* norm's residual sum (output 3) continued by a plain residual Add (a
    parallel block's second writer, an unfused final norm) was not taken for the stream: the
    walk back from the last norm stopped there and the model was refused ("does not start at
    a Gather", "an embedding is also read elsewhere")."""
    g, v = _start()
    y = g.rms(v, gain=g.gain(N))
    a, m = _mlp_writer(g, y), _mlp_writer(g, y)
    v = g.op("Add", [v, a])
    y, _, _, v = g.op("SkipSimplifiedLayerNormalization", [v, m, g.const(g.gain(N))], n_out=4,
                      domain="com.microsoft", epsilon=1e-6)
    v = g.op("Add", [_mlp_writer(g, y), v])
    rot = _rotated_exactly(_model(g, v))
    assert rot["writers"] == 3 and rot["norms"] == 3, rot


def test_token_position_type_embeddings():
    """Gap (fixed): three embedding Gathers summed (token + position + type) were refused."""
    g, v = _start()
    for rows, ids in ((5, np.arange(5)), (2, np.array([0, 1, 0, 1, 1]))):
        table = g.const(g.rng.standard_normal((rows, N)).astype(np.float32), "P")
        v = g.op("Add", [v, g.op("Gather", [table, g.const(ids.astype(np.int64))], axis=0)])
    v = g.op("Add", [v, _mlp_writer(g, g.rms(v, gain=g.gain(N)))])
    rot = _rotated_exactly(_model(g, v))
    assert rot["constants"] == 3 + 2 + 1, rot     # 3 tables, the reader and writer, the head


def test_refusal_names_a_norm_when_only_skip_norms_follow():
    """Bug (fixed): the first norm's output is also a graph output (its gain cannot fold) and
    the only other norm is a Skip* one: refused with no node named (only non-Skip norms
    started the stream's search). Now the Skip* norm starts it and the unfolded norm is named."""
    g, v = _start(rank=2)
    y = g.rms(v, gain=g.gain(N))
    g.output(y, shape=g.lead + [N])
    y, _, _, _ = g.op("SkipSimplifiedLayerNormalization", [v, _mlp_writer(g, y), g.const(g.gain(N))], n_out=4,
                      domain="com.microsoft", epsilon=1e-6)
    g.output(g.op("MatMul", [y, g.weight(N, VOCAB)], hint="logits"), shape=g.lead + [VOCAB])
    model = g.model()
    onnx.helper.set_model_props(model, {diff.SHAPES_KEY: json.dumps({"ids": g.lead})})
    _refused(model, "not rewritten")


@pytest.mark.parametrize("op_type", ["LayerNormalization", "SkipLayerNormalization"])
def test_refused_layernorm_mean_output_read(op_type):
    """LayerNorm's Mean output read elsewhere: centering the stream would change it."""
    g, v = _start()
    if op_type == "LayerNormalization":
        y, mean, _ = g.op(op_type, [v, g.const(g.gain(N))], n_out=3, axis=-1, epsilon=1e-5)
        v = g.op("Add", [v, _mlp_writer(g, y)])
    else:
        y = g.op("LayerNormalization", [v, g.const(g.gain(N))], axis=-1, epsilon=1e-5)
        y, mean, _, v = g.op(op_type, [v, _mlp_writer(g, y), g.const(g.gain(N))], n_out=4, domain="com.microsoft",
                             epsilon=1e-5)
        v = g.op("Add", [v, _mlp_writer(g, y)])
    g.output(mean, shape=g.lead + [1])
    # (the Skip* norm that reads the mean is no rewritten site: the walk back stops at it)
    _refused(_model(g, v, lambda x: g.op("LayerNormalization", [x, g.const(g.gain(N))], axis=-1)),
             "read by" if op_type == "LayerNormalization" else "")


@pytest.mark.parametrize("reads", ["stream", "weight"])
def test_refused_reader_inside_a_subgraph(reads):
    """An If branch reading the stream (or a writer's weight) from the outer scope is a reader
    like any other: refused, the branch's node named."""
    from onnx import TensorProto, helper
    g, v = _start()
    shared = g.weight(8, N)
    v = g.op("Add", [v, _mlp_writer(g, g.rms(v, gain=g.gain(N)), shared)])
    read = v if reads == "stream" else shared

    def branch(op_type: str) -> onnx.GraphProto:
        out = f"{op_type.lower()}_out"
        return helper.make_graph([helper.make_node(op_type, [read], [out], name=f"{op_type}_in_branch")], op_type,
                                 [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    cond = g.input("cond", [], np.bool_)
    g.nodes.append(helper.make_node("If", [cond], ["branch_out"], name="If1", then_branch=branch("Relu"),
                                    else_branch=branch("Sigmoid")))
    g.output("branch_out", shape=None)
    model = _model(g, v)
    model.metadata_props[0].value = json.dumps({"ids": g.lead, "cond": []})
    rot = _refused(model, "read by")
    assert "_in_branch" in rot["at"], rot


@pytest.mark.parametrize("norm", ["fp32_behind_casts", "fused_fp16"])
def test_fp16_stream(norm):
    """An fp16 model (table, weights and stream in fp16): rotated, as accurate as the original
    by the fp16 standard (differential.Checker: the reference evaluator, fp32 reference), the
    online Hadamards in fp16."""
    from onnx import TensorProto
    g = GraphBuilder(opset=17, seed=3)
    g.lead = [2, 5]
    ids = g.input("ids", g.lead, np.int64)
    table = g.const((g.rng.standard_normal((VOCAB, N)) + 5 * (np.arange(N) == 2)).astype(np.float16), "E")
    v = g.op("Gather", [table, ids], axis=0)

    def normed(x):
        if norm == "fused_fp16":
            return g.op("SimplifiedLayerNormalization", [x, g.const(g.gain(N, np.float16))], axis=-1, epsilon=1e-5)
        y = g.op("Mul", [g.rms(g.op("Cast", [x], to=TensorProto.FLOAT)), g.const(g.gain(N))])
        return g.op("Cast", [y], to=TensorProto.FLOAT16)
    for _ in range(2):
        h = g.op("Relu", [g.op("MatMul", [normed(v), g.weight(N, 16, np.float16)])])
        v = g.op("Add", [v, g.op("MatMul", [h, g.weight(16, N, np.float16)])])
    g.output(g.op("MatMul", [normed(v), g.weight(N, VOCAB, np.float16)]), np.float16, shape=g.lead + [VOCAB])
    model = g.model()
    onnx.helper.set_model_props(model, {diff.SHAPES_KEY: json.dumps({"ids": g.lead})})
    assert _rotated_exactly(model)["online"] == 2


def test_tied_skip_norm_after_a_layernorm_is_refused():
    """Bug (fixed; tests/regressions/rotate_tied_skip_after_layernorm.onnx, found by this fuzzer):
    a LayerNorm block, then a final SkipSimplifiedLayerNormalization whose gain the fold keeps
    (a tied head). The Skip norm, seen as a kept gain, was taken into a LayerNorm stream without
    the kind check every other norm gets: the writers were centered for an RMSNorm reader, which
    does not subtract the mean — logits off by 6.5e-2. Now refused."""
    from pathlib import Path
    model = onnx.load(str(Path(__file__).parent / "regressions" / "rotate_tied_skip_after_layernorm.onnx"))
    assert not check_rotation(model)
    rot = rewrite(model, rotate=True)[1].rotation
    assert not rot["applied"] and "both read the residual stream" in rot["reason"] and rot["at"], rot

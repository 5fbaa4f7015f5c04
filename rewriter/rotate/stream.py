"""The residual stream of a pre-norm transformer, found from the graph's structure.

The stream is a chain of values v0 → v1 → … → vL: v0 is an embedding (a Gather of rows of a
constant [V, n] table, or a sum of such gathers: token + position embeddings), each v(i+1) is
a residual Add of v(i) and the output of a *writer* (a linear with a constant weight, and
optionally a constant bias) or a sum of writers (a parallel block: Phi-2, GPT-J), and every
reader of every v(i) is either a weightless norm over the last axis (whose normalized output
only linears with constant weights read) or the next residual Add. A value passes as itself
through Identity, a widening Cast, and a Reshape that keeps the last axis whole (rows only
regrouped: OPT's [B, T, n] ↔ [B·T, n]). Then for any orthogonal Q (fixing the all-ones vector when the norms are
LayerNorms) the graph computes the same function with the stream rotated to v·Q: every
constant that writes into the stream is multiplied by Q along its stream axis, every
constant that reads from it by Q along its stream axis too (Qᵀ·W is W's rows mixed by Q).

`find_stream` returns the `Stream` (which axis of which constant to rotate, and the norms) or
the `Failure` that refuses the whole rotation, naming the node at fault. It only reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from rewriter.patterns import Failure, Form, Site, fail, find_sites
from rewriter.patterns.graph import (attr, cast_to, const_array, const_tensor, dtype_of, holds, is_cast, last_dim, op,
                                     rank_of, transpose_perm, users)
from rewriter.patterns.linear import resolve_weight


@dataclass
class Use:
    """Axis `axis` of the constant `source` is indexed by the stream; `node` reads it (through
    `steps`, the Transpose/Cast nodes between the constant and `node`). `role`: embedding,
    reader, writer or bias."""

    source: ir.Value
    axis: int
    node: ir.Node
    role: str
    steps: tuple[ir.Node, ...] = ()


@dataclass
class Stream:
    values: list[ir.Value]
    size: int
    kind: str                        # "rms" or "layer": the norms that read it
    norms: list[Site] = field(default_factory=list)
    uses: list[Use] = field(default_factory=list)
    writers: list[ir.Node] = field(default_factory=list)
    kept_gains: list[ir.Node] = field(default_factory=list)     # see kept_gain

    @property
    def sources(self) -> dict[ir.Value, int]:
        """Each constant to rotate and its stream axis (one per constant: checked)."""
        return {use.source: use.axis for use in self.uses}


class Refused(Exception):
    def __init__(self, failure: Failure):
        super().__init__(failure.reason)
        self.failure = failure


def _weight_use(value: ir.Value, effective_axis: int, node: ir.Node, role: str) -> Use:
    """The stored constant behind a linear's weight input and the axis of it that the
    effective 2-D weight's `effective_axis` is (Transpose steps followed back)."""
    ref = resolve_weight(value, transposed=False)
    if ref is None or ref.tensor is not const_tensor(ref.source):
        raise Refused(fail(f"{node.op_type} weight is not a constant 2-D tensor", node))
    steps, axis, v = [], effective_axis, value
    while v is not ref.source:
        producer = v.producer()
        steps.append(producer)
        if op(producer, "Transpose", domain=""):
            axis = transpose_perm(producer, 2)[axis]
        v = producer.inputs[0]
    return Use(ref.source, axis, node, role, tuple(steps))


def _gemm_weight_axis(node: ir.Node, contracted: bool) -> int:
    """Axis of Gemm's B (as stored after its transB) that is the input (contracted) or output axis."""
    if attr(node, "transA"):
        raise Refused(fail("Gemm with transA=1 on the residual stream", node))
    trans_b = bool(attr(node, "transB"))
    return (1 if trans_b else 0) if contracted else (0 if trans_b else 1)


def _only_reader(value: ir.Value, node: ir.Node) -> bool:
    """`node` is the only reader of `value`'s values (Shape readers aside)."""
    readers = [u for u, _ in users(value) if u.op_type not in ("Shape", "Size")]
    return not value.is_graph_output() and readers == [node]


def _row_reshape(node: ir.Node | None, n: int) -> bool:
    """A Reshape that keeps the last axis, of width n, as it is (it only regroups rows)."""
    return op(node, "Reshape", domain="") and last_dim(node.inputs[0]) == n and last_dim(node.outputs[0]) == n


def _bias_use(bias: ir.Value, n: int, node: ir.Node) -> Use:
    array = const_array(bias, follow=False)
    if array is None or array.ndim == 0 or array.shape[-1] != n or any(d != 1 for d in array.shape[:-1]):
        raise Refused(fail(f"bias {list(np.shape(array)) if array is not None else '?'} of a stream writer "
                           f"is not a constant of shape [{n}] (a broadcast bias does not rotate)", node))
    return Use(bias, array.ndim - 1, node, "bias")


def _behind_row_reshapes(producer: ir.Node | None, value: ir.Value, n: int) -> tuple[ir.Node | None, ir.Value]:
    """(producer, value) behind the row-regrouping Reshapes that produce `value`, each the only
    reader of its input."""
    while _row_reshape(producer, n):
        reshape, value = producer, producer.inputs[0]
        if not _only_reader(value, reshape):
            raise Refused(fail("a writer's output is also read elsewhere than its Reshape", value))
        producer = value.producer()
    return producer, value


def _writer(value: ir.Value, add: ir.Node, n: int) -> list[Use]:
    """The constants of the linear whose output `value` the residual Add `add` adds to the stream."""
    producer = value.producer()
    if not _only_reader(value, add):
        raise Refused(fail("a writer's output is also read elsewhere than the residual Add", value))
    producer, value = _behind_row_reshapes(producer, value, n)     # Conv1D/addmm exports: Reshape → Gemm → Reshape
    if op(producer, "Add", domain="") and len(producer.inputs) == 2 and \
            all(const_array(v, follow=False) is None for v in producer.inputs):
        # a parallel block (Phi-2, GPT-J): attention and MLP outputs summed, then added to the
        # stream — each addend is a writer of its own
        return [u for v in producer.inputs for u in _writer(v, producer, n)]
    uses: list[Use] = []
    if op(producer, "Add", domain="") and any(const_array(v, follow=False) is not None for v in producer.inputs):
        k = 0 if const_array(producer.inputs[0], follow=False) is not None else 1
        uses.append(_bias_use(producer.inputs[k], n, producer))
        inner = producer.inputs[1 - k]
        if not _only_reader(inner, producer):
            raise Refused(fail("a writer's output is also read elsewhere than its bias Add", inner))
        producer, _ = _behind_row_reshapes(inner.producer(), inner, n)
    if op(producer, "MatMul", domain=""):
        uses.append(_weight_use(producer.inputs[1], 1, producer, "writer"))
    elif op(producer, "Gemm", domain=""):
        uses.append(_weight_use(producer.inputs[1], _gemm_weight_axis(producer, contracted=False),
                                producer, "writer"))
        if len(producer.inputs) > 2 and producer.inputs[2] is not None:
            uses.append(_bias_use(producer.inputs[2], n, producer))
    else:
        raise Refused(fail(f"the residual stream is written by {producer.op_type if producer else 'a graph input'}"
                           ", not by a linear with a constant weight", producer or value))
    return uses


def _embedding(value: ir.Value, n: int) -> list[Use]:
    """v0: Gather(constant [V, n], ids, axis 0), or a sum of them (token + position [+ type])."""
    producer = value.producer()
    if op(producer, "Add", domain=""):
        return [u for v in producer.inputs for u in _embedding_part(v, producer, n)]
    return _embedding_part(value, None, n)


def _embedding_part(value: ir.Value, add: ir.Node | None, n: int) -> list[Use]:
    producer = value.producer()
    if add is not None and not _only_reader(value, add):
        raise Refused(fail("an embedding is also read elsewhere than the embedding sum", value))
    while add is not None and producer is not None and _alias_step(producer):
        add, value = producer, producer.inputs[0]
        if not _only_reader(value, add):
            raise Refused(fail("an embedding is also read elsewhere than the embedding sum", value))
        producer = value.producer()
    if add is not None and _embedding_start(producer) and op(producer, "Add", domain=""):
        # a sum of sums: token + position + type embeddings
        return [u for v in producer.inputs for u in _embedding_part(v, producer, n)]
    if not op(producer, "Gather", domain="") or int(attr(producer, "axis")) != 0:
        raise Refused(fail("the residual stream does not start at a Gather of embedding rows",
                           producer or value))
    # the table [V, n] as Gather reads it: stored, or behind Transpose/Cast (genai's builder
    # gathers from the transposed head weight)
    return [_weight_use(producer.inputs[0], 1, producer, "embedding")]


def _alias_step(node: ir.Node) -> bool:
    """Identity, a Cast that keeps or widens the type (TorchScript's `.to(float32)` of an fp32
    stream, an fp16 stream widened for its norm), or a Reshape whose input and output have the
    same known last axis (OPT's [B, T, n] ↔ [B·T, n]: rows regrouped, each row kept whole):
    every row passes exactly, so the rotated stream passes as the rotated stream."""
    if op(node, "Identity", domain=""):
        return True
    if op(node, "Reshape", domain=""):
        return last_dim(node.inputs[0]) is not None and last_dim(node.inputs[0]) == last_dim(node.outputs[0])
    return is_cast(node) and holds(cast_to(node), dtype_of(node.inputs[0]))


def _unalias(value: ir.Value) -> ir.Value:
    while value.producer() is not None and _alias_step(value.producer()):
        value = value.producer().inputs[0]
    return value


def _aliases(value: ir.Value) -> list[ir.Value]:
    """`value` and every value equal to it through alias steps."""
    found, pending = [], [value]
    while pending:
        v = pending.pop()
        found.append(v)
        pending += [node.outputs[0] for node, _ in users(v) if _alias_step(node)]
    return found


def _gain_mul(mul: ir.Node | None, normalized: ir.Value, n: int) -> bool:
    """`mul` is Mul(normalized, g) with g a constant of n values along the last axis."""
    if not op(mul, "Mul", domain="") or normalized not in mul.inputs or mul.outputs[0].is_graph_output() \
            or not rank_of(normalized):      # (the MatMul it becomes transposes y: rank known)
        return False
    gain = const_array(mul.inputs[1 - list(mul.inputs).index(normalized)], follow=False)
    return gain is not None and gain.size == n and gain.shape[-1] == n


def kept_gain(site: Site) -> ir.Node | None:
    """The Mul by which a stream norm applies a gain that was not folded — the fold keeps it
    when the weight it would fold into is shared (a tied embedding/head) — as the norm's last
    op, with no β after it: y = norm(x)·g. Rotated, norm(x·Q)·(Qᵀ·diag(g)·Q) = y·Q, so the Mul
    becomes a MatMul by that n×n matrix (rewriter.rotate.apply) and the shared weight is
    rotated once, for both its readers, instead of copied."""
    if site.form != Form.DECOMPOSED or site.unit_gain or (site.beta is not None and np.any(site.beta)):
        return None
    mul = site.nodes[-1] if site.nodes else None
    if mul is None or mul.outputs[0] is not site.output or not _gain_mul(mul, site.pre_affine, site.size):
        return None
    return mul


def _past_row_steps(value: ir.Value, n: int) -> ir.Value:
    """What a chain of row-regrouping Reshapes and alias steps, each the only reader of its
    input (Shape readers aside), makes of `value` (`value` itself without one)."""
    while not value.is_graph_output():
        readers = [node for node, _ in users(value) if node.op_type not in ("Shape", "Size")]
        if len(readers) != 1 or not (_row_reshape(readers[0], n) or _alias_step(readers[0])):
            break
        value = readers[0].outputs[0]
    return value


def _kept_gain_reader(site: Site | None, n: int) -> tuple[ir.Node, list[Use]] | None:
    """The same kept gain after a weightless norm the matcher sees on its own (a LayerNorm, whose
    β ends it; GPT-2's row Reshape before its head): the norm's only reader (past row Reshapes)
    is Mul(y, g), read (past row Reshapes) only as the data input of MatMul/Gemm linears with
    constant weights. (that Mul, the linears' reader uses) or None."""
    if site is None or site.kind not in ("rms", "layer") or not site.weightless or site.output.is_graph_output():
        return None
    y = _past_row_steps(site.output, n)
    readers = [node for node, _ in users(y) if node.op_type not in ("Shape", "Size")]
    if len(readers) != 1 or not _gain_mul(readers[0], y, n):
        return None
    uses, out = [], _past_row_steps(readers[0].outputs[0], n)
    for node, index in users(out):
        if node.op_type in ("Shape", "Size"):
            continue
        if index != 0 or not op(node, "MatMul", "Gemm", domain="") or out.is_graph_output():
            return None
        axis = 0 if node.op_type == "MatMul" else _gemm_weight_axis(node, contracted=True)
        uses.append(_weight_use(node.inputs[1], axis, node, "reader"))
    return (readers[0], uses) if uses else None


def _norm_uses(site: Site, n: int) -> list[Use]:
    if site.kind not in ("rms", "layer"):
        raise Refused(fail(f"a {site.kind} norm reads the residual stream (not RMS- or LayerNorm-type)", site.anchor))
    if not site.weightless and kept_gain(site) is None:
        raise Refused(fail("a norm reading the residual stream keeps a gain or β (it was not folded)", site.anchor))
    if site.size != n or site.groups != 1:
        raise Refused(fail(f"a norm reading the residual stream does not normalize all {n} features at once",
                           site.anchor))
    uses = []
    for linear in site.linears:
        if linear.stacked_axis is not None or linear.conv:
            raise Refused(fail(f"{linear.node.op_type} reads a stream norm through a stacked or Conv weight",
                               linear.node))
        if any(not op(p, "Cast", "Identity", "Reshape", domain="") for p in linear.path):
            raise Refused(fail("a linear reads a stream norm through a row move", linear.path[0]))
        node = linear.node
        if op(node, "MatMul", domain=""):
            axis = 0
        elif op(node, "Gemm", domain=""):
            axis = _gemm_weight_axis(node, contracted=True)
        else:
            raise Refused(fail(f"{node.op_type} reads a stream norm (only MatMul and Gemm are rotated)", node))
        uses.append(_weight_use(node.inputs[1], axis, node, "reader"))
    return uses


def _join(stream: Stream, site: Site, kept: ir.Node | None = None, kept_uses: list[Use] = ()) -> None:
    """`site` reads the stream: of the stream's norm kind (else refused), its linears' weights
    rotated on their input axis, and `kept` — the Mul of a gain the fold kept — with the uses of
    the linears behind it (_kept_gain_reader), rotated as a matrix (kept_gain)."""
    if site.kind != stream.kind:
        raise Refused(fail("RMSNorm and LayerNorm both read the residual stream", site.anchor))
    stream.norms.append(site)
    stream.uses += _norm_uses(site, stream.size) + list(kept_uses)
    if kept is not None:
        stream.kept_gains.append(kept)


def find_stream(graph: ir.Graph) -> Stream:
    """The residual stream of `graph` (shapes inferred) or raises Refused with the reason."""
    sites, misses = find_sites(graph)
    by_x: dict[ir.Value, list[Site]] = {}
    for site in sites:
        if site.x is not None:
            by_x.setdefault(site.x, []).append(site)
    miss_by_x = {m.site.x: m for m in misses if m.site is not None and m.site.x is not None}
    stream_norms = [s for s in sites if s.kind in ("rms", "layer") and (s.x is not None or s.skip_inputs)]
    if not stream_norms:
        for miss in misses:
            if miss.site is not None and any(op(node, "Add", domain="") for node, _ in users(miss.site.output)):
                raise Refused(fail("post-norm: a norm's output is the residual stream (its Add reads it); "
                                   "rotation needs pre-norm", miss.anchor))
        if misses:      # the norms that could be the stream's were not rewritten: name one
            raise Refused(fail(f"no norm that could read a residual stream was rewritten: {misses[0].failure.reason}",
                               misses[0].failure.at or misses[0].anchor))
        raise Refused(fail("no RMSNorm or LayerNorm reads a residual stream"))
    # Skip* norms (onnxruntime's fusion of the residual Add and the norm): by their node
    skips = {site.anchor: site for site in sites if site.skip_inputs}
    # the start: walk back from the last norm along the stream operand of each residual Add
    last = stream_norms[-1]
    v = _unalias(last.x if last.x is not None else _skip_operands(last)[0])
    while True:
        producer = v.producer()
        if op(producer, "Add", domain="") and _residual_operand(producer) is not None:
            v = _unalias(_residual_operand(producer))
        elif producer in skips and v is skips[producer].residual_out:
            v = _unalias(_skip_operands(skips[producer])[0])
        else:
            break
    n = stream_norms[-1].size
    if n is None:
        raise Refused(fail("the residual stream's width is unknown", v))
    # a Skip* norm whose gain the fold kept (a tied head): a miss, rotated with its kept gain
    gained_skips = {miss.site.anchor: kept for miss in misses if miss.site is not None and miss.site.skip_inputs
                    and (kept := _kept_gain_reader(miss.site, n)) is not None}
    skips.update({miss.site.anchor: miss.site for miss in misses if miss.site is not None
                  and miss.site.anchor in gained_skips})
    stream = Stream([v], n, stream_norms[-1].kind)
    stream.uses += _embedding(v, n)
    while True:
        aliases = _aliases(v)
        readers = [site for alias in aliases for site in by_x.get(alias, [])]
        gained = [(miss_by_x[alias].site, kept) for alias in aliases if alias in miss_by_x
                  and (kept := _kept_gain_reader(miss_by_x[alias].site, n)) is not None]
        norm_nodes = {node for site in readers + [site for site, _ in gained] for node in site.nodes}
        nxt = None
        for alias in aliases:
            if alias.is_graph_output():
                raise Refused(fail("the residual stream is a graph output (it would come out rotated)", alias))
            for node, _ in users(alias):
                if node in norm_nodes or _alias_step(node) or node.op_type in ("Shape", "Size"):
                    continue
                if node in skips and nxt is None and _skip_operands(skips[node])[0] is alias:
                    nxt = node
                    continue
                miss = miss_by_x.get(alias)
                if miss is not None and node in miss.site.nodes:
                    raise Refused(fail(f"a norm on the residual stream was not rewritten: {miss.failure.reason}",
                                       miss.failure.at or miss.anchor))
                if op(node, "Add", domain="") and nxt is None and _residual_operand(node) is alias:
                    nxt = node
                    continue
                if op(node, "Add", domain="") and any(s.output in node.inputs for s in sites):
                    raise Refused(fail("post-norm: a norm's output is the residual stream (rotation needs "
                                       "pre-norm)", node))
                raise Refused(fail(f"the residual stream is read by {node.op_type} (not a weightless norm "
                                   "or the next residual Add)", node))
        for site in readers:
            _join(stream, site, kept_gain(site))
        for site, kept in gained:
            _join(stream, site, *kept)
        if nxt is None:
            break
        if nxt in skips:        # the residual Add, a bias and the next norm in one op
            site = skips[nxt]
            _join(stream, site, *gained_skips.get(nxt, (kept_gain(site), [])))
            _, written, bias = _skip_operands(site)
            uses = _writer(written, nxt, n)
            if bias is not None:
                uses.append(_bias_use(bias, n, nxt))
            nxt_value = site.residual_out if site.residual_out is not None and \
                (site.residual_out.uses() or site.residual_out.is_graph_output()) else None
        else:
            k = 0 if _residual_operand(nxt) is nxt.inputs[0] else 1
            uses = _writer(nxt.inputs[1 - k], nxt, n)
            nxt_value = nxt.outputs[0]
        stream.writers += [u.node for u in uses if u.role == "writer"]
        stream.uses += uses
        if nxt_value is None:   # the last Skip* norm: its sum is not read
            break
        v = nxt_value
        stream.values.append(v)
    if not stream.norms or not stream.writers:
        raise Refused(fail("no residual stream (norms reading a chain of residual Adds) was found", v))
    _check_owned(stream)
    return stream


def _residual_operand(add: ir.Node) -> ir.Value | None:
    """The operand of `add` that continues the stream (a residual Add's or an embedding's
    output, maybe through alias steps), or None when `add` is not a residual Add (a bias Add,
    an embedding sum, or neither side qualifies)."""
    if len(add.inputs) != 2 or any(const_array(v, follow=False) is not None for v in add.inputs):
        return None
    for k in (0, 1):
        producer = _unalias(add.inputs[k]).producer()
        if _embedding_start(producer) or _skip_sum(_unalias(add.inputs[k])) or (
                op(producer, "Add", domain="") and _residual_operand(producer) is not None):
            if _embedding_start(_unalias(add.inputs[1 - k]).producer()):   # an embedding sum
                return None
            return add.inputs[k]
    return None


def _skip_sum(value: ir.Value) -> bool:
    """`value` is a Skip* norm's residual sum (its output 3), which a plain residual Add may
    continue (a parallel block's second writer, a final norm that is not fused)."""
    producer = value.producer()
    return op(producer, "SkipSimplifiedLayerNormalization", "SkipLayerNormalization", domain="com.microsoft") \
        and len(producer.outputs) > 3 and producer.outputs[3] is value


def _skip_operands(site: Site) -> tuple[ir.Value, ir.Value, ir.Value | None]:
    """(stream, writer output, bias) of a Skip* norm: the writer's side is the linear's output
    (a MatMul/Gemm, maybe behind its bias Add or a Reshape), the stream the other."""
    first, second, bias = (tuple(site.skip_inputs) + (None, None, None))[:3]

    def written(value: ir.Value) -> bool:
        producer = _unalias(value).producer()
        return op(producer, "MatMul", "Gemm", "Reshape", domain="") or (
            op(producer, "Add", domain="") and any(const_array(v, follow=False) is not None for v in producer.inputs))
    if written(second) and not written(first):
        return first, second, bias
    if written(first) and not written(second):
        return second, first, bias
    raise Refused(fail("a Skip* norm's inputs do not tell the stream from the writer", site.anchor))


def _embedding_start(node: ir.Node | None) -> bool:
    """A Gather (of embedding rows), or a sum of them (token + position [+ type])."""
    if op(node, "Gather", domain=""):
        return True
    return op(node, "Add", domain="") and len(node.inputs) == 2 and \
        all(_embedding_start(_unalias(v).producer()) for v in node.inputs)


def _check_owned(stream: Stream) -> None:
    """Every constant is rotated along one axis, and nothing outside the stream reads it."""
    axes: dict[ir.Value, int] = {}
    allowed: dict[ir.Value, set[ir.Node]] = {}
    for use in stream.uses:
        width = const_tensor(use.source).shape[use.axis]
        if width != stream.size:        # e.g. a writer of width 1, broadcast by the residual Add
            raise Refused(fail(f"a {use.role} constant is {width} wide along the stream's axis, not {stream.size}",
                               use.node))
        if axes.setdefault(use.source, use.axis) != use.axis:
            raise Refused(fail("a constant is read along two different axes by the stream's linears", use.node))
        allowed.setdefault(use.source, set()).update((use.node, *use.steps))
    for source, nodes in allowed.items():
        if source.is_graph_input() or source.is_graph_output():
            raise Refused(fail("a weight of the stream is a graph input or output", source))
        pending = [source]
        while pending:
            value = pending.pop()
            for node, _ in users(value):
                if node not in nodes:
                    raise Refused(fail(f"a weight of the stream is also read by {node.op_type}, outside it", node))
                if node.op_type in ("Transpose", "Cast", "Identity"):
                    pending.append(node.outputs[0])


__all__ = ["Refused", "Stream", "Use", "find_stream", "kept_gain"]

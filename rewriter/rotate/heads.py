"""Head-wise rotation of V and O (QuaRot's and SpinQuant's R2), proved from the graph.

Attention mixes V over positions only: head h's output is P_h·V_h, V_h the head_dim columns
of head h, and the heads are concatenated before the output projection. So for an orthogonal
R2 (head_dim × head_dim) and B = blockdiag(R2, …, R2), W_v → W_v·B (and b_v → b_v·B) and
W_o → Bᵀ·W_o compute the same function: P·(V·R2) = (P·V)·R2 per head, then Bᵀ undoes it in
o_proj. It costs nothing at run time, and it spreads o_proj's input outliers inside each head.

The proof follows V from its projection to the projections that read it, keeping one axis
`a` of every value on the way with this invariant: along `a` the value is made of aligned
head_dim-long blocks, each of which is a head vector — so the value with the rotation applied
is the value ×_a B. Each op must keep that: Reshape (a the last axis, both last widths
multiples of head_dim: a Reshape keeps the row-major order, so aligned blocks stay aligned),
Transpose/Unsqueeze/Squeeze/Expand/Tile (a moves, is not broadcast), Identity/Cast, Add of a
bias along a (rotated too), Mul/Div by a scalar, MatMul(P, ·) with a the column axis (P not on
the path), onnxruntime's MultiHeadAttention/GroupQueryAttention (its value input, no cache),
and the end: a MatMul/Gemm with a constant weight contracting a. Anything else — or V leaving
the graph as a KV cache, or meeting the past one — skips that block, with the node at fault.
`find_head_blocks` only reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from rewriter.patterns.graph import (attr, cast_to, const_array, const_tensor, is_cast, is_float, last_dim, node_opset, op,
                                     rank_of, transpose_perm, users)
from rewriter.patterns.schema import SchemaUnknown

from .stream import Refused, Use, _gemm_weight_axis, _weight_use

_PASS = ("Identity",)
_FUSED = ("MultiHeadAttention", "GroupQueryAttention")


class Skip(Exception):
    def __init__(self, reason: str, at: ir.Node | ir.Value | None):
        super().__init__(reason)
        self.reason = reason
        self.at = at


@dataclass
class HeadBlock:
    """One attention block: `anchor` is its P·V MatMul (or fused attention node). Rotated when
    `reason` is empty: `uses` are the constants and the axis of each to multiply by B (kron(I,
    R2) of the axis' width)."""

    anchor: ir.Node
    head_dim: int = 0
    reason: str = ""
    at: str = ""
    uses: list[Use] = field(default_factory=list)
    ranges: dict[ir.Value, tuple[int, int]] = field(default_factory=dict)   # (start, width) of a fused QKV constant

    @property
    def rotated(self) -> bool:
        return not self.reason


def _name(thing: ir.Node | ir.Value | None) -> str:
    if thing is None:
        return ""
    if isinstance(thing, ir.Node):
        return f'{thing.op_type} "{thing.name}"'
    return f'"{thing.name}"'


def _dim(value: ir.Value, axis: int, rank: int | None = None) -> int | None:
    """The width of `value` along `axis`: inferred, else — for the last axis — the one that the
    linears reading it force (TorchScript's Reshape to [b, s, -1] before o_proj: shape
    inference leaves it unknown, yet the MatMul with a constant [k, n] weight runs only when it
    is k)."""
    rank = len(value.shape) if value.shape is not None else rank
    if rank is None or axis >= rank:
        return None
    d = value.shape[axis] if value.shape is not None else None
    if isinstance(d, int):
        return d
    if axis != rank - 1:
        return None
    target = _reshape_last(value.producer())
    if target is not None:
        return target
    widths = set()
    for node, index in users(value):
        if op(node, "Shape", "Size", domain=""):
            continue
        if index != 0 or not op(node, "MatMul", "Gemm", domain="") or op(node, "Gemm") and attr(node, "transA"):
            return None
        try:
            use = _linear_use(node, contracted=True)
        except Refused:
            return None
        widths.add(int(const_tensor(use.source).shape[use.axis]))
    return widths.pop() if len(widths) == 1 else None


def _reshape_last(node: ir.Node | None) -> int | None:
    """The last dim a Reshape makes when its target is a Concat ending in a positive constant
    (TorchScript's [b, s, 64] from Shape gathers; shape inference leaves the output unknown)."""
    if not op(node, "Reshape", domain="") or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    concat = node.inputs[1].producer()
    if not op(concat, "Concat", domain="") or not concat.inputs:
        return None
    tail = const_array(concat.inputs[-1])
    return int(tail.reshape(-1)[-1]) if tail is not None and tail.size and tail.reshape(-1)[-1] > 0 else None


def _attention_anchors(graph: ir.Graph) -> list[tuple[ir.Node, ir.Value, int | None]]:
    """(anchor, V as it reads it, heads sharing that V's last axis or None): every MatMul whose
    first input comes from a Softmax (a few elementwise steps back), and every fused attention."""
    found = []
    for node in graph:
        if op(node, *_FUSED, domain="com.microsoft"):
            value = node.inputs[2] if len(node.inputs) > 2 else None
            heads = attr(node, "kv_num_heads" if node.op_type == "GroupQueryAttention" else "num_heads")
            found.append((node, value, int(heads) if heads else None))
        elif op(node, "Attention", domain="com.microsoft"):
            found.append((node, None, None))
        elif op(node, "MatMul", domain="") and _from_softmax(node.inputs[0], 4):
            found.append((node, node.inputs[1], 1))
    return found


def _from_softmax(value: ir.Value | None, depth: int) -> bool:
    """`value` is a Softmax's output, maybe masked, cast or dropped out on the way (dynamo's
    Where(IsNaN(p), 0, p)). Only names attention blocks: the proof does not rely on it."""
    producer = value.producer() if value is not None else None
    if producer is None or depth == 0:
        return False
    if op(producer, "Softmax", domain=""):
        return True
    return op(producer, "Cast", "Identity", "Where", "Dropout", "Mul", "Div", domain="") and \
        any(_from_softmax(v, depth - 1) for v in producer.inputs if v is not None and const_tensor(v) is None)


_BACK = ("Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Tile", "Identity", "Cast")


def _projection(value: ir.Value) -> tuple[ir.Node, tuple[int, int] | None]:
    """The linear with a constant weight that V comes from, walking back through the ops that
    carry V to attention, or any op with one operand that is not a constant (the forward proof
    then says whether that op acts on each head alike); and V's (start, width) in its output's
    last axis where a Split cuts V out of a fused QKV projection (GPT-2's c_attn), else None."""
    part = None
    while True:
        node = value.producer()
        if node is None:
            raise Skip("V is a graph input, not a projection", value)
        if op(node, "MatMul", "Gemm", domain=""):
            if _weight_source(node) is None:
                raise Skip(f"V comes from a {node.op_type} without a constant 2-D weight", node)
            return node, part
        if op(node, "Split", domain="") and part is None:
            rank, width = rank_of(node.inputs[0]), last_dim(node.inputs[0])
            sizes = _split_sizes(node, width)
            if rank is None or int(attr(node, "axis")) % rank != rank - 1 or sizes is None:
                raise Skip("V is cut out of a fused projection by a Split that is not along known last-axis sizes",
                           node)
            k = list(node.outputs).index(value)
            part = (sum(sizes[:k]), sizes[k])
            value = node.inputs[0]
            continue
        if op(node, *_BACK, domain=""):
            value = node.inputs[0]
        elif op(node, "Concat", domain=""):
            past = [v for v in node.inputs if v is not None and v.is_graph_input()]
            raise Skip("V is concatenated with " + (f'the graph input "{past[0].name}" (a KV cache)' if past else
                                                   "another tensor") + " before attention", node)
        elif op(node, "Split", "Slice", domain=""):
            raise Skip(f"V is cut out of a fused projection by {node.op_type} (only one last-axis Split is proved)",
                       node)
        elif sum(v is not None and const_array(v) is None for v in node.inputs) == 1:
            value = next(v for v in node.inputs if v is not None and const_array(v) is None)
        else:
            raise Skip(f"V does not come from a linear with a constant weight (it comes from {node.op_type})", node)


def _split_sizes(node: ir.Node, width: int | None) -> list[int] | None:
    sizes = attr(node, "split") if node_opset(node) < 13 else \
        (const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None)
    if sizes is None:       # equal parts
        count = len(node.outputs)
        return None if width is None or width % count else [width // count] * count
    return [int(s) for s in np.atleast_1d(sizes)]


def _weight_source(node: ir.Node) -> Use | None:
    try:
        return _linear_use(node, contracted=False)
    except (Refused, Skip):
        return None


def _linear_use(node: ir.Node, contracted: bool) -> Use:
    """The constant behind a MatMul/Gemm weight and its stored axis that is the input
    (`contracted`) or output axis."""
    if op(node, "MatMul", domain=""):
        return _weight_use(node.inputs[1], 0 if contracted else 1, node, "head")
    return _weight_use(node.inputs[1], _gemm_weight_axis(node, contracted), node, "head")


def _unsqueeze_axes(node: ir.Node) -> list[int] | None:
    axes = attr(node, "axes") if node_opset(node) < 13 else \
        (const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None)
    return None if axes is None else [int(a) for a in np.atleast_1d(axes)]


def _kept_axis(axis: int, rank_in: int, rank_out: int, inserted: list[int] | None, removed: list[int] | None) -> int:
    """Where input axis `axis` lands after Unsqueeze (`inserted`) or Squeeze (`removed`)."""
    if inserted is not None:
        inserted = sorted(a % rank_out for a in inserted)
        return [k for k in range(rank_out) if k not in inserted][axis]
    removed = [a % rank_in for a in removed]
    if axis in removed:
        raise ValueError
    return axis - sum(a < axis for a in removed)


class _Walk:
    """The forward proof of one block from V's projection output (see the module doc)."""

    def __init__(self, head_dim: int):
        self.head_dim = head_dim
        self.axes: dict[ir.Value, int] = {}
        self.consumers: dict[ir.Node, int] = {}        # node → the input index on the path
        self.uses: list[Use] = []
        self.ends: list[ir.Node] = []
        self.ranks: dict[ir.Value, int] = {}           # ranks a fused op's definition gives
        self.part: dict[ir.Value, tuple[int, int]] = {}     # fused QKV output: V's (start, width), before the Split
        self.ranges: dict[ir.Value, tuple[int, int]] = {}   # constants rotated on that range only
        self.flat: set[ir.Value] = set()    # width unknown, read by Reshapes only (GPT-2: [b, s, -1] → [b·s, 64])

    def rank(self, value: ir.Value) -> int | None:
        return rank_of(value) if rank_of(value) is not None else self.ranks.get(value)

    def blocks(self, value: ir.Value, axis: int, node: ir.Node) -> int:
        width = _dim(value, axis, self.rank(value))
        if width is None or width % self.head_dim:
            raise Skip(f"the axis carrying head_dim ({self.head_dim}) is {width or 'of unknown width'}, "
                       "not a known multiple of it", node)
        return width

    def run(self, start: ir.Value, part: tuple[int, int] | None = None) -> None:
        if part is not None:
            self.part[start] = part
        pending = [(start, self.rank(start) - 1 if self.rank(start) else None)]
        while pending:
            value, axis = pending.pop()
            if value in self.axes:
                continue
            if axis is None:
                raise Skip("the rank of a value on the V path is unknown", value.producer())
            self.axes[value] = axis
            if value.is_graph_output():
                raise Skip(f'V leaves the graph as output "{value.name}" (a KV cache: R2 would change its basis)',
                           value.producer())
            for node, index in users(value):
                if op(node, "Shape", "Size", domain=""):
                    continue
                if node in self.consumers:
                    raise Skip(f"{node.op_type} reads the V path twice", node)
                self.consumers[node] = index
                if value in self.part:
                    pending += self.before_split(node, index, value, axis, self.part[value])
                else:
                    pending += [(v, a) for v, a in self.step(node, index, value, axis)]
        for node, index in self.consumers.items():        # nothing else on the path feeds a consumer
            others = [v for k, v in enumerate(node.inputs) if k != index and v in self.axes]
            if others:
                raise Skip(f"{node.op_type} reads the V path on two inputs", node)

    def before_split(self, node: ir.Node, index: int, value: ir.Value, axis: int,
                     part: tuple[int, int]) -> list[tuple[ir.Value, int]]:
        """A fused projection's output, V its columns `part`: rows regrouped, a bias added (rotated
        on `part`), then the Split that cuts V out (its other outputs are untouched)."""
        out = node.outputs[0]
        if op(node, *_PASS, domain="") or is_cast(node) and is_float(cast_to(node)) or \
                op(node, "Reshape", domain="") and index == 0 and last_dim(value) is not None and \
                last_dim(value) == last_dim(out):
            self.part[out] = part
            return [(out, self.rank(out) - 1 if self.rank(out) else None)]
        if op(node, "Add", domain="") and len(node.inputs) == 2:
            array = const_array(node.inputs[1 - index], follow=False)
            if array is not None and array.size == array.shape[-1] == last_dim(value):
                self.uses.append(Use(node.inputs[1 - index], array.ndim - 1, node, "bias"))
                self.ranges[node.inputs[1 - index]] = part
                self.part[out] = part
                return [(out, axis)]
        if op(node, "Split", domain="") and index == 0 and int(attr(node, "axis")) % self.rank(value) == axis:
            sizes, start = _split_sizes(node, last_dim(value)) or [], 0
            for output, size in zip(node.outputs, sizes):
                if (start, size) == part:
                    return [(output, axis)]
                start += size
        raise Skip(f"{node.op_type} reads the fused projection's output before V is split off", node)

    def step(self, node: ir.Node, index: int, value: ir.Value, axis: int) -> list[tuple[ir.Value, int]]:
        rank = self.rank(value)
        out = node.outputs[0]
        if op(node, *_PASS, domain="") or is_cast(node) and is_float(cast_to(node)):
            return [(out, axis)]
        if op(node, "Reshape", domain="") and index == 0:
            if axis != rank - 1:
                raise Skip("a Reshape regroups the V path while head_dim is not its last axis", node)
            if value not in self.flat:
                self.blocks(value, axis, node)
            if self.rank(out) is None:
                raise Skip("the V path's Reshape has an unknown output rank", node)
            readers = [u for u, _ in users(out) if not op(u, "Shape", "Size", domain="")]
            if _dim(out, self.rank(out) - 1) is None and readers and \
                    all(op(u, "Reshape", domain="") and u.inputs[0] is out for u in readers):
                self.flat.add(out)      # only Reshapes read it: the flat order is all that matters
            else:
                self.blocks(out, self.rank(out) - 1, node)
            return [(out, self.rank(out) - 1)]
        if op(node, "Transpose", domain=""):
            perm = transpose_perm(node, rank)
            return [(out, perm.index(axis))]
        if op(node, "Unsqueeze", "Squeeze", domain="") and index == 0:
            axes = _unsqueeze_axes(node)
            if axes is None or self.rank(out) is None:
                raise Skip(f"{node.op_type} on the V path has no constant axes", node)
            try:
                moved = _kept_axis(axis, rank, self.rank(out), axes if node.op_type == "Unsqueeze" else None,
                                   axes if node.op_type == "Squeeze" else None)
            except ValueError:
                raise Skip("Squeeze removes the axis carrying head_dim", node) from None
            return [(out, moved)]
        if op(node, "Expand", "Tile", domain="") and index == 0:
            self.blocks(value, axis, node)     # a width > 1 is not broadcast by Expand; Tile copies whole rows
            if self.rank(out) is None:
                raise Skip(f"{node.op_type} on the V path has an unknown output rank", node)
            return [(out, axis + self.rank(out) - rank)]
        if op(node, "Add", "Mul", "Div", domain="") and len(node.inputs) == 2:
            return [(out, self.elementwise(node, index, value, axis))]
        if op(node, "MatMul", domain="") and index == 1:
            if rank < 2 or axis != rank - 1:
                raise Skip("a MatMul contracts the axis carrying head_dim of V", node)
            return [(out, self.rank(out) - 1)]
        if op(node, "MatMul", "Gemm", domain="") and index == 0:
            return self.end(node, value, axis)
        if op(node, *_FUSED, domain="com.microsoft") and index == 2:
            return [(node.outputs[0], self.fused(node, value, axis))]
        raise Skip(f"{node.op_type} on the V path does not act on each head alike", node)

    def elementwise(self, node: ir.Node, index: int, value: ir.Value, axis: int) -> int:
        other = node.inputs[1 - index]
        array = const_array(other, follow=False)
        rank = self.rank(value)
        if op(node, "Mul", "Div", domain="") and array is not None and array.size == 1 and array.ndim <= rank \
                and (node.op_type == "Mul" or index == 0):
            return axis                                     # a scalar scales every head alike
        if op(node, "Add", domain="") and array is not None and axis == rank - 1 and array.ndim >= 1 \
                and array.ndim <= rank and array.shape[-1] == _dim(value, axis, rank) and array.size == array.shape[-1]:
            self.uses.append(Use(other, array.ndim - 1, node, "bias"))
            return axis
        raise Skip(f"{node.op_type} by {'a constant of shape ' + str(list(array.shape)) if array is not None else 'a tensor'}"
                   " on the V path does not act on each head alike", node)

    def end(self, node: ir.Node, value: ir.Value, axis: int) -> list:
        if op(node, "Gemm", domain="") and (attr(node, "transA") or axis != 1):
            raise Skip("a Gemm reads the V path with head_dim not as its contracted axis", node)
        if axis != self.rank(value) - 1:
            raise Skip("a MatMul contracts an axis of the V path other than the one carrying head_dim", node)
        self.blocks(value, axis, node)
        try:
            self.uses.append(_linear_use(node, contracted=True))
        except Refused:
            raise Skip(f"{node.op_type} reads the V path with a weight that is not a constant", node) from None
        self.ends.append(node)
        return []

    def fused(self, node: ir.Node, value: ir.Value, axis: int) -> int:
        if axis != self.rank(value) - 1 or self.rank(value) != 3:
            raise Skip(f"{node.op_type}'s value input does not carry head_dim on its last axis", node)
        past = 4 if node.op_type == "GroupQueryAttention" else 7
        if len(node.inputs) > past and node.inputs[past] is not None:
            raise Skip(f"{node.op_type} concatenates V with a past value (a KV cache)", node)
        if node.op_type == "MultiHeadAttention" and len(node.inputs) > 3 and node.inputs[3] is not None:
            raise Skip("MultiHeadAttention adds a packed QKV bias to V", node)
        if len(node.outputs) > 2 and node.outputs[2] is not None and \
                (node.outputs[2].uses() or node.outputs[2].is_graph_output()):
            raise Skip(f"{node.op_type}'s present value (a KV cache) is read: R2 would change its basis", node)
        heads = attr(node, "kv_num_heads" if node.op_type == "GroupQueryAttention" else "num_heads")
        width = self.blocks(value, axis, node)
        if not heads or width != int(heads) * self.head_dim:
            raise Skip(f"{node.op_type}'s value width {width} is not its heads × head_dim {self.head_dim}", node)
        self.ranks[node.outputs[0]] = 3          # [batch, sequence, num_heads · head_dim] by its definition
        return 2


def _block(anchor: ir.Node, v: ir.Value | None, heads: int | None) -> HeadBlock:
    block = HeadBlock(anchor)
    try:
        if v is None or heads is None:
            raise Skip(f"{anchor.op_type} takes V packed with Q and K (one weight or one input)", anchor)
        width = _dim(v, rank_of(v) - 1) if rank_of(v) else None
        if width is None or width % heads:
            raise Skip("V's head_dim at attention is unknown", anchor)
        block.head_dim = width // heads
        projection, part = _projection(v)
        if part is not None and part[1] % block.head_dim:
            raise Skip(f"V's width {part[1]} in the fused projection is not a multiple of head_dim", projection)
        walk = _Walk(block.head_dim)
        walk.uses.append(_linear_use(projection, contracted=False))
        if const_tensor(walk.uses[0].source).dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
            # measured (zoo Llama, dynamo fp16, seeds 0–3): R2 took the rotated model's error vs
            # fp32 from 1.42–1.48× to 1.46–1.51× the fp16 original's, and quantize takes fp32 only
            raise Skip(f"the V projection's weight is {const_tensor(walk.uses[0].source).dtype.name.lower()}: "
                       "R2 is applied to fp32 weights only (in fp16 it adds rounding error)", projection)
        if op(projection, "Gemm", domain="") and len(projection.inputs) > 2 and projection.inputs[2] is not None:
            array = const_array(projection.inputs[2], follow=False)
            if array is None or array.size != array.shape[-1]:
                raise Skip("the V projection's bias is not a constant vector", projection)
            walk.uses.append(Use(projection.inputs[2], array.ndim - 1, projection, "bias"))
        if part is not None:
            walk.ranges.update({use.source: part for use in walk.uses})
        walk.run(projection.outputs[0], part)
        if anchor not in walk.consumers:
            raise Skip("the V projection found does not reach this attention on the path proved", projection)
        if not walk.ends:
            raise Skip("V reaches no output projection", anchor)
        _check_owned(walk.uses)
        block.uses, block.ranges = walk.uses, walk.ranges
    except Skip as skip:
        block.reason, block.at = skip.reason, _name(skip.at)
    except (Refused, SchemaUnknown) as refused:
        block.reason, block.at = str(refused), _name(anchor)
    return block


def _check_owned(uses: list[Use]) -> None:
    """Each constant is read by its own node only (through its Transpose/Cast steps)."""
    for use in uses:
        if use.source.is_graph_input() or use.source.is_graph_output():
            raise Skip("a V/O weight is a graph input or output", use.source)
        allowed, pending = {use.node, *use.steps}, [use.source]
        while pending:
            for node, _ in users(pending.pop()):
                if node not in allowed:
                    raise Skip(f"a V/O constant is also read by {node.op_type}, outside the block", node)
                if node is not use.node:
                    pending.append(node.outputs[0])
    sources = [use.source for use in uses]
    if len(set(sources)) != len(sources):
        raise Skip("one constant is used twice in the block", uses[0].node)


def find_head_blocks(graph: ir.Graph) -> list[HeadBlock]:
    """Every attention block of `graph` (shapes inferred), each proved or skipped; blocks that
    share a constant with another are skipped too (one rotation per constant)."""
    blocks = [_block(*found) for found in _attention_anchors(graph)]
    owners: dict[ir.Value, int] = {}
    for block in blocks:
        for use in block.uses:
            owners[use.source] = owners.get(use.source, 0) + 1
    for block in blocks:
        shared = [use for use in block.uses if owners[use.source] > 1]
        if block.rotated and shared:
            block.reason, block.at, block.uses = "a V/O constant is shared with another attention block", \
                _name(shared[0].node), []
    return blocks


def head_rotations(blocks: list[HeadBlock], r2_for) -> dict[ir.Value, list[tuple[int, np.ndarray]]]:
    """{constant: [(axis, B)]} for the rotated blocks: B = kron(I, R2) as wide as the axis,
    R2 = r2_for(head_dim) (one per head_dim)."""
    out: dict[ir.Value, list[tuple[int, np.ndarray]]] = {}
    for block in blocks:
        if not block.rotated:
            continue
        r2 = r2_for(block.head_dim)
        for use in block.uses:
            full = int(const_tensor(use.source).shape[use.axis])
            start, width = block.ranges.get(use.source, (0, full))
            b = np.eye(full)
            b[start:start + width, start:start + width] = np.kron(np.eye(width // block.head_dim), r2)
            out.setdefault(use.source, []).append((use.axis, b))
    return out


__all__ = ["HeadBlock", "find_head_blocks", "head_rotations"]

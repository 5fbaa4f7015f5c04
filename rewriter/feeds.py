"""Inputs made from the graph itself, so that a model runs without the caller's feeds.

Each graph input gets a role, from structure first and from the interface names that every
producer shares (optimum, onnxruntime-genai, transformers) only where structure is silent:

| role | found by | fed |
|---|---|---|
| past | a float input that an attention-cache op extends into a graph output, its present: `Concat` along one axis, ORT `GroupQueryAttention` / `MultiHeadAttention`, ONNX `Attention` (past_key/value → present_key/value) | empty at a prefill (past length 0), then the presents of the step before; random normals for a given past length |
| tokens | an integer input indexing an embedding table (`Gather` / `GatherBlockQuantized` of a constant) | ids below the table's row count |
| mask | an integer or bool input named `*mask*` | ones over past + sequence |
| positions | an integer input named `*position*` | past, past + 1, … |
| other | anything else | normal floats; integers 0/1 |
| unranked | an input that declares no shape | none: its rank is unknown (CannotRun: pass the inputs) |

Sizes are never guessed from what a dimension is called: a size the graph fixes is kept; the
batch, sequence and past-sequence axes are the roles' own (batch first, the sequence last for
ids and positions, the mask past + sequence, a past its op's cache axis); a symbol the graph
uses on one of those axes has that size wherever else it appears (one name, one size — the
graph's own declaration); a past's head count and head size come from its attention op:
`GroupQueryAttention` kv_num_heads and the query projection's width / (num_heads + 2 ·
kv_num_heads) when Q, K, V arrive packed, `MultiHeadAttention` / `Attention` their head
attributes and the K/V projection widths, a `Concat` the shape of the new keys it appends.
A size nothing in the graph determines is an error that says so (pass the inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from rewriter.errors import BadInput, CannotRun
from rewriter.inline import read_structure
from rewriter.patterns.graph import attr, bind_scopes, const_tensor, op

# attention-cache ops: {input index of a past: (output index of its present, cache axis)}
KV_OPS = {
    ("com.microsoft", "GroupQueryAttention"): {3: (1, 2), 4: (2, 2)},
    ("com.microsoft", "MultiHeadAttention"): {6: (1, 2), 7: (2, 2)},
    ("", "Attention"): {4: (1, 2), 5: (2, 2)},
}
EMBEDDING_OPS = ("Gather", "GatherBlockQuantized")
PASS_THROUGH = ("Identity", "Cast", "CastLike")
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


@dataclass
class Input:
    name: str
    dtype: np.dtype
    dims: tuple                      # int (fixed by the graph), str (a symbol) or None per axis
    role: str = "other"              # past | tokens | mask | positions | other | unranked
    rows: int = 2                    # tokens: ids are below this
    present: str | None = None       # past: the graph output it becomes
    axis: int | None = None          # past: the cache (past-sequence) axis
    sizes: dict = field(default_factory=dict)   # past: {axis: size} its attention op implies


class Signature:
    """The inputs of a graph with their roles; `feeds` makes one consistent set for a given
    batch, sequence and past length."""

    def __init__(self, inputs: list[Input], logits: str | None = None):
        self.inputs = inputs
        self.pasts = [i for i in inputs if i.role == "past"]
        self.logits = logits        # the output scoring the embedding table's rows, if any

    @property
    def has_past(self) -> bool:
        return bool(self.pasts)

    def symbols(self, batch: int, seq: int, past: int) -> dict[str, int]:
        """Sizes of the symbols the graph uses on the roles' own axes."""
        table: dict[str, int] = {}
        for inp in self.inputs:
            for axis, size in role_axes(inp, batch, seq, past, self.has_past).items():
                if isinstance(inp.dims[axis], str):
                    table.setdefault(inp.dims[axis], size)
        return table

    def shape(self, inp: Input, batch: int, seq: int, past: int, table: dict[str, int]) -> list[int]:
        if inp.role == "unranked":
            raise CannotRun(f"input {inp.name!r} declares no shape (its rank is unknown); pass the inputs (--inputs)")
        own = role_axes(inp, batch, seq, past, self.has_past)
        dims = []
        for axis, dim in enumerate(inp.dims):
            size = dim if isinstance(dim, int) else own.get(axis, inp.sizes.get(axis, table.get(dim)))
            if size is None and inp.role == "past":
                raise CannotRun(f"input {inp.name!r}: the graph does not determine the size of axis {axis} "
                                f"({dim or 'unnamed'}); pass the inputs (--inputs)")
            dims.append(size if size is not None else (batch if axis == 0 else seq))
        return dims

    def feeds(self, *, batch: int = 1, seq: int = 16, past: int = 0, rng=None,
              given: dict | None = None) -> dict[str, np.ndarray]:
        """One feed per input: `given[name]` as it is where given (a decode step's pasts and
        tokens, a caller's token ids), else made for this batch, sequence and past length
        (pasts: random normals, none at past 0)."""
        rng = rng if rng is not None else np.random.default_rng(0)
        given = given or {}
        table = self.symbols(batch, seq, past)
        return {inp.name: given[inp.name] if inp.name in given
                else fill(inp, self.shape(inp, batch, seq, past, table), past, rng) for inp in self.inputs}

    def lengths(self, given: dict) -> tuple[int, int] | None:
        """(batch, sequence) of the token ids in `given`, if it holds them."""
        for inp in self.inputs:
            if inp.role == "tokens" and inp.name in given and np.ndim(given[inp.name]) >= 2:
                return int(given[inp.name].shape[0]), int(given[inp.name].shape[-1])
        return None

    def next_step(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What a greedy generator feeds after a run: each past's present and, when the graph
        has logits over its embedding table, the most likely next token for the token ids."""
        given = {inp.name: outputs[inp.present] for inp in self.pasts}
        if self.logits in outputs:
            following = np.argmax(outputs[self.logits][..., -1:, :], axis=-1)
            for inp in self.inputs:
                if inp.role == "tokens":
                    given[inp.name] = following.astype(inp.dtype)
        return given


def role_axes(inp: Input, batch: int, seq: int, past: int, has_past: bool) -> dict[int, int]:
    """{axis: size} of the axes a role fixes (batch, sequence, past)."""
    rank = len(inp.dims)
    if rank == 0:
        return {}
    if inp.role == "past":
        return {0: batch, inp.axis: past}
    if inp.role in ("tokens", "positions"):
        return {0: batch, rank - 1: seq} if rank >= 2 else {0: seq}
    if inp.role == "mask":
        total = past + seq if has_past else seq
        return {0: batch, rank - 1: total} if rank >= 2 else {0: total}
    return {}


def fill(inp: Input, dims: list[int], past: int, rng) -> np.ndarray:
    if inp.role == "mask":
        return np.ones(dims, inp.dtype)
    if inp.role == "positions":
        return np.broadcast_to(np.arange(past, past + dims[-1]), dims).astype(inp.dtype)
    if inp.dtype.kind in "iub":
        high = inp.rows if inp.role == "tokens" else 2
        return rng.integers(0, high, size=dims).astype(inp.dtype)
    return rng.standard_normal(dims).astype(inp.dtype)


# -- reading the graph ---------------------------------------------------------------------------

def signature(source) -> Signature:
    """The Signature of a model: a path, serialized bytes or an onnx_ir.Model (its weights are
    not read)."""
    model = load(source)
    graph = model.graph
    bind_scopes(graph)      # attributes read in nested bodies take their defaults at the model's opset
    inputs = []
    for value in graph.inputs:
        if value.name in graph.initializers:      # IR < 4: an initializer listed as an input
            continue
        inp = Input(value.name, _numpy_dtype(value), _dims(value))
        _assign_role(inp, value)
        if value.shape is None:     # no declared shape: not even its rank is known
            inp.role = "unranked"
        inputs.append(inp)
    return Signature(inputs, _logits(graph, inputs))


def _logits(graph: ir.Graph, inputs: list[Input]) -> str | None:
    """The float output of rank 3 whose last axis has one entry per embedding row (logits)."""
    rows = {inp.rows for inp in inputs if inp.role == "tokens"}
    presents = {inp.present for inp in inputs if inp.role == "past"}
    for value in graph.outputs:
        dims = _dims(value)
        if value.name not in presents and len(dims) == 3 and dims[-1] in rows:
            return value.name
    return None


def from_session(sess) -> Signature:
    """A Signature from an onnxruntime session alone (no graph): roles by name only."""
    inputs = []
    for meta in sess.get_inputs():
        dtype = np.dtype(ORT_TYPES.get(meta.type, np.float32))
        inp = Input(meta.name, dtype, tuple(meta.shape))
        inp.role = _named_role(inp) or "other"
        inputs.append(inp)
    return Signature(inputs)


def load(source) -> ir.Model:
    if isinstance(source, ir.Model):
        return source
    try:
        if isinstance(source, bytes):
            return ir.from_proto(onnx.load_from_string(source))
        structure = read_structure(str(Path(source)))      # inline weights: left in the file, unread
        return ir.from_proto(structure[0]) if structure else ir.load(str(Path(source)))
    except Exception as exc:
        raise BadInput(f"{source if not isinstance(source, bytes) else 'model bytes'}: cannot read the "
                       f"graph to make inputs from it ({type(exc).__name__}: {exc})") from exc


def _numpy_dtype(value: ir.Value) -> np.dtype:
    try:
        return np.dtype(value.dtype.numpy())
    except Exception:           # an unknown or exotic type: floats are the safest guess
        return np.dtype(np.float32)


def _dims(value: ir.Value) -> tuple:
    if value.shape is None:
        return ()
    return tuple(d if isinstance(d, int) else d.value for d in value.shape)


def _assign_role(inp: Input, value: ir.Value) -> None:
    kv = _cache_use(value)
    if kv is not None and inp.dtype.kind == "f":
        inp.role, inp.present, inp.axis, inp.sizes = "past", *kv
        return
    named = _named_role(inp)
    if named:
        inp.role = named
        return
    rows = _embedding_rows(value)
    if rows is not None and inp.dtype.kind in "iu":
        inp.role, inp.rows = "tokens", rows


def _named_role(inp: Input) -> str | None:
    """mask / positions by the interface's names: no structure tells an attention mask from
    position ids (both integer [batch, length] tensors feeding index arithmetic)."""
    name = inp.name.lower()
    if inp.dtype.kind in "iub" and "mask" in name:
        return "mask"
    if inp.dtype.kind in "iu" and "position" in name:
        return "positions"
    return None


def _forward(value: ir.Value):
    """(node, input index) of each reader of `value`, looking through Identity/Cast."""
    for use in value.uses():
        node = use.node
        if op(node, *PASS_THROUGH, domain="") and use.idx == 0:
            yield from _forward(node.outputs[0])
        else:
            yield node, use.idx


def _graph_output(value: ir.Value) -> str | None:
    """The graph output `value` is (directly or through Identity/Cast)."""
    if value.is_graph_output():
        return value.name
    for use in value.uses():
        if op(use.node, *PASS_THROUGH, domain="") and use.idx == 0:
            found = _graph_output(use.node.outputs[0])
            if found:
                return found
    return None


def _cache_use(value: ir.Value):
    """(present name, cache axis, {axis: size}) when an attention-cache op extends `value`
    into a graph output, else None."""
    rank = len(value.shape) if value.shape is not None else None
    for node, idx in _forward(value):
        if op(node, "Concat", domain="") and rank:
            axis = attr(node, "axis") % rank
            present = _concatenated_output(node, axis, rank)
            if present:
                return present, axis, _concat_sizes(node, value, axis)
        table = KV_OPS.get(_op_key(node))
        if table and idx in table:
            out, axis = table[idx]
            present = _graph_output(node.outputs[out]) if out < len(node.outputs) and node.outputs[out] else None
            if present:
                return present, axis, _attention_sizes(node, idx)
    return None


def _concatenated_output(node: ir.Node, axis: int, rank: int, depth: int = 0) -> str | None:
    """The graph output a Concat's result becomes, through further Concats along the same axis
    (a TorchScript trace of transformers' cache concatenates the past to an empty one first)."""
    present = _graph_output(node.outputs[0])
    if present or depth > 3:
        return present
    for reader, _ in _forward(node.outputs[0]):
        if op(reader, "Concat", domain="") and attr(reader, "axis") % rank == axis:
            found = _concatenated_output(reader, axis, rank, depth + 1)
            if found:
                return found
    return None


def _op_key(node: ir.Node) -> tuple[str, str]:
    return ("" if node.domain == "ai.onnx" else node.domain, node.op_type)


def _concat_sizes(node: ir.Node, past: ir.Value, axis: int) -> dict[int, int]:
    """Sizes of the non-cache axes from the new entries the Concat appends (or its output)."""
    sizes: dict[int, int] = {}
    for other in [*node.inputs, node.outputs[0]]:
        if other is None or other is past or other.shape is None or len(other.shape) != len(past.shape):
            continue
        for i, d in enumerate(other.shape):
            if i != axis and isinstance(d, int):
                sizes.setdefault(i, d)
    return sizes


def _attention_sizes(node: ir.Node, idx: int) -> dict[int, int]:
    """{1: kv heads, 3: head size} of a [batch, heads, past, head size] cache, from the op."""
    is_value = idx == max(KV_OPS[_op_key(node)])      # the value cache (the key cache comes first)
    if node.op_type == "GroupQueryAttention":
        heads, kv_heads = attr(node, "num_heads"), attr(node, "kv_num_heads")
        packed = len(node.inputs) < 2 or node.inputs[1] is None     # Q, K, V in one projection
        return _heads_and_size(kv_heads, _width(node.inputs[0]), heads + 2 * kv_heads if packed else heads)
    source = node.inputs[2 if is_value else 1] if len(node.inputs) > 2 else None
    if source is not None and source.shape is not None and len(source.shape) == 4:
        return {i: d for i, d in ((1, source.shape[1]), (3, source.shape[3])) if isinstance(d, int)}
    heads = attr(node, "num_heads") if node.op_type == "MultiHeadAttention" else attr(node, "kv_num_heads")
    return _heads_and_size(heads, _width(source if source is not None else node.inputs[0]), heads)


def _heads_and_size(heads, width, per) -> dict[int, int]:
    sizes = {1: int(heads)} if heads else {}
    if width and per and width % per == 0:
        sizes[3] = width // per
    return sizes


def _width(value: ir.Value | None, depth: int = 0) -> int | None:
    """The static size of the last axis of `value`: declared, or from the projection making
    it (MatMul/Gemm/FusedMatMul of a constant weight, MatMulNBits' N, a bias Add)."""
    if value is None or depth > 8:
        return None
    if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
        return value.shape[-1]
    node = value.producer()
    if node is None:
        return None
    if op(node, "MatMul", "FusedMatMul") and const_tensor(node.inputs[1]) is not None:
        dims = const_tensor(node.inputs[1]).shape
        return int(dims[-2] if node.op_type == "FusedMatMul" and attr(node, "transB") else dims[-1])
    if op(node, "Gemm") and const_tensor(node.inputs[1]) is not None:
        dims = const_tensor(node.inputs[1]).shape
        return int(dims[0] if attr(node, "transB") else dims[1])
    if op(node, "MatMulNBits", domain="com.microsoft"):
        return attr(node, "N")
    if op(node, "Add", "Sub", *PASS_THROUGH):
        for operand in node.inputs:
            if operand is not None and const_tensor(operand) is None:
                return _width(operand, depth + 1)
    return None


def _embedding_rows(value: ir.Value) -> int | None:
    """The fewest rows of an embedding table the integer input `value` indexes."""
    rows = [_rows(node.inputs[0]) for node, idx in _forward(value) if op(node, *EMBEDDING_OPS) and idx == 1]
    rows = [r for r in rows if r]
    return min(rows) if rows else None


def _rows(table: ir.Value | None, depth: int = 0) -> int | None:
    """Rows of a constant table, or of a Transpose/Cast of one (onnxruntime-genai shares the
    lm_head weight with the embedding through a Transpose)."""
    if table is None or depth > 4:
        return None
    tensor = const_tensor(table)
    if tensor is not None:
        return int(tensor.shape[0]) if len(tensor.shape) >= 2 else None
    node = table.producer()
    if op(node, "Transpose", domain="") and const_tensor(node.inputs[0]) is not None:
        dims = const_tensor(node.inputs[0]).shape
        perm = attr(node, "perm") or list(range(len(dims)))[::-1]
        return int(dims[perm[0]])
    if op(node, *PASS_THROUGH, domain=""):
        return _rows(node.inputs[0], depth + 1)
    return None

"""Consumers that can absorb a norm's gain: linears on the normalized (last) axis.

A norm output may reach a MatMul/Gemm/FusedMatMul through Cast, Identity and Reshapes that
keep the last axis; `Shape` consumers only read the shape and are redirected. Anything else
is a reason not to rewrite, returned as a `Failure` naming the node at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from .base import Failure, Linear, Site, WeightRef, fail
from .graph import (attr, cast_to, const_array, const_tensor, dtype_of, exact_source, holds, is_cast, op,
                    pad_spec, rank_of, reads_type_only, reshape_target, slice_axes, static_shape, through_casts,
                    transpose_perm, users)

# activation-side ops the normalized tensor may pass through on its way to a linear
TRANSPARENT = ("Cast", "CastLike", "Identity", "Reshape")


def resolve_weight(value: ir.Value, transposed: bool) -> WeightRef | None:
    """Follow Transpose/Cast/Identity of a constant up to the stored tensor."""
    steps: list[tuple[str, object]] = []
    while True:
        tensor = const_tensor(value)
        if tensor is not None:
            if len(tensor.shape) != 2:
                return None
            return WeightRef(value, tensor, tuple(reversed(steps)), transposed)
        node = value.producer()
        expert = _expert_slice(node)
        if expert is not None:          # one expert's matrix of a stacked [E, n, k] constant
            return WeightRef(value, expert, tuple(reversed(steps)), transposed)
        if op(node, "Transpose", domain=""):
            steps.append(("transpose", tuple(transpose_perm(node, 2))))
        elif is_cast(node) and cast_to(node) is not None:
            steps.append(("cast", cast_to(node).numpy()))
        elif not op(node, "Identity", domain=""):
            return None
        value = node.inputs[0]


def _expert_slice(node: ir.Node | None) -> ir.TensorProtocol | None:
    """Gather(stacked, constant scalar e, axis 0) of a constant [E, n, k] (transformers' MoE
    experts: gate_up_proj / down_proj stacked): expert e's matrix, as a tensor of its own."""
    if not op(node, "Gather", domain="") or int(attr(node, "axis")) != 0:
        return None
    table, index = const_tensor(node.inputs[0]), const_array(node.inputs[1])
    if table is None or len(table.shape) != 3 or index is None or index.size != 1 or index.ndim > 1:
        return None
    return ir.Tensor(np.ascontiguousarray(table.numpy()[int(index.reshape(()))]), name=f"{node.name}_expert")


def _stacked_expert(node: ir.Node, path) -> Linear | Failure | None:
    """MatMul(rows, [Transpose](Gather(stacked [E, a, b], e, axis 0))) with e known only at run
    time (transformers' MoE experts): γ folds into the whole stack along the contracted axis
    (every expert gets it), when nothing else reads the stack (checked by match_linears)."""
    flips, source = 0, node.inputs[1]
    while op(source.producer(), "Transpose", "Identity", domain=""):
        producer = source.producer()
        if op(producer, "Transpose", domain=""):
            if tuple(transpose_perm(producer, 2)) != (1, 0):
                return None
            flips += 1
        source = producer.inputs[0]
    gather = source.producer()
    if not op(node, "MatMul", domain="") or not op(gather, "Gather", domain="") or \
            int(attr(gather, "axis")) != 0:
        return None
    table = const_tensor(gather.inputs[0])
    index = gather.inputs[1]
    if table is None or len(table.shape) != 3 or rank_of(index) not in (0, None):
        return None
    if rank_of(index) is None:
        return fail("MatMul weight is one expert of a stacked constant with an index of unknown rank", index)
    axis = 2 if flips % 2 else 1        # the slice [a, b] is read as W = slice or sliceᵀ
    bias, add = _bias_after(node)
    return Linear(node, WeightRef(gather.inputs[0], table), path, bias=bias, bias_add=add, stacked_axis=axis,
                  beta_blocker=fail("β through an expert chosen at run time is no constant bias", gather))


def _stacks_owned(linears: list[Linear]) -> Failure | None:
    """Every reader of a stacked expert constant is one of this site's expert linears."""
    gathers: dict[int, set[int]] = {}
    for linear in linears:
        if linear.stacked_axis is not None:
            source = linear.node.inputs[1]
            while source.producer() is not None and not op(source.producer(), "Gather", domain=""):
                source = source.producer().inputs[0]
            gathers.setdefault(id(linear.weight.source), set()).add(id(source.producer()))
    for linear in linears:
        if linear.stacked_axis is not None:
            table = linear.weight.source
            if table.is_graph_input() or table.is_graph_output() or \
                    any(id(reader) not in gathers[id(table)] for reader, _ in users(table)):
                return fail("the stacked experts are also read elsewhere (folding the stack would change them)",
                            table)
    return None


def _bias_after(node: ir.Node) -> tuple[ir.Value | None, ir.Node | None]:
    out = node.outputs[0]
    uses = users(out)
    if len(uses) == 1 and op(uses[0][0], "Add", domain="") and not out.is_graph_output():
        add = uses[0][0]
        other = add.inputs[1 - uses[0][1]]
        c = const_array(other)
        if c is not None and c.ndim <= 1:
            return other, add
    return None, None


# Linears over quantized weights: a gain cannot be folded into block-quantized or integer weights
# exactly (each block's scale and rounding would change); and quantizing a rewritten model was
# measured worse than quantizing the original (README: Quantized models).
QUANTIZED = {"MatMulNBits", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
             "DynamicQuantizeLinear", "QuantizeLinear", "QGemm", "MatMulBnb4", "GatherBlockQuantized"}
QUANTIZED_REASON = ("weights are quantized ({what}): a gain cannot be folded into them exactly "
                    "(README: Quantized models)")


def _is_linear_op(node: ir.Node) -> bool:
    return op(node, "MatMul", "Gemm", domain="") or op(node, "FusedMatMul", domain="com.microsoft")


def _linear(node: ir.Node, index: int, path: tuple[ir.Node, ...]) -> Linear | Failure:
    """`node` (a MatMul, Gemm or FusedMatMul: _is_linear_op) as a linear over the normalized
    tensor it reads at `index`, or the condition it breaks."""
    if index != 0:
        return fail(f"{node.op_type} reads the normalized tensor as its weight", node)
    if op(node, "MatMul", domain=""):
        transposed = False
    elif op(node, "Gemm", domain=""):
        if attr(node, "transA"):
            return fail("Gemm with transA=1 (normalized axis is not the contraction axis)", node)
        transposed = bool(attr(node, "transB"))
    else:       # com.microsoft FusedMatMul
        if attr(node, "transA") or attr(node, "transBatchA") or attr(node, "transBatchB"):
            return fail("FusedMatMul with transposed A", node)
        transposed = bool(attr(node, "transB"))
    ref = resolve_weight(node.inputs[1], transposed)
    if ref is None:
        if op(through_casts(node.inputs[1]).producer(), "DequantizeLinear"):
            return fail(QUANTIZED_REASON.format(what=f"{node.op_type} weight from DequantizeLinear, QDQ"), node)
        stacked = _stacked_expert(node, path)
        if stacked is not None:
            return stacked
        return fail(f"{node.op_type} weight is not a constant 2-D tensor", node.inputs[1])
    if op(node, "Gemm", domain="") and len(node.inputs) > 2 and node.inputs[2] is not None:
        c, array = node.inputs[2], const_array(node.inputs[2])
        if array is None:
            return fail("Gemm bias is not constant", c)
        found, shape = Linear(node, ref, path, bias=c), array.shape     # C' = β·C + α·β_LN·W broadcasts as C
        if len(shape) > 2 or shape and shape[-1] not in (1, found.weight_shape[1]):
            return fail(f"Gemm C of shape {list(shape)} does not broadcast to the output", c)
        return found
    bias, add = _bias_after(node)
    return Linear(node, ref, path, bias=bias, bias_add=add)


def _keeps_last_axis(node: ir.Node, n: int | None) -> bool:
    if is_cast(node):
        return cast_to(node) in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16,
                                 ir.DataType.DOUBLE)
    if op(node, "Identity", domain=""):
        return True
    if op(node, "Reshape", domain="") and n is not None:
        # rows may be merged or split, the last axis must stay whole: [.., n] → [.., n]
        target = reshape_target(node)
        if target is not None and target.size >= 1 and int(target[-1]) == -1:    # inferred: from the sizes
            src = static_shape(node.inputs[0])
            rest = [int(d) if d != 0 else (src[i] if src and i < len(src) else 0) for i, d in enumerate(target[:-1])]
            return src is not None and 0 not in rest and int(np.prod(src)) == int(np.prod(rest)) * n
        if target is not None:
            return target.size >= 1 and int(target[-1]) == n
        src, dst = node.inputs[0].shape, node.outputs[0].shape
        # the input's last axis is the normalized one (the walk's invariant): the output keeps it
        # when its last dim is n, or the same named dim (ONNX: one dim_param, one size)
        return bool(src and dst) and (dst[-1] == n or not isinstance(dst[-1], int) and dst[-1] == src[-1])
    return False


# ops that move whole rows of the normalized tensor and never mix or change a row's features
# (Swin's padding, roll and window partition; MoE's token Gather): γ folds through them, and
# 1/RMS follows them (transform mirrors them on the scale), unless a condition says otherwise
ROW_MOVES = ("Transpose", "Slice", "Pad", "Concat", "Gather", "Split")


@dataclass(frozen=True)
class Where:
    """Where the normalized axis is on a value of the walk: `axis` counted from the end (−1:
    last), `rank` when known; what the path so far forbids (defer, β)."""

    axis: int = -1
    rank: int | None = None
    defer: Failure | None = None
    beta: Failure | None = None

    def to(self, axis: int | None = None, rank: int | None = None, **kw) -> "Where":
        return replace(self, axis=self.axis if axis is None else axis, rank=rank, **kw)

    def neg(self, a: int) -> int | None:
        """Axis `a` of an op counted from the end (None: a ≥ 0 with the rank unknown)."""
        return a if a < 0 else None if self.rank is None else a - self.rank


def _axes_avoid(node: ir.Node, axes, at: "Where") -> Failure | None:
    if axes is None:
        return fail(f"{node.op_type} axes are not constant (cannot prove they avoid the normalized axis)", node)
    normalized = [at.neg(int(a)) for a in np.atleast_1d(axes)]
    if any(a is None for a in normalized):
        return fail(f"{node.op_type} axes cannot be placed (rank unknown)", node)
    if at.axis in normalized:
        return fail(f"{node.op_type} along the normalized axis (selects or mixes features)", node)
    return None


def row_move(node: ir.Node, index: int, at: Where, from_norm) -> Where | Failure:
    """Where the normalized axis is after `node`, a row move reading it at `index`, or why
    `node` is not one."""
    rank = rank_of(node.outputs[0])
    if op(node, "Transpose"):
        perm = transpose_perm(node, rank_of(node.inputs[0]) or at.rank)
        if perm is None:
            return fail("Transpose without perm, rank unknown", node)
        r = len(perm)
        pos = tuple(perm).index(r + at.axis) if -r <= at.axis < 0 else None
        if pos is None:
            return fail("Transpose rank does not match", node)
        return at.to(pos - r, r)
    if index != 0 and not op(node, "Concat"):
        return fail(f"{node.op_type} reads the normalized tensor as input {index}", node)
    if op(node, "Slice"):
        return _axes_avoid(node, slice_axes(node), at) or at.to(rank=rank or at.rank)
    if op(node, "Split"):
        return _axes_avoid(node, [attr(node, "axis")], at) or at.to(rank=rank or at.rank)
    if op(node, "Concat"):
        for part in node.inputs:
            if not from_norm(part):
                return fail("Concat joins the normalized rows with rows from elsewhere", part)
        return _axes_avoid(node, [attr(node, "axis")], at) or at.to(rank=rank or at.rank)
    if op(node, "Gather"):
        g = at.neg(int(attr(node, "axis")))
        if g is None:
            return fail("Gather axis cannot be placed (rank unknown)", node)
        if g == at.axis:
            return fail("Gather along the normalized axis (selects features)", node)
        if g > at.axis:
            return fail("Gather along an axis after the normalized one (not followed)", node)
        return at.to(rank=rank)
    if op(node, "Pad"):
        pads, value, mode = pad_spec(node, rank_of(node.inputs[0]) or at.rank)
        if pads is None:
            return fail("Pad amounts (or axes) are not constant", node)
        r = pads.shape[1]
        if not -r <= at.axis < 0 or pads[:, r + at.axis].any():
            return fail("Pad pads the normalized axis", node)
        if not pads.any():
            return at.to(rank=r)                              # no row added: an identity
        if mode != "constant" or value is None or np.any(value):
            why = f"mode {mode}" if mode != "constant" else "fill value not constant" if value is None else \
                f"fill value {np.asarray(value).reshape(-1)[0]:g}"
            return fail(f"Pad adds rows that are not zero ({why}): a gain would scale them", node)
        why = "Pad adds zero rows"
        return at.to(rank=r, defer=at.defer or fail(f"{why}: the deferred 1/RMS is not carried past it", node),
                     beta=at.beta or fail(f"{why}: β folded into a bias would appear on them", node))
    return fail(f"{node.op_type} is not a row move", node)


def _reshape_rows(node: ir.Node, at: Where) -> Where | Failure:
    """A Reshape after the normalized axis was moved off the last place (SegFormer's [B, C, N]
    → [B, C, H, W] before its spatial-reduction Conv): a row move when every axis up to the
    normalized one keeps its size, so only the rows after it are relabeled. The deferred scale is
    not reshaped along (fold only)."""
    target, src = reshape_target(node), static_shape(node.inputs[0])
    if target is None or src is None or at.axis + len(src) < 0:
        return fail("Reshape of the transposed normalized tensor with sizes unknown", node)
    p = at.axis + len(src)
    kept = [int(src[i]) if int(t) == 0 else int(t) for i, t in enumerate(target[:p + 1])]
    if len(target) <= p or kept != [int(d) for d in src[:p + 1]]:
        return fail("Reshape changes the normalized axis or the axes before it", node)
    return at.to(p - len(target), len(target),
                 defer=at.defer or fail("the deferred 1/RMS is not reshaped past a transposed Reshape", node))


def _conv(node: ir.Node, index: int, at: Where, n: int | None) -> Linear | Failure:
    """Conv reading the normalized axis as its input channels (ConvNeXt, SegFormer: LN channels
    last → Transpose → Conv; grouped and depthwise too): γ folds into the weight of each input
    channel, β into the bias (exact without padding); 1/RMS does not defer (a kernel wider
    than 1 mixes rows)."""
    if index != 0:
        return fail("Conv reads the normalized tensor as its weight", node)
    rank = at.rank or rank_of(node.inputs[0])
    if rank is None or at.axis + rank != 1:
        return fail("Conv input channels are not the normalized axis", node)
    group = int(attr(node, "group"))
    tensor = const_tensor(node.inputs[1])
    if tensor is None or len(users(node.inputs[1])) != 1 or \
            (n is not None and int(tensor.shape[1]) * group != n) or int(tensor.shape[0]) % group:
        return fail("Conv weight is not a constant of its own over the normalized axis", node.inputs[1])
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and const_array(bias) is None:
        return fail("Conv bias is not constant", bias)
    kernel = tuple(int(d) for d in tensor.shape[2:])
    defer = fail("the Conv mixes rows" if any(k > 1 for k in kernel)      # the reason that always holds
                 else "the deferred 1/RMS is not carried past a Conv", node)
    return Linear(node, WeightRef(node.inputs[1], tensor), bias=bias, defer_blocker=defer, beta_blocker=at.beta)


def conv_pads(node: ir.Node) -> bool:
    """Whether a tap of the Conv reads its zero padding: there β's part of the output differs
    from the interior's (rewriter/conv.py adds it as a map)."""
    pads = attr(node, "pads") or ()
    auto = attr(node, "auto_pad")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    kernel = const_tensor(node.inputs[1]).shape[2:]
    return any(pads) or auto not in ("NOTSET", "VALID") and any(int(k) > 1 for k in kernel)


# ops between a Concat's parts and their common source (Swin's roll: two Slices of one tensor)
_IN_PLACE = ("Slice", "Split", "Gather", "Pad", "Identity")


def _chain(value: ir.Value) -> list[ir.Value]:
    """`value` and its sources up through _IN_PLACE ops, nearest first."""
    chain = [value]
    while (node := chain[-1].producer()) is not None and op(node, *_IN_PLACE, domain=""):
        chain.append(node.inputs[0])
    return chain


def _part_ok(value: ir.Value, base: ir.Value, at: Where) -> bool:
    """Every op from `base` to this Concat part is a row move that keeps the normalized axis
    where `at` has it and adds no row (each is checked as the walk checks it)."""
    while value is not base:
        node = value.producer()
        if not op(node, "Identity", domain=""):
            moved = row_move(node, 0, Where(at.axis, rank_of(node.inputs[0])), lambda u: False)
            if isinstance(moved, Failure) or moved.axis != at.axis or moved.defer or moved.beta:
                return False
        value = node.inputs[0]
    return True


def _same_layout(parts, at: Where) -> bool:
    """The parts of a Concat come from one value (their nearest common source) through row
    moves that keep the normalized axis in place, so the Concat joins rows laid out alike."""
    chains = [_chain(v) for v in parts]
    others = [{id(v) for v in chain} for chain in chains[1:]]
    base = next((v for v in chains[0] if all(id(v) in ids for ids in others)), None)
    return base is not None and all(_part_ok(v, base, at) for v in parts)


def _not_linear(node: ir.Node, v: ir.Value) -> Failure:
    if op(node, "Mul", "Div") and any(const_array(u) is None for u in node.inputs if u is not v):
        return fail(f"consumer {node.op_type} scales the normalized tensor by a non-constant (no gain to fold)", node)
    return fail(f"consumer {node.op_type} is not a linear on the normalized axis", node)


def match_linears(value: ir.Value, n: int | None, graph: ir.Graph | None = None):
    """All linears reading `value` (a value of `graph`) -> (linears, shape_users) or the
    Failure naming the op and condition that really block. The walk passes Cast/Identity,
    Reshapes keeping the last axis and row moves (ROW_MOVES); each linear records what its path
    forbids (defer, β). A reader inside a subgraph (an If/Loop body reading the outer value)
    is refused: the rewrite and the scale walker work on one graph."""
    if value.is_graph_output():
        return fail("norm output is a graph output", value)
    linears: list[Linear] = []
    shape_users: list[tuple[ir.Node, int]] = []
    seen: set[int] = set()
    graph = graph or (value.producer().graph if value.producer() is not None else None)

    def walk(v: ir.Value, path: tuple[ir.Node, ...], at: Where) -> Failure | None:
        if v.is_graph_output():
            return fail("norm output reaches a graph output" + (f" (after {path[-1].op_type})" if path else ""), v)
        for node, index in users(v):
            if node.graph is not graph:
                return fail(f"{node.op_type} inside a subgraph (If/Loop body) reads the normalized tensor", node)
            if reads_type_only(node, index):
                continue                              # reads only the dtype, which is kept
            if id(node) in seen:
                continue
            seen.add(id(node))
            if op(node, "Shape", domain=""):
                shape_users.append((node, index))     # reads only the shape, which is kept
            elif op(node, "Reshape", domain="") and index == 0 and at.axis != -1:
                moved = _reshape_rows(node, at)
                if isinstance(moved, Failure):
                    return moved
                failure = walk(node.outputs[0], path + (node,), moved)
                if failure:
                    return failure
            elif op(node, *TRANSPARENT, domain="") and index == 0:
                if not _keeps_last_axis(node, n):
                    return fail(f"{node.op_type} changes the normalized axis or dtype", node)
                rank = rank_of(node.outputs[0])
                if rank is None and op(node, "Reshape", domain="") and reshape_target(node) is not None:
                    rank = int(reshape_target(node).size)
                failure = walk(node.outputs[0], path + (node,),
                               at.to(rank=rank if op(node, "Reshape", domain="") else rank or at.rank))
                if failure:
                    return failure
            elif op(node, *ROW_MOVES, domain=""):
                moved = row_move(node, index, at, lambda u, node=node: _same_layout([u, *node.inputs], at))
                if isinstance(moved, Failure):
                    return moved
                for out in node.outputs:
                    failure = walk(out, path + (node,), moved)
                    if failure:
                        return failure
            elif op(node, "Conv", domain=""):
                found = _conv(node, index, at, n)
                if isinstance(found, Failure):
                    return found
                found.path = path
                linears.append(found)
            else:
                if at.axis != -1 and op(node, "MatMul", "Gemm", "FusedMatMul", domain=None):
                    return fail(f"{node.op_type} does not read the normalized axis last "
                                "(a Transpose moved it)", node)
                if at.axis != -1:
                    return _not_linear(node, v)
                if node.op_type in QUANTIZED:
                    return fail(QUANTIZED_REASON.format(what=f"consumer {node.op_type}"), node)
                if not _is_linear_op(node):
                    return _not_linear(node, v)
                found = _linear(node, index, path)
                if isinstance(found, Failure):
                    return found
                axis = found.stacked_axis if found.stacked_axis is not None else \
                    1 if found.weight.transposed ^ _transposes(found.weight) else 0
                if n is not None and found.weight.tensor.shape[axis] != n:
                    return fail(f"{node.op_type} weight does not contract the normalized axis", node)
                found.defer_blocker, found.beta_blocker = at.defer, at.beta or found.beta_blocker
                linears.append(found)
        return None

    failure = walk(value, (), Where(rank=rank_of(value))) or _stacks_owned(linears)
    if failure:
        return failure
    if not linears:
        return fail("no linear consumer", value)
    return linears, shape_users


def defer_blocker(site: Site) -> Failure | None:
    """Why deferring would not be exact, or None. Deferring feeds the raw input x to the linears
    in the types the normalized tensor had on its way to them: each must hold x exactly —
    a narrowing Cast (fp32 → fp16/bf16, autocast graphs) would give the un-normalized x a wider
    range than the original ever had in that type. And an fp16 linear would give its output one
    (bf16 has fp32's range: its linears defer)."""
    x = site.skip_inputs[0] if site.skip_inputs else site.x
    if x is None:
        return fail("the norm's input is unknown", site.anchor)
    if site.merge is not None and site.groups != 1:
        return fail(f"the norm runs over {site.groups} groups a Reshape merges: 1/RMS varies along "
                    "the linear's input features", site.merge)
    source = dtype_of(exact_source(x))
    steps: list[tuple[str, ir.DataType | None, ir.Node | ir.Value]] = [
        ("the norm's output", dtype_of(site.output), site.output)]
    for linear in site.linears:
        steps += [(f"a {node.op_type}", cast_to(node), node) for node in linear.path if is_cast(node)]
    for where, dtype, at in steps:
        if not holds(dtype, source):
            names = (getattr(source, "name", "?"), getattr(dtype, "name", "?"))
            return fail(f"{where} narrows the {names[0]} input to {names[1]} (the raw input would lose range)", at)
    for linear in site.linears:
        if weight_dtype(linear) == ir.DataType.FLOAT16:
            return fail(f"{linear.node.op_type} computes in fp16: its un-normalized output x·W (RMS(x) times "
                        "the original's) can overflow fp16 where the original's cannot", linear.node)
    found = next((linear.defer_blocker for linear in site.linears if linear.defer_blocker), None)
    padded = any(linear.conv and conv_pads(linear.node) for linear in site.linears)
    if found and padded and site.beta is not None and np.any(site.beta):
        found = fail(f"{found.reason} (it pads its input: β's part, which differs at the borders, is added "
                     "after it by a Conv of ones)", found.at)
    return found


def beta_blocker(site: Site) -> Failure | None:
    """Why β (present and non-zero) cannot be folded into the linears' biases, or None."""
    if site.beta is None or not np.any(site.beta):
        return None
    return next((linear.beta_blocker for linear in site.linears if linear.beta_blocker), None)


def _transposes(ref: WeightRef) -> bool:
    """Whether the Transpose steps swap the stored tensor's two axes."""
    return sum(1 for kind, perm in ref.steps if kind == "transpose" and tuple(perm) == (1, 0)) % 2 == 1


def weight_dtype(linear: Linear) -> ir.DataType:
    return dtype_of(linear.node.inputs[1]) or linear.weight.tensor.dtype


__all__ = ["Linear", "ROW_MOVES", "WeightRef", "beta_blocker", "conv_pads", "defer_blocker", "match_linears", "resolve_weight", "weight_dtype"]

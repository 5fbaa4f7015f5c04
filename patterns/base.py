"""What a rule returns: a `Site` (a norm and the linears that consume it) or a `Miss` (a
candidate that was not matched, with the `Failure` the report shows: the condition that fails
and the node or value at fault)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import onnx_ir as ir

from .graph import last_dim


class StrEnum(str, Enum):
    """Members that are their strings: == "rms", f"{m}", repr and JSON give "rms", so the report and
    the command line keep their values (Python 3.11's enum.StrEnum, for 3.10)."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(self, spec)

    def __repr__(self) -> str:          # messages quote the value, as they quoted the string
        return str.__repr__(self)


class NormKind(StrEnum):
    """What a norm computes."""

    RMS = "rms"            # x / RMS(x) · γ
    LAYER = "layer"        # (x − mean) / σ · γ + β
    DYT = "dyt"            # γ · tanh(α·x) + β: no statistic to defer


class Form(StrEnum):
    """How a norm is written in the graph."""

    DECOMPOSED = "decomposed"    # a subgraph of elementwise ops
    FUSED = "fused"              # one op (`Site.op` names it)


@dataclass
class WeightRef:
    """A projection weight as the linear sees it: a constant `source` (initializer or Constant
    output) followed by Transpose/Cast `steps`; `transposed` when the node reads it as [k, n]
    (Gemm/FusedMatMul transB=1)."""

    source: ir.Value
    tensor: ir.TensorProtocol
    steps: tuple[tuple[str, object], ...] = ()
    transposed: bool = False

    @property
    def nbytes(self) -> int:
        return int(self.tensor.nbytes)


@dataclass
class Linear:
    """One consumer of a norm output that absorbs the gain: MatMul, Gemm or FusedMatMul, reached
    through `path` (Cast/Identity/Reshape nodes on the activation side)."""

    node: ir.Node
    weight: WeightRef
    path: tuple[ir.Node, ...] = ()
    bias: ir.Value | None = None          # Gemm C or the constant of a following Add
    bias_add: ir.Node | None = None       # that Add node, when the bias is a separate op
    defer_blocker: "Failure | None" = None   # the row moves on the path that 1/RMS cannot follow
    beta_blocker: "Failure | None" = None    # the row moves on the path β cannot follow (zero padding)
    stacked_axis: int | None = None          # weight = one expert (chosen at run time) of a stacked
                                             # [E, a, b] constant: the axis of it the linear contracts

    @property
    def conv(self) -> bool:
        """A Conv reading the normalized axis as its input channels (γ, β fold; nothing defers)."""
        return self.node.op_type == "Conv"

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        """[n_in, k_out] of the effective weight, from shapes only."""
        shape = tuple(int(d) for d in self.weight.tensor.shape)
        if self.conv:               # [out, in, k...]
            return shape[1], shape[0]
        if self.stacked_axis is not None:
            return shape[self.stacked_axis], shape[3 - self.stacked_axis]
        for kind, perm in self.weight.steps:
            if kind == "transpose":
                shape = tuple(shape[p] for p in perm)
        return shape[::-1] if self.weight.transposed else shape


@dataclass
class Site:
    """A normalization whose output is consumed by linears.

    kind: a NormKind; form: a Form (DECOMPOSED: a subgraph of elementwise ops; FUSED: one op,
    `op` names it). `x` is the tensor the norm normalizes (for Skip* ops the
    residual sum is built from `skip_inputs`). `gain`/`beta` are small arrays (None = 1 / 0).
    `output` is the value the linears read; `nodes` are the norm's own nodes.
    """

    kind: NormKind
    form: Form
    anchor: ir.Node
    x: ir.Value | None
    output: ir.Value
    eps: float
    gain: np.ndarray | None = None
    beta: np.ndarray | None = None
    nodes: tuple[ir.Node, ...] = ()
    pre_affine: ir.Value | None = None     # decomposed forms: the value before the gain/β ops
    skip_inputs: tuple[ir.Value | None, ...] = ()   # Skip*: (input, skip, bias)
    residual_out: ir.Value | None = None   # Skip*: output 3 (input + skip + bias)
    gain_input: int | None = None          # fused ops: index of the gain input
    beta_input: int | None = None
    linears: list[Linear] = field(default_factory=list)
    shape_users: list[tuple[ir.Node, int]] = field(default_factory=list)
    defer_blocker: "Failure | None" = None   # why deferring 1/RMS would not be exact (fold only)
    merge: ir.Node | None = None           # gated group norms: the Reshape merging G groups before γ
    groups: int = 1

    @property
    def name(self) -> str:
        return self.anchor.name or self.output.name or "?"

    @property
    def unit_gain(self) -> bool:
        """No gain to fold: absent or all ones."""
        return self.gain is None or bool(np.all(self.gain == 1))

    @property
    def weightless(self) -> bool:
        """Nothing to fold: a unit (or absent) gain and a zero (or absent) β."""
        return self.unit_gain and (self.beta is None or not np.any(self.beta))

    @property
    def op(self) -> str:
        """The single op's type for a fused form ('' for a decomposed one)."""
        return self.anchor.op_type if self.form == Form.FUSED else ""

    @property
    def axes(self) -> tuple[int, ...]:
        """The axes of `x` the norm normalizes over: the last one only, for every form the
        rules match (a reduction or a fused op's `axis` over anything else is a Miss)."""
        return (-1,)

    @property
    def size(self) -> int | None:
        if self.gain is not None and self.gain.size > 1:
            return int(self.gain.size)
        return last_dim(self.output) or (last_dim(self.x) if self.x is not None else None)


@dataclass(frozen=True)
class Failure:
    """Why a pattern does not hold: the condition that fails, and the node or value at fault."""

    reason: str
    at: ir.Node | ir.Value | None = None

    @property
    def where(self) -> str:
        """'MatMul node "name"' or 'value "name"' ('' when nothing in particular is at fault)."""
        if isinstance(self.at, ir.Node):
            return f'{self.at.op_type} node "{self.at.name}"'
        if isinstance(self.at, ir.Value):
            return f'value "{self.at.name}"'
        return ""

    def __str__(self) -> str:
        return self.reason


def fail(reason: str, at: ir.Node | ir.Value | None = None) -> Failure:
    return Failure(reason, at)


@dataclass
class Miss:
    """A candidate normalization that no rule could rewrite, and why."""

    anchor: ir.Node
    kind: NormKind
    failure: Failure
    form: Form | str = ""        # "" when the rule did not get as far as the form
    site: Site | None = None     # the norm itself, when it matched but its consumers did not

    @property
    def reason(self) -> str:
        return self.failure.reason

    @property
    def op(self) -> str:
        return self.anchor.op_type if self.form == Form.FUSED else ""

    @property
    def name(self) -> str:
        return self.anchor.name or "?"

"""Rotating the residual stream (computational invariance, as QuaRot and SliceGPT use it).

Once every norm that reads the residual stream is weightless (its gain folded into the
linears: `--mode fold`), norm(x·Q) = norm(x)·Q for an orthogonal Q (RMSNorm: any Q;
LayerNorm: a Q that fixes the all-ones vector), so the whole stream can be rotated and the
model computes the same function with its outlier channels spread out — which is what helps
a quantizer. `RotatePass` does it on an exported graph: find the stream from the structure
(rewriter.rotate.stream), rotate its constants (rewriter.rotate.apply). Anything the algebra
cannot prove refuses the whole rotation (nothing partial): `RotatePass.result` says why and
at which node.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from .apply import rotate_kept_gains, rotate_stream
from .hadamard import hadamard, rotation
from .heads import HeadBlock, find_head_blocks, head_rotations
from .online import insert_online, online_rotation_nodes
from .stream import Refused, Stream, find_stream


@dataclass
class RotationResult:
    applied: bool
    reason: str = ""          # why not (the condition that fails)
    at: str = ""              # the node or value at fault
    size: int = 0             # the stream's width n
    matrix: str = ""          # "hadamard" or "orthogonal"
    seed: int = 0
    norm_kind: str = ""       # rms | layer (layer: the stream was also centered)
    norms: int = 0
    writers: int = 0
    readers: int = 0
    constants: int = 0        # constants rewritten (tied embedding/head: one)
    online: int = 0           # writers whose input is rotated at run time (--rotate-online)
    kept_gains: int = 0       # gains of norms whose linear's weight is shared (tied head): n×n MatMuls
    keep_float: list = field(default_factory=list)   # nodes a quantizer should leave in float (their names)
    heads: bool = False           # the head-wise V/O rotation was asked for (--rotate-heads)
    attention_blocks: int = 0     # attention blocks found (rewriter.rotate.heads)
    heads_rotated: int = 0        # of them, V/O rotated head-wise (R2, seed + 1)
    head_dim: int = 0
    heads_skipped: list[dict] = field(default_factory=list)    # {anchor, reason, at} per block skipped

    def line(self) -> str:
        if not self.applied:
            return f"residual stream not rotated: {self.reason}" + (f" (at {self.at})" if self.at else "")
        centered = ", stream centered (LayerNorm)" if self.norm_kind == "layer" else ""
        return (f"residual stream rotated: n = {self.size}, {self.matrix} Q (seed {self.seed}){centered}; "
                f"{self.norms} norms, {self.writers} writers, {self.readers} readers, "
                f"{self.constants} constants rewritten"
                + (f"; {self.online} writer inputs rotated online (Kronecker-factored Hadamard MatMuls)"
                   if self.online else "")
                + (f"; {self.kept_gains} gain(s) of a norm whose linear shares its weight (tied embedding/head) "
                   f"applied as an n×n MatMul by Qᵀ·diag(g)·Q ({self.size * self.size} values each, instead of a "
                   "copy of the shared weight)" if self.kept_gains else "")
                + (f"; {self.head_line()}" if self.heads else ""))

    def head_line(self) -> str:
        """The head-wise V/O rotation: how many blocks, and each reason a block was skipped
        (once, with its first node and how many blocks it stopped)."""
        if not self.heads:
            return "head-wise V/O rotation: not asked for (--rotate-heads)"
        if not self.attention_blocks:
            return "head-wise V/O rotation: no attention block found"
        line = (f"head-wise V/O rotation (R2, head_dim {self.head_dim}) in {self.heads_rotated} of "
                f"{self.attention_blocks} attention blocks")
        reasons = Counter(skip["reason"] for skip in self.heads_skipped)
        for reason, count in reasons.items():
            first = next(skip for skip in self.heads_skipped if skip["reason"] == reason)
            line += f"; skipped ×{count}: {reason}" + (f" (at {first['at']})" if first["at"] else "")
        return line

    def to_dict(self) -> dict:
        return asdict(self)


class RotatePass(ir.passes.InPlacePass):
    """Rotate the residual stream of a model whose stream norms are weightless (run the fold
    first). Needs inferred shapes. `self.result` holds the outcome; `self.stream` the stream."""

    def __init__(self, seed: int = 0, online: bool = False, heads: bool = False):
        super().__init__()
        self.seed = seed
        self.online = online
        self.heads = heads
        self.result: RotationResult | None = None
        self.stream: Stream | None = None
        self.blocks: list[HeadBlock] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            stream = find_stream(model.graph)
        except Refused as refused:
            self.result = RotationResult(False, refused.failure.reason, refused.failure.where, seed=self.seed)
            return ir.passes.PassResult(model, False)
        q, matrix = rotation(stream.size, self.seed, fix_ones=stream.kind == "layer")
        blocks = find_head_blocks(model.graph) if self.heads else []   # before the online ops change o_proj's input
        heads = head_rotations(blocks, lambda head_dim: rotation(head_dim, self.seed + 1)[0])
        inputs = insert_online(model.graph, stream) if self.online else {}
        constants = rotate_stream(stream, q, inputs, heads)
        gain_matmuls = rotate_kept_gains(model.graph, stream, q)
        self.stream = stream
        self.blocks = blocks
        rotated = [b for b in blocks if b.rotated]
        self.result = RotationResult(
            True, size=stream.size, matrix=matrix, seed=self.seed, norm_kind=stream.kind, norms=len(stream.norms),
            writers=len(stream.writers), readers=sum(u.role == "reader" for u in stream.uses), constants=constants,
            online=len(inputs), kept_gains=len(gain_matmuls),
            keep_float=gain_matmuls + (online_rotation_nodes(model.graph) if self.online else []),
            heads=self.heads, attention_blocks=len(blocks), heads_rotated=len(rotated),
            head_dim=rotated[0].head_dim if rotated else 0,
            heads_skipped=[{"anchor": b.anchor.name, "reason": b.reason, "at": b.at} for b in blocks if not b.rotated])
        return ir.passes.PassResult(model, True)


# onnxruntime's fused norms (onnx's shape inference has no schema for them): {op: {output: the
# input whose element type it has}}; each has input 0's shape (the normalized output, Skip*'s
# residual sum). SimplifiedLayerNormalization's Y has its scale's type (V), the Skip* ops' T.
FUSED_NORM_OUTPUTS = {"SimplifiedLayerNormalization": {0: 1}, "SkipSimplifiedLayerNormalization": {0: 0, 3: 0},
                      "SkipLayerNormalization": {0: 0, 3: 0}}


def infer_shapes(model: ir.Model) -> None:
    """onnx's shape inference, plus the shapes of onnxruntime's fused norms' outputs (their
    input's): without them everything after the first such norm stays shapeless and the
    stream's width is unknown. Repeated while that gives a fused norm a shape it lacked."""
    for _ in range(len(model.graph) + 1):
        ShapeInferencePass(strict_mode=False, data_prop=True)(model)
        learned = False
        for node in model.graph:
            x = node.inputs[0] if node.inputs else None
            if node.op_type not in FUSED_NORM_OUTPUTS or x is None or x.shape is None:
                continue
            for k, typed_as in FUSED_NORM_OUTPUTS[node.op_type].items():
                out = node.outputs[k] if k < len(node.outputs) else None
                if out is None or not out.name or out.shape is not None:
                    continue
                out.shape = ir.Shape(list(x.shape))
                if out.dtype is None and len(node.inputs) > typed_as and node.inputs[typed_as] is not None:
                    out.dtype = node.inputs[typed_as].dtype
                learned = True
        if not learned:
            return


def rotate_residual_stream(model: ir.Model, seed: int, report, online: bool = False,
                           heads: bool = False) -> RotationResult:
    """Rotate `model`'s residual stream in place (its norms folded already); the outcome goes
    to `report` (rewriter.report.Report: its `rotation` and a note)."""
    infer_shapes(model)
    rotate = RotatePass(seed, online, heads)
    rotate(model)
    report.rotation = rotate.result.to_dict()
    report.notes.append(rotate.result.line())
    return rotate.result


__all__ = ["HeadBlock", "RotatePass", "RotationResult", "Refused", "Stream", "find_head_blocks", "find_stream", "hadamard",
           "online_rotation_nodes", "rotate_residual_stream", "rotation"]

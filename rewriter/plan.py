"""Decide, per matched site, what to do — without touching a weight.

The plan is a plain list of `Decision`s: printable, diffable and testable on its own. Each
decision names one strategy from STRATEGIES; with a target that has measured costs
(`--target ort-cuda|ort-cpu`) the strategy is chosen per site by `rewriter.costs.choose`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from rewriter.patterns import Form, Linear, Miss, NormKind, Site, StrEnum
from rewriter.patterns.graph import dtype_of, last_dim, op, rank_of, residual_add, users


class Strategy(StrEnum):
    """What a rewritten site looks like (STRATEGIES: a line each)."""

    KEEP = "keep"
    FOLD = "fold"
    FOLD_FUSED = "fold-fused"
    DEFER = "defer"
    DEFER_NORMOP = "defer-normop"


class Action(StrEnum):
    """What the editor does at a site."""

    DEFER = "defer"      # fold the gain, defer 1/RMS past the linears
    FOLD = "fold"        # fold the gain, the norm stays (weightless)
    SKIP = "skip"        # leave the site as it is (the decision's reason says why)


class Target(StrEnum):
    """The runtime a rewrite is for (TARGETS)."""

    PORTABLE = "portable"
    ORT_CPU = "ort-cpu"
    ORT_CUDA = "ort-cuda"


class Mode(StrEnum):
    """The paper's two forms, the short spelling of strategies defer and fold."""

    DEFER = "defer"
    FOLD = "fold"


MODES = tuple(Mode)

# One line per strategy: what the rewritten site looks like.
STRATEGIES = {
    Strategy.KEEP:         "leave the site as exported",
    Strategy.FOLD:         "fold gain (and β) into the weights, keep the norm weightless",
    Strategy.FOLD_FUSED:   "fold, and run the weightless norm as one onnxruntime kernel",
    Strategy.DEFER:        "fold, defer 1/RMS past the linears (FlashNorm); 1/RMS from a sum-of-squares reduction",
    Strategy.DEFER_NORMOP: "fold, defer 1/RMS; 1/RMS from the inverse-std output of one onnxruntime norm kernel",
}
DEFERRING = (Strategy.DEFER, Strategy.DEFER_NORMOP)

# --target: which strategies a runtime may use, which one is the safe reference, and which
# measured costs decide between them (rewriter/data/costs-<ep>.json, `python -m rewriter
# calibrate`). ORT CUDA has no GEMM epilogue for a per-row scale, so a deferred Mul costs a
# pass over the output there; the chooser takes a candidate over the reference only where it
# was measured faster at every token count (docs/BENCHMARKS.md). On ORT CPU every strategy is
# within ±5 % per site, and whole models are fastest folded, fused and then given onnxscript's
# attention/rotary fusions (docs/BENCHMARKS.md, ORT CPU): fold-fused is the reference there too.
# The ort-* targets compose: after the rewrite, onnxscript's ORT fusions run (Options.compose)
# — on ORT CPU not on graphs with a KV cache (`compose_kv_cache`): there its MultiHeadAttention
# made each decode step of real SmolLM2-135M 5 % (past 128) to 17 % (past 512) slower than the
# rewrite alone (benchmarks/results/cpu/end_to_end_real_decode_compose.json).
TARGETS = {
    Target.PORTABLE: dict(reference=Strategy.DEFER, ep=None, candidates=(Strategy.DEFER,)),
    Target.ORT_CPU: dict(reference=Strategy.FOLD_FUSED, ep="cpu", compose_kv_cache=False, candidates=tuple(Strategy)),
    Target.ORT_CUDA: dict(reference=Strategy.FOLD_FUSED, ep="cuda", compose_kv_cache=True, candidates=tuple(Strategy)),
}


@dataclass
class Options:
    """How a model is rewritten. Which strategy each site gets is one rule:

        strategy (one forced everywhere)
        > target (ort-cpu/ort-cuda: chosen per site from measured costs, the target's
                  reference where none decides; portable: defer)
        > mode   (the paper's two forms: defer, fold — the short spelling of those strategies)

    The command line's --strategy, --target and --mode and the keywords of rewrite() set these
    fields; nothing else picks a strategy (`default_strategy`; with a measured target, the cost
    table's chooser per site). The other fields say how a strategy is carried out."""

    mode: Mode = Mode.DEFER      # "defer": fold + defer 1/RMS past the linears; "fold": fold only
    clone_shared: bool = False   # fold into a copy of a weight something else also reads (tied lm_head);
                                 # default: keep it, the gain stays one Mul on that linear's input
    push_scales: bool = True     # defer: move each 1/RMS as far downstream as the algebra allows
    approx: bool = False         # let a deferred scale cancel in a following norm (exact only for ε=0)
    target: Target | None = None      # choose each site's strategy for this runtime (TARGETS)
    strategy: Strategy | None = None  # force one strategy (STRATEGIES) at every site
    costs: object = None         # a cost file path or CostTable (default: the target's built-in file)
    tokens: tuple[int, ...] | None = None   # token counts the chooser optimizes for (None: all measured)
    compose: bool | None = None  # ort-* targets: then run onnxscript's ORT fusions (attention, rotary, ...);
                                 # None: where the target's measurements say so (TARGETS), True: always
    rotate: bool = False         # then rotate the residual stream (rewriter.rotate); implies the fold form
    rotate_seed: int = 0         # seed of the rotation's random signs
    rotate_online: bool = False  # also rotate each stream writer's input at run time (implies rotate)
    rotate_heads: bool = False   # also rotate V/O head-wise, R2 (implies rotate; measured neutral: README)

    def __post_init__(self):
        if self.target is not None and self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r} (choose from {', '.join(TARGETS)})")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r} (choose from {', '.join(STRATEGIES)})")
        self.mode = Mode(self.mode)
        self.target = None if self.target is None else Target(self.target)
        self.strategy = None if self.strategy is None else Strategy(self.strategy)
        if (self.costs is not None or self.tokens) and not self.measured:
            raise ValueError("costs/tokens choose per site: they need target ort-cpu or ort-cuda")
        self.rotate = self.rotate or self.rotate_online or self.rotate_heads
        if self.rotate:     # the linears must read normalized activations
            if self.target is not None or self.strategy not in (None, Strategy.FOLD, Strategy.FOLD_FUSED):
                raise ValueError("rotate needs the fold form: no target, strategy fold or fold-fused")
            self.mode = Mode.FOLD

    @property
    def measured(self) -> bool:
        """Each site's strategy comes from measured costs."""
        return self.target is not None and TARGETS[self.target]["ep"] is not None

    @property
    def default_strategy(self) -> Strategy:
        """The strategy every site gets unless a cost table says otherwise (the rule above)."""
        if self.strategy is not None:
            return self.strategy
        if self.target is not None:
            return TARGETS[self.target]["reference"]
        return Strategy(self.mode)



@dataclass
class Decision:
    site: Site | None
    miss: Miss | None
    action: Action
    reason: str = ""
    cloned: list[Linear] = field(default_factory=list)   # shared weights folded into a copy
    gain_kept: list[Linear] = field(default_factory=list)   # shared weights kept: gain on the input
    folded_once: list[Linear] = field(default_factory=list)  # weights only sites with this gain read:
                                                              # one folded copy, read by them all
    strategy: Strategy | str = ""   # "" for a miss
    evidence: str = ""           # the measured costs behind a chosen strategy

    def __post_init__(self):
        self.action = Action(self.action)
        self.strategy = Strategy(self.strategy) if self.strategy else ""

    @property
    def rewritten(self) -> bool:
        return self.action != Action.SKIP

    @property
    def fused(self) -> bool:
        return self.strategy == Strategy.FOLD_FUSED

    @property
    def bytes_added(self) -> int:
        return sum(linear.weight.nbytes for linear in self.cloned)


def owns_weight(linear: Linear) -> bool:
    """True when nothing but `linear` reads its weight (so it can be replaced, not cloned)."""
    if linear.stacked_axis is not None:
        return True     # a stacked expert constant: patterns.linear proved every reader is this site's
    value = linear.weight.source
    if value.is_graph_input() or value.is_graph_output():
        return False
    while True:
        uses = users(value)
        if len(uses) != 1:
            return False
        node, _ = uses[0]
        if node is linear.node:
            return True
        if not op(node, "Transpose", "Cast", "Identity", domain=""):
            return False
        value = node.outputs[0]


def agreeing_weights(sites: list[Site]) -> set[ir.Value]:
    """Shared weights whose every reader is a linear of one of `sites` — in any scope: the
    branches of optimum's merged decoders read the same outer weights — reading it as stored,
    after norms of one kind and the same gain. Such a weight is folded once, into one copy all
    of them read (the original then has no reader left); any other reader (a tied embedding's
    Gather) keeps the gain on the linear's input instead."""
    readers: dict[ir.Value, list[tuple[Site, Linear]]] = {}
    for site in sites:
        for linear in site.linears:
            ref = linear.weight
            if (linear.stacked_axis is None and not linear.conv and not ref.steps
                    and ref.source.is_initializer() and not owns_weight(linear)):
                readers.setdefault(ref.source, []).append((site, linear))
    agreed = set()
    for source, group in readers.items():
        nodes = {linear.node for _, linear in group}
        first_site, first_linear = group[0]
        if (not source.is_graph_input() and not source.is_graph_output()
                and all(node in nodes for node, _ in users(source))
                and all(site.kind == first_site.kind and _same(site.gain, first_site.gain)
                        and linear.weight.transposed == first_linear.weight.transposed for site, linear in group)):
            agreed.add(source)
    return agreed


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.dtype == b.dtype
                                         and a.shape == b.shape and bool(np.array_equal(a, b)))


# -- onnxruntime's fused norm kernels: the shapes each accepts ------------------------------------
# SimplifiedLayerNormalization / LayerNormalization (axis -1): any rank, a gain of the last
# axis' size. Skip(Simplified)LayerNormalization (contrib_ops/cpu/skip_layer_norm_helper.h, the
# CPU and CUDA kernels' check): input and skip of rank 2 or 3, the output taking the input's
# shape, a 1-D gain of the hidden size.
KERNEL_DTYPES = {Strategy.FOLD_FUSED: (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16),
                 Strategy.DEFER_NORMOP: (ir.DataType.FLOAT, ir.DataType.FLOAT16)}
KERNEL_FALLBACK = {Strategy.FOLD_FUSED: Strategy.FOLD, Strategy.DEFER_NORMOP: Strategy.DEFER}


def kernel_width(site: Site) -> int | None:
    """The gain size of one norm kernel run on the site's input: its last axis (a gated group
    norm's [.., G, n]: n per group, the Reshape merging the groups after the kernel)."""
    n = last_dim(site.x) if site.x is not None else None
    return n if n is not None or site.merge is not None else site.size


# The opsets a model must import for them: LayerNormalization (a LayerNorm's fold-fused kernel
# and its centered defer-normop statistics) is an ONNX op from opset 17; onnxruntime registers
# SimplifiedLayerNormalization in the ONNX domain at every opset, and the Skip* kernels in
# com.microsoft at version 1 only.
LAYERNORM_OPSET = 17
CONTRIB_VERSION = 1


def kernel_contract(site: Site, strategy: str, opsets: Mapping[str, int] | None = None) -> str:
    """Why onnxruntime's kernel for `strategy` (fold-fused: the weightless norm as one op;
    defer-normop: 1/RMS from one norm op's inverse std) would not accept this site in a model
    importing `opsets` ({domain: version}; None: not checked), or ''. A site without a graph
    (calibrate's shape-only stand-in: no `x`) is its probe's, which fits."""
    if strategy not in KERNEL_DTYPES or getattr(site, "x", None) is None:
        return ""
    if kernel_width(site) is None:
        return f"{strategy} not possible: the normalized axis' size is unknown (the kernel's gain needs it)"
    dtype = dtype_of(site.output)
    if dtype not in KERNEL_DTYPES[strategy]:
        return f"{strategy} not possible: no onnxruntime norm kernel for {dtype} here"
    return _opsets_refuse(site, strategy, opsets) if opsets is not None else ""


def _opsets_refuse(site: Site, strategy: str, opsets: Mapping[str, int]) -> str:
    """Why the model's opset imports have no kernel for `strategy` at this site, or ''."""
    version = int(opsets.get("", opsets.get("ai.onnx", 0)))
    if site.kind == NormKind.LAYER and version < LAYERNORM_OPSET:
        return (f"{strategy} not possible: a LayerNorm's kernel is LayerNormalization, an ONNX op from opset "
                f"{LAYERNORM_OPSET}; the model imports opset {version}")
    contrib = opsets.get("com.microsoft")
    if (strategy == Strategy.FOLD_FUSED and site.kind == NormKind.RMS and contrib not in (None, CONTRIB_VERSION)
            and skip_operands(site.x)):
        return (f"{strategy} not possible: the residual norm's kernel, SkipSimplifiedLayerNormalization, is "
                f"com.microsoft version {CONTRIB_VERSION}; the model imports version {contrib}")
    return ""


def _may_equal(a, b) -> bool:
    """Two dims not proven different: equal sizes, or not both known — except a 1 against an
    unknown size, which is a broadcast."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return a != 1 and b != 1


def skip_operands(x: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(input, skip) where Skip*LayerNormalization can compute the norm of x = input + skip: a
    residual Add of two activations, x of rank 2 or 3 (known), both operands of x's shape (no
    dim of either proven to broadcast). Else None: the plain kernel normalizes the sum."""
    add = x.producer()
    if rank_of(x) not in (2, 3) or not residual_add(add):
        return None
    if all(v.shape is not None and len(v.shape) == len(x.shape) and all(map(_may_equal, v.shape, x.shape))
           for v in add.inputs):
        return add.inputs[0], add.inputs[1]
    return None


def _form_allows(site: Site, strategy: str) -> str:
    if site.kind == NormKind.DYT and strategy in DEFERRING + (Strategy.FOLD_FUSED,):
        return Strategy.FOLD
    if strategy in DEFERRING and site.defer_blocker:
        return Strategy.FOLD
    if strategy == Strategy.FOLD_FUSED and site.form != Form.DECOMPOSED:
        return Strategy.FOLD
    if strategy == Strategy.DEFER_NORMOP and site.kind == NormKind.LAYER and site.form == Form.DECOMPOSED \
            and site.size is None:
        return Strategy.DEFER
    return strategy


def applicable(site: Site, strategy: str, opsets: Mapping[str, int] | None = None) -> str:
    """The strategy this site can take: DyT has no 1/RMS to defer, an already fused norm is its
    own fused kernel, and a kernel strategy needs a site its onnxruntime op accepts in a model
    importing `opsets` (kernel_contract; else fold-fused → fold, defer-normop → defer)."""
    strategy = _form_allows(site, strategy)
    return KERNEL_FALLBACK[strategy] if kernel_contract(site, strategy, opsets) else strategy


def kernels_refused(site: Site, strategies, opsets: Mapping[str, int] | None = None) -> str:
    """Why the kernel strategies among `strategies` were not open to this site ('' if all were)."""
    return "; ".join(dict.fromkeys(filter(None, (kernel_contract(site, _form_allows(site, s), opsets)
                                                 for s in strategies))))


def decide(site: Site, options: Options, strategy: str | None = None, evidence: str = "",
           agreed: set[ir.Value] = frozenset(), opsets: Mapping[str, int] | None = None) -> Decision:
    """The plan for one site: `strategy` (default the options') where the site and the model's
    `opsets` allow it (applicable), else its fallback with the reason in the evidence."""
    asked = strategy or options.default_strategy
    strategy = applicable(site, asked, opsets)
    if asked in DEFERRING and strategy == Strategy.FOLD and site.defer_blocker:
        evidence = "; ".join(filter(None, [f"fold only: {site.defer_blocker}", evidence]))
    considered = TARGETS[options.target]["candidates"] if options.measured and not options.strategy else (asked,)
    evidence = "; ".join(filter(None, [kernels_refused(site, considered, opsets), evidence]))
    if strategy == Strategy.KEEP:
        return Decision(site, None, Action.SKIP, "kept as exported: measured fastest on the target"
                        + (f" ({evidence})" if evidence else ""), strategy=strategy, evidence=evidence)
    action = Action.DEFER if strategy in DEFERRING else Action.FOLD
    if action == Action.FOLD and site.weightless and strategy != Strategy.FOLD_FUSED:
        return Decision(site, None, Action.SKIP, "nothing to fold: unit gain and no β (already folded?)",
                        strategy=strategy, evidence=evidence)
    once = [linear for linear in site.linears if linear.weight.source in agreed]
    shared = [linear for linear in site.linears if linear.weight.source not in agreed and not owns_weight(linear)]
    reason = "fold gain into weights" if action == Action.FOLD else "fold gain, defer 1/RMS past the linears"
    if site.kind == NormKind.LAYER:
        reason = ("fold γ, β into weights/bias" if action == Action.FOLD
                  else "fold γ, β into weights/bias, linears read x − mean(x), defer 1/σ")
    if strategy == Strategy.FOLD_FUSED:
        reason += "; norm fused into one onnxruntime kernel"
    if strategy == Strategy.DEFER_NORMOP:
        reason += " (1/RMS from one onnxruntime norm kernel)"
    if once:
        reason += (f"; {len(once)} weight(s) read only by sites with this gain (e.g. both branches "
                   "of a merged decoder): folded once, into one copy they all read")
    if shared and options.clone_shared:
        reason += f"; folded into a copy of {len(shared)} shared weight(s)"
    elif shared:
        reason += (f"; {len(shared)} shared weight(s) kept (tied embedding): the gain stays one Mul "
                   "on that linear's input")
    if evidence:
        reason += f" [{evidence}]"
    cloned, kept = (shared, []) if options.clone_shared else ([], shared)
    return Decision(site, None, action, reason, cloned=cloned, gain_kept=kept, folded_once=once,
                    strategy=strategy, evidence=evidence)


def make_plan(sites: list[Site], misses: list[Miss], options: Options, chooser=None,
              agreed: set[ir.Value] = frozenset(), opsets: Mapping[str, int] | None = None) -> list[Decision]:
    """`chooser(site) -> (strategy, evidence)` picks per site (rewriter.costs); without one,
    every site takes the options' default strategy. `agreed`: see agreeing_weights. `opsets`:
    the model's opset imports, which the kernel strategies need (kernel_contract)."""
    plan = []
    for site in sites:
        strategy, evidence = chooser(site) if chooser is not None else (None, "")
        plan.append(decide(site, options, strategy, evidence, agreed, opsets))
    plan += [Decision(None, miss, Action.SKIP, miss.reason) for miss in misses]
    return plan


__all__ = ["DEFERRING", "Action", "Decision", "MODES", "Mode", "Options", "STRATEGIES", "Strategy", "TARGETS", "Target",
           "agreeing_weights", "applicable",
           "decide", "kernel_contract", "kernel_width", "make_plan", "owns_weight", "skip_operands"]

"""Measured costs per site shape and execution provider, and the per-site chooser.

A cost file (JSON, shippable next to a model) holds *probes*: one site shape — norm kind and
form, residual or not, hidden size d, the widths of the linears that read the norm, dtype —
timed on one execution provider for every strategy at a few token counts:

    {"format": "flashnorm-costs/1",
     "probes": [{"ep": "cuda", "device": "NVIDIA H100 80GB HBM3", "onnxruntime": "1.31.1",
                 "dtype": "float16", "kind": "rms", "form": "decomposed", "residual": true,
                 "d": 576, "outs": [960], "layers": 8, "source": "...",
                 "tokens": {"512": {"keep": {"ms": 0.107, "p10": ..., "p90": ...}, ...}},
                 "failed": {"defer-normop": "why"}}]}

`python -m rewriter calibrate MODEL --provider cuda -o costs.json` measures the probes a model
needs (rewriter/calibrate.py); rewriter/data/costs-<ep>.json are the built-in tables.

The chooser takes, for a site, the nearest probe of the same provider and compares every
applicable strategy with the target's reference (the safe choice): a strategy replaces the
reference only when its median is no slower at every token count (within `noise`) and its
slow tail (p90) is faster than the reference's median by more than `noise` in geometric mean
over the token counts — a win that run-to-run spread cannot explain. Without a probe the
reference stands, and the report says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rewriter.patterns import Form, NormKind, Site
from rewriter.patterns.graph import dtype_of, residual_add, through_casts
from rewriter.plan import STRATEGIES, TARGETS, applicable

FORMAT = "flashnorm-costs/1"
DATA = Path(__file__).resolve().parent / "data"
NOISE = 0.03


@dataclass(frozen=True)
class SiteShape:
    """What the cost of a site depends on."""

    kind: str                 # rms | layer | dyt
    form: str                 # decomposed | fused
    residual: bool            # the norm's input is a residual sum (Skip* kernels apply)
    d: int
    outs: tuple[int, ...]     # output widths of the linears reading the norm
    dtype: str                # float32 | float16 | bfloat16

    @classmethod
    def of_probe(cls, probe: dict) -> "SiteShape":
        return cls(probe["kind"], probe["form"], bool(probe["residual"]), probe["d"], tuple(probe["outs"]),
                   probe["dtype"])

    def label(self) -> str:
        return f"{self.kind}/{self.form}{'+res' if self.residual else ''} {self.d}→{'+'.join(map(str, self.outs))} {self.dtype}"

    def fallback(self, probe: "SiteShape") -> str:
        """'' when `probe` was measured at this very shape, else what the lookup falls back on."""
        differ = [name for name in ("kind", "form", "residual", "d", "outs", "dtype")
                  if getattr(self, name) != getattr(probe, name)]
        if not differ:
            return ""
        return (f"no probe at this site's shape ({self.label()}): nearest neighbour "
                f"{probe.label()} (differs in {', '.join(differ)}); ")


def site_shape(site: Site) -> SiteShape | None:
    """The shape key of a matched site (None when its hidden size is unknown)."""
    if site.size is None:
        return None
    residual = bool(site.skip_inputs) or (site.x is not None and residual_add(through_casts(site.x).producer()))
    dtype = dtype_of(site.output)
    return SiteShape(kind=site.kind, form=site.form,
                     residual=bool(residual), d=int(site.size),
                     outs=tuple(sorted(int(linear.weight_shape[1]) for linear in site.linears)),
                     dtype=dtype_name(dtype))


def dtype_name(dtype) -> str:
    """numpy's name for an onnx_ir dtype (float32, float16, bfloat16); float32 when unknown."""
    return "float32" if dtype is None else np.dtype(dtype.numpy()).name


class CostTable:
    def __init__(self, probes: list[dict] | None = None, path: str | None = None):
        self.probes = list(probes or [])
        self.path = path

    @classmethod
    def load(cls, path) -> "CostTable":
        """Read and check a cost file; ValueError says what is wrong with it."""
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a FlashNorm cost file (format {found!r}, want {FORMAT!r})")
        probes = data.get("probes")
        if not isinstance(probes, list):
            raise ValueError("'probes' is not a list")
        for i, probe in enumerate(probes):
            problem = _probe_problem(probe)
            if problem:
                raise ValueError(f"probe {i}: {problem}")
        return cls(probes, str(path))

    @classmethod
    def builtin(cls, ep: str) -> "CostTable":
        path = DATA / f"costs-{ep}.json"
        return cls.load(path) if path.exists() else cls()

    def save(self, path) -> None:
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "probes": self.probes}, indent=1) + "\n")
        tmp.replace(path)

    def merge(self, other: "CostTable") -> "CostTable":
        """`other`'s probes replace ours with the same key (provider, device, shape)."""
        keys = {_probe_key(p) for p in other.probes}
        self.probes = [p for p in self.probes if _probe_key(p) not in keys] + list(other.probes)
        return self

    def nearest(self, ep: str, shape: SiteShape) -> tuple[dict | None, float]:
        best, best_d = None, math.inf
        for probe in self.probes:
            if probe["ep"] != ep or probe["kind"] != shape.kind:
                continue
            dist = (abs(math.log(probe["d"] / shape.d)) + abs(math.log(sum(probe["outs"]) / sum(shape.outs)))
                    + abs(len(probe["outs"]) - len(shape.outs)) * 0.5
                    + (probe["dtype"] != shape.dtype) + (probe["form"] != shape.form)
                    + 0.5 * (bool(probe["residual"]) != shape.residual))
            if dist < best_d:
                best, best_d = probe, dist
        return best, best_d


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


# The schema of a probe: what each field must be, and the message naming it when it is not.
KINDS = tuple(NormKind)
FORMS = tuple(Form)
STRATEGY_NAMES = tuple(STRATEGIES)
PROBE_FIELDS = {
    "ep": (lambda v: isinstance(v, str) and bool(v), "a provider name"),
    "dtype": (lambda v: isinstance(v, str) and bool(v), "a dtype name"),
    "kind": (lambda v: v in KINDS, f"one of {', '.join(KINDS)}"),
    "form": (lambda v: v in FORMS, f"one of {', '.join(FORMS)}"),
    "residual": (lambda v: isinstance(v, bool), "true or false"),
    "d": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "outs": (lambda v: isinstance(v, list) and bool(v)
             and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v), "positive integers"),
    "tokens": (lambda v: isinstance(v, dict) and bool(v), "a non-empty object"),
}
CELL_TIMES = ("ms", "p10", "p90")       # ms required, the spread optional


def _probe_problem(probe) -> str | None:
    """What is wrong with one probe of a cost file (naming the field), or None."""
    if not isinstance(probe, dict):
        return "not an object"
    missing = [k for k in PROBE_FIELDS if k not in probe]
    if missing:
        return f"missing {', '.join(missing)}"
    for key, (valid, want) in PROBE_FIELDS.items():
        if not valid(probe[key]):
            return f"{key} = {probe[key]!r} (want {want})"
    for t, cells in probe["tokens"].items():
        if not str(t).isdigit() or int(t) < 1 or not isinstance(cells, dict):
            return f"tokens[{t!r}] is not a token count with its cells"
        for strategy, cell in cells.items():
            problem = _cell_problem(strategy, cell)
            if problem:
                return f"tokens[{t!r}][{strategy!r}]: {problem}"
    failed = probe.get("failed", {})
    if not isinstance(failed, dict) or not all(k in STRATEGY_NAMES for k in failed):
        return f"failed = {failed!r} (want an object of strategy: reason)"
    return None


def _cell_problem(strategy, cell) -> str | None:
    if strategy not in STRATEGY_NAMES:
        return f"unknown strategy (want one of {', '.join(STRATEGY_NAMES)})"
    if not isinstance(cell, dict) or "ms" not in cell:
        return "no ms"
    for key in CELL_TIMES:
        if key in cell and not _positive(cell[key]):
            return f"{key} = {cell[key]!r} (want a positive number of milliseconds)"
    return None


def _probe_key(p: dict) -> tuple:
    return (p["ep"], p.get("device"), p["dtype"], p["kind"], p["form"], bool(p["residual"]), p["d"], tuple(p["outs"]))


# A probe of the other form still says what a site costs: an already fused norm, kept or
# folded, runs the kernel a decomposed probe timed as "fold-fused"; a decomposed site folded
# into a fused kernel runs what a fused probe timed as "fold".
_OTHER_FORM = {("decomposed", "fused"): {"keep": "fold-fused", "fold": "fold-fused"},
               ("fused", "decomposed"): {"fold-fused": "fold", "keep": None, "fold": None}}


def _cell(probe: dict, tokens: str, strategy: str, form: str | None = None) -> dict | None:
    if form is not None and form != probe["form"]:
        strategy = _OTHER_FORM[(probe["form"], form)].get(strategy, strategy)
        if strategy is None:
            return None
    cell = probe["tokens"][tokens].get(strategy)
    return cell if cell and "ms" in cell else None


def choose(table: CostTable, ep: str, shape: SiteShape | None, candidates, reference: str,
           tokens=None, noise: float = NOISE) -> tuple[str, str]:
    """(strategy, evidence) for one site. `candidates` are the strategies applicable to it."""
    if shape is None:
        return reference, "hidden size unknown: target's reference strategy"
    probe, _ = table.nearest(ep, shape)
    if probe is None:
        return reference, f"no measured cost for {ep}: target's reference strategy"
    measured = sorted(probe["tokens"], key=int)
    if tokens:      # the nearest measured token count to each requested one
        measured = sorted({min(measured, key=lambda t: abs(math.log(int(t) / max(n, 1)))) for n in tokens}, key=int)

    def ms(t, c):
        return float(_cell(probe, t, c, shape.form)["ms"])

    def slow_tail(t, c):    # the candidate's p90: a gain must hold beyond its run-to-run spread
        cell = _cell(probe, t, c, shape.form)
        return max(float(cell.get("p90", cell["ms"])), float(cell["ms"]))
    usable = [c for c in candidates if all(_cell(probe, t, c, shape.form) is not None for t in measured)]
    ref = reference if reference in usable else None
    if ref is None:
        return reference, f"{reference} not measured in probe {SiteShape.of_probe(probe).label()}: kept as the reference"
    best, best_gain = ref, 1.0
    for c in usable:
        ratios = [ms(t, ref) / ms(t, c) for t in measured]
        sure = [ms(t, ref) / slow_tail(t, c) for t in measured]
        gain = math.exp(sum(map(math.log, sure)) / len(sure))
        if c != ref and min(ratios) >= 1 - noise and gain >= 1 + noise and gain > best_gain:
            best, best_gain = c, gain
    cells = "; ".join(f"t{t}: " + " ".join(f"{c} {ms(t, c):.3g}" for c in usable) for t in measured)
    verdict = (f"{best} {best_gain:.2f}× {ref} (p90 vs median)" if best != ref
               else f"none beats {ref} by >{noise:.0%} beyond its spread at every size")
    measured_at = SiteShape.of_probe(probe)
    return best, f"{shape.fallback(measured_at)}{ep} {measured_at.label()} ms/site {cells}; {verdict}"


__all__ = ["CostTable", "FORMAT", "SiteShape", "choose", "site_shape"]


def chooser_for(options, opsets=None):
    """`site -> (strategy, evidence)` from measured costs, for a target with a provider (None
    otherwise: every site takes the options' default strategy). `options`: rewriter.Options;
    `opsets`: the model's opset imports, which decide the kernel strategies open to a site."""
    spec = TARGETS.get(options.target or "", {})
    if options.strategy is not None or not spec.get("ep"):
        return None
    table = options.costs
    if table is None:
        table = CostTable.builtin(spec["ep"])
    elif not isinstance(table, CostTable):
        table = CostTable.load(table)

    def chooser(site):
        candidates = list(dict.fromkeys(applicable(site, c, opsets) for c in spec["candidates"]))
        return choose(table, spec["ep"], site_shape(site), candidates,
                      applicable(site, spec["reference"], opsets), tokens=options.tokens)
    return chooser

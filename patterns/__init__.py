"""The catalogue of normalization rules and the matcher that runs them over a graph.

Each rule is a small object with `anchors` (op types it starts from) and `match(node)`
returning a `Site`, a `Miss` (a candidate it refuses, with the reason) or None (not its
pattern). Linear consumers are matched once, for every rule, by patterns.linear.

This folder is installed as the package `rewriter.patterns` (pyproject.toml: `package-dir`;
setup.py finds its subpackages), so it is imported as `rewriter.patterns` everywhere — a grep
for `import patterns` finds nothing. Its modules import only each other (tests/test_layout.py
checks that, and that the built wheel holds them under rewriter/patterns/).
"""

from __future__ import annotations

import onnx_ir as ir

from .base import Failure, Form, Linear, Miss, NormKind, Site, StrEnum, WeightRef, fail
from .fused import FUSED_NORMS, FusedNormRule
from .graph import bind_scopes
from .layernorm import DecomposedDyT, DecomposedLayerNorm
from .linear import beta_blocker, defer_blocker, match_linears
from .rmsnorm import DecomposedRMSNorm

RULES = (DecomposedRMSNorm(), DecomposedLayerNorm(), DecomposedDyT(), FusedNormRule())


def find_sites(graph: ir.Graph, rules=RULES) -> tuple[list[Site], list[Miss]]:
    """Every normalization in `graph` with the linears it feeds, or the reason it can't be
    rewritten. Only reads the graph (and records on its nested bodies the opsets they are read at)."""
    bind_scopes(graph)
    by_anchor: dict[str, list] = {}
    for rule in rules:
        for anchor in rule.anchors:
            by_anchor.setdefault(anchor, []).append(rule)
    sites: list[Site] = []
    misses: list[Miss] = []
    for node in list(graph):
        for rule in by_anchor.get(node.op_type, ()):
            found = rule.match(node)
            if found is None:
                continue
            if isinstance(found, Site):
                consumers = match_linears(found.output, found.size, graph)
                if isinstance(consumers, Failure):
                    found = Miss(node, found.kind, consumers, found.form, site=found)
                else:
                    found.linears, found.shape_users = consumers
                    found.defer_blocker = defer_blocker(found)
                    blocked = beta_blocker(found)
                    if blocked is not None:
                        found = Miss(node, found.kind, blocked, found.form, site=found)
            (sites if isinstance(found, Site) else misses).append(found)
            break
    return sites, misses


__all__ = ["FUSED_NORMS", "Failure", "Form", "Linear", "Miss", "NormKind", "RULES", "Site", "StrEnum", "WeightRef",
           "fail", "find_sites"]

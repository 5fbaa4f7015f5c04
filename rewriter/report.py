"""What happened to every candidate: one object behind the CLI table, `--report` JSON and the
tests' assertions."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rewriter.plan import Action, Decision


@dataclass
class SiteReport:
    name: str
    kind: str             # rms | layer | dyt
    form: str             # decomposed | fused
    op: str               # the fused op (RMSNormalization, SimplifiedLayerNormalization, ...); '' if decomposed
    action: str           # defer | fold | skip
    reason: str
    consumers: list[str] = field(default_factory=list)
    weights_changed: int = 0
    bytes_added: int = 0
    strategy: str = ""    # one of rewriter.plan.STRATEGIES ("" for a candidate no rule matched)
    evidence: str = ""    # the measured costs behind the strategy (--target with a cost table)
    at: str = ""          # the node or value at fault when a condition failed ('MatMul node "name"')


@dataclass
class Report:
    mode: str
    sites: list[SiteReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rotation: dict | None = None      # rewriter.rotate.RotationResult, when asked for

    @classmethod
    def from_plan(cls, mode: str, plan: list[Decision]) -> "Report":
        report = cls(mode)
        for d in plan:
            source = d.site or d.miss
            consumers = [f"{lin.node.op_type}:{lin.node.name}" for lin in d.site.linears] if d.site else []
            failure = d.miss.failure if d.miss else d.site.defer_blocker if d.site else None
            report.sites.append(SiteReport(
                name=source.name, kind=source.kind, form=source.form, op=source.op, action=d.action,
                reason=d.reason, consumers=consumers,
                weights_changed=len(consumers) if d.rewritten else 0,
                bytes_added=d.bytes_added if d.rewritten else 0,
                strategy=d.strategy, evidence=d.evidence, at=failure.where if failure else ""))
        return report

    # -- counts the tests and the table use -----------------------------------------------
    @property
    def found(self) -> int:
        return len(self.sites)

    @property
    def rewritten(self) -> int:
        return sum(s.action != Action.SKIP for s in self.sites)

    @property
    def skipped(self) -> Counter:
        return Counter(s.reason for s in self.sites if s.action == Action.SKIP)

    @property
    def weights_changed(self) -> int:
        return sum(s.weights_changed for s in self.sites)

    @property
    def bytes_added(self) -> int:
        return sum(s.bytes_added for s in self.sites)

    def count(self, **where) -> int:
        return sum(all(getattr(s, k) == v for k, v in where.items()) for s in self.sites)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "found": self.found, "rewritten": self.rewritten,
                "skipped": dict(self.skipped), "weights_changed": self.weights_changed,
                "bytes_added": self.bytes_added, "notes": self.notes, "rotation": self.rotation,
                "sites": [asdict(s) for s in self.sites]}

    def to_json(self, path: str) -> None:
        """Written beside `path` and renamed over it: a file that was another name (a hard link)
        of a model or its weights keeps its contents."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "x") as f:
                json.dump(self.to_dict(), f, indent=2)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def table(self) -> str:
        by_kind = Counter((s.kind, s.op or s.form) for s in self.sites)
        lines = [f"FlashNorm rewrite (mode: {self.mode})",
                 f"  sites found      {self.found:>6}   "
                 + ", ".join(f"{k}/{f}: {n}" for (k, f), n in sorted(by_kind.items())),
                 f"  rewritten        {self.rewritten:>6}   "
                 + ", ".join(f"{a}: {n}" for a, n in sorted(Counter(
                     s.strategy or s.action for s in self.sites if s.action != 'skip').items())),
                 f"  skipped          {self.found - self.rewritten:>6}"]
        for reason, n in self.skipped.most_common():
            lines.append(f"    {n:>4} × {reason}")
        lines += [f"  weights changed  {self.weights_changed:>6}",
                  f"  bytes added      {self.bytes_added:>6}   ({self.bytes_added / 2**20:.1f} MiB, "
                  "copies of shared weights, --clone-shared)"]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

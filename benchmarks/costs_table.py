"""Print a cost file as a markdown table, with what the chooser picks for each probe.

    python benchmarks/costs_table.py rewriter/data/costs-cpu.json [--reference defer]

Cells: ms per site, median [p10-p90] over the interleaved rounds; "pick" is
rewriter.costs.choose() with the target's reference for the probe's provider.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rewriter.costs import CostTable, SiteShape, choose  # noqa: E402
from rewriter.plan import STRATEGIES, TARGETS  # noqa: E402

REFERENCE = {spec["ep"]: spec["reference"] for spec in TARGETS.values() if spec["ep"]}


def table(costs: CostTable, reference: str | None = None) -> str:
    rows = ["| probe | tokens | " + " | ".join(STRATEGIES) + " | pick |",
            "|---|---|" + "---|" * len(STRATEGIES) + "---|"]
    for p in costs.probes:
        shape = SiteShape.of_probe(p)
        ref = reference or REFERENCE.get(p["ep"], "defer")
        single = CostTable([p])
        pick, _ = choose(single, p["ep"], shape, list(STRATEGIES), ref)
        for t in sorted(p["tokens"], key=int):
            cells = []
            for s in STRATEGIES:
                c = p["tokens"][t].get(s)
                cells.append(f"{c['ms']:.3g} [{c['p10']:.3g}-{c['p90']:.3g}]" if c else
                             ("failed" if s in p.get("failed", {}) else "–"))
            rows.append(f"| {p['ep']} {shape.label()} | {t} | " + " | ".join(cells) + f" | {pick} (vs {ref}) |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("costs")
    ap.add_argument("--reference", help="reference strategy (default: the target's for the probe's provider)")
    args = ap.parse_args(argv)
    print(table(CostTable.load(args.costs), args.reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tables for docs/BENCHMARKS.md from the JSON the benchmarks wrote (nothing re-measured).

    python benchmarks/summarize.py benchmarks/results/h100/op_level.json [...]
"""

from __future__ import annotations

import json
import sys

COLUMNS = ("raw", "best-fused", "rewritten", "rewritten-fold", "ort-cuda", "norm-free")
HEAD = ("raw (as exported)", "best-fused (ORT fusions)", "defer (paper form)", "fold",
        "--target ort-cuda", "norm-free limit")


def _ms(v: dict) -> str:
    return f"{v['median_ms']:.3g}"


def table(path: str) -> str:
    data = json.load(open(path))
    lines = ["| case | " + " | ".join(HEAD) + " | raw ÷ ort-cuda | best-fused ÷ ort-cuda | best-fused ÷ defer |",
             "|---" * (len(HEAD) + 4) + "|"]
    for row in data["shapes"]:
        case = row["case"]
        if True:
            v = row["variants"]
            if not all(c in v for c in COLUMNS):
                continue
            shape = row["shape"]
            label = f"{case} t{shape['tokens']}" + (f" past{shape['past']}" if shape.get("past") else "")
            t = {c: v[c]["median_ms"] for c in COLUMNS}
            lines.append(f"| {label} | " + " | ".join(_ms(v[c]) for c in COLUMNS)
                         + f" | {t['raw'] / t['ort-cuda']:.2f} | {t['best-fused'] / t['ort-cuda']:.2f}"
                         f" | {t['best-fused'] / t['rewritten']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(f"\n<!-- {p} -->\n" + table(p))

"""Turn an op-level benchmark result (benchmarks/op_level.py JSON) into a cost file.

    python benchmarks/costs_from_op_level.py benchmarks/results/h100/op_level.json \
        -o rewriter/data/costs-cuda.json

The op-level chains are norm → projection sites in the dynamo form (decomposed RMSNorm after a
residual Add), timed side by side per variant; per-site cost = chain median / layers. Variant
→ strategy: raw → keep, rewritten → defer, rewritten-fold → fold, ort-cuda → fold-fused.
Strategies the run did not time (defer-normop) are absent, so the chooser never picks them
from this file. `python -m rewriter calibrate --provider cuda` measures all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rewriter.costs import CostTable  # noqa: E402

VARIANT_TO_STRATEGY = {"raw": "keep", "rewritten": "defer", "rewritten-fold": "fold", "ort-cuda": "fold-fused"}
DTYPES = {"fp16": "float16", "fp32": "float32"}


def convert(result: dict, source: str) -> CostTable:
    config = result["config"]
    layers = int(config["layers"])
    probes = []
    for case in result["cases"]:
        d, d_out = (int(v) for v in case.split("->"))
        tokens = {}
        for row in (r for r in result["shapes"] if r.get("case") == case):
            cells = {}
            for variant, strategy in VARIANT_TO_STRATEGY.items():
                st = row["variants"].get(variant, {})
                if "median_ms" in st:
                    cells[strategy] = {"ms": round(st["median_ms"] / layers, 6),
                                       "p10": round(st["p10_ms"] / layers, 6),
                                       "p90": round(st["p90_ms"] / layers, 6)}
            tokens[str(row["shape"]["tokens"])] = cells
        probes.append({"ep": result["provider"], "device": result["device"], "onnxruntime": result["onnxruntime"],
                       "dtype": DTYPES[config["dtype"]], "kind": "rms", "form": "decomposed", "residual": True,
                       "d": d, "outs": [d_out], "layers": layers,
                       "source": f"{source} (op-level chains; defer timed with the earlier 5-kernel 1/RMS)",
                       "tokens": tokens, "failed": {}})
    return CostTable(probes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    result = json.loads(Path(args.result).read_text())
    table = convert(result, args.result)
    table.save(args.output)
    print(f"wrote {args.output}: {len(table.probes)} probes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

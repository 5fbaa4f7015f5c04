"""Export-matrix check: every family x exporter/opset x dtype, run in ORT, compare to torch.

    python -m models.sweep [--families llama,qwen3] [--combos dynamo:18,torchscript:17,dynamo:23]
                           [--dtypes fp32,fp16] [--ort-opt] [--chains] [--out /tmp/sweep]
"""
from __future__ import annotations

import argparse
import traceback
from pathlib import Path

from .export import compare_with_torch, export_onnx, ort_model_type, ort_optimize
from .norm_chains import summarize
from .zoo import FAMILIES, build, num_heads_hidden


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--combos", default="dynamo:18,torchscript:17,dynamo:23")
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--ort-opt", action="store_true")
    ap.add_argument("--chains", action="store_true")
    ap.add_argument("--out", default="/tmp/sweep")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for fam in a.families.split(","):
        model = build(fam, a.size)
        for combo in a.combos.split(","):
            exp, op = combo.split(":")
            for dt in a.dtypes.split(","):
                p = out / f"{fam}_{a.size}_{exp}{op}_{dt}.onnx"
                try:
                    r = export_onnx(model, p, exporter=exp, opset=int(op), dtype=dt)
                    diff = compare_with_torch(model, p)
                    diff2 = compare_with_torch(model, p, batch=2, seq=5)
                    msg = (f"OK   {fam:12s} {exp:11s} {op:>2s} {dt} export {r.seconds:5.1f}s "
                           f"opset={r.opset} max|d| b1 {diff:.1e} b2 {diff2:.1e}")
                except Exception as e:  # noqa: BLE001
                    if not p.exists():
                        msg = f"FAIL {fam:12s} {exp:11s} {op:>2s} {dt} export: " \
                              f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
                    else:
                        msg = f"FAIL {fam:12s} {exp:11s} {op:>2s} {dt} run: " \
                              f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
                    if a.chains:
                        traceback.print_exc(limit=2)
                print(msg, flush=True)
                rows.append(msg)
                if a.chains and p.exists():
                    print(summarize(p), flush=True)
                if a.ort_opt and p.exists():
                    q = out / f"{fam}_{a.size}_{exp}{op}_{dt}_ortopt.onnx"
                    try:
                        heads, hidden = num_heads_hidden(model)
                        ort_optimize(p, q, ort_model_type(fam), heads, hidden)
                        diff = compare_with_torch(model, q)
                        print(f"  ort-opt OK max|d| {diff:.1e}", flush=True)
                        if a.chains:
                            print(summarize(q), flush=True)
                    except Exception as e:  # noqa: BLE001
                        print(f"  ort-opt FAIL: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1][:200]}", flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

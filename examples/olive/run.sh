#!/usr/bin/env bash
# One Olive workflow end to end on the real SmolLM2, offline, beside the original's:
#   fp32 ONNX → FlashNorm (rotate_online) → Olive's OnnxDynamicQuantization → Olive's evaluator
# (perplexity on offline text, latency), printed side by side with
#   fp32 ONNX → the same quantization → the same evaluator,
# and written to benchmarks/results/cpu/olive_workflow.json. Needs .venv-olive
# (scripts/setup_olive.sh: olive-ai and this package). About 5 min on 2 cores.
# Arguments go to examples/olive/run_workflows.py (--work DIR, --out DIR, --json FILE).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x .venv-olive/bin/python ]; then
  echo "examples/olive/run.sh: .venv-olive is missing; run scripts/setup_olive.sh first" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)
.venv-olive/bin/python examples/olive/run_workflows.py "$@"
echo "examples/olive/run.sh: $(( $(date +%s) - start )) s"

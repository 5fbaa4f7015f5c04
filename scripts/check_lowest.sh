#!/usr/bin/env bash
# The declared dependency floors are true: a fresh venv with the lowest versions pyproject.toml
# admits (ci/lowest-constraints.txt) runs the core tests — those that need neither torch nor
# onnxruntime-genai (the models extra pins torch and transformers to one version anyway).
#   bash scripts/check_lowest.sh            (CI: .ci/run; ~1 min of tests on 2 cores)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/flashnorm-lowest.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
PY="${PYTHON:-python3}"
CORE_TESTS=(
    test_api_cli test_approx_cancel test_chooser test_consumers test_explain test_external_data
    test_faults test_files_and_exits test_fused_forms test_layernorm_dyt test_pass_protocol
    test_precision test_regressions test_rewrite_memory_smoke test_scale_rules test_scale_walker
    test_scopes test_soundness test_strategies test_weights
    test_schema_defaults test_gemm_scaling test_conv_pad test_approx_axes test_fused_contract
    test_file_safety test_verify_floor test_adversarial_18 test_layernorm_precision test_options
)

"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q -c "$ROOT/ci/lowest-constraints.txt" -e "$ROOT[graphsurgeon]" pytest hypothesis ml_dtypes
"$VPY" -m pip list 2>/dev/null | grep -i -E "^(numpy|onnx|onnx-ir|onnx_ir|onnxruntime|onnxscript) "
cd "$ROOT"
paths=()
for t in "${CORE_TESTS[@]}"; do paths+=("tests/$t.py"); done
"$VPY" -m pytest -q -p no:cacheprovider "${paths[@]}"

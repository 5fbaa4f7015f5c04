#!/usr/bin/env bash
# The package as people install it: build the wheel, install it with its declared core
# dependencies only (no torch, no extras) into a fresh venv, and run every verb from a folder
# outside the checkout, so that nothing of the source tree is on the path.
#   bash scripts/check_wheel.sh            (CI: .ci/run)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/flashnorm-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
PY="${PYTHON:-python3}"

"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
WHEEL="$(ls "$WORK"/dist/*.whl)"
echo "built $(basename "$WHEEL"): $("$VPY" -c 'import sys, zipfile; print(len(zipfile.ZipFile(sys.argv[1]).namelist()))' "$WHEEL") files"
"$VPY" -m pip install -q "$WHEEL"
if "$VPY" -c "import torch" 2>/dev/null; then echo "FAIL: torch came with the core dependencies"; exit 1; fi

cd "$WORK"          # outside the checkout
"$VPY" - <<'PY'
# A decomposed RMSNorm (Pow/ReduceMean/Add/Sqrt/Div/Mul, a gain) read by a MatMul: a few KB.
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(0)
n, k = 16, 24
init = [numpy_helper.from_array(a, name) for name, a in [
    ("two", np.array(2.0, np.float32)), ("eps", np.array(1e-5, np.float32)),
    ("one", np.array(1.0, np.float32)), ("gain", (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)),
    ("w", rng.standard_normal((n, k)).astype(np.float32))]]
nodes = [
    helper.make_node("Pow", ["x", "two"], ["sq"]),
    helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
    helper.make_node("Add", ["ms", "eps"], ["mse"]),
    helper.make_node("Sqrt", ["mse"], ["rms"]),
    helper.make_node("Div", ["one", "rms"], ["inv"]),
    helper.make_node("Mul", ["x", "inv"], ["normed"]),
    helper.make_node("Mul", ["normed", "gain"], ["scaled"]),
    helper.make_node("MatMul", ["scaled", "w"], ["y"], name="proj"),
]
graph = helper.make_graph(nodes, "rms_matmul",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", k])], init)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
onnx.checker.check_model(model)
onnx.save(model, "tiny.onnx")
PY

run() {     # run "what" expected-exit-code command...
    local what="$1" want="$2"; shift 2
    set +e; "$@" >"$WORK/out.txt" 2>&1; local got=$?; set -e
    if [ "$got" != "$want" ]; then
        echo "FAIL: $what: exit $got, expected $want"; cat "$WORK/out.txt"; exit 1
    fi
    echo "ok: $what (exit $got)"
}
MAIN="$WORK/venv/bin/python -m rewriter"
run "--help" 0 $MAIN --help
run "flashnorm --help (console script)" 0 "$WORK/venv/bin/flashnorm" --help
run "rewrite" 0 $MAIN tiny.onnx -o tiny_flash.onnx --report report.json
test -s tiny_flash.onnx && test -s report.json || { echo "FAIL: rewrite wrote no output"; exit 1; }
grep -q '"rewritten": 1' report.json || { echo "FAIL: the site was not rewritten"; cat report.json; exit 1; }
run "rewrite --verify (console script)" 0 "$WORK/venv/bin/flashnorm" tiny.onnx -o tiny_flash2.onnx --verify
run "verify" 0 $MAIN verify tiny.onnx tiny_flash.onnx
run "explain" 0 $MAIN explain tiny.onnx proj
grep -q "decision: defer" "$WORK/out.txt" || { echo "FAIL: explain"; cat "$WORK/out.txt"; exit 1; }
run "bench --help" 0 $MAIN bench --help
# the demo exports its model with the checkout's models/ tooling (torch): from an installed
# wheel it says so in one line, exit 2
run "demo outside a checkout" 2 $MAIN demo --workdir demo
test "$(wc -l <"$WORK/out.txt")" -eq 1 || { echo "FAIL: demo's refusal is not one line"; cat "$WORK/out.txt"; exit 1; }
echo "wheel check passed"

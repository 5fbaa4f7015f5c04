"""FlashNorm as an Olive pass: its options, and the package config through which a workflow
names it.

Olive (olive-ai 0.13) resolves a pass's `"type"` through its package config — olive_config.json
in the olive package, pass name → `module_path` — and `olive run --package-config FILE` (or
`olive.workflows.run(config, package_config=...)`) replaces that file as a whole. A dotted
`"type"` is no way around it (Olive looks up its last part in the same table), and Olive has no
entry points for passes. So ours is Olive's own table with the FlashNorm entry added:

    python -m rewriter.integrations.olive_config flashnorm_olive.json
    olive run --config workflow.json --package-config flashnorm_olive.json

and a workflow's pass reads `{"type": "FlashNorm", "rotate_online": true}` (PARAMS: the options).
Nothing here imports olive: the options map onto rewriter.Options without it (and are tested
without it); the Pass class is rewriter.integrations.olive_pass.FlashNorm."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from rewriter.plan import MODES, TARGETS, Options

PASS_NAME = "FlashNorm"
MODULE_PATH = "rewriter.integrations.olive_pass.FlashNorm"

# name -> (type, default, description): the pass's config params (olive_pass makes Olive's
# PassConfigParams of them); REWRITE_OPTIONS are rewriter.Options fields of the same name
PARAMS = {
    "mode": (str, "defer", f"FlashNorm's form, one of {', '.join(MODES)}: defer folds the gains and applies 1/RMS "
             "after the linears; fold folds the gains only and keeps a weightless norm"),
    "target": (Optional[str], None, f"choose each site's strategy for this runtime ({', '.join(TARGETS)}); "
               "None: mode decides everywhere"),
    "rotate": (bool, False, "fold, then rotate the residual stream by a seeded random-sign Hadamard (the same "
               "function, outlier channels spread for a quantizer that follows); refused whole where unprovable, "
               "and then the pass fails"),
    "rotate_online": (bool, False, "rotate, and rotate each stream writer's input at run time (two small Hadamard "
                      "MatMuls each, constant first input: onnxruntime's quantize_dynamic leaves them in float)"),
    "rotate_seed": (int, 0, "seed of the rotation's random signs"),
    "rotate_heads": (bool, False, "rotate, and rotate V/O head-wise (QuaRot's R2; free at run time)"),
    "clone_shared": (bool, False, "fold a gain into a copy of a weight something else also reads (a tied "
                     "embedding/head: + its size). With rotate, a tied head otherwise keeps its norm's gain as an "
                     "n×n MatMul, constant first: onnxruntime's quantizers leave it in float"),
    "verify": (bool, False, "also run the original and the rewritten model on inputs made from the signature and "
               "refuse a difference beyond the tolerance (the written model is always load- and run-checked)"),
    "save_as_external_data": (bool, False, "write the weights to a data file beside the model (by default only "
                              "when the input had one or the model passes 2 GiB)"),
    "external_data_name": (Optional[str], None, "with save_as_external_data: the data file's name (default "
                           "<model file name>.data)"),
}
REWRITE_OPTIONS = ("mode", "target", "rotate", "rotate_online", "rotate_seed", "rotate_heads", "clone_shared")


def _getter(config):
    if isinstance(config, Mapping):
        return lambda name: config.get(name, PARAMS[name][1])
    return lambda name: getattr(config, name, PARAMS[name][1])


def rewrite_options(config) -> dict:
    """The keywords of rewriter.rewrite_file (rewriter.Options fields) for a pass config — a
    mapping or Olive's config object; missing params take their defaults. A bad value raises
    ValueError (rewriter.Options's message) before anything runs."""
    get = _getter(config)
    options = {name: get(name) for name in REWRITE_OPTIONS}
    Options(**options)
    return options


def external_data_name(config, model_file_name: str) -> str | None:
    """The `external_data` argument of rewrite_file: None unless save_as_external_data."""
    get = _getter(config)
    if not get("save_as_external_data"):
        return None
    return get("external_data_name") or f"{model_file_name}.data"


def report_summary(report) -> dict:
    """What the output model carries in its attributes ("flashnorm"): counts and the rotation.
    Empty strings are left out: Olive's config serializer turns a string naming an existing
    path into an absolute one, and "" names the current directory."""
    rotation = None if report.rotation is None else {k: v for k, v in report.rotation.items() if v != ""}
    return {"mode": str(report.mode), "found": report.found, "rewritten": report.rewritten,
            "skipped": dict(report.skipped), "rotation": rotation, "notes": list(report.notes)}


def pass_entry() -> dict:
    """The FlashNorm entry of an Olive package config: any provider, device and precision."""
    return {"module_path": MODULE_PATH, "supported_providers": ["*"], "supported_accelerators": ["*"],
            "supported_precisions": ["*"], "supported_algorithms": [], "supported_quantization_encodings": []}


def olive_default_config() -> dict:
    """Olive's own package config (olive_config.json of the installed olive package), read
    without importing olive."""
    spec = importlib.util.find_spec("olive")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("olive-ai is not installed (pip install 'flashnorm-onnx[olive]', or "
                                  "scripts/setup_olive.sh)")
    return json.loads((Path(list(spec.submodule_search_locations)[0]) / "olive_config.json").read_text())


def package_config(base: dict | None = None) -> dict:
    """`base` (default: Olive's own package config) with the FlashNorm pass added."""
    config = copy.deepcopy(base if base is not None else olive_default_config())
    config.setdefault("passes", {})[PASS_NAME] = pass_entry()
    return config


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m rewriter.integrations.olive_config OUT.json   (Olive's package config + FlashNorm; "
              "then: olive run --config WORKFLOW.json --package-config OUT.json)", file=sys.stderr)
        return 2
    try:
        text = json.dumps(package_config(), indent=2) + "\n"
    except ModuleNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    out = Path(argv[0])
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")     # written whole, then renamed into place
    tmp.write_text(text)
    os.replace(tmp, out)
    print(f"wrote {argv[0]}: Olive's passes and {PASS_NAME} ({MODULE_PATH})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

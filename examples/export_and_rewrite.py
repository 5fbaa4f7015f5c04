"""Export a transformers model with torch's dynamo exporter, rewrite it, save it, verify it.

    python examples/export_and_rewrite.py [OUT_DIR]

The three lines an export script adds are marked (1)–(3). The model is a small Llama built
from a config (random weights, norm gains moved away from 1 so folding them matters); nothing
is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import transformers

from rewriter import rewrite
from rewriter.api import check_outputs


class Logits(torch.nn.Module):
    """The causal LM without its cache: input_ids → logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


def small_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    lm = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():                       # trained models' gains are far from 1
        for name, p in lm.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return Logits(lm).eval()


def main(out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    model = small_llama()
    ids = torch.randint(0, 512, (1, 16))
    seq = torch.export.Dim("seq", min=2, max=256)
    program = torch.onnx.export(model, (ids,), dynamo=True, dynamic_shapes={"input_ids": {1: seq}},
                                verbose=False)
    program.save(str(out_dir / "model.onnx"))                 # the export as it was, for comparison

    program, report = rewrite(program)                        # (1) rewrite the ONNXProgram in place
    print(report.table())
    program.save(str(out_dir / "model_flash.onnx"))           # (2) save it as usual
    diffs = check_outputs(out_dir / "model.onnx", out_dir / "model_flash.onnx")   # (3) verify: raises if it differs
    for d in diffs:
        print(f"output {d.name}: max relative difference {d.max_rel:.1e} (tolerance {d.tolerance:g})")

    import onnxruntime as ort
    with torch.no_grad():
        want = model(ids).numpy()
    got = ort.InferenceSession(str(out_dir / "model_flash.onnx")).run(None, {"input_ids": ids.numpy()})[0]
    rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    print(f"rewritten {report.rewritten} norms; max relative difference against PyTorch: {rel:.2e}")
    return 0 if report.rewritten and rel <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out/export_and_rewrite")))

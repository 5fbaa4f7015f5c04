"""Architectures whose norm → linear sites sit behind row moves, scalars, Convs or group merges,
built from transformers configs in code (random weights, perturbed norms; nothing is
downloaded) and exported with TorchScript (Mamba2: dynamo): T5 (tied head scaled by
d_model^-0.5), ConvNeXt and SegFormer (LN → Conv), Swin (padded, rolled windows), a Mixtral-style
MoE layer (`moe`: the router and experts reading gathered token rows; transformers' own Mixtral
does not export: TorchScript stops at aten::histc, dynamo at its grouped-mm experts), Mamba2
(gated group norm).

    python -m models.reach OUT_DIR [NAME ...]     # export, rewrite, print each report
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.zoo import perturb_norms, perturb_zero_biases


class _Ids(nn.Module):
    """input_ids → logits (decoders; T5 reads the ids as both encoder and decoder input)."""

    def __init__(self, model, seq2seq=False):
        super().__init__()
        self.model, self.seq2seq = model, seq2seq

    def forward(self, input_ids):
        if self.seq2seq:
            return self.model(input_ids=input_ids, decoder_input_ids=input_ids.flip(1)).logits
        return self.model(input_ids=input_ids).logits


class _Pixels(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration
    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                   num_heads=4, tie_word_embeddings=True, feed_forward_proj="relu")
    return _Ids(T5ForConditionalGeneration(cfg), seq2seq=True), "ids"


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"       # TorchScript cannot convert SDPA with GQA
    cfg._experts_implementation = "eager"    # the per-expert loop (the grouped-mm kernel uses histc)
    return _Ids(MixtralForCausalLM(cfg)), "ids"


class MoEBlock(nn.Module):
    """A Mixtral-style sparse MoE layer as the classic HF loop wrote it (top-k router, each
    expert's tokens gathered by index, SwiGLU experts, index_add back) between Mixtral's own
    RMSNorms: transformers' current MoE kernels (histc, grouped mm) do not export to ONNX."""

    def __init__(self, vocab=128, d=32, ff=64, experts=4, top_k=2):
        super().__init__()
        from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm
        self.embed = nn.Embedding(vocab, d)
        self.norm, self.final_norm = MixtralRMSNorm(d), MixtralRMSNorm(d)
        self.router = nn.Linear(d, experts, bias=False)
        self.w1 = nn.ModuleList(nn.Linear(d, ff, bias=False) for _ in range(experts))
        self.w3 = nn.ModuleList(nn.Linear(d, ff, bias=False) for _ in range(experts))
        self.w2 = nn.ModuleList(nn.Linear(ff, d, bias=False) for _ in range(experts))
        self.head = nn.Linear(d, vocab, bias=False)
        self.top_k = top_k

    def forward(self, input_ids):
        h = self.embed(input_ids)
        flat = self.norm(h).reshape(-1, h.shape[-1])
        weights, chosen = torch.topk(torch.softmax(self.router(flat), dim=-1), self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        for e in range(len(self.w1)):
            token, slot = torch.where(chosen == e)
            rows = flat[token]                                         # Gather of token rows
            y = self.w2[e](nn.functional.silu(self.w1[e](rows)) * self.w3[e](rows))
            out = out.index_add(0, token, y * weights[token, slot, None])
        return self.head(self.final_norm(h + out.reshape(h.shape)))


def _moe():
    return MoEBlock(), "ids"


def _mamba2(groups: int = 2):
    from transformers import Mamba2Config, Mamba2ForCausalLM
    cfg = Mamba2Config(vocab_size=128, hidden_size=32, state_size=8, num_heads=4, head_dim=16, n_groups=groups,
                       expand=2, num_hidden_layers=1, conv_kernel=4, chunk_size=8, tie_word_embeddings=False)
    return _Ids(Mamba2ForCausalLM(cfg)), "ids"


def _convnext():
    from transformers import ConvNextConfig, ConvNextModel
    cfg = ConvNextConfig(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                         image_size=32)
    return _Pixels(ConvNextModel(cfg)), "pixels"


def _segformer():
    from transformers import SegformerConfig, SegformerModel
    cfg = SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                          hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                          mlp_ratios=[2, 2])
    return _Pixels(SegformerModel(cfg)), "pixels"


def _swin():
    from transformers import SwinConfig, SwinModel
    cfg = SwinConfig(image_size=32, patch_size=2, num_channels=3, embed_dim=16, depths=[2], num_heads=[2],
                     window_size=4, mlp_ratio=2.0)
    return _Pixels(SwinModel(cfg)), "pixels"


BUILDERS = {"t5": _t5, "moe": _moe, "mixtral": _mixtral, "mamba2": _mamba2, "mamba2-1g": lambda: _mamba2(groups=1),
            "convnext": _convnext, "segformer": _segformer, "swin": _swin}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model, kind = BUILDERS[name]()
    perturb_norms(model, seed)
    perturb_zero_biases(model, seed)
    return model.float().eval(), kind


def example(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "ids":
        return torch.randint(0, 128, (2, 7), generator=g), "input_ids"
    return torch.randn(2, 3, 32, 32, generator=g), "pixel_values"


# TorchScript's Mamba2 graph is invalid (a Transpose with negative perm entries); dynamo's is fine
DYNAMO = {"mamba2", "mamba2-1g"}


def export(name: str, path, opset: int = 17) -> Path:
    """TorchScript export (static shapes: the model's real structure), dynamo for DYNAMO."""
    model, kind = build(name)
    x, input_name = example(kind)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if name in DYNAMO:
            program = torch.onnx.export(model, (x,), input_names=[input_name], output_names=["out"],
                                        opset_version=max(opset, 18), dynamo=True)
            program.save(str(path))
        else:
            torch.onnx.export(model, (x,), str(path), input_names=[input_name], output_names=["out"],
                              opset_version=opset, dynamo=False)
    return path


def feeds(name: str, seed: int = 1) -> dict:
    kind = "ids" if name in ("t5", "moe", "mixtral", "mamba2", "mamba2-1g") else "pixels"
    x, input_name = example(kind, seed)
    return {input_name: x.numpy() if x.dtype != torch.int64 else x.numpy().astype(np.int64)}


def main(argv=None) -> int:
    from rewriter import rewrite_file
    args = list(sys.argv[1:] if argv is None else argv)
    out = Path(args.pop(0))
    for name in args or BUILDERS:
        src = export(name, out / f"{name}.onnx")
        report = rewrite_file(src, out / f"{name}_flash.onnx", verify=True)
        print(f"== {name}\n{report.table()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

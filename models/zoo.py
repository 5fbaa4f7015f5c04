"""Catalogue of small random-init transformers used to exercise the FlashNorm rewriter.

Every family has a ``tiny`` config (2 layers, small hidden, vocab 256) for fast tests and a
``small`` one (4 layers, hidden 256); ``llama`` also has ``full`` (SmolLM2-135M shape), and a
few others a ``full`` shape of their smallest real member. All norm gains/biases are perturbed
away from their init values (w += 0.1*randn, b += 0.1*randn; Gemma's stored w starts at 0, so
its effective gain 1+w is perturbed too) so that folding is really exercised. Everything is
seeded: ``build(family, size, seed)`` gives the same weights each time.

Usage::

    from models.zoo import build, FAMILIES
    model = build("llama", "tiny")          # torch.nn.Module, fp32, eval()
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Config catalogue. Plain dicts: kwargs of the HF config class (or of DyTConfig).
# --------------------------------------------------------------------------------------------

_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=128)
_SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              max_position_embeddings=512)

CONFIGS: dict[str, dict[str, dict]] = {
    "llama": {
        "tiny": dict(_TINY, rms_norm_eps=1e-5, tie_word_embeddings=True),
        "small": dict(_SMALL, rms_norm_eps=1e-5, tie_word_embeddings=True),
        # SmolLM2-135M(-Instruct) shape
        "full": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     tie_word_embeddings=True, rope_theta=100000.0,
                     bos_token_id=1, eos_token_id=2, pad_token_id=2),
    },
    "qwen3": {
        "tiny": dict(_TINY, rms_norm_eps=1e-6, tie_word_embeddings=True),
        "small": dict(_SMALL, rms_norm_eps=1e-6, tie_word_embeddings=True),
    },
    "gemma3": {
        "tiny": dict(_TINY, rms_norm_eps=1e-6, sliding_window=4, query_pre_attn_scalar=16,
                     layer_types=["sliding_attention", "full_attention"],
                     pad_token_id=0, bos_token_id=2, eos_token_id=1),
        "small": dict(_SMALL, rms_norm_eps=1e-6, sliding_window=16, query_pre_attn_scalar=64,
                      layer_types=["sliding_attention"] * 3 + ["full_attention"],
                      pad_token_id=0, bos_token_id=2, eos_token_id=1),
        # Gemma-3-270M shape (vocab 262144 -> big embedding: ~270M params)
        "full": dict(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                     num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                     head_dim=256, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     sliding_window=512, query_pre_attn_scalar=256,
                     layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
                     pad_token_id=0, bos_token_id=2, eos_token_id=1),
    },
    "phi3": {
        "tiny": dict({k: v for k, v in _TINY.items() if k != "head_dim"}, rms_norm_eps=1e-5,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "small": dict({k: v for k, v in _SMALL.items() if k != "head_dim"}, rms_norm_eps=1e-5,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2),
    },
    "gpt2": {
        "tiny": dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=0, eos_token_id=0),
        "small": dict(vocab_size=4096, n_embd=256, n_layer=4, n_head=4, n_positions=512,
                      bos_token_id=0, eos_token_id=0),
        "full": dict(),  # GPT-2 124M defaults
    },
    # OPT (pre-LN: do_layer_norm_before): learned positions read at position + 2, ReLU FFN,
    # biases on every linear, the head tied to the token embedding
    "opt": {
        "tiny": dict(vocab_size=256, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                     do_layer_norm_before=True, tie_word_embeddings=True,
                     pad_token_id=1, bos_token_id=2, eos_token_id=2),
        "small": dict(vocab_size=4096, hidden_size=256, word_embed_proj_dim=256, ffn_dim=1024,
                      num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512,
                      do_layer_norm_before=True, tie_word_embeddings=True,
                      pad_token_id=1, bos_token_id=2, eos_token_id=2),
    },
    # Phi-2 shape: attention and MLP in parallel off one LayerNorm, partial rotary, GELU,
    # a final LayerNorm and an untied head with a bias
    "phi": {
        "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                     partial_rotary_factor=0.5, layer_norm_eps=1e-5, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=2),
        "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      partial_rotary_factor=0.5, layer_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2),
    },
    "bert": {
        "tiny": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128),
        "small": dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4,
                      num_attention_heads=4, intermediate_size=1024,
                      max_position_embeddings=512),
        # all-MiniLM-L6-v2 shape
        "full": dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                     num_attention_heads=12, intermediate_size=1536,
                     max_position_embeddings=512),
    },
    "deepseek_v3": {
        # dense (first_k_dense_replace >= num layers), MLA with q_lora_rank set
        "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                     moe_intermediate_size=32, num_hidden_layers=2, first_k_dense_replace=2,
                     n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                     n_group=1, topk_group=1, num_attention_heads=4, num_key_value_heads=4,
                     q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                     qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
                     max_position_embeddings=128, rms_norm_eps=1e-6,
                     bos_token_id=0, eos_token_id=1),
        "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=704,
                      moe_intermediate_size=64, num_hidden_layers=4, first_k_dense_replace=4,
                      n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                      n_group=1, topk_group=1, num_attention_heads=4, num_key_value_heads=4,
                      q_lora_rank=96, kv_lora_rank=64, qk_rope_head_dim=16,
                      qk_nope_head_dim=32, v_head_dim=32, head_dim=16,
                      max_position_embeddings=512, rms_norm_eps=1e-6,
                      bos_token_id=0, eos_token_id=1),
    },
    "olmo2": {
        "tiny": dict({k: v for k, v in _TINY.items() if k != "head_dim"}, rms_norm_eps=1e-6,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "small": dict({k: v for k, v in _SMALL.items() if k != "head_dim"}, rms_norm_eps=1e-6,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2),
    },
    "dyt": {
        "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, alpha_init=0.5),
        "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=704,
                      num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512,
                      alpha_init=0.5),
    },
}

FAMILIES = tuple(CONFIGS)

#: family -> (HF model class name, HF config class name); None for our own torch models
HF_CLASSES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config"),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config"),
    "opt": ("OPTForCausalLM", "OPTConfig"),
    "phi": ("PhiForCausalLM", "PhiConfig"),
    "bert": ("BertModel", "BertConfig"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config"),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config"),
    "dyt": None,
}

#: families whose exported output is last_hidden_state (encoders) instead of logits
ENCODERS = frozenset({"bert"})


def sizes(family: str) -> list[str]:
    return list(CONFIGS[family])


def config_dict(family: str, size: str = "tiny") -> dict:
    try:
        return dict(CONFIGS[family][size])
    except KeyError:
        raise KeyError(f"no config {family!r}/{size!r}; have "
                       f"{ {f: list(s) for f, s in CONFIGS.items()} }") from None


# --------------------------------------------------------------------------------------------
# DyT transformer (Dynamic Tanh, Zhu et al. 2025): norm-free pre-norm decoder.
# --------------------------------------------------------------------------------------------

class DyTConfig:
    def __init__(self, vocab_size=256, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                 alpha_init=0.5, tie_word_embeddings=False):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.alpha_init = alpha_init
        self.tie_word_embeddings = tie_word_embeddings
        self.model_type = "dyt"

    def to_dict(self):
        return dict(self.__dict__)


class DyT(nn.Module):
    """y = weight * tanh(alpha * x) + bias   (alpha: learnable scalar)."""

    def __init__(self, dim: int, alpha_init: float = 0.5):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return self.weight * torch.tanh(self.alpha * x) + self.bias


class DyTBlock(nn.Module):
    def __init__(self, cfg: DyTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.head_dim = h // self.n_heads
        self.attn_norm = DyT(h, cfg.alpha_init)
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.mlp_norm = DyT(h, cfg.alpha_init)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)

    def forward(self, x, attn_bias=None):
        b, t, h = x.shape
        a = self.attn_norm(x)
        q = self.q_proj(a).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(a).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(a).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        if attn_bias is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        x = x + self.o_proj(o.transpose(1, 2).reshape(b, t, h))
        m = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))


class DyTForCausalLM(nn.Module):
    """Pre-norm decoder where every norm is DyT; learned absolute positions; SwiGLU MLP.

    forward(input_ids, attention_mask=None) -> logits [B, T, V]
    """

    def __init__(self, cfg: DyTConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(DyTBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = DyT(cfg.hidden_size, cfg.alpha_init)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=0.02)

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        pos = torch.arange(t, device=input_ids.device)
        x = self.embed_tokens(input_ids) + self.embed_positions(pos)[None]
        attn_bias = None
        if attention_mask is not None:
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            keep = causal[None, None] & attention_mask[:, None, None, :].bool()
            attn_bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
            attn_bias = attn_bias.masked_fill(~keep, torch.finfo(x.dtype).min)
        for layer in self.layers:
            x = layer(x, attn_bias)
        return self.lm_head(self.norm(x))


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------

def _is_norm_module(name: str, mod: nn.Module) -> bool:
    cls = type(mod).__name__
    return (isinstance(mod, (nn.LayerNorm, nn.RMSNorm, DyT)) or "Norm" in cls
            or cls.endswith("LayerNorm"))


@torch.no_grad()
def perturb_norms(model: nn.Module, seed: int = 0, scale: float = 0.1) -> list[str]:
    """Add scale*randn to every norm weight and bias (and DyT alpha a little). Returns names."""
    g = torch.Generator().manual_seed(seed + 12345)
    touched = []
    for name, mod in model.named_modules():
        if not _is_norm_module(name, mod):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if pname == "alpha":
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
            else:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
            touched.append(f"{name}.{pname}" if name else pname)
    return touched


@torch.no_grad()
def perturb_zero_biases(model: nn.Module, seed: int = 0, scale: float = 0.02) -> list[str]:
    """Give all-zero linear biases (GPT-2 Conv1D, BERT Linear init) small random values, as in
    trained models; the dynamo exporter would otherwise drop them (Gemm without C)."""
    g = torch.Generator().manual_seed(seed + 54321)
    touched = []
    for name, mod in model.named_modules():
        if _is_norm_module(name, mod):
            continue
        b = getattr(mod, "bias", None)
        if isinstance(b, nn.Parameter) and b.ndim == 1 and not b.any():
            b.add_(scale * torch.randn(b.shape, generator=g, dtype=torch.float32).to(b.dtype))
            touched.append(f"{name}.bias")
    return touched


def make_config(family: str, size: str = "tiny", **overrides):
    kw = config_dict(family, size)
    kw.update(overrides)
    if family == "dyt":
        return DyTConfig(**kw)
    import transformers
    _, cfg_cls = HF_CLASSES[family]
    cfg_cls = getattr(transformers, cfg_cls)
    rope_theta = kw.pop("rope_theta", None)
    cfg = cfg_cls(**kw)
    if rope_theta is not None:
        rp = dict(getattr(cfg, "rope_parameters", None) or {})
        rp.update(rope_theta=rope_theta, rope_type=rp.get("rope_type", "default"))
        cfg.rope_parameters = rp
    return cfg


def build(family: str, size: str = "tiny", seed: int = 0, *, perturb: bool = True,
          attn_implementation: str = "sdpa", **overrides) -> nn.Module:
    """Build a seeded random-init torch model (fp32, eval mode) of ``family``/``size``.

    ``overrides`` are passed to the config class. The returned model has ``.config``; for HF
    families it's a transformers PreTrainedModel (BERT: BertModel, others: *ForCausalLM).
    """
    cfg = make_config(family, size, **overrides)
    torch.manual_seed(seed)
    if family == "dyt":
        model = DyTForCausalLM(cfg)
    else:
        import transformers
        model_cls = getattr(transformers, HF_CLASSES[family][0])
        cfg._attn_implementation = attn_implementation
        model = model_cls(cfg)
    if perturb:
        perturb_norms(model, seed)
        perturb_zero_biases(model, seed)
    return model.float().eval()


def num_heads_hidden(model: nn.Module) -> tuple[int, int]:
    """(num_attention_heads, hidden_size) for ort_optimize."""
    c = model.config
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    hidden = getattr(c, "hidden_size", None) or c.n_embd
    return int(heads), int(hidden)


def describe() -> str:
    lines = []
    for fam, s in CONFIGS.items():
        lines.append(f"{fam}: {', '.join(s)}")
    return "\n".join(lines)


__all__ = ["CONFIGS", "FAMILIES", "HF_CLASSES", "ENCODERS", "build", "make_config",
           "perturb_norms", "perturb_zero_biases", "config_dict", "sizes", "num_heads_hidden", "DyT",
           "DyTConfig", "DyTForCausalLM", "describe"]

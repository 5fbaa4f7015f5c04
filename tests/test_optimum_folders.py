"""optimum folders (rewriter/folders.py): `python -m rewriter DIR -o OUT_DIR` on a folder laid out
as `optimum-cli export onnx` writes it — a Hugging Face config.json beside model.onnx (+
model.onnx_data), the tokenizer's files and generation_config.json — recognized by structure.

A tiny random Llama exported with optimum's text-generation-with-past interface
(models/kv_export.py), no optimum needed; the real round trip through optimum itself is
tests/test_optimum_roundtrip.py (slow, .venv-optimum).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest

from models_cache import zoo_model
from rewriter.cli import main
from rewriter.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_USAGE
from rewriter.folders import folder_models, optimum_models

pytest.importorskip("transformers")

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
          "num_hidden_layers": 2, "tie_word_embeddings": False}
OTHERS = {"config.json": json.dumps(CONFIG), "generation_config.json": '{"bos_token_id": 1}',
          "tokenizer.json": '{"model": {"type": "BPE"}}', "tokenizer_config.json": "{}",
          "special_tokens_map.json": "{}", "chat_template.jinja": "{{ messages }}"}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """The tiny Llama with a KV cache, exported once (inline weights)."""
    from models.kv_export import export_optimum_style
    path = tmp_path_factory.mktemp("optimum-export") / "model.onnx"
    export_optimum_style(zoo_model("llama"), str(path))
    return path


def optimum_folder(root: Path, export: Path, models=("model.onnx",), data: str | None = "model.onnx_data") -> Path:
    """An optimum-like folder: each of `models` the export (its weights in `<data>` or
    `<model>_data`, optimum's naming, or inline when `data` is None), and OTHERS."""
    folder = root / "export"
    folder.mkdir()
    for name in models:
        proto = onnx.load(str(export))
        location = None if data is None else data if len(models) == 1 else f"{name}_data"
        onnx.save_model(proto, str(folder / name), save_as_external_data=location is not None,
                        all_tensors_to_one_file=True, location=location, size_threshold=0)
    for name, text in OTHERS.items():
        (folder / name).write_text(text)
    return folder


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rewritten(src: Path, out: Path, *extra: str) -> dict:
    report = out.with_name(out.name + ".report.json")
    assert main([str(src), "-o", str(out), "--report", str(report), "--quiet", *extra]) == EXIT_OK
    return json.loads(report.read_text())


def test_recognized_by_structure(tmp_path, export):
    folder = optimum_folder(tmp_path, export)
    assert optimum_models(folder) == folder_models(folder) == [folder / "model.onnx"]
    (folder / "model.onnx").rename(folder / "decoder_model_merged.onnx")       # any name: what it is counts
    assert optimum_models(folder) == [folder / "decoder_model_merged.onnx"]


@pytest.mark.parametrize("config", ['{"architectures": ["LlamaForCausalLM"]}', "[1, 2]", "not json"])
def test_config_without_a_model_type_is_not_an_optimum_folder(tmp_path, export, config):
    folder = optimum_folder(tmp_path, export)
    (folder / "config.json").write_text(config)
    assert optimum_models(folder) == []
    assert main([str(folder), "-o", str(tmp_path / "out"), "--quiet"]) == EXIT_BAD_INPUT
    assert not (tmp_path / "out").exists()


def test_config_without_models_is_bad_input(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(CONFIG))
    assert main([str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "--quiet"]) == EXIT_BAD_INPUT
    assert "neither an onnxruntime-genai folder" in capsys.readouterr().err


def test_folder_rewritten_others_copied_byte_identical(tmp_path, export):
    """The decoder rewritten (every norm; the KV-cache verify runs prefill and decode steps), its
    weights in a file of the same name, every other file copied as it was, the input untouched."""
    src = optimum_folder(tmp_path, export)
    before = digests(src)
    out = tmp_path / "flash"
    report = rewritten(src, out, "--verify")
    assert report["found"] == report["rewritten"] == 5        # 2 layers × 2 norms + the final norm
    assert digests(src) == before
    after = digests(out)
    assert sorted(after) == sorted(before)                      # model.onnx_data kept its name
    assert {name: after[name] for name in OTHERS} == {name: before[name] for name in OTHERS}
    assert after["model.onnx_data"] != before["model.onnx_data"]                # gains folded
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"} \
        == {"model.onnx_data"}
    assert main(["verify", str(src / "model.onnx"), str(out / "model.onnx"), "--batch", "2"]) == EXIT_OK


def test_inline_export_stays_inline(tmp_path, export):
    """optimum writes weights inline under 2 GiB (SmolLM2's export): so does the rewrite."""
    src = optimum_folder(tmp_path, export, data=None)
    out = tmp_path / "flash"
    rewritten(src, out)
    assert sorted(digests(out)) == sorted(digests(src)) == sorted([*OTHERS, "model.onnx"])


@pytest.mark.parametrize("extra", [("--rotate",), ("--mode", "fold")])
def test_rotate_and_fold_on_the_folder(tmp_path, export, extra):
    src = optimum_folder(tmp_path, export)
    out = tmp_path / "out"
    report = rewritten(src, out, *extra)
    assert report["rewritten"] == 5 and report["mode"] == "fold"
    assert (report["rotation"] or {}).get("applied", False) == (extra == ("--rotate",))
    assert main(["verify", str(src / "model.onnx"), str(out / "model.onnx")]) == EXIT_OK


def test_every_model_of_an_older_layout_rewritten(tmp_path, export):
    """decoder_model.onnx + decoder_with_past_model.onnx (optimum's older layout): both
    rewritten, one report holding both models' sites; one --external-data name for both is a
    usage error."""
    names = ("decoder_model.onnx", "decoder_with_past_model.onnx")
    src = optimum_folder(tmp_path, export, models=names)
    out = tmp_path / "flash"
    report = rewritten(src, out)
    assert report["found"] == report["rewritten"] == 10
    assert sorted(digests(out)) == sorted(digests(src))
    for name in names:
        assert main(["verify", str(src / name), str(out / name)]) == EXIT_OK
    assert main([str(src), "-o", str(tmp_path / "o2"), "--external-data", "w.data", "--quiet"]) == EXIT_USAGE


def test_output_folder_has_the_input_folders_mode(tmp_path, export):
    src = optimum_folder(tmp_path, export)
    src.chmod(0o750)
    rewritten(src, tmp_path / "flash")
    assert (tmp_path / "flash").stat().st_mode & 0o777 == 0o750


def test_models_sharing_one_data_file_each_get_their_own(tmp_path, export):
    """Two models reading one model.onnx_data: each rewrite writes its own weights (the
    default name beside it), neither over the other's."""
    import shutil
    src = optimum_folder(tmp_path, export)
    shutil.copy(src / "model.onnx", src / "decoder_with_past_model.onnx")
    out = tmp_path / "flash"
    report = rewritten(src, out)
    assert report["rewritten"] == 10
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*OTHERS, "model.onnx", "model.onnx.data", "decoder_with_past_model.onnx", "decoder_with_past_model.onnx.data"])
    for name in ("model.onnx", "decoder_with_past_model.onnx"):
        assert main(["verify", str(src / name), str(out / name)]) == EXIT_OK


def test_hugging_face_cache_symlinks_keep_the_data_name(tmp_path, export):
    """snapshots/*/ → blobs/ (the Hugging Face cache): the data file keeps the name the model
    gives it, not its blob's."""
    real = optimum_folder(tmp_path, export)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for path in real.iterdir():
        (snapshot / path.name).symlink_to(path.rename(tmp_path / f"blob-{path.name}"))
    out = tmp_path / "flash"
    rewritten(snapshot, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in snapshot.iterdir())
    assert not any(p.is_symlink() for p in out.iterdir())

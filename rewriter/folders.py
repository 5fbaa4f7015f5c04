"""Model folders: `python -m rewriter DIR -o OUT_DIR` on an onnxruntime-genai folder.

A folder holding genai_config.json is rewritten as a whole: the decoder its config names
(model.decoder.filename) is rewritten, every other file (genai_config.json, the tokenizer's,
other components' models and their weights) is copied, so that OUT_DIR runs as it is. The
decoder's own external data is not copied: the rewrite writes its own.

An optimum folder (`optimum-cli export onnx`, read by ORTModelForCausalLM and its kin) is
recognized by its structure: a Hugging Face config.json (a JSON object naming its model_type)
beside the ONNX models it holds. Every ONNX model in it is rewritten (one model.onnx today;
decoder_model.onnx + decoder_with_past_model.onnx + decoder_model_merged.onnx in older
layouts), each keeping its external data file's name (optimum's model.onnx_data), and every
other file is copied.

Atomic like a single model (rewriter/files.py): everything is written into a temporary folder
beside OUT_DIR (named so that a later run removes it if this one is killed), rewritten,
checked and verified there, then renamed into place. On any failure nothing is left. An
existing OUT_DIR that is not empty is refused unless `overwrite`; it is then replaced (moved
aside under a name no cleanup removes, until the new folder is in place).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from rewriter.api import rewrite_file
from rewriter.errors import BadInput, OutputError, UsageError
from rewriter.files import (check_external_name, data_files_of, mentions_external_data, proto_tensors,
                            remove_stale_temporaries, temp_prefix)
from rewriter.report import Report

GENAI_CONFIG = "genai_config.json"
HF_CONFIG = "config.json"


def decoder_file(folder: Path) -> Path:
    """The decoder model genai_config.json names (model.decoder.filename)."""
    config = folder / GENAI_CONFIG
    try:
        name = json.loads(config.read_text(encoding="utf-8"))["model"]["decoder"]["filename"]
    except FileNotFoundError as exc:
        raise BadInput(f"{folder}: a directory without {GENAI_CONFIG} (give a model file, or an "
                       "onnxruntime-genai folder)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{config}: no model.decoder.filename in it ({type(exc).__name__}: {exc})") from exc
    path = folder / str(name)
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file():
        raise BadInput(f"{config}: model.decoder.filename {name!r} is not a file in {folder}")
    return path


def optimum_models(folder: Path) -> list[Path]:
    """The ONNX models of an optimum folder, recognized by structure: config.json is a Hugging
    Face model config (a JSON object with a model_type) and the folder holds *.onnx files
    (searched below it too, as optimum's loaders do). Empty when it is not such a folder."""
    try:
        config = json.loads((folder / HF_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        return []
    return sorted(p for p in folder.rglob("*.onnx") if p.is_file())


def folder_models(folder: Path) -> list[Path]:
    """The models a folder's rewrite rewrites: the decoder genai_config.json names, else an
    optimum folder's ONNX models; a folder that is neither is bad input."""
    if (folder / GENAI_CONFIG).exists():
        return [decoder_file(folder)]
    models = optimum_models(folder)
    if models:
        return models
    raise BadInput(f"{folder}: a directory that is neither an onnxruntime-genai folder ({GENAI_CONFIG}) nor an "
                   f"optimum folder ({HF_CONFIG} with a model_type, beside *.onnx models); give a model file")


def rewrite_folder(src, dst, *, overwrite: bool = False, keep_failed: bool = False, **settings) -> Report:
    """Rewrite the onnxruntime-genai or optimum folder `src` into the folder `dst` (atomic; `src`
    is never modified). `settings` are rewrite_file's (options, verify, external_data, progress,
    ...). Returns the decoder's report (several models': one report, their sites together)."""
    src, dst = Path(src), Path(dst)
    models = folder_models(src)
    if keep_failed:
        raise UsageError("--keep-failed is for a single model: on a folder nothing is written when "
                         "--verify fails (rewrite the decoder file itself to keep it)")
    data_name = settings.get("external_data")
    if data_name is not None and len(models) > 1:
        raise UsageError(f"--external-data names one file: {src} holds {len(models)} models "
                         f"({', '.join(str(m.relative_to(src)) for m in models)})")
    _check_destination(src, dst, overwrite)
    files = [p for p in src.rglob("*") if p.is_file()]      # the folder walked once
    copies = _files_to_copy(files, models)
    held = {path.relative_to(src) for path in copies} | {model.relative_to(src) for model in models}
    for model in models:
        _check_data_name(data_name, model.relative_to(src), held)
    also_writes = settings.pop("also_writes", None) or {}
    optimum = not (src / GENAI_CONFIG).exists()
    kept = {model: _kept_data_name(model, optimum) for model in models}
    shared = {name for name in kept.values() if list(kept.values()).count(name) > 1}    # one file, several models
    names = {model: data_name or (None if kept[model] in shared else kept[model]) for model in models}
    data = {model.relative_to(src).with_name(str(names[model] or f"{model.name}.data")) for model in models}
    _check_also_written(also_writes, files, src, dst, held | data)
    reports = []
    with _staged(src, dst, copies) as tmp:
        # a file written later inside OUT_DIR is checked where it lies now, in the temporary
        # folder: io.save then refuses it on the decoder's own output files (its data name)
        inside = {what: _moved(Path(path), dst, tmp) for what, path in also_writes.items()}
        for model in models:
            target = tmp / model.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                reports.append(rewrite_file(model, target, also_writes=inside,
                                            **{**settings, "external_data": names[model]}))
            except OutputError as exc:      # say where the file will be, not where it is made
                raise OutputError(str(exc).replace(str(tmp), str(dst))) from exc
    return reports[0] if len(reports) == 1 else _together(reports, [m.relative_to(src) for m in models])


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Before anything is written: OUT_DIR is a new name or a folder (empty, or replaced with
    `overwrite`), neither inside the input folder nor holding it."""
    if not dst.parent.is_dir():
        raise OutputError(f"{dst.parent}: output directory does not exist")
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise OutputError(f"{dst}: exists and is not a folder; refusing to replace it")
    here, there = src.resolve(), dst.resolve()
    if there == here or here in there.parents or there in here.parents:
        raise OutputError(f"{dst}: is, holds or lies inside the input folder {src}; write the "
                          "rewritten folder elsewhere")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise OutputError(f"{dst}: folder exists and is not empty (pass --overwrite to replace it)")


def _files_to_copy(files: list[Path], models: list[Path]) -> list[Path]:
    """Every file of the folder (`files`) but the rewritten models and the data files only they
    use (each rewrite writes its own)."""
    others = [p for p in files if p not in models]
    shared = set().union(*(data_files_of(p) for p in others if p.suffix.lower() == ".onnx"))
    own = set().union(*(data_files_of(model) for model in models)) - shared
    return [p for p in others if str(p.resolve()) not in own]


def _kept_data_name(model: Path, optimum: bool) -> str | None:
    """An optimum model's weights keep their file's name (optimum's loaders fetch
    `model.onnx_data` by that name): the one data file beside it that it names (as written in
    the model: a Hugging Face cache's symlink resolves to a blob's hash); None (the rewrite's
    default) otherwise."""
    if not optimum or not mentions_external_data(model):
        return None
    try:
        proto = onnx.load(str(model), format="protobuf", load_external_data=False)
    except Exception:       # not a model: rewrite_file says so, with its exit code
        return None
    locations = {entry.value for tensor in proto_tensors(proto.graph)
                 if tensor.data_location == onnx.TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    if len(locations) != 1:
        return None
    name = locations.pop()
    return name if Path(name).name == name and name != model.name else None


def _together(reports: list[Report], models: list[Path]) -> Report:
    """One report for a folder of several models: their sites in model order, each note and the
    rotation under its model's name."""
    together = Report(reports[0].mode)
    for report, model in zip(reports, models):
        together.sites += report.sites
        together.notes += [f"{model}: {note}" for note in report.notes]
        if report.rotation is not None:
            together.rotation = {**(together.rotation or {}), str(model): report.rotation}
    return together


def _check_data_name(name, decoder: Path, held: set[Path]) -> None:
    """--external-data names a file beside the decoder in OUT_DIR: never one the folder holds
    (its config, tokenizer, another component). The decoder's own data files are not copied,
    so their names are free."""
    if name is None:
        return
    check_external_name(str(name), decoder)
    if decoder.parent / str(name) in held:
        raise OutputError(f"--external-data {name!r}: the output folder holds {decoder.parent / str(name)} "
                          "(copied from the input folder); refusing to write the decoder's weights over it "
                          "(choose another name)")


def _check_also_written(also_writes: dict, files: list[Path], src: Path, dst: Path, held: set[Path]) -> None:
    """Files the caller writes afterwards (the report) are none of the input folder's files
    (`files`) and none the output folder will hold (`held`: relative paths, the decoder's data
    file's too; io.save checks once more on the data name it chooses)."""
    # by the path inside the folder and by what it resolves to (a symlink into a blob store)
    inputs = {str(p.resolve()) for p in files} | {str(src.resolve() / p.relative_to(src)) for p in files}
    outputs = {str(dst.resolve() / rel) for rel in held}
    for what, path in also_writes.items():
        key = str(Path(path).resolve())
        if key in inputs:
            raise OutputError(f"{what} {path}: is a file of the input folder {src}; refusing to write over it")
        if key in outputs or key == str(dst.resolve()):
            raise OutputError(f"{what} {path}: is a file the output folder {dst} holds; refusing to write over it")


def _moved(path: Path, dst: Path, tmp: Path) -> Path:
    """`path` inside `tmp` if it lies inside `dst`, else itself."""
    try:
        return tmp / path.resolve().relative_to(dst.resolve())
    except ValueError:
        return path


def _copy(copies: list[Path], src: Path, tmp: Path) -> None:
    """Copy `copies` from `src` into `tmp` (symlinks are copied as the files they point to:
    the Hugging Face cache's snapshots/ → blobs/)."""
    for path in copies:
        target = tmp / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


@contextlib.contextmanager
def _staged(src: Path, dst: Path, copies: list[Path]):
    """The temporary folder beside `dst` that a folder is written in: made (a later run removes
    it if this one is killed) with `src`'s mode, `copies` copied into it; yielded for the
    models to be written, then renamed into place — or removed on any failure."""
    remove_stale_temporaries(dst.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), suffix=".tmp", dir=dst.parent))
    except OSError as exc:
        raise OutputError(f"{dst.parent}: cannot write ({exc.strerror or exc})") from exc
    try:
        shutil.copymode(src, tmp)       # the folder readable as the input was (mkdtemp makes it 0700)
        _copy(copies, src, tmp)
        yield tmp
        _commit(tmp, dst)
    except OSError as exc:
        raise OutputError(f"{dst}: cannot write ({exc.strerror or exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: Path, dst: Path) -> None:
    """Rename the finished folder into place. A folder already there is moved aside first
    (under a name no stale-temporary cleanup removes) and put back if the rename fails."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    aside = dst.with_name(f".{dst.name}.replaced-{os.getpid()}")
    os.rename(dst, aside)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(aside, dst)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_folder(src, dst, write_decoder, *, overwrite: bool = False):
    """The onnxruntime-genai folder `src` written to `dst` as rewrite_folder writes it (atomic,
    the same refusals), its decoder made by `write_decoder(decoder, target)` (the quantize verb:
    rewriter/quantize.py) instead of rewritten; every other file is copied but the data files
    only the decoder uses. Returns what write_decoder returns."""
    src, dst = Path(src), Path(dst)
    decoder = decoder_file(src)
    _check_destination(src, dst, overwrite)
    copies = _files_to_copy([p for p in src.rglob("*") if p.is_file()], [decoder])
    with _staged(src, dst, copies) as tmp:
        target = tmp / decoder.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        return write_decoder(decoder, target)

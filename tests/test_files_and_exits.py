"""Issue 10, files and exit codes: nothing is lost, ever, and every refusal is one line with its
documented exit code.

- `--report`, `-o` and the external-data file never land on a file the input or the output
  uses, nor on anything that is not a regular file or a new name (a device, a FIFO, a
  directory, a symlink);
- `--overwrite` never modifies a data file another model in the folder references;
- temporaries carry the owner's PID, and stale ones of dead runs are removed;
- `--verify` runs on the temporary model, before anything is renamed into place;
- input problems are exit 3 at load, a rewrite that fails its own checks exit 7, a model
  onnxruntime cannot run exit 8; bad option values are usage errors (2)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import rewriter.io as rio
from parity import assert_exact
from rewriter.cli import main
from rewriter.costs import FORMAT
from rewriter.errors import (EXIT_BAD_INPUT, EXIT_CANNOT_RUN, EXIT_INTERNAL, EXIT_OK, EXIT_OUTPUT,
                             EXIT_USAGE, EXIT_VERIFY_FAILED)
from rewriter.verify import judge, run
from test_api_cli import llama_like_block
from test_faults import assert_error, cli, digests, save_external


def feeds():
    return {"x": np.random.default_rng(5).standard_normal((2, 5, 16)).astype(np.float32)}


def expected():
    return run(llama_like_block().SerializeToString(), feeds(), provider="cpu")


def locations(path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


def assert_runs_like_the_original(path) -> None:
    assert_exact(judge(expected(), run(path, feeds(), provider="cpu")))


def external_input(src: Path) -> Path:
    save_external(llama_like_block(), src / "model.onnx")
    return src / "model.onnx"


# -- 1. --report never lands on a file the input or the output uses -------------------------------

REPORT_ON = {
    "input_model": lambda src, out: src / "model.onnx",
    "input_data": lambda src, out: src / "model.onnx.data",
    "output_model": lambda src, out: out / "flash.onnx",
    "output_data": lambda src, out: out / "flash.onnx.data",
}


@pytest.mark.parametrize("target", list(REPORT_ON))
def test_report_on_a_file_the_input_or_output_uses_is_refused(target, dirs):
    src, out = dirs
    path = external_input(src)
    before = digests(src)
    code, _, err = cli(path, "-o", out / "flash.onnx", "--report", REPORT_ON[target](src, out))
    assert_error(code, err, EXIT_OUTPUT, "report")
    assert digests(src) == before and list(out.iterdir()) == []


def test_report_on_a_chosen_external_data_name_is_refused(dirs):
    src, out = dirs
    path = external_input(src)
    (out / "w.bin").write_bytes(b"keep me")
    code, _, err = cli(path, "-o", out / "flash.onnx", "--external-data", "w.bin", "--report", out / "w.bin")
    assert_error(code, err, EXIT_OUTPUT, "report")
    assert (out / "w.bin").read_bytes() == b"keep me" and sorted(p.name for p in out.iterdir()) == ["w.bin"]


# -- 2. only regular files or new names are replaced ----------------------------------------------

def _fifo(folder: Path, name: str) -> Path:
    os.mkfifo(folder / name)
    return folder / name


def _symlink(folder: Path, name: str) -> Path:
    (folder / "target.bin").write_bytes(b"the symlink's target")
    (folder / name).symlink_to("target.bin")
    return folder / name


def _directory(folder: Path, name: str) -> Path:
    (folder / name).mkdir()
    return folder / name


SPECIAL = {"fifo": _fifo, "symlink": _symlink, "directory": _directory}


def _state(folder: Path) -> dict:
    """What every entry of `folder` is, and a regular file's bytes (a symlink is not followed)."""
    state = {}
    for p in sorted(folder.iterdir()):
        mode = os.lstat(p).st_mode
        state[p.name] = (stat.S_IFMT(mode), p.read_bytes() if stat.S_ISREG(mode) else None)
    return state


@pytest.mark.parametrize("kind", list(SPECIAL))
@pytest.mark.parametrize("role", ["output", "report", "external_data"])
def test_special_targets_are_refused_and_kept(kind, role, dirs):
    src, out = dirs
    path = external_input(src)
    name = {"output": "flash.onnx", "report": "r.json", "external_data": "w.bin"}[role]
    target = SPECIAL[kind](out, name)
    args = {"output": ["-o", target],
            "report": ["-o", out / "flash.onnx", "--report", target],
            "external_data": ["-o", out / "flash.onnx", "--external-data", name]}[role]
    before, before_in = _state(out), digests(src)
    code, _, err = cli(path, *args)
    message = "symbolic link" if kind == "symlink" else "directory" if kind == "directory" else "FIFO"
    assert_error(code, err, EXIT_OUTPUT, message)
    assert _state(out) == before and digests(src) == before_in
    if kind == "symlink":
        assert str(os.path.realpath(target)) in err          # says what to pass instead


def test_a_symlinks_target_named_explicitly_is_written(dirs):
    src, out = dirs
    path = external_input(src)
    link = _symlink(out, "flash.onnx")
    code, _, err = cli(path, "-o", os.path.realpath(link), "--quiet")
    assert code == EXIT_OK, err
    assert link.is_symlink() and os.readlink(link) == "target.bin"
    assert_runs_like_the_original(link)


def _character_device(folder: Path, monkeypatch) -> Path:
    """A character device with /dev/null's numbers, in tmp (replacing it would harm nothing);
    where mknod is not allowed, lstat is made to report one."""
    node = folder / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        return node
    except (PermissionError, OSError):
        pass
    node.write_bytes(b"")
    real = os.lstat

    def lstat(p, *args, **kwargs):
        st = real(p, *args, **kwargs)
        if os.fspath(p) == os.fspath(node):
            fields = list(st)
            fields[0] = stat.S_IFCHR | 0o666
            return os.stat_result(fields)
        return st
    monkeypatch.setattr(rio.os, "lstat", lstat)
    return node


def test_a_character_device_is_refused_before_anything_is_written(dirs, monkeypatch):
    src, out = dirs
    path = external_input(src)
    node = _character_device(out, monkeypatch)
    for args in (["-o", node], ["-o", out / "flash.onnx", "--report", node]):
        code, _, err = cli(path, *args)
        assert_error(code, err, EXIT_OUTPUT, "character device")
        assert stat.S_ISCHR(os.lstat(node).st_mode)
        assert sorted(p.name for p in out.iterdir()) == ["null"]


def test_dev_null_is_never_replaced(dirs, monkeypatch):
    """Refused before anything is written; a guard makes sure a regression cannot replace the
    real /dev/null while this test runs (the tests run as root)."""
    src, _ = dirs
    path = external_input(src)
    real = os.replace

    def guarded(a, b, *args, **kwargs):
        if os.path.realpath(b) == "/dev/null":
            raise AssertionError("the rewriter tried to replace /dev/null")
        return real(a, b, *args, **kwargs)
    monkeypatch.setattr(rio.os, "replace", guarded)
    code, _, err = cli(path, "-o", "/dev/null")
    assert_error(code, err, EXIT_OUTPUT, "character device")
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


# -- 3. --overwrite never modifies a data file another model uses ---------------------------------

def test_overwrite_keeps_a_data_file_a_sibling_model_references(dirs):
    src, _ = dirs
    path = external_input(src)
    shutil.copyfile(path, src / "sibling.onnx")          # references model.onnx.data too
    data_before = digests(src)["model.onnx.data"]
    code, _, err = cli(path, "-o", path, "--overwrite", "--quiet")
    assert code == EXIT_OK, err
    assert digests(src)["model.onnx.data"] == data_before
    assert_runs_like_the_original(src / "sibling.onnx")
    assert_runs_like_the_original(path)
    (new_data,) = locations(path)
    assert new_data != "model.onnx.data" and (src / new_data).is_file()


def test_explicit_external_data_name_a_sibling_uses_is_refused(dirs):
    src, out = dirs
    path = external_input(src)
    shutil.copyfile(path, src / "sibling.onnx")
    before = digests(src)
    code, _, err = cli(path, "-o", path, "--overwrite", "--external-data", "model.onnx.data")
    assert_error(code, err, EXIT_OUTPUT, "sibling.onnx")
    assert digests(src) == before


def test_default_data_name_moves_off_a_file_another_model_uses(dirs):
    src, out = dirs
    path = external_input(src)
    save_external(llama_like_block(), out / "other.onnx", location="flash.onnx.data")
    before = digests(out)
    code, _, err = cli(path, "-o", out / "flash.onnx", "--quiet")
    assert code == EXIT_OK, err
    assert {k: v for k, v in digests(out).items() if k in before} == before
    assert_runs_like_the_original(out / "other.onnx")
    assert_runs_like_the_original(out / "flash.onnx")
    assert locations(out / "flash.onnx") != {"flash.onnx.data"}


def test_output_on_a_file_another_model_uses_is_refused(dirs):
    src, out = dirs
    path = external_input(src)
    save_external(llama_like_block(), out / "other.onnx", location="w.bin")
    before = digests(out)
    code, _, err = cli(path, "-o", out / "w.bin")
    assert_error(code, err, EXIT_OUTPUT, "other.onnx")
    assert digests(out) == before


def test_hard_linked_data_is_read_and_overwrite_leaves_the_other_link(dirs):
    src, _ = dirs
    path = external_input(src)
    os.link(src / "model.onnx.data", src / "other.bin")       # the same inode under another name
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "other.bin"
    onnx.save(proto, str(src / "other.onnx"))
    other_before = digests(src)["other.bin"]
    code, _, err = cli(path, "-o", path, "--overwrite", "--quiet", "--verify")
    assert code == EXIT_OK, err
    assert digests(src)["other.bin"] == other_before
    assert_runs_like_the_original(src / "other.onnx")
    assert_runs_like_the_original(path)


# -- 4. temporaries name their owner; stale ones are removed --------------------------------------

def _dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_stale_temporaries_of_dead_runs_are_removed_live_ones_kept(dirs, monkeypatch):
    src, out = dirs
    path = external_input(src)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = out / f"{rio.temp_prefix(_dead_pid())}abc123.tmp"
        live = out / f"{rio.temp_prefix(sleeper.pid)}xyz789.tmp"
        foreign = out / ".flash.onnx.q1w2e3.tmp"              # not ours: never touched
        for folder in (stale, live, foreign):
            folder.mkdir()
            (folder / "flash.onnx.data").write_bytes(b"x" * 1000)
        seen = []
        real = rio.ir.save

        def save(model, target, *args, **kwargs):
            seen.append(Path(target).parent.name)
            return real(model, target, *args, **kwargs)
        monkeypatch.setattr(rio.ir, "save", save)
        code, _, err = cli(path, "-o", out / "flash.onnx", "--quiet")
        assert code == EXIT_OK, err
        assert not stale.exists() and live.is_dir() and foreign.is_dir()
        assert seen and seen[0].startswith(rio.temp_prefix(os.getpid())) and seen[0].endswith(".tmp")
    finally:
        sleeper.kill()
        sleeper.wait()


# -- 5. --verify runs before the rename -----------------------------------------------------------

@pytest.fixture
def wrong_rewrite(monkeypatch):
    """Every rewrite comes out wrong (a weight changed after the rewrite): verification fails."""
    import rewriter.api as api
    real = api.rewrite_ir

    def broken(model, options):
        report = real(model, options)
        value = next(v for v in model.graph.initializers.values() if v.name.startswith("W"))
        value.const_value = onnx_ir_tensor(value.const_value.numpy() * 1.5, value.name)
        return report
    monkeypatch.setattr(api, "rewrite_ir", broken)


def onnx_ir_tensor(array, name):
    import onnx_ir as ir
    return ir.tensor(np.ascontiguousarray(array), name=name)


@pytest.mark.parametrize("external", [False, True])
def test_failed_verify_writes_nothing(external, dirs, wrong_rewrite):
    src, out = dirs
    path = external_input(src) if external else src / "model.onnx"
    if not external:
        onnx.save(llama_like_block(), path)
    before = digests(src)
    code, stdout, err = cli(path, "-o", out / "flash.onnx", "--verify", "--report", out / "r.json")
    assert_error(code, err, EXIT_VERIFY_FAILED, "verification failed")
    assert "NO" in stdout
    assert list(out.iterdir()) == [] and digests(src) == before


def test_failed_verify_keeps_what_was_there(dirs, wrong_rewrite):
    src, out = dirs
    path = external_input(src)
    (out / "flash.onnx").write_bytes(b"old model")
    (out / "flash.onnx.data").write_bytes(b"old data")
    before = digests(out)
    code, _, err = cli(path, "-o", out / "flash.onnx", "--verify", "--quiet")
    assert_error(code, err, EXIT_VERIFY_FAILED, "verification failed")
    assert digests(out) == before


def test_failed_verify_overwrite_leaves_the_input(dirs, wrong_rewrite):
    src, _ = dirs
    path = external_input(src)
    before = digests(src)
    code, _, err = cli(path, "-o", path, "--overwrite", "--verify", "--quiet")
    assert_error(code, err, EXIT_VERIFY_FAILED, "verification failed")
    assert digests(src) == before


def test_keep_failed_writes_under_a_failed_name(dirs, wrong_rewrite):
    src, out = dirs
    path = external_input(src)
    code, _, err = cli(path, "-o", out / "flash.onnx", "--verify", "--keep-failed", "--quiet")
    assert_error(code, err, EXIT_VERIFY_FAILED, "flash.failed.onnx")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["flash.failed.onnx", "flash.failed.onnx.data"]
    assert locations(out / "flash.failed.onnx") == {"flash.failed.onnx.data"}
    run(out / "flash.failed.onnx", feeds(), provider="cpu")          # a complete, loadable model


def test_keep_failed_needs_verify(dirs):
    src, out = dirs
    path = external_input(src)
    code, _, err = cli(path, "-o", out / "flash.onnx", "--keep-failed")
    assert_error(code, err, EXIT_USAGE, "--keep-failed")


def test_models_onnxruntime_cannot_run_are_exit_8(dirs, monkeypatch):
    import rewriter.verify as verify
    src, out = dirs
    path = external_input(src)

    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model failed")
    monkeypatch.setattr(verify, "session", refuse)
    code, _, err = cli(path, "-o", out / "flash.onnx", "--verify")
    assert_error(code, err, EXIT_CANNOT_RUN, "could not run")
    assert list(out.iterdir()) == []
    code, _, err = cli("verify", path, path)
    assert_error(code, err, EXIT_CANNOT_RUN, "could not run")


# -- 6. exit codes and messages -------------------------------------------------------------------

def test_unreadable_external_data_is_exit_3_naming_the_input(dirs, monkeypatch):
    src, out = dirs
    path = external_input(src)
    data = src / "model.onnx.data"
    if os.geteuid() == 0:                  # root reads anything: make the open fail instead
        real = os.open

        def refuse(p, flags, *args, **kwargs):
            if os.fspath(p) == os.fspath(data):
                raise PermissionError(13, "Permission denied", os.fspath(p))
            return real(p, flags, *args, **kwargs)
        monkeypatch.setattr(rio.os, "open", refuse)
    else:
        data.chmod(0)
    try:
        code, _, err = cli(path, "-o", out / "flash.onnx")
    finally:
        data.chmod(0o644)
    assert_error(code, err, EXIT_BAD_INPUT, "permission denied")
    assert str(path) in err and "model.onnx.data" in err
    assert list(out.iterdir()) == []


def test_hugging_face_cache_layout_just_works(tmp_path):
    """snapshots/<rev>/ holds symlinks into ../../blobs/: the data is outside the model's folder
    only through a symlink the cache made."""
    repo = tmp_path / "models--org--name"
    build, blobs, snapshot = repo / "build", repo / "blobs", repo / "snapshots" / "0123abc"
    for folder in (build, blobs, snapshot):
        folder.mkdir(parents=True)
    save_external(llama_like_block(), build / "model.onnx")
    for name, blob in (("model.onnx", "1f2e3d"), ("model.onnx.data", "4c5b6a")):
        shutil.move(build / name, blobs / blob)
        (snapshot / name).symlink_to(f"../../blobs/{blob}")
    before = digests(blobs)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = cli(snapshot / "model.onnx", "-o", out / "flash.onnx", "--quiet", "--verify")
    assert code == EXIT_OK, err
    assert_runs_like_the_original(out / "flash.onnx")
    assert digests(blobs) == before
    code, _, err = cli(snapshot / "model.onnx", "-o", snapshot / "model.onnx", "--overwrite")
    assert_error(code, err, EXIT_OUTPUT, "symbolic link")        # the cache's blob is never replaced
    assert digests(blobs) == before


def test_only_data_read_through_a_link_skips_onnx_irs_containment_check(tmp_path):
    """onnx_ir refuses to read data whose real path leaves the model's folder or that has
    several hard links; the loader checked those locations itself, so only such tensors are
    read by their absolute path (no base_dir: onnx_ir's check off). Every other tensor keeps
    its base_dir and the check; and a model handed in memory gets its own locations back."""
    import onnx_ir as ir

    from rewriter import rewrite
    repo = tmp_path / "hub"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    save_external(llama_like_block(), snapshot / "model.onnx", location="model.onnx.data")
    shutil.move(snapshot / "model.onnx.data", blobs / "4c5b6a")
    (snapshot / "model.onnx.data").symlink_to("../../blobs/4c5b6a")
    save_external(llama_like_block(), tmp_path / "plain.onnx", location="plain.onnx.data")

    linked, _ = rio.load(snapshot / "model.onnx")
    plain, _ = rio.load(tmp_path / "plain.onnx")
    external = [v.const_value for v in linked.graph.initializers.values()
                if isinstance(v.const_value, ir.ExternalTensor)]
    assert external and all(not t.base_dir and Path(str(t.location)).is_absolute() for t in external)
    assert all(t.numpy() is not None for t in external)          # readable through the symlink
    kept = [v.const_value for v in plain.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    assert kept and all(t.base_dir and str(t.location) == "plain.onnx.data" for t in kept)

    proto = onnx.load(str(snapshot / "model.onnx"), load_external_data=False)
    out, report = rewrite(proto, base_dir=snapshot)
    assert report.rewritten > 0
    locations = {e.value for t in out.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}


def test_an_output_failing_the_checker_is_an_internal_error(dirs, monkeypatch):
    src, out = dirs
    path = external_input(src)
    real = rio.onnx.checker.check_model

    def checker(model, *args, **kwargs):
        if isinstance(model, (str, os.PathLike)):      # the written file, not the input's skeleton
            raise onnx.checker.ValidationError("simulated: the rewrite broke a node")
        return real(model, *args, **kwargs)
    monkeypatch.setattr(rio.onnx.checker, "check_model", checker)
    code, _, err = cli(path, "-o", out / "flash.onnx")
    assert_error(code, err, EXIT_INTERNAL, "a bug")
    assert list(out.iterdir()) == []


def _strict_cli(*args) -> tuple[int, str, str]:
    """The CLI with stdout/stderr that refuse what UTF-8 cannot encode, as a terminal does."""
    out, err = io.BytesIO(), io.BytesIO()
    wout = io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True)
    werr = io.TextIOWrapper(err, encoding="utf-8", errors="strict", write_through=True)
    with contextlib.redirect_stdout(wout), contextlib.redirect_stderr(werr):
        code = main([os.fspath(a) for a in args])
    return code, out.getvalue().decode("utf-8", "replace"), err.getvalue().decode("utf-8", "replace")


@pytest.mark.parametrize("external", [False, True])
def test_non_utf8_output_names_work(external, dirs):
    src, out = dirs
    path = external_input(src) if external else src / "model.onnx"
    if not external:
        onnx.save(llama_like_block(), path)
    name = os.fsdecode(b"mod\xff.onnx")
    code, stdout, err = _strict_cli(path, "-o", out / name, "--verify")
    assert code == EXIT_OK, err
    assert os.fsencode(name) in os.listdir(os.fsencode(out))
    shutil.copyfile(out / name, out / "copy.onnx")       # onnxruntime takes UTF-8 paths only
    assert_runs_like_the_original(out / "copy.onnx")
    if external:
        assert locations(out / "copy.onnx") == {"mod\ufffd.onnx.data"}    # ONNX stores UTF-8 text
    assert "wrote" in stdout
    # and an error naming such a file is still one line
    os.mkfifo(out / os.fsdecode(b"fifo\xfe.onnx"))
    code, _, err = _strict_cli(path, "-o", out / os.fsdecode(b"fifo\xfe.onnx"))
    assert_error(code, err, EXIT_OUTPUT, "FIFO")


def _probe(**changes) -> dict:
    probe = {"ep": "cuda", "device": "x", "dtype": "float16", "kind": "rms", "form": "decomposed",
             "residual": True, "d": 16, "outs": [16],
             "tokens": {"1": {"keep": {"ms": 1.0, "p10": 0.9, "p90": 1.1},
                              "fold-fused": {"ms": 0.5, "p10": 0.4, "p90": 0.6}}}}
    for key, value in changes.items():
        if value is None:
            del probe[key]
        else:
            probe[key] = value
    return probe


BAD_COSTS = {
    "string_p90": (_probe(tokens={"1": {"keep": {"ms": 1.0, "p90": "p90"},
                                        "fold-fused": {"ms": 0.5, "p90": "0.6"}}}), "p90"),
    "unknown_form": (_probe(form="fused-ish"), "form"),
    "unknown_kind": (_probe(kind="batchnorm"), "kind"),
    "missing_keys": (_probe(form=None, residual=None), "form"),
    "residual_not_bool": (_probe(residual="yes"), "residual"),
    "unknown_strategy": (_probe(tokens={"1": {"keep": {"ms": 1.0}, "fold-fusd": {"ms": 0.5}}}), "fold-fusd"),
}


@pytest.mark.parametrize("case", list(BAD_COSTS))
def test_cost_file_schema_errors_are_exit_3_naming_the_field(case, dirs):
    src, out = dirs
    onnx.save(llama_like_block(), src / "m.onnx")
    probe, field = BAD_COSTS[case]
    costs = src / "costs.json"
    costs.write_text(json.dumps({"format": FORMAT, "probes": [probe]}))
    code, _, err = cli(src / "m.onnx", "-o", out / "flash.onnx", "--target", "ort-cuda", "--costs", costs)
    assert_error(code, err, EXIT_BAD_INPUT, field)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("args,fragment", [
    (["calibrate", "--shapes", "12xab", "-o", "{out}/c.json"], "--shapes"),
    (["calibrate", "--shapes", "0x0", "-o", "{out}/c.json"], "--shapes"),
    (["calibrate", "--shapes", "x", "-o", "{out}/c.json"], "--shapes"),
    (["bench", "{model}", "--tokens", "x"], "--tokens"),
    (["bench", "{model}", "--tokens", "0"], "--tokens"),
    (["bench", "{model}", "--past", "-1"], "--past"),
    (["verify", "{model}", "{model}", "--tolerance", "-1"], "--tolerance"),
    (["verify", "{model}", "{model}", "--tolerance", "nan"], "--tolerance"),
    (["verify", "{model}", "{model}", "--tolerance", "abc"], "--tolerance"),
    (["verify", "{model}", "{model}", "--seq", "0"], "--seq"),
    (["verify", "{model}", "{model}", "--batch", "0"], "--batch"),
    (["{model}"], "-o"),
], ids=["shapes-letters", "shapes-zero", "shapes-empty", "bench-tokens-x", "bench-tokens-0",
        "bench-past-negative", "tolerance-negative", "tolerance-nan", "tolerance-text", "seq-0", "batch-0",
        "missing-output"])
def test_bad_option_values_are_one_line_usage_errors(args, fragment, dirs):
    src, out = dirs
    onnx.save(llama_like_block(), src / "m.onnx")
    code, _, err = cli(*[a.format(model=src / "m.onnx", out=out) for a in args])
    assert_error(code, err, EXIT_USAGE, fragment)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("which", ["original", "rewritten"])
def test_bench_on_a_missing_file_is_exit_3(which, dirs):
    src, _ = dirs
    onnx.save(llama_like_block(), src / "m.onnx")
    args = [src / "nope.onnx"] if which == "original" else [src / "m.onnx", src / "nope.onnx"]
    code, _, err = cli("bench", *args, "--tokens", "1")
    assert_error(code, err, EXIT_BAD_INPUT, "nope.onnx")


def test_a_closed_output_pipe_is_exit_141_without_a_traceback(dirs):
    """`python -m rewriter verify m.onnx | head -1`: the reader is gone before we finish printing."""
    src = dirs[0] / "m.onnx"
    onnx.save(llama_like_block(), src)
    read_end, write_end = os.pipe()
    os.close(read_end)                  # whoever reads our output has gone already
    try:
        done = subprocess.run([sys.executable, "-m", "rewriter", "verify", str(src), str(src)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300,
                              cwd=Path(__file__).resolve().parents[1])
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr

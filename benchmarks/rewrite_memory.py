"""Scale benchmark: rewriting a model in bounded memory and time, against a plain file copy.

    python benchmarks/rewrite_memory.py          # SmolLM2 single file (fp32), 1B and 8B fp16
    python benchmarks/rewrite_memory.py --preset smollm2-135m:fp32:inline,llama-3.2-1b --keep
    python benchmarks/rewrite_memory.py --preset tiny --no-drop-caches    # CI size (seconds)

A case is `PRESET[:DTYPE][:inline]`: a random-weight Llama-shaped model synthesized with
models.synth_llama into `--workdir` (skipped when it is already there), its weights in
model.onnx.data, or with `:inline` inside model.onnx (a single-file export). Each operation runs
in a FRESH SUBPROCESS so that its peak RSS (ru_maxrss of that child, via os.wait4) is its own,
side by side in the same run, once for each page-cache state of `--caches`:

  copy     shutil.copyfile of the model's files (sendfile, in-kernel)
  rewrite  `python -m rewriter model.onnx -o out/model.onnx --report report.json` (the CLI)

cold: the page cache is dropped before each measurement (`sync; echo 3 >
/proc/sys/vm/drop_caches`, root only; when that fails the JSON says the caches were warm);
warm: the input's files are read once before each measurement. Times are the child's wall
time; `*_synced_s` adds the `sync` that puts the written bytes on disk (the copy and the
rewrite leave dirty pages alike). While a child runs, its RSS (VmRSS) and the bytes written
under its output folder are sampled and printed every `--interval` seconds (the timeline goes
to the JSON, so the peak can be placed: before the first byte is written = load/shape
inference/matching/validation, during = save with folding, after = checks).

Targets, external data: peak RSS <= 1.25 x the largest single tensor + 2 GiB, rewrite time
<= 1.3 x the copy's. Single file: peak RSS <= 1.5 x the model, rewrite time <= 3 x the copy's.
Throughput is reported for both as GB/s and s/GB of the input's bytes (GB = 10^9 bytes).
Sanity checks of the output: onnx.checker (path based), the output's size (input's + the bytes
the report says were added, e.g. the tied head's clone), the report's norm count (2 per layer +
the final one), and for models under `--verify-max-gb` an onnxruntime CPU run of original vs
rewritten (`python -m rewriter verify --seq 8`).

`--stages` additionally runs the rewrite in-process through the API in another fresh child,
printing VmRSS/VmHWM after each stage (load, rewrite, validation, save, checks), for when a
target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 1 << 30
MiB = 1 << 20
RSS_FACTOR = 1.25           # external data: x the largest tensor, + RSS_SLACK
RSS_SLACK = 2 * GiB
TIME_FACTOR = 1.3           # external data: x the copy's time
INLINE_RSS_FACTOR = 1.5     # single file: x the model's size
INLINE_TIME_FACTOR = 3.0    # single file: x the copy's time
GB = 10**9                  # throughput unit (decimal, as disk speeds are quoted)
DEFAULT_PRESETS = "smollm2-135m:fp32:inline,llama-3.2-1b,llama-3.1-8b"
CACHES = ("cold", "warm")


# -- helpers ------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def drop_caches() -> str | None:
    """None when the page cache was dropped, else why not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return None
    except OSError as exc:
        return f"caches warm: cannot drop the page cache ({exc.strerror or exc})"


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, ... of a process, in bytes ({} when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Vm"):
                    key, value = line.split(":", 1)
                    parts = value.split()
                    if parts and parts[-1] == "kB":
                        out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def tree_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def model_files(model: Path) -> tuple[Path, Path]:
    return model, model.with_name(model.name + ".data")


def tensor_stats(model: Path) -> dict:
    """Largest single tensor (from the proto's dims, no external data read) and counts."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype
    from rewriter.inline import read_structure
    structure = read_structure(str(model))      # a single file's weights are not read
    proto = structure[0] if structure else onnx.load(str(model), load_external_data=False)
    largest, name, count, total = 0, None, 0, 0
    for init in proto.graph.initializer:
        n = 1
        for d in init.dims:
            n *= int(d)
        nbytes = n * tensor_dtype_to_np_dtype(init.data_type).itemsize
        count += 1
        total += nbytes
        if nbytes > largest:
            largest, name = nbytes, init.name
    return dict(largest_tensor_bytes=largest, largest_tensor=name, tensors=count, tensor_bytes=total)


GNU_TIME = "/usr/bin/time"


def program_pid(pid: int) -> int:
    """The measured program's pid: `pid`'s child when `pid` is GNU time wrapping it."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except OSError:
        return pid
    return int(children[0]) if children else pid


def run_measured(cmd: list[str], *, label: str, watch: Path | None, total: int | None,
                 interval: float, logfile: Path, cwd: Path = ROOT) -> dict:
    """Run `cmd` as a child; sample its RSS and the bytes under `watch`; return wall time,
    peak RSS, exit code and the sampled timeline. The peak is the program's own, as GNU time
    reports it: a child's ru_maxrss also counts this process's RSS at the fork (Linux carries
    it over the exec), which would make every case after a large one look as large."""
    maxrss_file = logfile.with_suffix(".maxrss")
    maxrss_file.unlink(missing_ok=True)
    timed = os.access(GNU_TIME, os.X_OK)
    if timed:
        cmd = [GNU_TIME, "-f", "%M", "-o", str(maxrss_file)] + list(cmd)
    t0 = time.perf_counter()
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        timeline, last_print, status, usage = [], 0.0, None, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            now = time.perf_counter() - t0
            if pid != 0:
                break
            rss = proc_status(program_pid(proc.pid) if timed else proc.pid).get("VmRSS", 0)
            written = tree_bytes(watch) if watch is not None else 0
            timeline.append({"t": round(now, 2), "rss": rss, "written": written})
            if now - last_print >= interval:
                last_print = now
                frac = f" ({100 * written / total:5.1f}%)" if total else ""
                log(f"  [{label}] {now:7.1f} s  written {written / MiB:9.0f} / "
                    f"{(total or 0) / MiB:.0f} MiB{frac}  RSS {rss / GiB:5.2f} GiB")
            time.sleep(min(0.25, interval / 4))
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - t1
    try:
        peak = int(maxrss_file.read_text().split()[-1]) * 1024 if timed else None    # kB
        source = "GNU time"
    except (OSError, ValueError, IndexError):
        peak = None
    if peak is None:
        peak, source = usage.ru_maxrss * 1024, "ru_maxrss (with this process's RSS at the fork)"
    log(f"  [{label}] done in {seconds:.1f} s (+{sync_s:.1f} s sync), rc {proc.returncode}, "
        f"peak RSS {peak / GiB:.2f} GiB")
    # keep the timeline short: at most ~400 points
    stride = max(1, len(timeline) // 400)
    return dict(cmd=[str(c) for c in cmd], rc=proc.returncode, seconds=round(seconds, 3),
                sync_s=round(sync_s, 3), synced_s=round(seconds + sync_s, 3), peak_rss_bytes=peak,
                peak_rss_source=source,
                user_s=round(usage.ru_utime, 2), sys_s=round(usage.ru_stime, 2),
                log=str(logfile), timeline=timeline[::stride])


def peak_phase(timeline: list[dict]) -> dict | None:
    """Where the sampled RSS peaked: before the first output byte, while writing, after."""
    if not timeline:
        return None
    top = max(timeline, key=lambda p: p["rss"])
    final = timeline[-1]["written"]
    first = next((p["t"] for p in timeline if p["written"] > 0), None)
    done = next((p["t"] for p in timeline if final and p["written"] >= final), None)
    if first is None or top["t"] < first:
        phase = "before writing (load / shape inference / matching / validation)"
    elif done is not None and top["t"] > done:
        phase = "after writing (checker / commit)"
    else:
        phase = "while writing (save + fold)"
    return dict(t=top["t"], rss=top["rss"], written=top["written"], phase=phase,
                first_write_t=first, writes_done_t=done)


def warm_up(files: list[Path]) -> None:
    """Read `files` once, so that the measurement after finds them in the page cache."""
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.read(16 * MiB):
                pass


def parse_case(text: str, default_dtype: str) -> tuple[str, str, bool]:
    """`PRESET[:DTYPE][:inline]` -> (preset, dtype, inline)."""
    parts = text.split(":")
    inline = parts[-1] == "inline"
    parts = parts[:-1] if inline else parts
    return parts[0], parts[1] if len(parts) > 1 else default_dtype, inline


# -- per-preset ---------------------------------------------------------------------------------

def synthesize_if_needed(folder: Path, preset: str, dtype: str, inline: bool = False) -> dict:
    model, data = model_files(folder / "model.onnx")
    marker = folder / "synth.json"
    if marker.exists() and model.exists() and (inline or data.exists()):
        info = json.loads(marker.read_text())
        info["skipped"] = True
        log(f"[{preset}] model already there: {model}")
        return info
    from models.synth_llama import synthesize
    folder.mkdir(parents=True, exist_ok=True)
    log(f"[{preset}] synthesizing {dtype} model{' (single file)' if inline else ''} into {folder} ...")
    info = synthesize(str(model), preset=preset, dtype=dtype, external_data=not inline,
                      progress=lambda s: log(f"  [synth] {s.strip()}"))
    keep = {k: info[k] for k in ("params", "bytes", "seconds", "nodes", "initializers")}
    keep.update(preset=preset, dtype=dtype, inline=inline)
    marker.write_text(json.dumps(keep))
    keep["skipped"] = False
    return keep


def parse_verify(text: str) -> dict:
    """`python -m rewriter verify`'s verdict: its one summary line when every output is within
    its bound, else its table's rows (output dtype max_abs max_rel ... ok)."""
    summary = re.search(r"verified: (\d+) of (\d+) output\(s\) within bound; nearest '([^']*)': "
                        r"max rel ([-+.\deE]+|nan|inf)", text)
    if summary:
        within, total, rel = int(summary.group(1)), int(summary.group(2)), float(summary.group(4))
        return dict(outputs=[dict(output=summary.group(3), max_rel=rel, ok=True)], max_rel=rel,
                    ok=within == total > 0)
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[-1] in ("yes", "no"):
            try:
                rows.append(dict(output=parts[0], dtype=parts[1], max_abs=float(parts[2]),
                                 max_rel=float(parts[3]), ok=parts[-1] == "yes"))
            except ValueError:
                continue
    return dict(outputs=rows, max_rel=max((r["max_rel"] for r in rows), default=None),
                ok=bool(rows) and all(r["ok"] for r in rows))


def prepare_cache(cache: str, args, inputs: list[Path], notes: list[str]) -> str:
    """Put the page cache in the state `cache` names; returns what it is ("cold" or why not)."""
    if cache == "warm":
        warm_up(inputs)
        return "warm"
    note = drop_caches() if args.drop_caches else "caches warm: --no-drop-caches"
    if note:
        notes.append(note)
    return note or "cold"


def measure_pair(case: str, cache: str, args, src: Path, inputs: list[Path], total: int, folder: Path,
                 notes: list[str]) -> dict:
    """Copy, then rewrite, with the page cache `cache` before each: {copy, rewrite, ...}."""
    copy_dir = folder / "copy"
    shutil.rmtree(copy_dir, ignore_errors=True)
    copy_dir.mkdir()
    state = prepare_cache(cache, args, inputs, notes)
    log(f"[{case}] copy {total / GiB:.2f} GiB ({state}) ...")
    copy_code = ("import shutil, sys\n"
                 "for s in sys.argv[2:]: shutil.copyfile(s, sys.argv[1] + '/' + s.rsplit('/', 1)[-1])\n")
    copy = run_measured([sys.executable, "-c", copy_code, str(copy_dir)] + [str(p) for p in inputs],
                        label=f"copy {cache}", watch=copy_dir, total=total, interval=args.interval,
                        logfile=folder / f"copy-{cache}.log")
    copy["caches"] = state
    shutil.rmtree(copy_dir, ignore_errors=True)       # the disk holds input + one output at a time

    out_dir = folder / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    report_path = folder / "report.json"
    report_path.unlink(missing_ok=True)
    state = prepare_cache(cache, args, inputs, notes)
    log(f"[{case}] rewrite (python -m rewriter, {state}) ...")
    rewrite = run_measured([sys.executable, "-m", "rewriter", str(src), "-o", str(out_dir / "model.onnx"),
                            "--report", str(report_path), "--quiet"],
                           label=f"rewrite {cache}", watch=out_dir, total=total, interval=args.interval,
                           logfile=folder / f"rewrite-{cache}.log")
    rewrite["caches"] = state
    rewrite["peak"] = peak_phase(rewrite["timeline"])
    for op in (copy, rewrite):
        if op["seconds"]:
            op["gb_per_s"] = round(total / GB / op["seconds"], 3)
            op["s_per_gb"] = round(op["seconds"] / (total / GB), 3)
    return dict(copy=copy, rewrite=rewrite,
                ratio=round(rewrite["seconds"] / copy["seconds"], 3) if copy["seconds"] else None,
                ratio_synced=round(rewrite["synced_s"] / copy["synced_s"], 3) if copy["synced_s"] else None)


def bench_preset(case_text: str, args, caches_notes: list[str]) -> dict:
    from models.synth_llama import PRESETS
    preset, dtype, inline = parse_case(case_text, args.dtype)
    cfg = PRESETS[preset]
    case = f"{preset}-{dtype}{'-inline' if inline else ''}"
    folder = Path(args.workdir) / case
    synth = synthesize_if_needed(folder, preset, dtype, inline)
    src, src_data = model_files(folder / "model.onnx")
    inputs = [src] if inline else [src, src_data]
    stats = tensor_stats(src)
    data_bytes = 0 if inline else src_data.stat().st_size
    model_bytes = src.stat().st_size
    total = data_bytes + model_bytes
    expected_norms = 2 * cfg["layers"] + 1
    result = dict(preset=preset, case=case, dtype=dtype, inline=inline, layers=cfg["layers"],
                  hidden=cfg["hidden"], vocab=cfg["vocab"], tied=cfg["tied"], model_bytes=model_bytes,
                  data_bytes=data_bytes, synth=synth, **stats)
    if inline:
        rss_limit = INLINE_RSS_FACTOR * total
        time_factor = INLINE_TIME_FACTOR
        result["targets"] = dict(rss_limit_bytes=int(rss_limit), rss=f"{INLINE_RSS_FACTOR} x the model",
                                 time=f"{INLINE_TIME_FACTOR} x copy time")
    else:
        rss_limit = RSS_FACTOR * stats["largest_tensor_bytes"] + RSS_SLACK
        time_factor = TIME_FACTOR
        result["targets"] = dict(rss_limit_bytes=int(rss_limit), rss="1.25 x largest tensor + 2 GiB",
                                 time=f"{TIME_FACTOR} x copy time")
    result["by_cache"] = {}
    for cache in args.caches:
        pair = measure_pair(case, cache, args, src, inputs, total, folder, caches_notes)
        rw, cp = pair["rewrite"], pair["copy"]
        pair["time_limit_s"] = round(time_factor * cp["seconds"], 3)
        pair["pass"] = dict(rss=rw["rc"] == 0 and rw["peak_rss_bytes"] <= rss_limit,
                            time=rw["rc"] == 0 and rw["seconds"] <= time_factor * cp["seconds"],
                            time_synced=rw["rc"] == 0 and rw["synced_s"] <= time_factor * cp["synced_s"])
        result["by_cache"][cache] = pair
    # the first cache state's numbers, also at the top level
    first = result["by_cache"][args.caches[0]]
    result.update(copy=first["copy"], rewrite=first["rewrite"], ratio=first["ratio"],
                  ratio_synced=first["ratio_synced"])
    result["pass"] = first["pass"]
    result["targets"]["time_limit_s"] = first["time_limit_s"]
    rw = result["rewrite"]

    # sanity checks of the (last) output
    out_dir = folder / "out"
    out, out_data = model_files(out_dir / "model.onnx")
    report_path = folder / "report.json"
    checks: dict = {}
    if rw["rc"] != 0:
        checks["error"] = Path(rw["log"]).read_text(errors="replace")[-2000:]
    else:
        import onnx
        try:
            onnx.checker.check_model(str(out))
            checks["checker"] = "ok"
        except Exception as exc:       # noqa: BLE001 - recorded, not raised
            checks["checker"] = f"failed: {' '.join(str(exc).split())[:300]}"
        report = json.loads(report_path.read_text())
        checks["norms"] = dict(expected=expected_norms, found=report.get("found"),
                               rewritten=report.get("rewritten"),
                               ok=report.get("found") == expected_norms == report.get("rewritten"))
        added = int(report.get("bytes_added") or 0)
        written = out if inline else out_data
        out_size = written.stat().st_size if written.exists() else None
        expect = (model_bytes if inline else data_bytes) + added
        slack = max(64 * MiB, expect // 100)       # input is 4 KiB-aligned, output may be packed
        checks["data_file"] = dict(path=str(written), bytes=out_size, input_bytes=expect - added,
                                   bytes_added=added, expected_bytes=expect,
                                   ok=out_size is not None and abs(out_size - expect) <= slack)
        if total <= args.verify_max_gb * GiB:
            log(f"[{case}] verify (onnxruntime CPU, seq 8) ...")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "rewriter", "verify", str(src), str(out),
                                   "--seq", "8", "--provider", "cpu"], cwd=ROOT, capture_output=True,
                                  text=True)
            verify = parse_verify(proc.stdout + proc.stderr)
            verify.update(rc=proc.returncode, seconds=round(time.perf_counter() - t0, 1))
            if proc.returncode != 0 and not verify["outputs"]:
                verify["error"] = (proc.stdout + proc.stderr)[-1000:]
            checks["verify"] = verify
        else:
            checks["verify"] = dict(skipped=f"data > {args.verify_max_gb} GiB (RAM)")
    result["checks"] = checks

    if args.stages and rw["rc"] == 0:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir()
        drop_caches() if args.drop_caches else None
        log(f"[{case}] stages (API in-process, RSS per stage) ...")
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_stages", str(src), str(out)],
                              cwd=ROOT, capture_output=True, text=True)
        stages = []
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                stages.append(json.loads(line))
        sys.stderr.write(proc.stderr[-3000:])
        result["stages"] = dict(rc=proc.returncode, stages=stages)
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return result


# -- stage profile (child) ----------------------------------------------------------------------

def stage_profile(src: str, dst: str) -> int:
    """Rewrite through the API with every stage wrapped: one JSON line per stage end."""
    from rewriter import api, inline, io, validate
    t0 = time.perf_counter()

    def emit(stage, start):
        st = proc_status()
        print(json.dumps(dict(stage=stage, seconds=round(time.perf_counter() - start, 2),
                              t=round(time.perf_counter() - t0, 2), rss=st.get("VmRSS"),
                              hwm=st.get("VmHWM"))), flush=True)
        log(f"  [stages] {stage:28s} {time.perf_counter() - start:7.1f} s  RSS "
            f"{st.get('VmRSS', 0) / GiB:5.2f} GiB  HWM {st.get('VmHWM', 0) / GiB:5.2f} GiB")

    def wrap(owner, name, stage):
        fn = getattr(owner, name, None)
        if fn is None:          # a stage this version does not have
            return

        def wrapped(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                emit(stage, start)
        setattr(owner, name, wrapped)

    wrap(io, "load_path", "load (structure)")
    wrap(io, "check_graph", "validate (skeleton checker)")
    wrap(api, "run_pipeline", "rewrite (infer, match, apply)")
    wrap(io, "write_inline", "save, single file")
    wrap(io.ir, "save", "save + fold (ir.save)")
    wrap(io, "check_structure", "check the written file")
    wrap(api, "check_loads_and_runs", "onnxruntime load check")
    emit("start", time.perf_counter())
    api.rewrite_file(src, dst)
    emit("end", t0)
    del inline, validate
    return 0


# -- table and main -----------------------------------------------------------------------------

def table(results: list[dict], caches: str) -> str:
    head = (f"{'case':28s} {'cache':5s} {'GiB':>6s} {'copy s':>7s} {'rewrite s':>9s} {'ratio':>6s} "
            f"{'synced':>6s} {'peak RSS':>8s} {'RSS tgt':>8s} {'RSS':>4s} {'time':>4s} {'tgt':>4s} "
            f"{'norms':>6s} {'max rel':>9s} {'copy GB/s':>9s} {'rw GB/s':>7s}")
    lines = [head, "-" * len(head)]
    for r in results:
        checks = r.get("checks", {})
        norms = checks.get("norms", {})
        verify = checks.get("verify", {})
        rel = verify.get("max_rel")
        factor = INLINE_TIME_FACTOR if r.get("inline") else TIME_FACTOR
        for cache, pair in r["by_cache"].items():
            rw, cp = pair["rewrite"], pair["copy"]
            lines.append(
                f"{r['case']:28s} {cache:5s} {(r['model_bytes'] + r['data_bytes']) / GiB:6.2f} {cp['seconds']:7.2f} "
                f"{rw['seconds']:9.2f} {pair['ratio'] or 0:6.2f} {pair['ratio_synced'] or 0:6.2f} "
                f"{gb(rw['peak_rss_bytes']):>8s} {gb(r['targets']['rss_limit_bytes']):>8s} "
                f"{'pass' if pair['pass']['rss'] else 'FAIL':>4s} {'pass' if pair['pass']['time'] else 'FAIL':>4s} "
                f"{factor:4.1f} "
                f"{(str(norms.get('rewritten')) + '/' + str(norms.get('expected'))) if norms else '-':>6s} "
                f"{(f'{rel:.2e}' if rel is not None else verify.get('skipped') and 'skipped' or '-'):>9s} "
                f"{cp.get('gb_per_s', 0):9.3f} {rw.get('gb_per_s', 0):7.3f}")
    lines.append("")
    lines.append("GiB = 2^30 bytes (model + data). ratio = rewrite/copy wall time, against tgt (external data "
                 f"{TIME_FACTOR}, single file {INLINE_TIME_FACTOR}); synced = both incl. the final sync; RSS tgt: "
                 f"external data 1.25 x largest tensor + 2 GiB, single file {INLINE_RSS_FACTOR} x the model; peak "
                 "RSS = ru_maxrss of the child; GB/s: input bytes (GB = 10^9 bytes) per wall second.")
    lines.append(f"page cache: {caches}")
    for r in results:
        for cache, pair in r["by_cache"].items():
            peak = pair["rewrite"].get("peak")
            if peak:
                lines.append(f"{r['case']} ({cache}): RSS peak at {peak['t']:.1f} s: {peak['phase']}")
        extra = [f"checker {r['checks'].get('checker', '-')}",
                 f"output {'ok' if r['checks'].get('data_file', {}).get('ok') else 'MISMATCH'} "
                 f"({gb(r['checks'].get('data_file', {}).get('bytes'))} GiB, +{gb(r['checks'].get('data_file', {}).get('bytes_added'))} added)"]
        lines.append(f"{r['case']}: " + "; ".join(extra))
        for st in r.get("stages", {}).get("stages", []):
            lines.append(f"    {st['stage']:28s} {st['seconds']:7.1f} s  RSS {gb(st['rss'])} GiB  "
                         f"HWM {gb(st['hwm'])} GiB")
    return "\n".join(lines)


def machine() -> dict:
    import numpy
    import onnx
    import onnx_ir
    info = dict(cpus=os.cpu_count(), python=platform.python_version(), platform=platform.platform(),
                numpy=numpy.__version__, onnx=onnx.__version__, onnx_ir=onnx_ir.__version__)
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_bytes"] = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return info


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_stages"]:
        return stage_profile(argv[1], argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=DEFAULT_PRESETS, help="comma separated PRESET[:DTYPE][:inline] (default "
                   f"{DEFAULT_PRESETS}; presets: tiny, smollm2-135m, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b)")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "fp32", "bf16"), help="a case's default dtype")
    p.add_argument("--caches", default=",".join(CACHES), help="page-cache states to measure in, in order "
                   "(default cold,warm)")
    p.add_argument("--workdir", default="/tmp/fn_mem")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--table", help="write the printed table here")
    p.add_argument("--keep", action="store_true", help="keep the synthesized models and outputs")
    p.add_argument("--interval", type=float, default=5.0, help="progress print interval (s)")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false", help="warm cache only")
    p.add_argument("--verify-max-gb", type=float, default=4.0,
                   help="run the onnxruntime verify only below this data size (default 4)")
    p.add_argument("--stages", action="store_true", help="also profile RSS per stage (API, in-process)")
    args = p.parse_args(argv)
    args.caches = [c.strip() for c in args.caches.split(",") if c.strip()]
    if not args.drop_caches:
        args.caches = ["warm"]
    if not args.caches or set(args.caches) - set(CACHES):
        p.error(f"--caches: a comma separated list of {', '.join(CACHES)}")
    from models.synth_llama import PRESETS
    cases = [s.strip() for s in args.preset.split(",") if s.strip()]
    for case in cases:
        preset, dtype, _ = parse_case(case, args.dtype)
        if preset not in PRESETS or dtype not in ("fp16", "fp32", "bf16"):
            p.error(f"unknown case {case!r}: PRESET[:DTYPE][:inline], PRESET one of {sorted(PRESETS)}")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    results, notes = [], []
    started = time.time()
    try:
        for case in cases:
            results.append(bench_preset(case, args, notes))
    finally:
        if not args.keep:
            for case in cases:
                preset, dtype, inline = parse_case(case, args.dtype)
                shutil.rmtree(Path(args.workdir) / f"{preset}-{dtype}{'-inline' if inline else ''}",
                              ignore_errors=True)
    states = {"cold": "cold: dropped before each measurement", "warm": "warm: the input read once before each measurement"}
    caches = "; ".join([states[c] for c in args.caches] + sorted(set(notes)))
    text = table(results, caches)
    print(text)
    doc = dict(benchmark="rewrite_memory", date=time.strftime("%Y-%m-%d %H:%M:%S"),
               total_s=round(time.time() - started, 1), machine=machine(), caches=caches,
               settings=dict(presets=cases, dtype=args.dtype, caches=args.caches, workdir=args.workdir,
                             rss_target=f"external data 1.25 x largest tensor + 2 GiB; single file {INLINE_RSS_FACTOR} x the model",
                             time_target=f"external data {TIME_FACTOR} x copy; single file {INLINE_TIME_FACTOR} x copy"),
               results=results)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    if args.table:
        Path(args.table).write_text(text + "\n")
    ok = all(pair["rewrite"]["rc"] == 0 for r in results for pair in r["by_cache"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Scale benchmark: rewriting a multi-GB model in bounded memory, against a plain file copy.

    python benchmarks/rewrite_memory.py                                   # 1B and 8B, fp16
    python benchmarks/rewrite_memory.py --preset llama-3.2-1b --keep      # one shape, keep files
    python benchmarks/rewrite_memory.py --preset tiny --no-drop-caches    # CI size (seconds)

For each preset a random-weight Llama-shaped model is synthesized with models.synth_llama into
`--workdir` (skipped when it is already there), then each operation runs in a FRESH
SUBPROCESS so that its peak RSS (ru_maxrss of that child, via os.wait4) is its own:

  copy     shutil.copyfile of model.onnx and model.onnx.data (sendfile, in-kernel)
  rewrite  `python -m rewriter model.onnx -o out/model.onnx --report report.json` (the CLI)

Before each measurement the page cache is dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`,
root only) so both start cold; when that fails the JSON says the caches were warm. Times are
the child's wall time; `*_synced_s` adds the `sync` that puts the written bytes on disk (the
copy and the rewrite leave dirty pages alike). While a child runs, its RSS (VmRSS) and the
bytes written under its output folder are sampled and printed every `--interval` seconds
(the timeline goes to the JSON, so the peak can be placed: before the first byte is written
= load/shape inference/matching/validation, during = save with folding, after = checker).

Targets: peak RSS <= 1.25 x the largest single tensor + 2 GiB; rewrite time
<= 1.3 x the copy time. Throughput is reported for both as GB/s and s/GB
of the input's bytes (GB = 10^9 bytes). Sanity checks of the output: onnx.checker (path based), the data file's
size (input's + the bytes the report says were added, e.g. the tied head's clone), the
report's norm count (2 per layer + the final one), and for models under `--verify-max-gb`
an onnxruntime CPU run of original vs rewritten (`python -m rewriter verify --seq 8`).

`--stages` additionally runs the rewrite in-process through the API in another fresh child,
printing VmRSS/VmHWM after each stage (load, shape inference, matching, plan, apply,
validation, save+fold, checker), for when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
RSS_FACTOR = 1.25
RSS_SLACK = 2 * GiB
TIME_FACTOR = 1.3
GB = 10**9                  # throughput unit (decimal, as disk speeds are quoted)
DEFAULT_PRESETS = "llama-3.2-1b,llama-3.1-8b"


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
    proto = onnx.load(str(model), load_external_data=False)
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


def run_measured(cmd: list[str], *, label: str, watch: Path | None, total: int | None,
                 interval: float, logfile: Path, cwd: Path = ROOT) -> dict:
    """Run `cmd` as a child; sample its RSS and the bytes under `watch`; return wall time,
    peak RSS (ru_maxrss of this child alone), exit code and the sampled timeline."""
    t0 = time.perf_counter()
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        timeline, last_print, status, usage = [], 0.0, None, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            now = time.perf_counter() - t0
            if pid != 0:
                break
            rss = proc_status(proc.pid).get("VmRSS", 0)
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
    peak = usage.ru_maxrss * 1024             # kB on Linux
    log(f"  [{label}] done in {seconds:.1f} s (+{sync_s:.1f} s sync), rc {proc.returncode}, "
        f"peak RSS {peak / GiB:.2f} GiB")
    # keep the timeline short: at most ~400 points
    stride = max(1, len(timeline) // 400)
    return dict(cmd=[str(c) for c in cmd], rc=proc.returncode, seconds=round(seconds, 3),
                sync_s=round(sync_s, 3), synced_s=round(seconds + sync_s, 3), peak_rss_bytes=peak,
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


# -- per-preset ---------------------------------------------------------------------------------

def synthesize_if_needed(folder: Path, preset: str, dtype: str) -> dict:
    model, data = model_files(folder / "model.onnx")
    marker = folder / "synth.json"
    if marker.exists() and model.exists() and data.exists():
        info = json.loads(marker.read_text())
        info["skipped"] = True
        log(f"[{preset}] model already there: {model}")
        return info
    from models.synth_llama import synthesize
    folder.mkdir(parents=True, exist_ok=True)
    log(f"[{preset}] synthesizing {dtype} model into {folder} ...")
    info = synthesize(str(model), preset=preset, dtype=dtype, progress=lambda s: log(f"  [synth] {s.strip()}"))
    keep = {k: info[k] for k in ("params", "bytes", "seconds", "nodes", "initializers")}
    keep.update(preset=preset, dtype=dtype)
    marker.write_text(json.dumps(keep))
    keep["skipped"] = False
    return keep


def parse_verify(text: str) -> dict:
    """Rows of `python -m rewriter verify`'s table: output dtype max_abs max_rel tol ok."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[5] in ("yes", "no"):
            try:
                rows.append(dict(output=parts[0], dtype=parts[1], max_abs=float(parts[2]),
                                 max_rel=float(parts[3]), tolerance=float(parts[4]), ok=parts[5] == "yes"))
            except ValueError:
                continue
    return dict(outputs=rows, max_rel=max((r["max_rel"] for r in rows), default=None),
                ok=bool(rows) and all(r["ok"] for r in rows))


def bench_preset(preset: str, args, caches_notes: list[str]) -> dict:
    from models.synth_llama import PRESETS
    cfg = PRESETS[preset]
    folder = Path(args.workdir) / f"{preset}-{args.dtype}"
    synth = synthesize_if_needed(folder, preset, args.dtype)
    src, src_data = model_files(folder / "model.onnx")
    stats = tensor_stats(src)
    data_bytes = src_data.stat().st_size
    model_bytes = src.stat().st_size
    total = data_bytes + model_bytes
    expected_norms = 2 * cfg["layers"] + 1
    result = dict(preset=preset, dtype=args.dtype, layers=cfg["layers"], hidden=cfg["hidden"],
                  vocab=cfg["vocab"], tied=cfg["tied"], model_bytes=model_bytes, data_bytes=data_bytes,
                  synth=synth, **stats)

    # (a) plain copy
    copy_dir = folder / "copy"
    shutil.rmtree(copy_dir, ignore_errors=True)
    copy_dir.mkdir()
    note = drop_caches() if args.drop_caches else "caches warm: --no-drop-caches"
    if note:
        caches_notes.append(note)
    log(f"[{preset}] copy {total / GiB:.2f} GiB ({'cold' if not note else note}) ...")
    copy_code = ("import shutil, sys\n"
                 "for s in sys.argv[1:3]: shutil.copyfile(s, sys.argv[3] + '/' + s.rsplit('/', 1)[-1])\n")
    result["copy"] = run_measured([sys.executable, "-c", copy_code, str(src), str(src_data), str(copy_dir)],
                                  label="copy", watch=copy_dir, total=total, interval=args.interval,
                                  logfile=folder / "copy.log")
    result["copy"]["caches"] = "cold" if not note else note
    shutil.rmtree(copy_dir, ignore_errors=True)       # the disk holds input + one output at a time

    # (b) rewrite with the CLI
    out_dir = folder / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    out, out_data = model_files(out_dir / "model.onnx")
    report_path = folder / "report.json"
    report_path.unlink(missing_ok=True)
    note = drop_caches() if args.drop_caches else "caches warm: --no-drop-caches"
    if note:
        caches_notes.append(note)
    log(f"[{preset}] rewrite (python -m rewriter) ...")
    result["rewrite"] = run_measured([sys.executable, "-m", "rewriter", str(src), "-o", str(out),
                                      "--report", str(report_path), "--quiet"],
                                     label="rewrite", watch=out_dir, total=total, interval=args.interval,
                                     logfile=folder / "rewrite.log")
    result["rewrite"]["caches"] = "cold" if not note else note
    result["rewrite"]["peak"] = peak_phase(result["rewrite"]["timeline"])

    for op in (result["copy"], result["rewrite"]):
        if op["seconds"]:
            op["gb_per_s"] = round(total / GB / op["seconds"], 3)
            op["s_per_gb"] = round(op["seconds"] / (total / GB), 3)

    # targets
    rss_limit = RSS_FACTOR * stats["largest_tensor_bytes"] + RSS_SLACK
    time_limit = TIME_FACTOR * result["copy"]["seconds"]
    rw, cp = result["rewrite"], result["copy"]
    result["ratio"] = round(rw["seconds"] / cp["seconds"], 3) if cp["seconds"] else None
    result["ratio_synced"] = round(rw["synced_s"] / cp["synced_s"], 3) if cp["synced_s"] else None
    result["targets"] = dict(rss_limit_bytes=int(rss_limit), time_limit_s=round(time_limit, 3),
                             rss="1.25 x largest tensor + 2 GiB", time=f"{TIME_FACTOR} x copy time")
    result["pass"] = dict(rss=rw["rc"] == 0 and rw["peak_rss_bytes"] <= rss_limit,
                          time=rw["rc"] == 0 and rw["seconds"] <= time_limit,
                          time_synced=rw["rc"] == 0 and rw["synced_s"] <= TIME_FACTOR * cp["synced_s"])

    # sanity checks of the output
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
        out_size = out_data.stat().st_size if out_data.exists() else None
        expect = data_bytes + added
        slack = max(64 * MiB, expect // 100)       # input is 4 KiB-aligned, output may be packed
        checks["data_file"] = dict(path=str(out_data), bytes=out_size, input_bytes=data_bytes,
                                   bytes_added=added, expected_bytes=expect,
                                   ok=out_size is not None and abs(out_size - expect) <= slack)
        if data_bytes <= args.verify_max_gb * GiB:
            log(f"[{preset}] verify (onnxruntime CPU, seq 8) ...")
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
        log(f"[{preset}] stages (API in-process, RSS per stage) ...")
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
    from rewriter import patterns
    import onnx_ir as ir
    from rewriter import api, io
    t0 = time.perf_counter()

    def emit(stage, start):
        st = proc_status()
        print(json.dumps(dict(stage=stage, seconds=round(time.perf_counter() - start, 2),
                              t=round(time.perf_counter() - t0, 2), rss=st.get("VmRSS"),
                              hwm=st.get("VmHWM"))), flush=True)
        log(f"  [stages] {stage:28s} {time.perf_counter() - start:7.1f} s  RSS "
            f"{st.get('VmRSS', 0) / GiB:5.2f} GiB  HWM {st.get('VmHWM', 0) / GiB:5.2f} GiB")

    def wrap(owner, name, stage):
        fn = getattr(owner, name)

        def wrapped(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                emit(stage, start)
        setattr(owner, name, wrapped)

    wrap(io, "load_path", "load (parse + deserialize)")
    wrap(io, "check_graph", "validate (skeleton checker)")
    wrap(api, "infer_shapes", "shape inference")
    wrap(patterns, "find_sites", "matching")
    wrap(api, "make_plan", "plan")
    wrap(api, "apply_plan", "apply (graph edits)")
    wrap(ir, "save", "save + fold (ir.save)")
    wrap(io, "check_structure", "checker on output")
    emit("start", time.perf_counter())
    api.rewrite_file(src, dst)
    emit("end", t0)
    return 0


# -- table and main -----------------------------------------------------------------------------

def table(results: list[dict], caches: str) -> str:
    head = (f"{'preset':14s} {'data GiB':>8s} {'copy s':>7s} {'rewrite s':>9s} {'ratio':>6s} "
            f"{'synced':>6s} {'peak RSS':>8s} {'largest':>8s} {'RSS tgt':>8s} {'RSS':>4s} {'time':>4s} "
            f"{'norms':>6s} {'max rel':>9s} {'copy GB/s':>9s} {'rw GB/s':>7s} {'rw s/GB':>7s}")
    lines = [head, "-" * len(head)]
    for r in results:
        rw, cp = r["rewrite"], r["copy"]
        checks = r.get("checks", {})
        norms = checks.get("norms", {})
        verify = checks.get("verify", {})
        rel = verify.get("max_rel")
        lines.append(
            f"{r['preset']:14s} {r['data_bytes'] / GiB:8.2f} {cp['seconds']:7.1f} {rw['seconds']:9.1f} "
            f"{r['ratio'] or 0:6.2f} {r['ratio_synced'] or 0:6.2f} {gb(rw['peak_rss_bytes']):>8s} "
            f"{gb(r['largest_tensor_bytes']):>8s} {gb(r['targets']['rss_limit_bytes']):>8s} "
            f"{'pass' if r['pass']['rss'] else 'FAIL':>4s} {'pass' if r['pass']['time'] else 'FAIL':>4s} "
            f"{(str(norms.get('rewritten')) + '/' + str(norms.get('expected'))) if norms else '-':>6s} "
            f"{(f'{rel:.2e}' if rel is not None else verify.get('skipped') and 'skipped' or '-'):>9s} "
            f"{cp.get('gb_per_s', 0):9.3f} {rw.get('gb_per_s', 0):7.3f} {rw.get('s_per_gb', 0):7.2f}")
    lines.append("")
    lines.append(f"GiB = 2^30 bytes. ratio = rewrite/copy wall time (target <= {TIME_FACTOR}); synced = both "
                 "incl. the final sync; RSS tgt = 1.25 x largest tensor + 2 GiB; peak RSS = ru_maxrss of the "
                 "child; GB/s, s/GB: input bytes (model + data, GB = 10^9 bytes) per wall second.")
    lines.append(f"page cache: {caches}")
    for r in results:
        peak = r["rewrite"].get("peak")
        extra = [f"checker {r['checks'].get('checker', '-')}",
                 f"data file {'ok' if r['checks'].get('data_file', {}).get('ok') else 'MISMATCH'} "
                 f"({gb(r['checks'].get('data_file', {}).get('bytes'))} GiB, +{gb(r['checks'].get('data_file', {}).get('bytes_added'))} added)"]
        if peak:
            extra.append(f"RSS peak at {peak['t']:.0f} s: {peak['phase']}")
        lines.append(f"{r['preset']}: " + "; ".join(extra))
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
    p.add_argument("--preset", default=DEFAULT_PRESETS, help=f"comma separated (default {DEFAULT_PRESETS}; "
                   "also tiny, smollm2-135m, llama-3.2-3b)")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "fp32", "bf16"))
    p.add_argument("--workdir", default="/tmp/fn_mem")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--table", help="write the printed table here")
    p.add_argument("--keep", action="store_true", help="keep the synthesized models and outputs")
    p.add_argument("--interval", type=float, default=5.0, help="progress print interval (s)")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false")
    p.add_argument("--verify-max-gb", type=float, default=4.0,
                   help="run the onnxruntime verify only below this data size (default 4)")
    p.add_argument("--stages", action="store_true", help="also profile RSS per stage (API, in-process)")
    args = p.parse_args(argv)
    from models.synth_llama import PRESETS
    presets = [s.strip() for s in args.preset.split(",") if s.strip()]
    for preset in presets:
        if preset not in PRESETS:
            p.error(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    results, notes = [], []
    started = time.time()
    try:
        for preset in presets:
            results.append(bench_preset(preset, args, notes))
    finally:
        if not args.keep:
            for preset in presets:
                shutil.rmtree(Path(args.workdir) / f"{preset}-{args.dtype}", ignore_errors=True)
    caches = "dropped before each measurement (cold)" if not notes else "; ".join(sorted(set(notes)))
    text = table(results, caches)
    print(text)
    doc = dict(benchmark="rewrite_memory", date=time.strftime("%Y-%m-%d %H:%M:%S"),
               total_s=round(time.time() - started, 1), machine=machine(), caches=caches,
               settings=dict(presets=presets, dtype=args.dtype, workdir=args.workdir,
                             rss_target="1.25 x largest tensor + 2 GiB", time_target=f"{TIME_FACTOR} x copy"),
               results=results)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    if args.table:
        Path(args.table).write_text(text + "\n")
    ok = all(r["rewrite"]["rc"] == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

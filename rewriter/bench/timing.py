"""The timing harness: one session per model, inputs from the model's signature, interleaved
rounds, statistics. Shared by `python -m rewriter bench`, `calibrate` and benchmarks/.

    measure({"a": Variant("a", "a.onnx"), "b": Variant("b", "b.onnx")}, [Shape(tokens=512)],
            provider="cuda", settings=Settings())
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnxruntime as ort

from rewriter.errors import first_line
from rewriter.verify import make_inputs, session

METHOD = (
    "onnxruntime {ort} ({provider}), graph optimization level {opt}. Each variant is its own "
    "InferenceSession, all loaded together; inputs come from the model's signature "
    "(rewriter.verify.make_inputs, seed 0: random token ids, ones for masks) and are the same "
    "for every variant. IOBinding with inputs and outputs on the device ({device} OrtValues; "
    "outputs pre-allocated by a first run and re-bound, so no copies are timed){graph}. Per "
    "shape: {warmup} warm-up runs per variant, then rounds of interleaved runs (A, B, C, ... "
    "with the order rotated every round), each sample the mean of `inner` back-to-back runs "
    "(inner chosen so a sample lasts >= {min_sample_ms} ms), at least {min_rounds} and at most "
    "{max_rounds} rounds or until {budget_s} s per shape. Reported: median per run, spread "
    "p10-p90 (and IQR in the JSON) over the rounds. Ratios are baseline time / variant time: "
    "> 1 means the variant is faster."
)


def log_to_stderr(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def quiet_log(msg: str) -> None:
    pass


def error_text(exc: BaseException, limit: int = 300) -> str:
    """"Type: first line of the message", for the JSON and the table."""
    return f"{type(exc).__name__}: {first_line(exc, limit)}"


@dataclass(frozen=True)
class Shape:
    tokens: int
    batch: int = 1
    past: int = 0

    @property
    def label(self) -> str:
        s = f"b{self.batch} t{self.tokens}"
        return s + (f" past{self.past}" if self.past else "")


def stats(samples_s: list[float]) -> dict:
    a = np.asarray(samples_s, dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0}
    p10, p25, p50, p75, p90 = np.percentile(a, [10, 25, 50, 75, 90])
    return {"median_ms": float(p50), "p10_ms": float(p10), "p90_ms": float(p90),
            "p25_ms": float(p25), "p75_ms": float(p75), "mean_ms": float(a.mean()),
            "min_ms": float(a.min()), "n": int(a.size)}


@dataclass
class Settings:
    warmup: int = 5
    min_rounds: int = 5
    max_rounds: int = 30
    budget_s: float = 10.0          # per shape, all variants together, after warm-up
    min_sample_ms: float = 5.0
    # ORT session graph optimization (rewriter.verify.OPT_LEVELS): timed at the level users run,
    # "all", not the correctness checks' verify.CHECK_LEVEL
    opt_level: str = "all"
    cuda_graph: bool = False
    threads: int = 0                # intra-op threads (0 = ORT default)


@dataclass
class Variant:
    """A model to time: its file, or why there is none."""

    name: str
    path: str | None
    info: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


_PRELOADED = False


def resolve_provider(provider: str | None) -> str:
    """"cuda" or "cpu" (None: CUDA when this onnxruntime has it). For CUDA, loads the CUDA
    libraries of the nvidia-* wheels first (onnxruntime.preload_dlls), as ORT_GPU.md asks."""
    global _PRELOADED
    available = ort.get_available_providers()
    if provider in (None, "auto"):
        provider = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if provider == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeError("CUDAExecutionProvider is not available in this onnxruntime "
                           f"({ort.__version__}, {available})")
    if provider == "cuda" and not _PRELOADED and hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):
            ort.preload_dlls()
        _PRELOADED = True
    return provider


def open_session(path, provider: str, settings: Settings):
    """(session, note) through rewriter.verify.session. CUDA graph mode falls back to a plain
    CUDA session, with the reason."""
    opts = dict(opt_level=settings.opt_level, threads=settings.threads)
    if provider == "cpu":
        return session(path, "cpu", **opts), None
    cuda = {"device_id": "0", "arena_extend_strategy": "kSameAsRequested"}
    if settings.cuda_graph:
        try:
            return session(path, "cuda", cuda_options=dict(cuda, enable_cuda_graph="1"), **opts), "cuda-graph"
        except Exception as exc:
            note = f"cuda graph refused at load: {first_line(exc, 200)}"
            return session(path, "cuda", cuda_options=cuda, **opts), note
    return session(path, "cuda", cuda_options=cuda, **opts), None


class Bound:
    """One session bound to one shape's inputs and outputs on the device."""

    def __init__(self, sess, feeds: dict, device: str, graph_id: int | None = None):
        self.sess = sess
        self.device = device
        self.io = sess.io_binding()
        self.keep = []
        for name, arr in feeds.items():
            ov = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), device, 0)
            self.keep.append(ov)
            self.io.bind_ortvalue_input(name, ov)
        self.run_options = ort.RunOptions()
        if graph_id is not None:
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        names = [o.name for o in sess.get_outputs()]
        for name in names:
            self.io.bind_output(name, device)
        sess.run_with_iobinding(self.io, self.run_options)       # allocates the outputs
        outs = self.io.get_outputs()
        self.io.clear_binding_outputs()
        for name, ov in zip(names, outs):                       # fixed addresses from now on
            self.io.bind_ortvalue_output(name, ov)
        self.keep.extend(outs)

    def run(self, n: int = 1) -> float:
        """Seconds per run, averaged over `n` back-to-back runs (synchronized at the end)."""
        sess, io_, ro = self.sess, self.io, self.run_options
        t0 = time.perf_counter()
        for _ in range(n):
            sess.run_with_iobinding(io_, ro)
        io_.synchronize_outputs()
        return (time.perf_counter() - t0) / n

    def close(self):
        self.io.clear_binding_inputs()
        self.io.clear_binding_outputs()
        self.keep.clear()


def shape_feeds(path, sess, shape: Shape) -> dict:
    return make_inputs(path, batch=shape.batch, seq=shape.tokens, past=shape.past, sess=sess)


def _open_all(variants: dict[str, Variant], provider: str, settings: Settings, log) -> tuple[dict, dict]:
    """{name: session} for every variant with a file, and {name: load note or error}."""
    sessions: dict = {}
    notes: dict = {}
    for name, v in variants.items():
        if v.path is None:
            continue
        t0 = time.perf_counter()
        try:
            sess, note = open_session(v.path, provider, settings)
            sessions[name] = sess
            notes[name] = {"load_s": round(time.perf_counter() - t0, 2), "note": note,
                           "providers": sess.get_providers()}
            log(f"session {name}: {time.perf_counter() - t0:.1f} s" + (f" ({note})" if note else ""))
        except Exception as exc:
            v.error = f"session: {error_text(exc)}"
            notes[name] = {"error": v.error}
            log(f"session {name}: FAILED {v.error}")
    return sessions, notes


def _bind_all(variants, sessions, notes, shape: Shape, si: int, device: str, row: dict, log) -> dict[str, Bound]:
    """Each session bound to the same inputs (the first session's; a variant with other
    inputs gets its own for those) for one shape."""
    ref = next(iter(sessions))
    try:
        base_feeds = shape_feeds(variants[ref].path, sessions[ref], shape)
    except Exception as exc:
        row["error"] = f"inputs: {type(exc).__name__}: {exc}"
        return {}
    bound: dict[str, Bound] = {}
    for name, sess in sessions.items():
        try:
            want = {i.name for i in sess.get_inputs()}
            feeds = {k: v for k, v in base_feeds.items() if k in want}
            if want - set(feeds):
                extra = shape_feeds(variants[name].path, sess, shape)
                feeds.update({k: extra[k] for k in want - set(feeds)})
            gid = si + 1 if notes[name].get("note") == "cuda-graph" else None
            bound[name] = Bound(sess, feeds, device, gid)
        except Exception as exc:
            row["variants"][name] = {"error": error_text(exc)}
            log(f"{shape.label} {name}: FAILED {row['variants'][name]['error']}")
    return bound


def _time_interleaved(bound: dict[str, Bound], settings: Settings, shape: Shape, row: dict, log) -> None:
    """Warm-up, then rounds A, B, C, ... rotated each round; stats into row["variants"]."""
    names = list(bound)
    samples: dict[str, list[float]] = {n: [] for n in names}
    inner: dict[str, int] = {}

    def failed(name, exc):
        row["variants"][name] = {"error": error_text(exc)}
        log(f"{shape.label} {name}: FAILED {row['variants'][name]['error']}")
        names.remove(name)
        samples[name] = []

    for name in list(names):                                 # warm-up (graph capture too)
        try:
            ts = [bound[name].run() for _ in range(max(1, settings.warmup))]
        except Exception as exc:
            failed(name, exc)
            continue
        one = float(np.median(ts))
        inner[name] = int(min(1000, max(1, math.ceil(settings.min_sample_ms / 1e3 / max(one, 1e-7)))))
    t_start = time.perf_counter()
    for r in range(settings.max_rounds):
        if not names:
            break
        k = r % len(names)
        for name in names[k:] + names[:k]:
            try:
                samples[name].append(bound[name].run(inner[name]))
            except Exception as exc:
                failed(name, exc)
        if r + 1 >= settings.min_rounds and time.perf_counter() - t_start > settings.budget_s:
            break
    for name in bound:
        if samples[name]:
            row["variants"][name] = dict(stats(samples[name]), inner=inner.get(name, 1))


def measure(variants: dict[str, Variant], shapes: list[Shape], *, provider: str | None = None,
            settings: Settings | None = None, log=quiet_log) -> dict:
    """Time every ready variant at every shape, interleaved. Returns the JSON-able result:
    {"provider", "settings", "sessions": {name: note}, "shapes": [{"shape", "variants":
    {name: stats | {"error"}}}]}."""
    settings = settings or Settings()
    provider = resolve_provider(provider)
    device = "cuda" if provider == "cuda" else "cpu"
    sessions, notes = _open_all(variants, provider, settings, log)
    results = []
    for si, shape in enumerate(shapes):
        row: dict = {"shape": asdict(shape), "variants": {}}
        results.append(row)
        if not sessions:
            continue
        bound = _bind_all(variants, sessions, notes, shape, si, device, row, log)
        _time_interleaved(bound, settings, shape, row, log)
        for b in bound.values():
            with contextlib.suppress(Exception):
                b.close()
        parts = [f"{n} {row['variants'][n]['median_ms']:.3g}" for n in bound
                 if "median_ms" in row["variants"].get(n, {})]
        bound.clear()
        log(f"{shape.label}: " + ", ".join(parts) + " ms")
    sessions.clear()
    gc.collect()
    return {"provider": provider, "onnxruntime": ort.__version__, "settings": asdict(settings),
            "sessions": notes, "shapes": results}


def method_text(result: dict) -> str:
    """METHOD filled in with a result's settings."""
    st = result["settings"]
    graph = ""
    if st.get("cuda_graph"):
        graph = "; ORT CUDA graph mode (enable_cuda_graph, one gpu_graph_id per shape)"
    return METHOD.format(ort=result.get("onnxruntime", "?"), provider=result["provider"],
                         opt=st["opt_level"], device=result["provider"], graph=graph,
                         warmup=st["warmup"], min_sample_ms=st["min_sample_ms"],
                         min_rounds=st["min_rounds"], max_rounds=st["max_rounds"],
                         budget_s=st["budget_s"])


def device_name(provider: str) -> str:
    if provider == "cuda":
        with contextlib.suppress(Exception):
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            if out:
                return out.splitlines()[0]
        return "cuda"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


__all__ = ["METHOD", "Bound", "Settings", "Shape", "Variant", "device_name", "error_text", "log_to_stderr",
           "measure", "method_text", "open_session", "quiet_log", "resolve_provider", "shape_feeds", "stats"]

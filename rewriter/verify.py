"""Run original and rewritten graphs under onnxruntime on the same inputs and compare.

Error measure per output: max |a − b| / max |a| (relative to the original's largest value).
Default tolerances by output dtype: fp32/fp64 1e-5, fp16 1e-2, bf16 5e-2 (low-precision
graphs are not bit-identical; judge them against an fp32 reference with `bench zero-loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from rewriter.errors import BadInput, CannotRun, UsageError, first_line
from rewriter.feeds import from_session, signature

TOLERANCE = {"float32": 1e-5, "float64": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}


def providers(preferred: str | None = None) -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    if preferred == "cpu":
        return ["CPUExecutionProvider"]
    if preferred == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeError("CUDAExecutionProvider is not available in this onnxruntime")
    if "CUDAExecutionProvider" in available and preferred in (None, "cuda"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


OPT_LEVELS = ("all", "extended", "basic", "disable")     # onnxruntime graph optimization levels


def session(path, provider: str | None = None, optimize: bool = True, *, opt_level: str | None = None,
            threads: int = 0, cuda_options: dict | None = None):
    """The onnxruntime session every caller opens (verify, bench, benchmarks): `path` is a file
    or serialized model bytes; `opt_level` one of OPT_LEVELS (default "all", "disable" when not
    `optimize`); `threads` intra-op threads (0: ORT's default); `cuda_options` the CUDA
    provider's options."""
    import onnxruntime as ort
    level = opt_level or ("all" if optimize else "disable")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    if threads:
        options.intra_op_num_threads = threads
    names = [(name, cuda_options) if name == "CUDAExecutionProvider" and cuda_options else name
             for name in providers(provider)]
    model = path if isinstance(path, bytes) else str(path)     # a path or serialized model bytes
    return ort.InferenceSession(model, options, providers=names)


def ort_kernels(path, provider: str | None = None) -> dict[str, int]:
    """Op types (with counts) of the graph onnxruntime actually runs: the model after ORT's own
    optimizations (level all) for `provider` — its fusions, not only the rewriter's graph."""
    import tempfile
    from collections import Counter

    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "optimized.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         "1024")
        ort.InferenceSession(str(path), options, providers=providers(provider))
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
        return dict(sorted(Counter(n.op_type for n in graph.node).items()))


def make_inputs(path, *, batch: int = 1, seq: int = 16, past: int = 8, seed: int = 0,
                sess=None) -> dict[str, np.ndarray]:
    """One consistent set of inputs made from the graph (rewriter.feeds): token ids within the
    embedding table, ones for masks (over past + sequence), positions after the past, pasts of
    length `past` (random normals) sized from the graph's attention ops, normal floats for
    everything else. Without a `path`, from the session's signature alone (roles by name)."""
    sig = signature(path) if path is not None else from_session(sess)
    return sig.feeds(batch=batch, seq=seq, past=past, rng=np.random.default_rng(seed))


def run(path, feeds, provider: str | None = None, sess=None) -> dict[str, np.ndarray]:
    import onnxruntime as ort
    sess = sess or session(path, provider)
    names = [o.name for o in sess.get_outputs()]
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4        # a failed run is an exception; ORT's own log line repeats it
    return dict(zip(names, sess.run(names, feeds, quiet)))


@dataclass
class OutputDiff:
    name: str
    dtype: str
    max_abs: float
    max_rel: float
    tolerance: float
    step: str = ""          # KV-cache graphs: the run it was worst at (prefill, decode 1, ...)

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_rel)) and self.max_rel <= self.tolerance


def compare(reference: dict, candidate: dict, tolerance: float | None = None) -> list[OutputDiff]:
    diffs = []
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None:
            diffs.append(OutputDiff(name, str(ref.dtype), float("inf"), float("inf"), 0.0))
            continue
        a, b = ref.astype(np.float64), got.astype(np.float64)
        if a.shape != b.shape:
            diffs.append(OutputDiff(name, str(ref.dtype), float("inf"), float("inf"), 0.0))
            continue
        max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
        scale = float(np.max(np.abs(a))) if a.size else 1.0
        tol = tolerance if tolerance is not None else TOLERANCE.get(str(ref.dtype), 1e-5)
        diffs.append(OutputDiff(name, str(ref.dtype), max_abs, max_abs / max(scale, 1e-30), tol))
    return diffs


DECODE_STEPS = 2    # after the prefill: the cache is fed back, then grows once more


def verify(original, rewritten, *, inputs: dict | None = None, provider: str | None = None,
           tolerance: float | None = None, seed: int = 0, **shape) -> list[OutputDiff]:
    """Compare the two models' outputs on the same inputs: `inputs` when they name every graph
    input; else inputs made from the original's graph (rewriter.feeds), taking those `inputs`
    gives (token ids: their batch and length). A KV-cache graph runs as a greedy generator runs
    it: a prefill (past length 0 unless `past` is given), then DECODE_STEPS one-token steps fed
    the original's presents and its most likely next token — both models get the same feeds at
    every step, each output's worst step is reported. CannotRun when onnxruntime cannot load or
    run either model (nothing was compared)."""
    check_arguments(tolerance, **shape)
    a = _open(original, "original", provider)
    b = _open(rewritten, "rewritten", provider)
    sig = signature(original)
    given = dict(inputs or {})
    unknown = sorted(set(given) - {inp.name for inp in sig.inputs})
    if unknown:
        raise BadInput(f"inputs {', '.join(map(repr, unknown[:4]))}: not inputs of the model "
                       f"(it takes {', '.join(inp.name for inp in sig.inputs[:6])}...)")
    if inputs is not None and all(inp.name in given for inp in sig.inputs):
        return compare(*_run_both(a, b, given), tolerance)      # the caller's feeds, as they are
    batch, seq = sig.lengths(given) or (shape.get("batch", 1), shape.get("seq", 16))
    past = shape.get("past", 0 if sig.has_past else 8)
    rng = np.random.default_rng(seed)
    feeds = sig.feeds(batch=batch, seq=seq, past=past, rng=rng, given=given)
    if not sig.has_past:
        return compare(*_run_both(a, b, feeds), tolerance)
    worst: dict[str, OutputDiff] = {}
    for step in range(DECODE_STEPS + 1):
        label = f"decode {step}" if step else "prefill"
        reference, candidate = _run_both(a, b, feeds, label)
        for diff in compare(reference, candidate, tolerance):
            diff.step = label
            if diff.name not in worst or _badness(diff) > _badness(worst[diff.name]):
                worst[diff.name] = diff
        past += seq if step == 0 else 1
        feeds = sig.feeds(batch=batch, seq=1, past=past, rng=rng, given=sig.next_step(reference))
    return list(worst.values())


def _badness(diff: OutputDiff) -> float:
    return np.inf if not np.isfinite(diff.max_rel) else diff.max_rel


def _open(path, which: str, provider: str | None):
    try:
        return session(path, provider)
    except Exception as exc:
        raise CannotRun(f"could not run the models under onnxruntime: it cannot load the {which} model "
                        f"({first_line(exc)})") from exc


def _run_both(a, b, feeds: dict, label: str = "") -> tuple[dict, dict]:
    """Both sessions' outputs on `feeds`; CannotRun names the model and the step."""
    outputs = []
    for sess, which in ((a, "original"), (b, "rewritten")):
        try:
            outputs.append(run(None, feeds, sess=sess))
        except Exception as exc:
            where = f" at the {label}" if label else ""
            raise CannotRun(f"could not run the models under onnxruntime: the {which} model failed{where} "
                            f"({first_line(exc)})") from exc
    return outputs[0], outputs[1]


def check_arguments(tolerance: float | None = None, **shape) -> None:
    """UsageError for a tolerance that is negative or not finite (NaN fails every output, ∞
    passes any) and for a batch or sequence length below 1 (past may be 0)."""
    if tolerance is not None and not (np.isfinite(tolerance) and tolerance >= 0):
        raise UsageError(f"tolerance {tolerance!r}: want a finite number >= 0")
    for name, value in shape.items():
        least = 0 if name == "past" else 1
        if not isinstance(value, (int, np.integer)) or value < least:
            raise UsageError(f"{name} {value!r}: want an integer >= {least}")


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(Path(path)) as data:
        return {k: data[k] for k in data.files}


def format_diffs(diffs: list[OutputDiff]) -> str:
    steps = any(d.step for d in diffs)      # a KV-cache graph: say at which run each was worst
    lines = [f"{'output':<32} {'dtype':<9} {'max abs':>11} {'max rel':>11} {'tol':>8}  ok"
             + ("   worst at" if steps else "")]
    for d in diffs:
        line = (f"{d.name[:32]:<32} {d.dtype:<9} {d.max_abs:>11.3e} {d.max_rel:>11.3e} "
                f"{d.tolerance:>8.0e}  {'yes' if d.ok else 'NO':<3}")
        lines.append(f"{line}  {d.step}" if steps else line.rstrip())
    return "\n".join(lines)

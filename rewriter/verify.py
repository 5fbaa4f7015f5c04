"""Run original and rewritten graphs under onnxruntime on the same inputs and judge them.

Error measure per output: max |a − b| / max |a| (relative to the original's largest value).
Default tolerances by output dtype: fp32/fp64 1e-5, fp16 1e-2, bf16 5e-2 (low-precision
graphs are not bit-identical; judge them against an fp32 reference with `bench zero-loss`).
An output beyond its tolerance fails only beyond FLOOR_K × the original's own noise floor:
the original's error against a float64 run of it (models with up to F64_MAX_WEIGHT_BYTES of
weights; where no float64 run is possible — onnxruntime's contrib ops have no double kernels —
its move when every weight and input moves by one ulp) and its move between onnxruntime's
optimized and unoptimized runs, the larger. An
ill-conditioned graph (LayerNorm over a large common mean, random all-positive weights) moves
by more than 1e-5 under onnxruntime's own fusions; an exact rewrite moves by as much.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from rewriter.errors import BadInput, CannotRun, UsageError, first_line
from rewriter.feeds import from_session, signature
from rewriter.promote import PROMOTED, float_weight_bytes, load_proto, promote

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
# The level of every correctness check (verify, --verify, the load and run checks of a written
# model and of the peer's fusions), not "all": onnxruntime 1.32 crashes the process (SIGSEGV)
# creating a level-"all" session of some valid fp16 Transpose → FusedMatMul graphs, where
# "extended" (which keeps its graph fusions; "all" adds layout transforms) runs them. The noise
# floor compares this level with "disable". Timing (rewriter/bench) passes the level users run,
# "all", explicitly.
CHECK_LEVEL = "extended"


def session(path, provider: str | None = None, optimize: bool = True, *, opt_level: str | None = None,
            threads: int = 0, cuda_options: dict | None = None, optimized_model_path=None):
    """The onnxruntime session every caller opens (verify, bench, benchmarks): `path` is a file
    or serialized model bytes; `opt_level` one of OPT_LEVELS (default CHECK_LEVEL, "disable"
    when not `optimize`); `threads` intra-op threads (0: ORT's default); `cuda_options` the CUDA
    provider's options; `optimized_model_path`: where ORT writes the graph it runs (weights
    of 1 KiB and more beside it, in optimized.data)."""
    import onnxruntime as ort
    level = opt_level or (CHECK_LEVEL if optimize else "disable")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    if threads:
        options.intra_op_num_threads = threads
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "optimized.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         "1024")
    names = [(name, cuda_options) if name == "CUDAExecutionProvider" and cuda_options else name
             for name in providers(provider)]
    model = path if isinstance(path, bytes) else str(path)     # a path or serialized model bytes
    return ort.InferenceSession(model, options, providers=names)


def ort_kernels(path, provider: str | None = None) -> dict[str, int]:
    """Op types (with counts) of the graph onnxruntime actually runs: the model after ORT's own
    optimizations for `provider` at the level the bench times (level "all", not CHECK_LEVEL) —
    its fusions, not only the rewriter's graph."""
    import tempfile
    from collections import Counter

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, provider, opt_level="all", optimized_model_path=optimized)
        graph = onnx.load(str(optimized), load_external_data=False).graph
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


RUN_CHECK_BYTES = 1 << 30     # a model is run-checked (run_check) when its weights are smaller than this
RUN_CHECK_SHAPE = {"batch": 1, "seq": 4}    # the inputs a run check makes from the signature


class RunCheckFailed(Exception):
    """A run check failed at `stage`: "load" (onnxruntime refused the model), "inputs" (no
    inputs could be made from its signature) or "run" (on `feeds`); `problem` is the reason."""

    def __init__(self, stage: str, problem: str, feeds: dict | None = None):
        super().__init__(f"{stage}: {problem}")
        self.stage, self.problem, self.feeds = stage, problem, feeds


def run_check(model, feeds: dict | None = None, signature_of=None) -> tuple[dict, dict]:
    """The run check of a model the rewriter made (`model`: a path or serialized bytes): loaded
    on CPU at CHECK_LEVEL and run once on `feeds` — default: made from the signature of
    `signature_of` (a path, bytes or onnx_ir.Model; default `model`), RUN_CHECK_SHAPE.
    Returns (feeds, outputs); RunCheckFailed names the stage that failed."""
    try:
        sess = session(model, "cpu")
    except Exception as exc:        # noqa: BLE001 - onnxruntime's refusal is the answer
        raise RunCheckFailed("load", first_line(exc)) from exc
    if feeds is None:
        try:
            feeds = make_inputs(signature_of if signature_of is not None else model, **RUN_CHECK_SHAPE)
        except Exception as exc:    # noqa: BLE001 - a signature feeds.py cannot fill
            raise RunCheckFailed("inputs", first_line(exc)) from exc
    try:
        return feeds, run(None, feeds, sess=sess)
    except Exception as exc:        # noqa: BLE001
        raise RunCheckFailed("run", first_line(exc), feeds) from exc


FLOOR_K = 3.0       # an output fails beyond max(tolerance, FLOOR_K × the original's own noise floor)
F64_MAX_WEIGHT_BYTES = 1 << 30  # float64 floor for models with up to this many bytes of weights
EVALUATOR_MAX_WEIGHT_BYTES = 64 << 20   # ... under onnx's reference evaluator (where ORT has no double kernel)


def max_rel_diff(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(max |Δ|, max |Δ| / max |reference|) over the positions where the reference is finite;
    inf when a shape differs or the candidate is Inf/NaN where the reference is finite (where
    the reference itself is not finite there is no value to be exact to)."""
    a, b = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if a.shape != b.shape:
        return float("inf"), float("inf")
    finite = np.isfinite(a)
    if not finite.any():
        return 0.0, 0.0
    if not np.isfinite(b[finite]).all():
        return float("inf"), float("inf")
    max_abs = float(np.max(np.abs(a[finite] - b[finite])))
    return max_abs, max_abs / max(float(np.max(np.abs(a[finite]))), 1e-30)


@dataclass
class OutputVerdict:
    """One output judged: the rewritten model's max relative difference from the original, the
    original's own noise floor (how far the original itself moves — its error against a float64
    run of it, and its move between onnxruntime's optimized and unoptimized runs — `floor_by`
    says which was measured) and the bound it is held to: max(tolerance, FLOOR_K × floor)."""
    name: str
    dtype: str
    max_abs: float
    max_rel: float
    tolerance: float
    floor: float = 0.0
    floor_by: str = ""      # what the floor was measured by ("" when not measured: within tolerance)
    step: str = ""          # KV-cache graphs: the run it was worst at (prefill, decode 1, ...)

    @property
    def bound(self) -> float:
        return max(self.tolerance, FLOOR_K * self.floor) if np.isfinite(self.floor) else self.tolerance

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_rel)) and self.max_rel <= self.bound


def judge(reference: dict, candidate: dict, tolerance: float | None = None,
          floor: dict | None = None) -> list[OutputVerdict]:
    """The one judgement of a rewrite every check of the project makes (verify, --verify, the
    tests, the fuzzer, calibrate, --measure): per output of `reference` (the original's), its max
    relative difference from `candidate`, held to max(tolerance — default by dtype, TOLERANCE —,
    FLOOR_K × the original's noise floor). `floor`: {output: (value, what measured it)}, from
    `noise_floor`; without it the bound is the tolerance alone."""
    verdicts = []
    for name, ref in reference.items():
        got = candidate.get(name)
        tol = tolerance if tolerance is not None else TOLERANCE.get(str(ref.dtype), 1e-5)
        max_abs, max_rel = max_rel_diff(ref, got) if got is not None else (float("inf"), float("inf"))
        value, by = (floor or {}).get(name, (0.0, ""))
        verdicts.append(OutputVerdict(name, str(ref.dtype), max_abs, max_rel, tol, value, by))
    return verdicts


def noise_floor(original, runs: list[tuple[dict, dict]], provider: str | None = None,
                float64: bool | None = None) -> dict[str, tuple[float, str]]:
    """Per float output of `original`, its own noise floor over `runs` ([(feeds, its outputs)],
    worst run): the larger of its move between onnxruntime's optimized and unoptimized runs of
    the same graph and — for models with at most F64_MAX_WEIGHT_BYTES of weights, or `float64`
    True — its error against a float64 run of it (the graph promoted to DOUBLE). A model
    onnxruntime cannot run either way gets the floors it can."""
    measured: dict[str, list] = {}

    def add(outputs_per_run: list[dict], by: str, truth: bool):
        for (_, reference), outputs in zip(runs, outputs_per_run):
            for name, ref in reference.items():
                if ref.dtype.kind != "f" or name not in outputs:
                    continue
                rel = max_rel_diff(outputs[name], ref)[1] if truth else max_rel_diff(ref, outputs[name])[1]
                if np.isfinite(rel):
                    entry = measured.setdefault(name, [0.0, set()])
                    entry[0] = max(entry[0], rel)
                    entry[1].add(by)

    try:
        unoptimized = session(original, provider, optimize=False)
        add([run(None, feeds, sess=unoptimized) for feeds, _ in runs], "ort-opt", truth=False)
        del unoptimized
    except Exception:       # noqa: BLE001 - onnxruntime refuses it unoptimized: the other floor
        pass
    small = float_weight_bytes(original) <= F64_MAX_WEIGHT_BYTES
    outputs = _float64_runs(original, [feeds for feeds, _ in runs], provider) \
        if (small if float64 is None else float64) else None
    if outputs is not None:
        add(outputs, "float64", truth=True)
    elif small:     # no float64 kernel (onnxruntime's contrib ops): how far one ulp of rounding moves it
        outputs = _ulp_runs(original, [feeds for feeds, _ in runs], provider)
        if outputs is not None:
            add(outputs, "ulp", truth=False)
    return {name: (value, "+".join(sorted(by))) for name, (value, by) in measured.items()}


def _ulp_runs(original, feeds_per_run: list[dict], provider, seed: int = 0) -> list[dict] | None:
    """The original with every float weight of two or more values, and every float input, moved
    by one ulp up or down at random (what one rounding more or less does), run on each feeds
    under onnxruntime; None where it cannot be. For graphs a float64 run cannot reach."""
    rng = np.random.default_rng(seed)

    def moved(a: np.ndarray) -> np.ndarray:
        return np.nextafter(a, np.where(rng.random(a.shape) < 0.5, -np.inf, np.inf).astype(a.dtype))

    try:
        model = load_proto(original, weights=True)
        if model is original:       # the caller's proto: perturb a copy (a loaded file is ours already)
            model = onnx.ModelProto()
            model.CopyFrom(original)
        for t in model.graph.initializer:
            if t.data_type in PROMOTED and np.prod(t.dims) >= 2:
                t.CopyFrom(numpy_helper.from_array(moved(numpy_helper.to_array(t)), t.name))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ulp.onnx"
            onnx.save(model, str(path), save_as_external_data=True, location="ulp.onnx.data", size_threshold=1024)
            del model
            sess = session(path, provider)
            return [run(None, {k: moved(v) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
                               for k, v in feeds.items()}, sess=sess) for feeds in feeds_per_run]
    except Exception:       # noqa: BLE001 - onnxruntime cannot run it: no such floor
        return None


def _float64_runs(original, feeds_per_run: list[dict], provider) -> list[dict] | None:
    """The original promoted to DOUBLE, run on each feeds (float inputs promoted) under
    onnxruntime — or, where it has no double kernel for an op (Conv), under onnx's reference
    evaluator for models of up to EVALUATOR_MAX_WEIGHT_BYTES —; None where neither runs it.
    Written with external data to a temporary folder: a promoted model passes protobuf's 2 GiB
    sooner than its original."""
    try:
        loaded = load_proto(original, weights=True)
        promoted = promote(loaded, {t: onnx.TensorProto.DOUBLE for t in PROMOTED})
    except Exception:       # noqa: BLE001 - a tensor numpy cannot widen: no float64 floor
        return None
    doubles = {v.name for v in promoted.graph.input if v.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE}
    feeds_per_run = [{k: v.astype(np.float64) if k in doubles else v for k, v in feeds.items()}
                     for feeds in feeds_per_run]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "float64.onnx"
        try:
            onnx.save(promoted, str(path), save_as_external_data=True, location="float64.onnx.data",
                      size_threshold=1024)      # (makes `promoted` refer to that file)
            sess = session(path, provider)
            return [run(None, feeds, sess=sess) for feeds in feeds_per_run]
        except Exception:   # noqa: BLE001 - no double kernel for an op: the reference evaluator
            if float_weight_bytes(loaded) > EVALUATOR_MAX_WEIGHT_BYTES:     # (not read again)
                return None
        try:
            onnx.load_external_data_for_model(promoted, tmp)
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                evaluator = ReferenceEvaluator(promoted)
                names = [o.name for o in promoted.graph.output]
                return [dict(zip(names, evaluator.run(None, feeds))) for feeds in feeds_per_run]
        except Exception:   # noqa: BLE001 - neither runs it: the optimized-vs-unoptimized floor alone
            return None


DECODE_STEPS = 2    # after the prefill: the cache is fed back, then grows once more


def verify(original, rewritten, *, inputs: dict | None = None, provider: str | None = None,
           tolerance: float | None = None, seed: int = 0, floor: bool = True, **shape) -> list[OutputVerdict]:
    """Judge the rewritten model's outputs against the original's on the same inputs: `inputs`
    when they name every graph input; else inputs made from the original's graph
    (rewriter.feeds), taking those `inputs` gives (token ids: their batch and length). A KV-cache
    graph runs as a greedy generator runs it: a prefill (past length 0 unless `past` is given),
    then DECODE_STEPS one-token steps fed the original's presents and its most likely next token —
    both models get the same feeds at every step, each output's worst step is reported. Where an
    output differs beyond the tolerance (and `floor`), the original's noise floor over the same
    runs (noise_floor) decides: it fails beyond FLOOR_K × that floor. CannotRun when onnxruntime
    cannot load or run either model (nothing was compared)."""
    check_arguments(tolerance, **shape)
    a = _open(original, "original", provider)
    b = _open(rewritten, "rewritten", provider)
    sig = signature(original)
    given = dict(inputs or {})
    unknown = sorted(set(given) - {inp.name for inp in sig.inputs})
    if unknown:
        raise BadInput(f"inputs {', '.join(map(repr, unknown[:4]))}: not inputs of the model "
                       f"(it takes {', '.join(inp.name for inp in sig.inputs[:6])}...)")
    runs: list[tuple[dict, dict, dict, str]] = []       # (feeds, original's, rewritten's, step)
    if inputs is not None and all(inp.name in given for inp in sig.inputs):
        runs.append((given, *_run_both(a, b, given), ""))       # the caller's feeds, as they are
    else:
        batch, seq = sig.lengths(given) or (shape.get("batch", 1), shape.get("seq", 16))
        past = shape.get("past", 0 if sig.has_past else 8)
        rng = np.random.default_rng(seed)
        feeds = sig.feeds(batch=batch, seq=seq, past=past, rng=rng, given=given)
        for step in range(DECODE_STEPS + 1 if sig.has_past else 1):
            label = (f"decode {step}" if step else "prefill") if sig.has_past else ""
            runs.append((feeds, *_run_both(a, b, feeds, label), label))
            past += seq if step == 0 else 1
            feeds = sig.feeds(batch=batch, seq=1, past=past, rng=rng, given=sig.next_step(runs[-1][1]))
    del b
    return judge_runs(original, runs, tolerance=tolerance, provider=provider, floor=floor)


def judge_runs(original, runs: list[tuple[dict, dict, dict, str]], *, tolerance: float | None = None,
               provider: str | None = None, floor: bool = True) -> list[OutputVerdict]:
    """`judge` over runs [(feeds, the original's outputs, the rewritten's, step)]: per output,
    its verdict at the run where it differed most. The original's noise floor over the same
    runs is measured only when an output is beyond its tolerance (and `floor`)."""
    worst: dict[str, OutputVerdict] = {}
    for _, reference, candidate, step in runs:
        for v in judge(reference, candidate, tolerance):
            v.step = step
            if v.name not in worst or badness(v) > badness(worst[v.name]):
                worst[v.name] = v
    verdicts = list(worst.values())
    if floor and any(np.isfinite(v.max_rel) and not v.ok for v in verdicts):
        floors = noise_floor(original, [(feeds, reference) for feeds, reference, _, _ in runs], provider)
        for v in verdicts:
            v.floor, v.floor_by = floors.get(v.name, (0.0, ""))
    return verdicts


def badness(verdict: OutputVerdict) -> float:
    """Its max relative difference, NaN counted as infinite (the key for the worst verdict)."""
    return np.inf if not np.isfinite(verdict.max_rel) else verdict.max_rel


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


def format_verdicts(verdicts: list[OutputVerdict]) -> str:
    """The table: per output the rewritten model's max relative difference, the original's own
    floor (what measured it) and the bound max(tolerance, FLOOR_K × floor)."""
    steps = any(v.step for v in verdicts)      # a KV-cache graph: say at which run each was worst
    lines = [f"{'output':<32} {'dtype':<9} {'max abs':>10} {'max rel':>10} {'floor':>10} {'by':<15} "
             f"{'bound':>8}  ok" + ("   worst at" if steps else "")]
    for v in verdicts:
        floor = f"{v.floor:>10.2e} {v.floor_by:<15}" if v.floor_by else f"{'-':>10} {'':<15}"
        line = (f"{v.name[:32]:<32} {v.dtype:<9} {v.max_abs:>10.3e} {v.max_rel:>10.3e} {floor} "
                f"{v.bound:>8.1e}  {'yes' if v.ok else 'NO':<3}")
        lines.append(f"{line}  {v.step}" if steps else line.rstrip())
    return "\n".join(lines)


def summary(verdicts: list[OutputVerdict]) -> str:
    """One line: how many outputs were judged and the one nearest its bound."""
    if not verdicts:
        return "verified: the models have no outputs"
    worst = max(verdicts, key=lambda v: badness(v) / max(v.bound, 1e-300))
    ok = sum(v.ok for v in verdicts)
    floor = f", the original's own floor {worst.floor:.2e} ({worst.floor_by})" if worst.floor_by else ""
    at = f" at {worst.step}" if worst.step else ""
    head = "verified" if ok == len(verdicts) else "verification failed"
    return (f"{head}: {ok} of {len(verdicts)} output(s) within bound; nearest {worst.name!r}{at}: max rel "
            f"{worst.max_rel:.3e}{floor}, bound {worst.bound:.1e}")

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

from rewriter.errors import UsageError

TOLERANCE = {"float32": 1e-5, "float64": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


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


def _vocab_sizes(path) -> dict[str, int]:
    """Graph inputs used as Gather indices into a constant table -> the table's row count."""
    if path is None:
        return {}
    model = onnx.load(str(path), load_external_data=False)
    tables = {init.name: init.dims[0] for init in model.graph.initializer if len(init.dims) == 2}
    vocab: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in tables:
            vocab[node.input[1]] = min(vocab.get(node.input[1], 1 << 62), tables[node.input[0]])
    return vocab


def make_inputs(path, *, batch: int = 1, seq: int = 16, past: int = 8, seed: int = 0,
                sess=None) -> dict[str, np.ndarray]:
    """Inputs from the model's signature: token ids within the embedding table, ones for
    masks, positions for position ids, normal floats for everything else."""
    sess = sess or session(path, "cpu")
    rng = np.random.default_rng(seed)
    vocab = _vocab_sizes(path)
    names = [i.name for i in sess.get_inputs()]
    has_past = any("past" in n or "cache" in n for n in names)
    feeds = {}
    for inp in sess.get_inputs():
        name = inp.name.lower()
        dims = []
        for i, d in enumerate(inp.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif i == 0:
                dims.append(batch)
            elif isinstance(d, str) and ("past" in d.lower() or "cache" in d.lower()):
                dims.append(past)
            elif ("past" in name or "cache" in name) and i == 2:
                dims.append(past)
            elif "mask" in name and has_past:
                dims.append(past + seq)
            else:
                dims.append(seq)
        dtype = ORT_TYPES.get(inp.type, np.float32)
        if "mask" in name:
            feeds[inp.name] = np.ones(dims, dtype)
        elif "position" in name:
            start = past if has_past else 0
            feeds[inp.name] = np.broadcast_to(np.arange(start, start + dims[-1]), dims).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[inp.name] = rng.integers(0, vocab.get(inp.name, 2), size=dims).astype(dtype)
        else:
            feeds[inp.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def run(path, feeds, provider: str | None = None, sess=None) -> dict[str, np.ndarray]:
    sess = sess or session(path, provider)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


@dataclass
class OutputDiff:
    name: str
    dtype: str
    max_abs: float
    max_rel: float
    tolerance: float

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


def verify(original, rewritten, *, inputs: dict | None = None, provider: str | None = None,
           tolerance: float | None = None, seed: int = 0, **shape) -> list[OutputDiff]:
    """Compare the two models' outputs on the same inputs (made from the signature)."""
    check_arguments(tolerance, **shape)
    a = session(original, provider)
    b = session(rewritten, provider)
    feeds = inputs if inputs is not None else make_inputs(original, seed=seed, sess=a, **shape)
    return compare(run(original, feeds, sess=a), run(rewritten, feeds, sess=b), tolerance)


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
    lines = [f"{'output':<32} {'dtype':<9} {'max abs':>11} {'max rel':>11} {'tol':>8}  ok"]
    for d in diffs:
        lines.append(f"{d.name[:32]:<32} {d.dtype:<9} {d.max_abs:>11.3e} {d.max_rel:>11.3e} "
                     f"{d.tolerance:>8.0e}  {'yes' if d.ok else 'NO'}")
    return "\n".join(lines)

"""Measure what each strategy costs on a target, per site shape: the cost files the chooser reads.

    python -m rewriter calibrate MODEL --provider cuda -o costs.json      # the model's site shapes
    python -m rewriter calibrate --shapes 576x960,4096x4096 --provider cpu -o costs.json

For every distinct site shape (rewriter.costs.SiteShape) a *probe* is built: `layers` copies
of the site in a residual chain,

    h_{i+1} = [h_i +] Σ_j MatMul(MatMul(Norm_i(h_i), W_j), V_j)     W_j: [d, n_j], V_j: [n_j, d]

with the norm in the site's own form (decomposed dynamo-style, or the fused op), its dtype and
random gains (β for LayerNorm). Each strategy is applied to the probe by the rewriter itself,
checked against the unrewritten probe on the target provider (tolerance by dtype, as `verify`),
and the passing ones are timed together, interleaved, by the bench harness (rewriter/bench.py).
A strategy that fails to load, run or match is recorded under "failed" with the reason and is
never chosen. Costs are per site: the chain's median time divided by `layers`. "kernels"
records, per strategy, the op types of the probe as onnxruntime runs it (after its own
fusions, rewriter.verify.ort_kernels): what the time was spent on.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from rewriter.costs import CostTable, SiteShape, site_shape
from rewriter.errors import UsageError
from rewriter.plan import STRATEGIES, applicable

NUMPY = {"float32": np.float32, "float16": np.float16}


def model_shapes(path) -> list[SiteShape]:
    """The distinct shapes of the sites the rewriter finds in a model."""
    from rewriter import patterns
    from rewriter import io
    from rewriter.api import infer_shapes
    model, _ = io.load(path)
    infer_shapes(model)
    sites, _ = patterns.find_sites(model.graph)
    return sorted({s for s in map(site_shape, sites) if s is not None}, key=SiteShape.label)


def build_probe(shape: SiteShape, path, layers: int = 4, seed: int = 0, eps: float = 1e-5) -> None:
    """Write the probe chain for `shape` (see the module doc) to `path`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if shape.dtype not in NUMPY:
        raise ValueError(f"no probe for dtype {shape.dtype}")
    np_dt = NUMPY[shape.dtype]
    onnx_dt = helper.np_dtype_to_tensor_dtype(np.dtype(np_dt))
    rng = np.random.default_rng(seed)
    d = shape.d
    nodes, inits = [], []
    counter = iter(range(1 << 30))

    def const(array, hint):
        name = f"{hint}_{next(counter)}"
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op_type, inputs, n_out=1, domain="", **attrs):
        k = next(counter)
        outs = [f"{op_type.lower()}_{k}_{i}" for i in range(n_out)]
        nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}_{k}", domain=domain, **attrs))
        return outs if n_out > 1 else outs[0]

    axes = const(np.array([-1], np.int64), "axes")

    def decomposed(x):
        x32 = node("Cast", [x], to=TensorProto.FLOAT) if shape.dtype != "float32" else x
        if shape.kind == "layer":
            x32 = node("Sub", [x32, node("ReduceMean", [x32, axes], keepdims=1)])
        ms = node("ReduceMean", [node("Pow", [x32, const(np.array(2.0, np.float32), "two")]), axes], keepdims=1)
        root = node("Sqrt", [node("Add", [ms, const(np.array(eps, np.float32), "eps")])])
        y = node("Mul", [x32, node("Reciprocal", [root])])
        return node("Cast", [y], to=onnx_dt) if shape.dtype != "float32" else y

    def affine(y):
        if shape.kind == "dyt":
            y = node("Tanh", [node("Mul", [y, const(np.array(0.5, np_dt), "alpha")])])
        y = node("Mul", [const((1 + 0.1 * rng.standard_normal(d)).astype(np_dt), "gain"), y])
        if shape.kind in ("layer", "dyt"):
            y = node("Add", [y, const((0.1 * rng.standard_normal(d)).astype(np_dt), "beta")])
        return y

    def norm(h, delta):
        """(normalized, the residual sum it normalized)."""
        x = h if delta is None else node("Add", [h, delta])
        if shape.form == "decomposed" or shape.kind == "dyt":
            return affine(decomposed(x) if shape.kind != "dyt" else x), x
        gain = const((1 + 0.1 * rng.standard_normal(d)).astype(np_dt), "gain")
        beta = [const((0.1 * rng.standard_normal(d)).astype(np_dt), "beta")] if shape.kind == "layer" else []
        if delta is not None:       # one Skip* kernel: residual add + norm
            op_type = "SkipSimplifiedLayerNormalization" if shape.kind == "rms" else "SkipLayerNormalization"
            nodes.pop()             # the Add above
            y, _, _, total = node(op_type, [h, delta, gain] + beta, n_out=4, domain="com.microsoft", epsilon=eps)
            return y, total
        op_type = "SimplifiedLayerNormalization" if shape.kind == "rms" else "LayerNormalization"
        return node(op_type, [x, gain] + beta, axis=-1, epsilon=eps, stash_type=1), x

    h, delta = "h0", None
    for _ in range(layers):
        y, x = norm(h, delta if shape.residual else None)
        h = x if shape.residual else h
        parts = []
        for n in shape.outs:
            w = (rng.standard_normal((d, n), dtype=np.float32) / np.sqrt(d)).astype(np_dt)
            v = (rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(n)).astype(np_dt)
            parts.append(node("MatMul", [node("MatMul", [y, const(w, "w")]), const(v, "v")]))
        summed = parts[0] if len(parts) == 1 else node("Sum", parts)
        if shape.residual:
            delta = summed
        else:
            h = summed
    out = node("Add", [h, delta]) if shape.residual else h
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("h0", onnx_dt, [1, "tokens", d])],
                              [helper.make_tensor_value_info(out, onnx_dt, [1, "tokens", d])], inits)
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("com.microsoft", 1)]
                                              if shape.form == "fused" else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    if sum(t.ByteSize() for t in inits) > 1 << 30:      # past protobuf's 2 GiB: weights beside it
        onnx.save(model, str(path), save_as_external_data=True, location=Path(path).name + ".data")
    else:
        onnx.save(model, str(path))


def candidates_for(shape: SiteShape) -> list[str]:
    """Strategies worth measuring for this shape (one representative per distinct graph)."""
    site = SimpleNamespace(kind=shape.kind, form=shape.form, size=shape.d,
                           defer_blocker=None)      # what applicable() reads
    return list(dict.fromkeys(applicable(site, s) for s in STRATEGIES))


def calibrate(shapes: list[SiteShape], *, provider: str = "cpu", tokens=(1, 512), layers: int = 4,
              settings=None, workdir=None, log=print) -> CostTable:
    """Measure every strategy on every shape; returns the probes as a CostTable."""
    from rewriter import bench
    from rewriter.api import rewrite_file
    from rewriter.verify import TOLERANCE, compare, make_inputs, ort_kernels, run

    provider = bench.resolve_provider(provider)
    settings = settings or bench.Settings(warmup=3, min_rounds=5, max_rounds=15, budget_s=1.5)
    device = bench.device_name(provider)
    import onnxruntime as ort
    probes = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for shape in shapes:
            t0 = time.perf_counter()
            base = Path(tmp) / f"probe_{len(probes)}.onnx"
            build_probe(shape, base, layers=layers)
            variants, failed = {"keep": bench.Variant("keep", str(base))}, {}
            kernels = {"keep": ort_kernels(base, provider)}
            feeds = make_inputs(base, batch=1, seq=8)
            reference = run(base, feeds, provider=provider)
            for strategy in candidates_for(shape):
                if strategy == "keep":
                    continue
                dst = Path(tmp) / f"{base.stem}.{strategy}.onnx"
                try:
                    report = rewrite_file(base, dst, strategy=strategy, overwrite=True)
                    if report.rewritten != layers:
                        raise RuntimeError(f"{report.rewritten}/{layers} sites rewritten")
                    diffs = compare(reference, run(dst, feeds, provider=provider), TOLERANCE.get(shape.dtype))
                    if not all(d.ok for d in diffs):
                        raise RuntimeError(f"outputs differ on {provider}: max rel {max(d.max_rel for d in diffs):.2e}")
                    variants[strategy] = bench.Variant(strategy, str(dst))
                    kernels[strategy] = ort_kernels(dst, provider)
                except Exception as exc:        # recorded, never chosen
                    failed[strategy] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    log(f"  {shape.label()} {strategy}: FAILED {failed[strategy]}")
            result = bench.measure(variants, [bench.Shape(tokens=t) for t in tokens], provider=provider,
                                   settings=settings)
            cells = {}
            for row in result["shapes"]:
                t = str(row["shape"]["tokens"])
                cells[t] = {}
                for name, st in row["variants"].items():
                    if "median_ms" in st:
                        cells[t][name] = {k: round(st[f"{k}_ms"] / layers, 6) for k in ("median", "p10", "p90")}
                        cells[t][name]["ms"] = cells[t][name].pop("median")
                    else:
                        failed.setdefault(name, st.get("error", "not measured"))
            probes.append({"ep": provider, "device": device, "onnxruntime": ort.__version__,
                           "dtype": shape.dtype, "kind": shape.kind, "form": shape.form,
                           "residual": shape.residual, "d": shape.d, "outs": list(shape.outs),
                           "layers": layers, "threads": settings.threads,
                           "source": "python -m rewriter calibrate", "tokens": cells,
                           "failed": failed, "kernels": kernels})
            best = {t: min(c, key=lambda n: c[n]["ms"]) for t, c in cells.items() if c}
            log(f"{shape.label()}: {time.perf_counter() - t0:.1f} s; fastest per tokens {best}")
    return CostTable(probes)


def parse_shapes(text: str, *, kind: str = "rms", form: str = "decomposed", residual: bool = True,
                 dtype: str = "float16") -> list[SiteShape]:
    """"576x960,4096x4096x4096" → SiteShapes (d x n1 [x n2 ...]); UsageError on anything else."""
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        d, *outs = _positive_sizes(item)
        out.append(SiteShape(kind, form, residual, d, tuple(sorted(outs or [d])), dtype))
    if not out:
        raise UsageError(f"--shapes {text!r}: give at least one DxN[xN2...] (e.g. 576x960)")
    return out


def _positive_sizes(item: str) -> list[int]:
    sizes = [v.strip() for v in item.lower().split("x")]
    if not all(v.isdigit() and int(v) > 0 for v in sizes):
        raise UsageError(f"--shapes {item!r}: want DxN[xN2...] with positive integers (e.g. 576x960)")
    return [int(v) for v in sizes]


__all__ = ["build_probe", "calibrate", "candidates_for", "model_shapes", "parse_shapes"]

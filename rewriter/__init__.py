"""FlashNorm for ONNX: fold normalization gains into the following linears and defer the
per-row 1/RMS scale, exactly. See README.md.

The public names are loaded on first use, so that `patterns` can import
`rewriter.irtools` without pulling in the whole engine (imports point one way:
cli → api → plan/rewrite → patterns → irtools).
"""

_PUBLIC = {"rewrite": "rewriter.api", "rewrite_file": "rewriter.api", "rewrite_ir": "rewriter.api",
           "Options": "rewriter.plan", "Report": "rewriter.report"}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        import importlib
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'rewriter' has no attribute {name!r}")

"""FlashNorm for ONNX: fold normalization gains into the following linears and defer the
per-row 1/RMS scale, exactly. See README.md (its Layout section maps the modules and which
way they import: cli → api → passes → plan/transform/scale → patterns → patterns.graph).
"""

from rewriter.api import rewrite, rewrite_file, rewrite_ir
from rewriter.plan import Options
from rewriter.report import Report

__all__ = ["Options", "Report", "rewrite", "rewrite_file", "rewrite_ir"]

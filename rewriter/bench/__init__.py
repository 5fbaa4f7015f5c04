"""Benchmark tooling: `python -m rewriter bench`, the harness `calibrate` times with, and the
graphs the tests, probes and benchmarks build. Import the module you need; this package
imports none of them, so `calibrate` loads the timing harness alone.

    timing.py    sessions (rewriter.verify.session), inputs, interleaved timing, statistics
                 → rewriter.verify, rewriter.io
    passes.py    the variant builders, each an onnx_ir pass: NormFree, FuseNorms (the rewriter's
                 NormKernels.fuse_norm at patterns.find_sites' sites), OnnxscriptFusions,
                 OrtTransformersOptimizer → rewriter.kernels, rewriter.patterns, rewriter.io
    variants.py  the VARIANTS table and the file behind each variant → passes, timing, rewriter.api
    present.py   ratios, table, plot, JSON, per-case merge → variants, timing
    cli.py       `python -m rewriter bench` and run_bench → present, variants, timing, rewriter.cli
    graphs.py    GraphBuilder: one onnx.helper graph builder (tests, calibrate probes,
                 benchmarks/op_level.py, models/synth_llama.py) → rewriter.io
"""

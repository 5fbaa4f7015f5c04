"""Benchmarks: op_level.py (norm -> projection chains), end_to_end.py (Llama-shaped decoders),
zero_loss.py (real SmolLM2 numerics). The timing core is rewriter/bench/timing.py, the
variants rewriter/bench/variants.py."""

"""The Olive user script of examples/olive: SmolLM2 on offline text, for Olive's evaluator.

    smollm2_text(tokens_file, length=None)   the dataset of both metrics: one sequence, batch 1

The text is benchmarks/quantize_after_rewrite.py's TEXT, tokenized with the SmolLM2 tokenizer
by run_workflows.py into tokens_file (no hub). Perplexity is Olive's own accuracy sub-type
"perplexity" (torchmetrics, next-token NLL over the sequence), latency its latency metric on
the first `length` tokens. (A "custom" metric — a user evaluate_func reusing the benchmark's
float64 NLL — does not run in olive-ai 0.13: serializing the workflow fails on a custom
metric's backend, None; run_workflows.py checks Olive's number against that NLL instead.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from olive.data.registry import Registry


@Registry.register_dataset()
def smollm2_text(tokens_file, length=None, **kwargs):
    """[(inputs, labels)]: the text's tokens (the first `length`, or all) as the model's
    input_ids and attention_mask, and as the perplexity's targets; Olive's dataloader adds the
    batch axis."""
    ids = np.asarray(json.loads(Path(tokens_file).read_text())[:length], np.int64)
    return [({"input_ids": ids, "attention_mask": np.ones_like(ids)}, ids)]

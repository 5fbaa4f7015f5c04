"""Decoder graphs with a KV cache, shaped like optimum's `text-generation-with-past` export.

    from models.kv_export import export_optimum_style
    export_optimum_style(model, "decoder_with_past.onnx")

A TorchScript export (seconds for the zoo's tiny models, where the dynamo export of
models.export.export_decoder_with_past takes a minute) of the same PastKVWrapper, with
optimum's interface: inputs input_ids, attention_mask, position_ids,
past_key_values.N.key/value [batch, kv heads, past, head size]; outputs logits,
present.N.key/value; the same dimension names. One graph serves the prefill (past length 0)
and the decode steps.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import torch

from models.export import PastKVWrapper, _kv_shape


def names(layers: int) -> tuple[list[str], list[str]]:
    pasts = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    presents = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *pasts], ["logits", *presents]


def export_optimum_style(model, path, opset: int = 17, batch: int = 1, seq: int = 3, past: int = 2) -> str:
    cfg = model.config
    layers = cfg.num_hidden_layers
    kv_heads, head_size = _kv_shape(cfg)
    inputs, outputs = names(layers)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq)
    cache = [torch.randn(batch, kv_heads, past, head_size) for _ in range(2 * layers)]
    total = "past_sequence_length + sequence_length"
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"}, "position_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: total}, "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({name: {0: "batch_size", 2: "past_sequence_length"} for name in inputs[3:]})
    axes.update({name: {0: "batch_size", 2: total} for name in outputs[1:]})
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")     # TorchScript tracer warnings about the cache's Python logic
        torch.onnx.export(PastKVWrapper(model).eval(), (ids, mask, positions, *cache), str(path), dynamo=False,
                          opset_version=opset, input_names=inputs, output_names=outputs, dynamic_axes=axes)
    return str(path)

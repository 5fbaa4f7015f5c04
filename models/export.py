"""Export zoo / real models to ONNX and make sure onnxruntime (CPU) can load and run them.

Main entry points::

    export_onnx(model, path, exporter="dynamo", opset=18, dtype="fp32", batch=1, seq=8,
                with_attention_mask=None) -> ExportResult
    ort_optimize(in_path, out_path, model_type, num_heads, hidden, ...) -> out_path
    export_decoder_with_past(model, path, exporter="wrapper"|"transformers", ...) -> path(s)
    run_ort(path, input_ids, attention_mask=None) -> np.ndarray
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import onnx
import torch
from torch import nn

from rewriter.bench.passes import fix_ir_version, ort_optimize as _ort_optimize
from rewriter.verify import session as _session


DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _is_encoder(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) in {"bert", "roberta", "distilbert", "xlm-roberta"} \
        and not hasattr(model, "lm_head")


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except Exception:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


class LogitsWrapper(nn.Module):
    """Calls the model with plain tensors and returns a single tensor (logits / last_hidden_state)."""

    def __init__(self, model: nn.Module, with_attention_mask: bool,
                 batched_positions: bool = False):
        super().__init__()
        self.model = model
        self.with_attention_mask = with_attention_mask
        self.hf = _is_hf(model)
        self.encoder = _is_encoder(model)
        # pass position_ids = arange(T) expanded to [B, T]: cos/sin then carry the batch dim,
        # which onnxruntime's RotaryEmbedding (opset 23) requires for batch > 1
        self.batched_positions = batched_positions and self.hf and not self.encoder

    def forward(self, input_ids, attention_mask=None):
        if not self.hf:
            out = self.model(input_ids, attention_mask) if attention_mask is not None \
                else self.model(input_ids)
            return out
        kw = dict(input_ids=input_ids, return_dict=True)
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        if self.encoder:
            return self.model(**kw).last_hidden_state
        if self.batched_positions:
            b, t = input_ids.shape
            kw["position_ids"] = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
        return self.model(**kw, use_cache=False).logits


@dataclasses.dataclass
class ExportResult:
    path: str
    exporter: str
    opset: int          # opset actually in the file (default domain)
    dtype: str
    inputs: list
    outputs: list
    seconds: float      # wall time of torch.onnx.export (+ save)
    ir_version: int
    op_counts: dict

    def summary(self) -> str:
        top = ", ".join(f"{k}:{v}" for k, v in sorted(self.op_counts.items(),
                                                       key=lambda kv: -kv[1])[:12])
        return (f"{self.path}: {self.exporter} opset{self.opset} {self.dtype} ir{self.ir_version} "
                f"in={self.inputs} out={self.outputs} {self.seconds:.1f}s  [{top}]")


def op_counts(model: onnx.ModelProto) -> dict:
    counts: dict = {}
    for n in model.graph.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _default_opset(m: onnx.ModelProto) -> int:
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return -1


def example_inputs(model: nn.Module, batch: int = 1, seq: int = 8, with_attention_mask=True,
                   seed: int = 0):
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", 256)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.long)
    mask = torch.ones(batch, seq, dtype=torch.long) if with_attention_mask else None
    return ids, mask


def export_onnx(model: nn.Module, path: str | os.PathLike, exporter: str = "dynamo",
                opset: int = 18, dtype: str = "fp32", batch: int = 1, seq: int = 8,
                with_attention_mask: bool | None = None, dynamic: bool = True,
                optimize: bool = True, check: bool = True, verbose: bool = False,
                batched_positions: bool | None = None) -> ExportResult:
    """Export ``model`` (a zoo / HF model) to ONNX at ``path``.

    Inputs: ``input_ids`` [batch, seq] int64 (+ ``attention_mask`` int64 where requested);
    output: ``logits`` (``last_hidden_state`` for BERT-like encoders). Dynamic axes
    ``batch`` and ``sequence`` unless ``dynamic=False``.

    exporter: "dynamo" (torch.onnx.export(dynamo=True), optimize=onnxscript optimizer) or
              "torchscript" (dynamo=False; opset <= 20).
    with_attention_mask: None = auto: True for torchscript (decoders fail on aten::diff
              without it) and for encoders; False for dynamo decoders.
    dtype: "fp32" | "fp16" (the model is converted to half in a deep copy; CPU half export).
    The dynamo exporter traces with batch >= 2 when dynamic (torch.export specializes size-1
    dims); the ``batch`` argument is otherwise just the example size.
    batched_positions: None = auto (True for opset >= 23): decoders get position_ids =
    arange(seq) expanded to [batch, seq] inside the graph, so that ORT's RotaryEmbedding
    (opset 23) runs at batch > 1 (it rejects a batch-1 cos/sin cache otherwise).
    The written file's ir_version is clamped to rewriter.bench.passes.MAX_IR_VERSION; with
    ``check`` the file is loaded in onnxruntime CPU and run once on random ids.
    """
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}")
    if exporter == "torchscript" and opset > 20:
        raise ValueError("TorchScript exporter supports opset <= 20")
    encoder = _is_encoder(model)
    if with_attention_mask is None:
        with_attention_mask = exporter == "torchscript" or encoder
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, Path(str(path) + ".data")):
        if stale.exists():
            stale.unlink()

    import copy
    m = model
    if DTYPES[dtype] != next(model.parameters()).dtype:
        m = copy.deepcopy(model).to(DTYPES[dtype])
    m.eval()
    if batched_positions is None:
        batched_positions = opset >= 23
    wrapper = LogitsWrapper(m, with_attention_mask, batched_positions).eval()
    trace_batch = max(batch, 2) if (dynamic and exporter == "dynamo") else batch
    ids, mask = example_inputs(model, trace_batch, seq, with_attention_mask)
    input_names = ["input_ids"] + (["attention_mask"] if with_attention_mask else [])
    output_names = ["last_hidden_state" if encoder else "logits"]
    args = (ids, mask) if with_attention_mask else (ids,)

    t0 = time.perf_counter()
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with torch.no_grad(), warnings.catch_warnings(), quiet:
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dyn = None
            if dynamic:
                B = torch.export.Dim("batch", min=1, max=1024)
                S = torch.export.Dim("sequence", min=1, max=8192)
                dyn = {"input_ids": {0: B, 1: S}}
                if with_attention_mask:
                    dyn["attention_mask"] = {0: B, 1: S}
            def dynamo(shapes):
                return torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset,
                                         input_names=input_names, output_names=output_names,
                                         dynamic_shapes=shapes, optimize=optimize,
                                         external_data=False, verbose=verbose)
            try:
                prog = dynamo(dyn)
            except Exception:
                if not dynamic:
                    raise
                # retry letting torch.export infer the dims (Dim.AUTO)
                prog = dynamo({k: {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for k in dyn})
            _rename_io(prog.model, input_names, output_names)
            prog.save(str(path), external_data=False)
        else:
            dyn_axes = None
            if dynamic:
                dyn_axes = {n: {0: "batch", 1: "sequence"} for n in input_names}
                dyn_axes[output_names[0]] = {0: "batch", 1: "sequence"}
            torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=dyn_axes, do_constant_folding=True,
                              external_data=False, verbose=verbose)
    seconds = time.perf_counter() - t0

    ir = fix_ir_version(path)
    proto = onnx.load(str(path), load_external_data=False)
    res = ExportResult(str(path), exporter, _default_opset(proto), dtype,
                       [i.name for i in proto.graph.input], [o.name for o in proto.graph.output],
                       seconds, ir, op_counts(proto))
    if check:
        run_ort(path, ids[:batch], mask[:batch] if mask is not None else None)
    return res


def _rename_io(ir_model, input_names, output_names):
    """Dynamo keeps input names from the signature already; make the output name stable."""
    g = ir_model.graph
    for v, n in zip(g.outputs, output_names):
        if v.name != n:
            v.name = n


def run_ort(path, input_ids, attention_mask=None, session=None, **extra) -> np.ndarray:
    """Run the exported model once in onnxruntime CPU; returns the first output."""
    sess = session or _session(path, "cpu")
    names = {i.name for i in sess.get_inputs()}
    feed = {"input_ids": np.asarray(input_ids, dtype=np.int64)}
    if "attention_mask" in names:
        if attention_mask is None:
            attention_mask = np.ones(feed["input_ids"].shape, dtype=np.int64)
        feed["attention_mask"] = np.asarray(attention_mask, dtype=np.int64)
    for k, v in extra.items():
        feed[k] = np.asarray(v)
    return sess.run(None, feed)[0]


def compare_with_torch(model: nn.Module, path, batch=1, seq=8, seed=1) -> float:
    """Max abs diff between torch (fp32) and ORT outputs on random ids."""
    ids, _ = example_inputs(model, batch, seq, with_attention_mask=False, seed=seed)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = LogitsWrapper(model, True)(ids, mask).float().numpy()
    out = run_ort(path, ids.numpy(), mask.numpy()).astype(np.float32)
    return float(np.abs(out - ref).max())


# --------------------------------------------------------------------------------------------
# onnxruntime.transformers optimizer
# --------------------------------------------------------------------------------------------

def ort_optimize(in_path, out_path, model_type: str = "gpt2", num_heads: int = 0,
                 hidden: int = 0, opt_level: int = 0, use_gpu: bool = False,
                 fp16: bool = False, fallback: bool = True) -> str:
    """Run onnxruntime.transformers.optimizer.optimize_model and save the result.

    model_type: "bert" for BERT/MiniLM; "gpt2" for decoders (fuses SimplifiedLayerNormalization /
    SkipSimplifiedLayerNormalization / SkipLayerNormalization; "bert" gives the same norm
    fusions). opt_level=0 = python fusions only (no ORT session graph rewrites), so the result
    stays plain ONNX + com.microsoft fused ops. With ``fallback``, a failing "gpt2" run is
    retried as "bert". Returns out_path.
    """
    _ort_optimize(in_path, out_path, model_type=model_type, num_heads=num_heads, hidden=hidden,
                  opt_level=opt_level, use_gpu=use_gpu, fp16=fp16, fallback=fallback, external_data=False)
    return str(out_path)


def ort_model_type(family: str) -> str:
    return {"bert": "bert", "gpt2": "gpt2"}.get(family, "gpt2")


# --------------------------------------------------------------------------------------------
# Decode-capable export (KV cache) for decoders
# --------------------------------------------------------------------------------------------

class PastKVWrapper(nn.Module):
    """Explicit-tensor KV-cache interface around an HF decoder.

    forward(input_ids, attention_mask, position_ids, past_key_0, past_value_0, ...) ->
        (logits, present_key_0, present_value_0, ...)
    attention_mask covers past + current tokens ([B, P+T]). Caches are [B, kv_heads, P, head_dim].
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache
        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True,
                         return_dict=True)
        pkv = out.past_key_values
        presents = []
        for i in range(self.n_layers):
            layer = pkv.layers[i]
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def _kv_shape(cfg):
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return kv, hd


def export_decoder_with_past(model: nn.Module, path, exporter: str = "wrapper",
                             opset: int = 18, dtype: str = "fp32", past_len: int = 4,
                             seq: int = 3, batch: int = 2, ort_fusions: str | None = None,
                             check: bool = True):
    """Export a decode-capable graph with explicit past key/value inputs.

    exporter="wrapper": torch.onnx.export(dynamo=True) of PastKVWrapper; inputs
        input_ids, attention_mask, position_ids, past_key_{i}, past_value_{i}; outputs
        logits, present_key_{i}, present_value_{i}. Dynamic batch / sequence / past axes.
        One graph serves prefill (past length 0) and decode.
    exporter="transformers": transformers.exporters.OnnxExporter.export_for_generation with
        OnnxConfig(dynamic=True, opset_version=opset, ort_fusions=ort_fusions); ``path`` is a
        directory receiving the components (prefill/decode .onnx + metadata). Returns the
        list of .onnx files.
    """
    import copy
    m = model if DTYPES[dtype] == next(model.parameters()).dtype \
        else copy.deepcopy(model).to(DTYPES[dtype])
    m.eval()
    cfg = m.config
    if exporter == "transformers":
        from transformers.exporters import OnnxConfig, OnnxExporter
        out_dir = Path(path)
        out_dir.mkdir(parents=True, exist_ok=True)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exp = OnnxExporter().export_for_generation(
                m, inputs, OnnxConfig(dynamic=True, opset_version=opset,
                                      ort_fusions=ort_fusions))
            exp.save_pretrained(str(out_dir))
        files = sorted(str(p) for p in out_dir.glob("*.onnx"))
        for f in files:
            _inline_external(f)
            fix_ir_version(f)
        if check:
            for f in files:
                _session(f, "cpu")
        print(f"transformers export: {files} in {time.perf_counter() - t0:.1f}s")
        return files
    if exporter != "wrapper":
        raise ValueError("exporter must be 'wrapper' or 'transformers'")

    n = cfg.num_hidden_layers
    kvh, hd = _kv_shape(cfg)
    wrapper = PastKVWrapper(m).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    past = []
    for _ in range(n):
        past += [torch.randn(batch, kvh, past_len, hd, dtype=DTYPES[dtype]),
                 torch.randn(batch, kvh, past_len, hd, dtype=DTYPES[dtype])]
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(n):
        names += [f"past_key_{i}", f"past_value_{i}"]
    outs = ["logits"] + [f"present_{kv}_{i}" for i in range(n) for kv in ("key", "value")]
    B = torch.export.Dim("batch", min=1, max=1024)
    S = torch.export.Dim("sequence", min=1, max=8192)
    P = torch.export.Dim("past_sequence", min=1, max=8192)
    dyn = {"input_ids": {0: B, 1: S}, "attention_mask": {0: B, 1: torch.export.Dim.AUTO},
           "position_ids": {0: B, 1: S}, "past": tuple({0: B, 2: P} for _ in range(2 * n))}
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(wrapper, (ids, mask, pos, *past), dynamo=True,
                                 opset_version=opset, input_names=names, output_names=outs,
                                 dynamic_shapes=dyn, external_data=False)
        prog.save(str(path), external_data=False)
    secs = time.perf_counter() - t0
    fix_ir_version(path)
    if check:
        sess = _session(path, "cpu")
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                "position_ids": pos.numpy()}
        for nm, t in zip(names[3:], past):
            feed[nm] = t.numpy()
        got = sess.run(None, feed)
        with torch.no_grad():
            ref = wrapper(ids, mask, pos, *past)
        diff = max(float(np.abs(g.astype(np.float32) - r.float().numpy()).max())
                   for g, r in zip(got, ref))
        print(f"with-past export {path}: {secs:.1f}s, ORT vs torch max|diff| {diff:.2e}")
    return str(path)


def _inline_external(path):
    """Pull a .onnx.data sidecar back into the file when small enough (< 1.8 GB)."""
    data = Path(str(path) + ".data")
    if not data.exists() or data.stat().st_size > 1_800_000_000:
        return
    m = onnx.load(str(path), load_external_data=True)
    onnx.save(m, str(path), save_as_external_data=False)
    data.unlink()

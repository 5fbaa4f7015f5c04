"""Synthesize Llama-shaped ONNX decoder graphs of any size, directly with ``onnx``.

The graph mirrors what ``torch.onnx.export(..., dynamo=True)`` produces for a Hugging Face
``LlamaForCausalLM`` (no KV cache): an embedding ``Gather``, per layer an RMSNorm chain
``[Cast f32] -> Pow(x, 2) -> ReduceMean(axes=[-1]) -> Add(eps) -> Sqrt -> Reciprocal ->
Mul(x, r) -> [Cast back] -> Mul(gain, .)`` feeding Q/K/V ``MatMul``s (weights stored
pre-transposed as [in, out]), rotate-half RoPE, GQA ``Unsqueeze/Expand/Reshape``, decomposed
scaled-dot-product attention with a causal ``Where`` mask, ``o_proj``, residual ``Add``, a second
RMSNorm feeding gate/up ``MatMul``s, SiLU as ``Mul(g, Sigmoid(g))``, ``down_proj``, residual
``Add``; final norm; ``lm_head`` as ``Transpose(embedding) -> MatMul`` when tied (one
initializer shared by ``Gather`` and ``Transpose``, as dynamo does) or its own [hidden, vocab]
initializer when untied.

Weights are random (HF init: normal std 0.02; RMSNorm gains 1 + 0.1 * N(0, 1) so that folding
them is not a no-op), generated chunk by chunk from a seeded generator and streamed straight to
``<model file name>.data`` beside the model; the ``ModelProto`` only holds external-data
references, so peak memory stays at a few chunks regardless of model size. The graph itself is
built with rewriter.bench.graphs.GraphBuilder (the builder of the tests and the calibration
probes); the weight store stays separate: it streams, the builder only collects the finished
(external-data) TensorProtos.

No torch is needed at generation time.

    python -m models.synth_llama --preset llama-3.1-8b --dtype fp16 -o /tmp/x/model.onnx
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import sys
import time
from collections import deque

import numpy as np
import onnx
from onnx import TensorProto, helper

from rewriter.bench.graphs import GraphBuilder

__all__ = ["PRESETS", "synthesize", "main"]

# ---------------------------------------------------------------------------------------------
# Presets (shapes of the real models; rope scaling as in their configs)
# ---------------------------------------------------------------------------------------------

_LLAMA3_SCALING_32 = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}
_LLAMA3_SCALING_8 = dict(_LLAMA3_SCALING_32, factor=8.0)

PRESETS: dict[str, dict] = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=256, tied=True,
                 rope_theta=10000.0, rope_scaling=None, eps=1e-5),
    "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, inter=1536, vocab=49152,
                         tied=True, rope_theta=100000.0, rope_scaling=None, eps=1e-5),
    "llama-3.2-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, inter=8192, vocab=128256,
                         tied=True, rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING_32,
                         eps=1e-5),
    "llama-3.2-3b": dict(hidden=3072, layers=28, heads=24, kv_heads=8, inter=8192, vocab=128256,
                         tied=True, rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING_32,
                         eps=1e-5),
    "llama-3.1-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, inter=14336,
                         vocab=128256, tied=False, rope_theta=500000.0,
                         rope_scaling=_LLAMA3_SCALING_8, eps=1e-5),
}

_DTYPES = {
    "fp32": (TensorProto.FLOAT, 4),
    "fp16": (TensorProto.FLOAT16, 2),
    "bf16": (TensorProto.BFLOAT16, 2),
}

_CHUNK = 1 << 22          # elements generated per chunk (16 MiB of fp32)
_INLINE_MAX = 1024        # tensors smaller than this many bytes stay inline (onnx's default)
_ALIGN = 4096             # external tensors start at page-aligned offsets (mmap friendly)
_WEIGHT_STD = 0.02
_GAIN_STD = 0.1


# ---------------------------------------------------------------------------------------------
# dtype helpers
# ---------------------------------------------------------------------------------------------

def _f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), round-to-nearest-even (no NaNs expected)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
            >> np.uint32(16)).astype(np.uint16)


def _encode(a: np.ndarray, dtype: str) -> np.ndarray:
    """fp32 array -> array whose raw bytes are the tensor in ``dtype``."""
    if dtype == "fp32":
        return np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "fp16":
        return np.ascontiguousarray(a, dtype=np.float16)
    return _f32_to_bf16_bits(a)


def _tensor_from_f32(name: str, a, dtype: str) -> TensorProto:
    a = np.asarray(a, dtype=np.float32)
    t = TensorProto(name=name, data_type=_DTYPES[dtype][0], dims=list(a.shape))
    t.raw_data = _encode(a, dtype).tobytes()
    return t


def _dtype_min(dtype: str) -> float:
    if dtype == "fp16":
        return float(np.finfo(np.float16).min)
    if dtype == "bf16":
        return float(np.array([0xFF7F0000], dtype=np.uint32).view(np.float32)[0])
    return float(np.finfo(np.float32).min)


def _inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                           / head_dim))
    if not scaling:
        return inv.astype(np.float32)
    # transformers' "llama3" rope type
    factor = scaling["factor"]
    lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    lo_wl, hi_wl = old / lo, old / hi
    wl = 2 * math.pi / inv
    out = np.where(wl > lo_wl, inv / factor, inv)
    smooth = (old / wl - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wl < hi_wl) & ~(wl > lo_wl)
    return np.where(medium, smoothed, out).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Streaming random-weight writer
# ---------------------------------------------------------------------------------------------

def _gen_chunk(seed: int, tidx: int, cidx: int, n: int, kind: str, dtype: str) -> np.ndarray:
    rng = np.random.default_rng([seed, tidx, cidx])
    buf = rng.standard_normal(n, dtype=np.float32)
    if kind == "gain":
        buf *= _GAIN_STD
        buf += 1.0
    else:
        buf *= _WEIGHT_STD
    if dtype == "fp16":
        out = np.empty(n, dtype=np.float16)
        np.copyto(out, buf, casting="unsafe")
        return out
    if dtype == "bf16":
        return _f32_to_bf16_bits(buf)
    return buf


class _WeightStore:
    """Makes random weight TensorProtos, streaming their bytes to one external data file."""

    def __init__(self, data_path: str | None, location: str | None, dtype: str, seed: int,
                 progress, workers: int = 2):
        self.dtype = dtype
        self.seed = seed
        self.location = location
        self.progress = progress
        self.f = open(data_path, "wb") if data_path else None
        self.offset = 0
        self.params = 0
        self.tidx = 0
        self.pool = cf.ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        self.workers = workers
        self.t0 = time.time()
        self._last_report = 0

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()
        if self.f is not None:
            self.f.close()

    def _chunks(self, tidx: int, numel: int, kind: str):
        starts = list(range(0, numel, _CHUNK))
        args = [(self.seed, tidx, ci, min(_CHUNK, numel - s), kind, self.dtype)
                for ci, s in enumerate(starts)]
        if self.pool is None or len(args) == 1:
            for a in args:
                yield _gen_chunk(*a)
            return
        pending: deque = deque()
        it = iter(args)
        for a in it:
            pending.append(self.pool.submit(_gen_chunk, *a))
            if len(pending) >= self.workers + 1:
                break
        for a in it:
            yield pending.popleft().result()
            pending.append(self.pool.submit(_gen_chunk, *a))
        while pending:
            yield pending.popleft().result()

    def random(self, name: str, shape, kind: str = "weight") -> TensorProto:
        numel = int(np.prod(shape))
        itemsize = _DTYPES[self.dtype][1]
        nbytes = numel * itemsize
        tidx = self.tidx
        self.tidx += 1
        self.params += numel
        t = TensorProto(name=name, data_type=_DTYPES[self.dtype][0], dims=list(shape))
        if self.f is None or nbytes < _INLINE_MAX:
            t.raw_data = b"".join(c.tobytes() for c in self._chunks(tidx, numel, kind))
            return t
        pad = (-self.offset) % _ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        for c in self._chunks(tidx, numel, kind):
            self.f.write(memoryview(c).cast("B"))
        self.offset += nbytes
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(start)),
                     ("length", str(nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self._maybe_report()
        return t

    def _maybe_report(self, force: bool = False):
        if not self.progress:
            return
        if (force and self.offset != self._last_report) or \
                self.offset - self._last_report >= (1 << 30):
            self._last_report = self.offset
            dt = time.time() - self.t0
            self.progress(f"  {self.offset / 2**30:7.2f} GiB written, "
                          f"{self.params / 1e6:9.1f} M params, {dt:6.1f} s")


# ---------------------------------------------------------------------------------------------
# Graph builder
# ---------------------------------------------------------------------------------------------

class _Graph(GraphBuilder):
    """rewriter.bench.graphs.GraphBuilder named as the dynamo exporter names things ("mul_12",
    nodes "node_mul_12", torch name scopes in the metadata), with shared small constants."""

    def __init__(self, opset: int):
        super().__init__(opset, sep="_")
        self._consts: dict = {}
        self.scope: list[str] = []

    def node_name(self, op_type: str, outputs: list[str]) -> str:
        return f"node_{outputs[0]}"

    def op(self, op_type: str, inputs, n_out: int = 1, domain: str = "", *, hint: str | None = None, **attrs):
        outs = super().op(op_type, inputs, n_out, domain, hint=hint, **attrs)
        if self.scope:
            node = self.nodes[-1]
            scopes = [""] + self.scope
            p = node.metadata_props.add()
            p.key, p.value = "pkg.torch.onnx.name_scopes", repr(scopes + [node.output[0]])
            p = node.metadata_props.add()
            p.key, p.value = "namespace", "".join(f"{s}/" for s in scopes)
        return outs

    def const_i64(self, values, scalar: bool = False) -> str:
        key = ("i64", tuple(np.atleast_1d(values).tolist()), scalar)
        if key not in self._consts:
            arr = np.array(values, dtype=np.int64)
            arr = arr.reshape(()) if scalar else arr.reshape(-1)
            name = self.name("val")
            self.inits.append(onnx.numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def const_f(self, value, dtype: str) -> str:
        """Scalar float constant in ``dtype`` (fp32/fp16/bf16)."""
        key = ("f", float(value), dtype)
        if key not in self._consts:
            name = self.name("val")
            self.inits.append(_tensor_from_f32(name, np.array(value, np.float32), dtype))
            self._consts[key] = name
        return self._consts[key]

    def const_f_array(self, arr: np.ndarray, name: str) -> str:
        self.inits.append(onnx.numpy_helper.from_array(arr.astype(np.float32), name))
        return name


# ---------------------------------------------------------------------------------------------
# Model construction
# ---------------------------------------------------------------------------------------------

def _rms_norm(g: _Graph, x: str, gain: str, cfg: dict, dtype: str) -> str:
    low = dtype != "fp32"
    xf = g.op("Cast", [x], hint="_to_copy", to=TensorProto.FLOAT) if low else x
    p = g.op("Pow", [xf, g.const_f(2.0, "fp32")], hint="pow")
    if g.opset >= 18:
        m = g.op("ReduceMean", [p, g.const_i64([-1])], hint="mean", keepdims=1,
                 noop_with_empty_axes=0)
    else:
        m = g.op("ReduceMean", [p], hint="mean", axes=[-1], keepdims=1)
    a = g.op("Add", [m, g.const_f(cfg["eps"], "fp32")], hint="add")
    s = g.op("Sqrt", [a], hint="val")
    r = g.op("Reciprocal", [s], hint="rsqrt")
    n = g.op("Mul", [xf, r], hint="mul")
    if low:
        n = g.op("Cast", [n], hint="_to_copy", to=_DTYPES[dtype][0])
    return g.op("Mul", [gain, n], hint="mul")


def _rotate_half_rope(g: _Graph, x: str, cos: str, sin: str, head_dim: int) -> str:
    half = head_dim // 2
    xc = g.op("Mul", [x, cos], hint="mul")
    ax = g.const_i64([3])
    one = g.const_i64([1])
    x1 = g.op("Slice", [x, g.const_i64([0]), g.const_i64([half]), ax, one], hint="slice")
    x2 = g.op("Slice", [x, g.const_i64([half]), g.const_i64([np.iinfo(np.int64).max]), ax, one],
              hint="slice")
    nx2 = g.op("Neg", [x2], hint="neg")
    rot = g.op("Concat", [nx2, x1], hint="cat", axis=-1)
    xs = g.op("Mul", [rot, sin], hint="mul")
    return g.op("Add", [xc, xs], hint="add")


def _build(g: _Graph, ws: _WeightStore, cfg: dict, dtype: str, attention_mask: bool,
           names: str, log) -> dict:
    H, L, nh, nkv = cfg["hidden"], cfg["layers"], cfg["heads"], cfg["kv_heads"]
    inter, V = cfg["inter"], cfg["vocab"]
    hd = H // nh
    rep = nh // nkv
    onnx_dt = _DTYPES[dtype][0]
    low = dtype != "fp32"
    wmap: dict[str, tuple[str, bool]] = {}   # HF parameter name -> (initializer, transposed)

    def linear_weight(hf_name: str, fan_in: int, fan_out: int) -> str:
        name = g.name("val") if names == "dynamo" else hf_name + ".T"
        wmap[hf_name] = (name, True)
        return g.initializer(ws.random(name, [fan_in, fan_out]))

    def gain_weight(hf_name: str) -> str:
        wmap[hf_name] = (hf_name, False)
        return g.initializer(ws.random(hf_name, [H], kind="gain"))

    # --- inputs / shapes -------------------------------------------------------------------
    emb_name = "lm_head.weight" if (cfg["tied"] and names == "dynamo") else \
        "model.embed_tokens.weight"
    wmap["model.embed_tokens.weight"] = (emb_name, False)
    emb = g.initializer(ws.random(emb_name, [V, H]))

    seq1 = g.op("Shape", ["input_ids"], hint="val", start=1, end=2)
    seq = g.op("Squeeze", [seq1], hint="sym_size_int")
    h = g.op("Gather", [emb, "input_ids"], hint="embedding", axis=0)

    zero = g.const_i64(0, scalar=True)
    one = g.const_i64(1, scalar=True)
    arange = g.op("Range", [zero, seq, one], hint="arange")                       # [S]
    pos = g.op("Unsqueeze", [arange, g.const_i64([0])], hint="unsqueeze")          # [1, S]

    # --- causal (+ padding) mask as additive tensor ------------------------------------------
    g.scope = ["model", "model.rotary_emb"]
    rows = g.op("Unsqueeze", [arange, g.const_i64([1])], hint="unsqueeze")        # [S, 1]
    causal = g.op("LessOrEqual", [pos, rows], hint="le")                          # [S, S] j <= i
    if attention_mask:
        am = g.op("Cast", ["attention_mask"], hint="_to_copy", to=TensorProto.BOOL)
        am = g.op("Unsqueeze", [am, g.const_i64([1, 2])], hint="unsqueeze")       # [B, 1, 1, S]
        causal = g.op("And", [causal, am], hint="bitwise_and")                    # [B, 1, S, S]
    mask = g.op("Where", [causal, g.const_f(0.0, dtype), g.const_f(_dtype_min(dtype), dtype)],
                hint="val")

    # --- rotary tables from positions --------------------------------------------------------
    inv = g.const_f_array(_inv_freq(hd, cfg["rope_theta"], cfg["rope_scaling"]),
                          "model.rotary_emb.inv_freq")
    posf = g.op("Cast", [g.op("Unsqueeze", [pos, g.const_i64([2])], hint="unsqueeze")],
                hint="_to_copy", to=TensorProto.FLOAT)                             # [1, S, 1]
    freqs = g.op("Mul", [posf, inv], hint="mul")                                   # [1, S, hd/2]
    emb_f = g.op("Concat", [freqs, freqs], hint="cat", axis=-1)                    # [1, S, hd]
    cos = g.op("Cos", [emb_f], hint="cos")
    sin = g.op("Sin", [emb_f], hint="sin")
    if low:
        cos = g.op("Cast", [cos], hint="_to_copy", to=onnx_dt)
        sin = g.op("Cast", [sin], hint="_to_copy", to=onnx_dt)
    cos = g.op("Unsqueeze", [cos, g.const_i64([1])], hint="unsqueeze")             # [1, 1, S, hd]
    sin = g.op("Unsqueeze", [sin, g.const_i64([1])], hint="unsqueeze")

    sqrt_scale = g.const_f(math.sqrt(1.0 / math.sqrt(hd)), dtype)
    q_shape = g.const_i64([0, 0, nh, hd])
    kv_shape = g.const_i64([0, 0, nkv, hd])
    gqa_expand = g.const_i64([1, 1, rep, 1, 1])
    gqa_shape = g.const_i64([0, nh, -1, hd])
    o_shape = g.const_i64([0, 0, nh * hd])
    perm_heads = [0, 2, 1, 3]

    for i in range(L):
        p = f"model.layers.{i}"
        # ---- attention ----
        g.scope = ["model", p, f"{p}.input_layernorm"]
        x = _rms_norm(g, h, gain_weight(f"{p}.input_layernorm.weight"), cfg, dtype)
        g.scope = ["model", p, f"{p}.self_attn"]
        wq = linear_weight(f"{p}.self_attn.q_proj.weight", H, nh * hd)
        wk = linear_weight(f"{p}.self_attn.k_proj.weight", H, nkv * hd)
        wv = linear_weight(f"{p}.self_attn.v_proj.weight", H, nkv * hd)
        q = g.op("MatMul", [x, wq], hint="linear")
        q = g.op("Transpose", [g.op("Reshape", [q, q_shape], hint="view")], hint="transpose",
                 perm=perm_heads)
        k = g.op("MatMul", [x, wk], hint="linear")
        k = g.op("Transpose", [g.op("Reshape", [k, kv_shape], hint="view")], hint="transpose",
                 perm=perm_heads)
        v = g.op("MatMul", [x, wv], hint="linear")
        v = g.op("Transpose", [g.op("Reshape", [v, kv_shape], hint="view")], hint="transpose",
                 perm=perm_heads)
        q = _rotate_half_rope(g, q, cos, sin, hd)
        k = _rotate_half_rope(g, k, cos, sin, hd)
        if rep > 1:
            k = g.op("Unsqueeze", [k, g.const_i64([2])], hint="unsqueeze")
            k = g.op("Reshape", [g.op("Expand", [k, gqa_expand], hint="expand"), gqa_shape],
                     hint="_unsafe_view")
            v = g.op("Unsqueeze", [v, g.const_i64([2])], hint="unsqueeze")
            v = g.op("Reshape", [g.op("Expand", [v, gqa_expand], hint="expand"), gqa_shape],
                     hint="_unsafe_view")
        kt = g.op("Transpose", [k], hint="val", perm=[0, 1, 3, 2])
        qs = g.op("Mul", [q, sqrt_scale], hint="val")
        ks = g.op("Mul", [kt, sqrt_scale], hint="val")
        sc = g.op("Add", [g.op("MatMul", [qs, ks], hint="val"), mask], hint="val")
        pr = g.op("Softmax", [sc], hint="val", axis=-1)
        pr = g.op("Where", [g.op("IsNaN", [pr], hint="val"), g.const_f(0.0, dtype), pr], hint="val")
        att = g.op("MatMul", [pr, v], hint="scaled_dot_product_attention")
        att = g.op("Transpose", [att], hint="transpose", perm=perm_heads)
        att = g.op("Reshape", [att, o_shape], hint="view")
        wo = linear_weight(f"{p}.self_attn.o_proj.weight", nh * hd, H)
        h = g.op("Add", [h, g.op("MatMul", [att, wo], hint="linear")], hint="add")
        # ---- MLP ----
        g.scope = ["model", p, f"{p}.post_attention_layernorm"]
        x = _rms_norm(g, h, gain_weight(f"{p}.post_attention_layernorm.weight"), cfg, dtype)
        g.scope = ["model", p, f"{p}.mlp"]
        wg = linear_weight(f"{p}.mlp.gate_proj.weight", H, inter)
        wu = linear_weight(f"{p}.mlp.up_proj.weight", H, inter)
        wd = linear_weight(f"{p}.mlp.down_proj.weight", inter, H)
        gt = g.op("MatMul", [x, wg], hint="linear")
        act = g.op("Mul", [gt, g.op("Sigmoid", [gt], hint="val")], hint="silu")
        up = g.op("MatMul", [x, wu], hint="linear")
        dn = g.op("MatMul", [g.op("Mul", [act, up], hint="mul"), wd], hint="linear")
        h = g.op("Add", [h, dn], hint="add")
        if log:
            log(f"  layer {i + 1}/{L} done: {ws.offset / 2**30:.2f} GiB, "
                f"{time.time() - ws.t0:.1f} s")

    g.scope = ["model", "model.norm"]
    x = _rms_norm(g, h, gain_weight("model.norm.weight"), cfg, dtype)
    g.scope = ["lm_head"]
    if cfg["tied"]:
        wmap["lm_head.weight"] = (emb, False)
        w_lm = g.op("Transpose", [emb], hint="val", perm=[1, 0])
    else:
        w_lm = linear_weight("lm_head.weight", H, V)
    g.op("MatMul", [x, w_lm], hint="linear")
    # rename the final output to "logits"
    g.nodes[-1].output[0] = "logits"
    g.scope = []
    return wmap


def synthesize(path, preset: str = "tiny", dtype: str = "fp16", layers: int | None = None,
               opset: int = 18, seed: int = 0, external_data: bool = True,
               progress=True, attention_mask: bool = False, names: str = "dynamo",
               workers: int = 2, **overrides) -> dict:
    """Write a random-weight Llama-shaped ONNX model to ``path``.

    Args:
        path: output ``.onnx`` file; weights go to ``<basename>.data`` beside it
            (relative ``location`` in each TensorProto's external_data).
        preset: one of ``PRESETS``.
        dtype: ``fp32`` | ``fp16`` | ``bf16`` (weights, activations and logits).
        layers: override the number of decoder layers.
        opset: 18 (ReduceMean axes as input, default) or 17 (axes attribute).
        seed: RNG seed; each weight tensor's chunk c of tensor t uses ``default_rng([seed, t, c])``.
        external_data: False stores everything inline (only for models < 2 GB).
        progress: True prints to stderr; a callable receives the progress strings; False: quiet.
        attention_mask: add an ``attention_mask`` [batch, seq] int64 input (padding mask).
        names: ``"dynamo"`` (linear weights named ``val_N``, tied table ``lm_head.weight``) or
            ``"hf"`` (linear weights named ``<hf name>.T``).
        workers: threads generating random chunks.
        **overrides: any preset field (hidden, heads, kv_heads, inter, vocab, tied, eps, ...).

    Returns:
        dict with model_path, data_path (None when inline), params, bytes (data file size),
        seconds, nodes, initializers, config, and ``weights``: HF parameter name ->
        (initializer name, transposed) where ``transposed`` means stored as [in, out].
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
    if opset not in (17, 18) and not (18 < opset <= 22):
        raise ValueError("opset must be 17..22")
    cfg = dict(PRESETS[preset])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown overrides {sorted(unknown)}")
    cfg.update(overrides)
    if layers is not None:
        cfg["layers"] = int(layers)
    if cfg["hidden"] % cfg["heads"] or cfg["heads"] % cfg["kv_heads"]:
        raise ValueError("hidden must divide by heads and heads by kv_heads")

    if progress is True:
        log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    elif callable(progress):
        log = progress
    else:
        log = None

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    location = os.path.basename(path) + ".data"
    data_path = os.path.join(os.path.dirname(os.path.abspath(path)), location)
    t0 = time.time()
    if log:
        log(f"synth_llama: {preset} {dtype} layers={cfg['layers']} -> {path}")
    ws = _WeightStore(data_path if external_data else None, location, dtype, seed, log,
                      workers=workers)
    g = _Graph(opset)
    try:
        wmap = _build(g, ws, cfg, dtype, attention_mask, names, log)
        ws._maybe_report(force=True)
    finally:
        ws.close()
    if not external_data and os.path.exists(data_path) and os.path.getsize(data_path) == 0:
        os.remove(data_path)

    onnx_dt = _DTYPES[dtype][0]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    if attention_mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                    ["batch", "seq"]))
    outputs = [helper.make_tensor_value_info("logits", onnx_dt, ["batch", "seq", cfg["vocab"]])]
    graph = helper.make_graph(g.nodes, "main_graph", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="synth_llama", producer_version="1")
    model.ir_version = 10
    meta = dict(cfg, preset=preset, dtype=dtype, seed=seed, opset=opset,
                attention_mask=attention_mask)
    helper.set_model_props(model, {"synth_llama.config": json.dumps(meta)})
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    dt = time.time() - t0
    nbytes = os.path.getsize(data_path) if external_data else 0
    if log:
        log(f"synth_llama: done in {dt:.1f} s, {ws.params / 1e6:.1f} M params, "
            f"{nbytes / 2**30:.2f} GiB data, model proto {os.path.getsize(path) / 1024:.0f} KiB")
    return dict(model_path=path, data_path=data_path if external_data else None,
                params=ws.params, bytes=nbytes, seconds=dt, nodes=len(g.nodes),
                initializers=len(g.inits), config=meta, weights=wmap)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.synth_llama", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="fp16", choices=sorted(_DTYPES))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inline", action="store_true", help="no external data (< 2 GB only)")
    ap.add_argument("--attention-mask", action="store_true")
    ap.add_argument("--names", choices=["dynamo", "hf"], default="dynamo")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    s = synthesize(a.output, preset=a.preset, dtype=a.dtype, layers=a.layers, opset=a.opset,
                   seed=a.seed, external_data=not a.inline, progress=not a.quiet,
                   attention_mask=a.attention_mask, names=a.names, workers=a.workers)
    s.pop("weights")
    print(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

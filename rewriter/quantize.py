"""`python -m rewriter quantize IN -o OUT --scheme S [--rotate]`: onnxruntime's own quantizers,
after the rewrite (no quantizer of our own).

Schemes (SCHEMES): w8a8 — `quantize_dynamic(weight_type=QInt8)`, onnxruntime's defaults
(per-tensor weights, dynamic per-tensor activations); w8a8-channel — the same, per_channel;
int4 / int4-b128 — `MatMulNBitsQuantizer` symmetric blocks of 32 / 128 (round to nearest; plain
Gemm linears handed to it as MatMul + Add, gemms_as_matmuls);
int4-hqq — its HQQ algorithm, blocks of 32. `--rotate` rotates the residual stream first
(rewriter.rotate; measured in docs/BENCHMARKS.md "Rotation before quantization").

IN may be an onnxruntime-genai folder (genai_config.json): its decoder is rotated and quantized,
written as one file under the name the config gives (no data file: under 2 GiB), and every
other file copied (rewriter.folders.write_folder: atomic, the same refusals as a rewritten
folder). The rotated fp32 model is checked against the input as `verify` does (prefill and
two decode steps for a KV-cache decoder); `tolerance` replaces the default 1e-5 bound of that
check (docs/BENCHMARKS.md "Rotated genai folders": why real SmolLM2's needs it). A decoder
already quantized, or not fp32, is refused (Unsupported) before anything is written."""

from __future__ import annotations

import gc
from collections import Counter
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from rewriter.api import check_outputs, rewrite_file
from rewriter.patterns.graph import GraphEditor, attr, const_array, dtype_of, op, set_dtype
from rewriter.errors import CannotRun, OutputError, Unsupported, VerificationFailed, first_line
from rewriter.files import check_target, commit, data_files_of, mentions_external_data, remove_stale_temporaries, temp_prefix
from rewriter.folders import decoder_file, write_folder
from rewriter.verify import session

SCHEMES = {
    "w8a8": "quantize_dynamic(weight_type=QInt8): per-tensor int8 weights, dynamic int8 activations",
    "w8a8-channel": "quantize_dynamic(weight_type=QInt8, per_channel=True)",
    "int4": "MatMulNBitsQuantizer(block_size=32, is_symmetric=True): int4 weights, round to nearest",
    "int4-b128": "MatMulNBitsQuantizer(block_size=128, is_symmetric=True)",
    "int4-hqq": "MatMulNBitsQuantizer(algo_config=HQQWeightOnlyQuantConfig(block_size=32))",
}
# ops that hold quantized weights or activations: a model with one is quantized already
QUANTIZED_OPS = {"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul",
                 "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "GatherBlockQuantized", "QAttention"}
SINGLE_FILE_LIMIT = 2**31 - 2**24       # protobuf's 2 GiB, less room for the graph


def quantize_file(src, dst, scheme: str, exclude: list[str] | None = None) -> None:
    """Quantize the fp32 model at `src` into `dst` with onnxruntime's quantizer for `scheme`;
    `exclude`: node names left in float (quantize_dynamic's nodes_to_exclude)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r} (choose from {', '.join(SCHEMES)})")
    src, dst = Path(src), Path(dst)
    if scheme.startswith("w8a8"):
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=scheme == "w8a8-channel",
                         nodes_to_exclude=exclude or [])
        return
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer
    model = gemms_as_matmuls(onnx.load(str(src)))
    if scheme == "int4-hqq":
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude or [],
                                         algo_config=HQQWeightOnlyQuantConfig(block_size=32))
    else:
        quantizer = MatMulNBitsQuantizer(model, block_size=128 if scheme == "int4-b128" else 32,
                                         is_symmetric=True, nodes_to_exclude=exclude or [])
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst))
    del quantizer, model
    gc.collect()


def gemms_as_matmuls(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Each Gemm that is a plain linear — transA 0, alpha and beta 1 (as its schema reads them), a
    constant 2-D B — as MatMul (B transposed once where transB) + Add of C, under the Gemm's name:
    the same products, for MatMulNBitsQuantizer, which quantizes MatMul only (GPT-2's Conv1D and
    OPT's fc1/fc2 export as Gemm; quantize_dynamic converts Gemm itself)."""
    model = ir.from_proto(proto)
    editor = GraphEditor(model.graph, prefix="int4")
    for node in list(model.graph):
        weight = const_array(node.inputs[1]) if op(node, "Gemm", domain="") else None
        if weight is None or weight.ndim != 2 or attr(node, "transA") or attr(node, "alpha") != 1.0 \
                or attr(node, "beta") != 1.0:
            continue
        if attr(node, "transB"):
            weight_value = editor.initializer(np.ascontiguousarray(weight.T), "weight")
        else:
            weight_value = node.inputs[1]
        matmul = editor.node("MatMul", [node.inputs[0], weight_value], before=node)
        out = matmul.outputs[0]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            out = editor.node("Add", [out, node.inputs[2]], hint="bias", before=node).outputs[0]
        for value in {matmul.outputs[0], out}:
            set_dtype(value, dtype_of(node.inputs[0]))
        node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        matmul.name = node.name
    RemoveUnusedNodesPass()(model)
    return ir.to_proto(model)


def quantize(src, dst, scheme: str, *, rotate: bool = False, seed: int = 0, online: bool = False,
             heads: bool = False, overwrite: bool = False, tolerance: float | None = None):
    """The `quantize` verb: [rotate the residual stream (`online`: and the writers' inputs at
    run time), then] quantize with onnxruntime into `dst`, written in a temporary folder beside
    it and renamed into place; the rotation's own MatMuls (online Hadamards, a tied head's gain
    matrix: report.rotation["keep_float"]) are excluded from quantization (quantized, they lose
    what they gain). A rotation that is refused raises Unsupported (nothing written). `src` an
    onnxruntime-genai folder: `dst` is a folder (module doc). Returns the rotation's report (or None)."""
    src, dst = Path(src), Path(dst)
    settings = dict(rotate=rotate or online or heads, seed=seed, online=online, heads=heads, tolerance=tolerance)
    if src.is_dir():
        check_quantizable(decoder_file(src))
        return write_folder(src, dst, lambda decoder, target: _quantize_model(
            decoder, target, scheme, scratch=dst.parent, check_load=True, **settings), overwrite=overwrite)
    check_target(dst, "output")
    if dst.exists() and dst.resolve() == src.resolve() and not overwrite:
        raise OutputError(f"output {dst}: is the input; give --overwrite to replace it")
    if mentions_external_data(src):
        raise Unsupported(f"{src}: quantize takes a single-file model under 2 GiB (external data: not yet)")
    check_quantizable(src)
    remove_stale_temporaries(dst.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), suffix=".tmp", dir=dst.parent))
    try:
        report = _quantize_model(src, tmp / "model.onnx", scheme, scratch=tmp, **settings)
        commit([(tmp / "model.onnx", dst)], tmp)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_quantizable(path: Path) -> None:
    """Unsupported (before anything is written) unless the model at `path` is an fp32 model
    under 2 GiB that holds no quantized op."""
    size = path.stat().st_size + sum(Path(f).stat().st_size for f in data_files_of(path) if Path(f).is_file())
    if size > SINGLE_FILE_LIMIT:
        raise Unsupported(f"{path}: {size / 2**30:.1f} GiB with its weights; quantize takes models under 2 GiB")
    graph = onnx.load(str(path), load_external_data=False).graph
    done = [n for n in graph.node if n.op_type in QUANTIZED_OPS]
    if done:
        kinds = Counter(n.op_type for n in done)
        raise Unsupported(f"{path}: already quantized ({', '.join(f'{c} {k}' for k, c in kinds.most_common())} "
                          f"node(s), e.g. {done[0].name!r}); quantize an fp32 model")
    weights = {t.name: t.data_type for t in graph.initializer}
    kinds = {weights[i] for n in graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input if i in weights}
    if kinds and onnx.TensorProto.FLOAT not in kinds:
        names = ", ".join(onnx.TensorProto.DataType.Name(k) for k in sorted(kinds))
        raise Unsupported(f"{path}: its MatMul weights are {names}; quantize takes an fp32 model")


def _quantize_model(src: Path, dst: Path, scheme: str, *, scratch: Path, rotate: bool, seed: int, online: bool,
                    heads: bool, tolerance: float | None, check_load: bool = False):
    """Rotate (in a temporary folder under `scratch`) and quantize `src` into the single file
    `dst`; `check_load`: onnxruntime must load the result (CannotRun). The rotation's report."""
    work = Path(tempfile.mkdtemp(prefix=temp_prefix(), suffix=".tmp", dir=scratch))
    try:
        report, fp32 = None, src
        if rotate:
            fp32 = work / "rotated.onnx"
            verify = (lambda original, rotated: check_outputs(original, rotated, tolerance=tolerance)) \
                if tolerance is not None else False
            try:
                report = rewrite_file(src, fp32, rotate=True, rotate_seed=seed, rotate_online=online,
                                      rotate_heads=heads, verify=verify)
            except VerificationFailed as exc:       # say which check, and what loosens it
                raise VerificationFailed(f"nothing written: the rotated fp32 model, checked before quantization "
                                         f"(--tolerance T loosens that check): {exc}", exc.diffs) from exc
            if not (report.rotation or {}).get("applied"):
                why = report.rotation or {}
                raise Unsupported(f"{src}: the residual stream cannot be rotated: {why.get('reason', '?')}"
                                  + (f" (at {why['at']})" if why.get("at") else "") + "; nothing written")
        quantize_file(fp32, dst, scheme, exclude=(report.rotation or {}).get("keep_float") if report else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if check_load:
        try:
            session(dst, "cpu")
        except Exception as exc:    # noqa: BLE001 - onnxruntime's refusal is the answer
            raise CannotRun(f"onnxruntime cannot load the quantized decoder: {first_line(exc)}; nothing written") from exc
    return report


__all__ = ["SCHEMES", "check_quantizable", "quantize", "quantize_file"]

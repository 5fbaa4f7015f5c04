"""`python -m rewriter quantize IN -o OUT --scheme S [--rotate]`: onnxruntime's own quantizers,
after the rewrite (no quantizer of our own).

Schemes (SCHEMES): w8a8 — `quantize_dynamic(weight_type=QInt8)`, onnxruntime's defaults
(per-tensor weights, dynamic per-tensor activations); w8a8-channel — the same, per_channel;
int4 / int4-b128 — `MatMulNBitsQuantizer` symmetric blocks of 32 / 128 (round to nearest);
int4-hqq — its HQQ algorithm, blocks of 32. `--rotate` rotates the residual stream first
(rewriter.rotate; measured in docs/BENCHMARKS.md "Rotation before quantization")."""

from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path

import onnx

from rewriter.api import rewrite_file
from rewriter.errors import OutputError, Unsupported
from rewriter.files import check_target, commit, mentions_external_data, remove_stale_temporaries, temp_prefix

SCHEMES = {
    "w8a8": "quantize_dynamic(weight_type=QInt8): per-tensor int8 weights, dynamic int8 activations",
    "w8a8-channel": "quantize_dynamic(weight_type=QInt8, per_channel=True)",
    "int4": "MatMulNBitsQuantizer(block_size=32, is_symmetric=True): int4 weights, round to nearest",
    "int4-b128": "MatMulNBitsQuantizer(block_size=128, is_symmetric=True)",
    "int4-hqq": "MatMulNBitsQuantizer(algo_config=HQQWeightOnlyQuantConfig(block_size=32))",
}


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
    model = onnx.load(str(src))
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


def quantize(src, dst, scheme: str, *, rotate: bool = False, seed: int = 0, online: bool = False,
             overwrite: bool = False):
    """The `quantize` verb: [rotate the residual stream (`online`: and the writers' inputs at
    run time), then] quantize with onnxruntime into `dst`, written in a temporary folder beside
    it and renamed into place; the rotation's own MatMuls (online Hadamards, a tied head's gain
    matrix: report.rotation["keep_float"]) are excluded from quantization (quantized, they lose
    what they gain). A rotation that is refused raises Unsupported
    (nothing written). Returns the rotation's report (or None)."""
    rotate = rotate or online
    src, dst = Path(src), Path(dst)
    check_target(dst, "output")
    if dst.exists() and dst.resolve() == src.resolve() and not overwrite:
        raise OutputError(f"output {dst}: is the input; give --overwrite to replace it")
    if mentions_external_data(src) or src.stat().st_size > 2**31 - 2**24:
        raise Unsupported(f"{src}: quantize takes a single-file model under 2 GiB (external data: not yet)")
    remove_stale_temporaries(dst.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), suffix=".tmp", dir=dst.parent))
    try:
        report, fp32 = None, src
        if rotate:
            fp32 = tmp / "rotated.onnx"
            report = rewrite_file(src, fp32, rotate=True, rotate_seed=seed, rotate_online=online)
            if not (report.rotation or {}).get("applied"):
                why = report.rotation or {}
                raise Unsupported(f"{src}: the residual stream cannot be rotated: {why.get('reason', '?')}"
                                  + (f" (at {why['at']})" if why.get("at") else "") + "; nothing written")
        keep_float = (report.rotation or {}).get("keep_float") if report is not None else None
        quantize_file(fp32, tmp / "model.onnx", scheme, exclude=keep_float)
        commit([(tmp / "model.onnx", dst)], tmp)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["SCHEMES", "quantize", "quantize_file"]

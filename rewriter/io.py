"""Load from and save to every form a user hands us; save atomically.

Inputs: a path, an `onnx.ModelProto`, an `onnx_ir.Model` or an onnx-graphsurgeon `Graph`.
Weights in external data stay memory-mapped until a rule reads them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from rewriter.errors import BadInput, OutputError, Unsupported

PROTOBUF_LIMIT = 2**31 - 2**26      # leave headroom under protobuf's 2 GiB message limit
KNOWN_DOMAINS = {"", "ai.onnx", "com.microsoft", "ai.onnx.ml", "pkg.onnxscript.torch_lib",
                 "pkg.onnxscript.torch_lib.common", "pkg.torch.onnx", "ai.onnx.preview.training"}
MAX_ONNX_OPSET = onnx.defs.onnx_opset_version()


def _kind(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return "path"
    if isinstance(source, onnx.ModelProto):
        return "proto"
    if isinstance(source, ir.Model):
        return "ir"
    if type(source).__name__ == "Graph" and type(source).__module__.startswith("onnx_graphsurgeon"):
        return "graphsurgeon"
    raise TypeError(f"cannot rewrite a {type(source).__name__}: pass a path, onnx.ModelProto, "
                    "onnx_ir.Model or onnx_graphsurgeon.Graph")


def load(source) -> tuple[ir.Model, str]:
    """(model, kind of `source`). A ModelProto or graphsurgeon graph is converted, never changed."""
    kind = _kind(source)
    if kind == "path":
        model = load_path(Path(source))
    elif kind == "proto":
        model = ir.from_proto(source)
    elif kind == "ir":
        model = source
    else:
        import onnx_graphsurgeon as gs
        model = ir.from_proto(gs.export_onnx(source))
    check_supported(model)
    return model, kind


def load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.is_dir() or path.stat().st_size == 0:
        raise BadInput(f"{path}: not an ONNX model (empty file or a directory)")
    try:
        model = ir.load(path)
    except Exception as exc:   # protobuf raises DecodeError and friends: all mean "not ONNX"
        raise BadInput(f"{path}: not an ONNX model or truncated ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else 'parse error'})") from exc
    if not model.graph.opset_imports and len(model.graph) == 0:
        raise BadInput(f"{path}: not an ONNX model (no graph)")
    check_external_data(model, path.parent)
    return model


def check_external_data(model: ir.Model, base: Path) -> None:
    """Every external tensor's file exists and is long enough (stat only, reads nothing)."""
    sizes: dict[str, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = Path(tensor.base_dir or base) / tensor.location
        key = str(location)
        if key not in sizes:
            sizes[key] = location.stat().st_size if location.is_file() else -1
        if sizes[key] < 0:
            raise BadInput(f"external data file {tensor.location!r} of tensor {value.name!r} is missing")
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if sizes[key] < end:
            raise BadInput(f"external data file {tensor.location!r} is shorter than tensor "
                           f"{value.name!r} needs ({sizes[key]} < {end} bytes)")


def check_supported(model: ir.Model) -> None:
    imports = model.graph.opset_imports
    version = imports.get("", imports.get("ai.onnx"))
    if version is None:
        raise Unsupported("model imports no default ONNX opset")
    if version > MAX_ONNX_OPSET:
        raise Unsupported(f"opset {version} is newer than this onnx supports ({MAX_ONNX_OPSET})")
    local = {domain for domain, _, _ in model.functions}
    for node in model.graph.all_nodes():
        if node.domain not in KNOWN_DOMAINS and node.domain not in local:
            raise Unsupported(f"node {node.name!r} uses unknown domain {node.domain!r}")


def to_kind(model: ir.Model, kind: str):
    if kind == "ir" or kind == "path":
        return model
    proto = ir.to_proto(model)
    if kind == "proto":
        return proto
    import onnx_graphsurgeon as gs
    return gs.import_onnx(proto)


def weight_bytes(model: ir.Model) -> int:
    return sum(int(v.const_value.nbytes) for v in model.graph.initializers.values()
               if v.const_value is not None)


def has_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def check_structure(path: Path, op_types: set[str]) -> None:
    """onnx.checker on the written file. ORT registers some contrib ops (e.g.
    SimplifiedLayerNormalization) in the ONNX domain, which the checker does not know:
    that one complaint is tolerated for ops the graph really uses."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        unknown = message.split("No Op registered for ", 1)
        if len(unknown) == 2 and unknown[1].split()[0] in op_types:
            return
        raise OutputError(f"rewritten model failed onnx.checker: {message}") from exc


def save(model: ir.Model, path, *, external_data: str | None = None, overwrite: bool = False,
         source: str | os.PathLike | None = None, check: bool = True, progress=None) -> Path:
    """Write `model` to `path` atomically: everything goes to a temporary folder beside the
    target, is checked, then renamed into place. External data is used when asked for, when
    the source had it, or when the weights pass protobuf's 2 GiB limit."""
    path = Path(path)
    if source is not None and Path(source).resolve() == path.resolve() and not overwrite:
        raise OutputError(f"{path}: refusing to write over the input (pass --overwrite to allow)")
    target_dir = path.parent if str(path.parent) else Path(".")
    if not target_dir.is_dir():
        raise OutputError(f"{target_dir}: output directory does not exist")
    if external_data is None and (has_external_data(model) or weight_bytes(model) > PROTOBUF_LIMIT):
        external_data = path.name + ".data"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=target_dir))
    except OSError as exc:
        raise OutputError(f"{target_dir}: cannot write ({exc.strerror})") from exc
    try:
        tmp_model = tmp / path.name
        callback = None
        if progress is not None:
            def callback(tensor, info):
                progress(info.index + 1, info.total, tensor.name)
        ir.save(model, tmp_model, external_data=external_data, callback=callback)
        if check:
            check_structure(tmp_model, {node.op_type for node in model.graph.all_nodes()})
        if external_data:
            os.replace(tmp / external_data, target_dir / external_data)
        os.replace(tmp_model, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path

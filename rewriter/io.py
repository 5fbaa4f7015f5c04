"""Load from and save to every form a user hands us.

Inputs: a path, an `onnx.ModelProto`, an `onnx_ir.Model` or an onnx-graphsurgeon `Graph`.
Weights in external data stay memory-mapped until a rule reads them; every layout exporters
produce loads (one file for all tensors, one file per tensor, `model.data`,
optimum's `model.onnx_data`, the Hugging Face cache's symlinks). Loading validates
(rewriter/validate.py); saving is atomic and never touches a file it was not asked to write
(rewriter/files.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import onnx_ir as ir

from rewriter.errors import BadInput, InternalError, OutputError, Unsupported, UsageError, first_line
from rewriter.inline import SpanTensor, attach_spans, read_structure, write_inline
from rewriter.files import (GIVEN_LOCATION, Siblings, check_also_written, check_target, commit, mentions_external_data,
                            output_data_name, proto_tensors, remove_stale_temporaries, temp_prefix,
                            temporary_model_name)
from rewriter.patterns.graph import has_external_data, initializers, weight_bytes
from rewriter.validate import check_graph, check_structure, check_supported, drop_stale

PROTOBUF_LIMIT = 2**31 - 2**26      # leave headroom under protobuf's 2 GiB message limit
INPUT_FILES = "rewriter.input_files"  # model.meta key: files the loaded model came from
DECLARED = "rewriter.value_info"      # model.meta key: names with a value_info in the loaded proto




def _kind(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return "path"
    if isinstance(source, onnx.ModelProto):
        return "proto"
    if isinstance(source, ir.Model):
        return "ir"
    if type(source).__name__ == "Graph" and type(source).__module__.startswith("onnx_graphsurgeon"):
        return "graphsurgeon"
    if type(source).__name__ == "ONNXProgram" and isinstance(getattr(source, "model", None), ir.Model):
        return "onnxprogram"        # torch.onnx.export(..., dynamo=True)
    raise TypeError(f"cannot rewrite a {type(source).__name__}: pass a path, onnx.ModelProto, "
                    "onnx_ir.Model, onnx_graphsurgeon.Graph or torch.onnx.ONNXProgram")


def load(source, base_dir=None) -> tuple[ir.Model, str]:
    """(model, kind of `source`). A ModelProto or graphsurgeon graph is converted, never changed.
    `base_dir`: the folder a handed model's external data lies in (default: where an
    onnx_ir.Model says, else the current directory, as onnx_ir reads it); a path's own folder.

    Raises BadInput (not ONNX, truncated, missing external data) or Unsupported (unknown
    opset or domain, invalid graph) before anything is rewritten."""
    kind = _kind(source)
    if kind == "path" and base_dir is not None:
        raise UsageError("base_dir is for a model handed in memory: a path's external data lies beside it")
    if kind == "path":
        model = load_path(Path(source))
    elif kind == "proto":
        model = _deserialize(source, "model")
    elif kind == "ir":
        model = source
    elif kind == "onnxprogram":
        model = source.model        # rewritten in place, like an onnx_ir.Model
    else:
        gs = _graphsurgeon()
        try:
            proto = gs.export_onnx(source)
        except Exception as exc:
            raise Unsupported(f"invalid graph: graphsurgeon export failed ({first_line(exc)})") from exc
        model = _deserialize(proto, "model")
    if kind != "path":
        check_weights(model, base_dir)
    check_supported(model)
    for note in drop_stale(model, check_graph(model)):
        warnings.warn(note, stacklevel=2)
    return model, kind


def _deserialize(proto: onnx.ModelProto, what) -> ir.Model:
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise BadInput(f"{what}: not an ONNX model (no graph or no ir_version)")
    try:
        model = ir.serde.deserialize_model(proto)
        model.meta[DECLARED] = _value_info_names(proto.graph)
        return model
    except Exception as exc:    # a parsable protobuf whose content is not a valid model
        root, seen = exc, set()     # onnx_ir wraps the real complaint in SerdeErrors: the
        while id(root) not in seen:    # deepest exception of the chain says what is wrong
            seen.add(id(root))
            inner = root.__cause__ or root.__context__
            if inner is None:
                break
            root = inner
        raise Unsupported(f"{what}: invalid model ({type(root).__name__}: {first_line(root)})") from exc


def _value_info_names(graph: onnx.GraphProto) -> frozenset[str]:
    """Names the producer declared a value_info for, in `graph` and its subgraphs."""
    names = {info.name for info in graph.value_info}
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                names |= _value_info_names(sub)
    return frozenset(names)


def load_path(path: Path) -> ir.Model:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.is_dir() or path.stat().st_size == 0:
        raise BadInput(f"{path}: not an ONNX model (empty file or a directory)")
    try:
        # weights inline: their bytes stay in the file, read when a rule needs them
        structure = read_structure(str(path))
        # protobuf, whatever the extension: onnx would guess a text format from `.json`/`.txt`
        proto, spans = structure or (onnx.load(str(path), format="protobuf", load_external_data=False), {})
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except Exception as exc:   # protobuf raises DecodeError and friends: all mean "not ONNX"
        raise BadInput(f"{path}: not an ONNX model or truncated ({type(exc).__name__}: "
                       f"{first_line(exc, 120)})") from exc
    model = _deserialize(proto, path)
    attach_spans(model, str(path.resolve()), spans)
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    try:
        files = check_external_data(model, path.parent)
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}") from exc
    _read_through_links(model)
    model.meta[INPUT_FILES] = [str(path.resolve())] + sorted(files)
    return model




def _read_through_links(model: ir.Model) -> None:
    """External data reached through a link. onnx_ir refuses to read, from a tensor with a
    base_dir, a data file whose real path leaves that folder or that has several hard links (a
    defence for servers loading untrusted models); the Hugging Face cache is exactly that
    (snapshots/<rev>/model.onnx.data -> ../../blobs/<sha>), and a hard link is an ordinary way
    to share weights. Their locations were checked at load (check_external_data: relative, no
    '..', the file the model's folder names), so such a tensor is given that file's absolute
    path and no base_dir — onnx_ir's form for a path its caller vouches for — and keeps the
    location it was given (files.given_location) for what is written back. Every other tensor
    keeps onnx_ir's check."""
    for value in initializers(model):
        tensor = value.const_value
        if type(tensor) is ir.ExternalTensor and tensor.base_dir and _through_a_link(tensor):
            linked = ir.ExternalTensor(
                os.path.abspath(tensor.path), tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape,
                name=tensor.name, doc_string=tensor.doc_string, metadata_props=tensor.metadata_props, base_dir="")
            linked.meta[GIVEN_LOCATION] = str(tensor.location)
            value.const_value = linked


def _through_a_link(tensor: ir.ExternalTensor) -> bool:
    """The data file's real path leaves the tensor's base_dir, or the file has several hard
    links: what onnx_ir refuses to read."""
    base, real = os.path.realpath(tensor.base_dir), os.path.realpath(tensor.path)
    try:
        links = os.stat(real).st_nlink
    except OSError:
        links = 1
    return os.path.commonpath([base, real]) != base or links > 1


def check_weights(model: ir.Model, base_dir=None) -> None:
    """The external data of a model handed in memory (`base_dir`: the folder it lies in) is
    where the model says, checked and read like a path's: a BadInput naming the tensor and the
    file looked for, not the FileNotFoundError of the first read."""
    if not has_external_data(model):
        return
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, str(base_dir))
    try:
        check_external_data(model, Path(base_dir) if base_dir is not None else Path.cwd())
    except BadInput as exc:
        raise BadInput(f"{exc}: pass the folder its weights lie in (rewrite(model, base_dir=...); "
                       "onnx_ir: ir.external_data.set_base_dir(model.graph, folder)), or load the model "
                       "with its external data") from exc
    _read_through_links(model)


def _readable(path: Path) -> str | None:
    """None when `path` opens for reading, else why not (stat alone does not say)."""
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _external_location(tensor: ir.ExternalTensor, base: Path, name: str) -> Path:
    if GIVEN_LOCATION in tensor.meta:       # checked at load, read through a link
        return Path(tensor.path)
    location = str(tensor.location)
    if not location or os.path.isabs(location) or ".." in Path(location).parts:
        raise BadInput(f"external data location {location!r} of tensor {name!r} is not a relative "
                       "path inside the model's folder")
    return Path(tensor.base_dir or base) / location


def check_external_data(model: ir.Model, base: Path) -> set[str]:
    """Every external tensor's file exists, opens for reading and is long enough (reads nothing).
    Returns the resolved paths of the external data files."""
    sizes: dict[str, int] = {}
    unreadable: dict[str, str | None] = {}
    for value in initializers(model):
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = _external_location(tensor, base, value.name)
        key = str(location.resolve())
        if key not in sizes:
            sizes[key] = location.stat().st_size if location.is_file() else -1
        if sizes[key] < 0:
            raise BadInput(f"external data file {tensor.location!r} of tensor {value.name!r} is missing "
                           f"(looked for {location})")
        if key not in unreadable:
            unreadable[key] = _readable(location)
        if unreadable[key]:
            raise BadInput(f"external data file {tensor.location!r} cannot be read ({unreadable[key]})")
        offset, length = tensor.offset or 0, tensor.length
        if offset < 0 or (length is not None and length < 0):
            raise BadInput(f"external data of tensor {value.name!r} has a negative offset or length")
        try:
            nbytes = tensor.nbytes
        except Exception:       # an unknown dtype: the checker will say
            nbytes = 0
        if length is not None and length < nbytes:
            raise BadInput(f"external data of tensor {value.name!r} is shorter than its shape needs "
                           f"({length} < {nbytes} bytes)")
        end = offset + (length if length is not None else nbytes)
        if sizes[key] < end:
            raise BadInput(f"external data file {tensor.location!r} is shorter than tensor "
                           f"{value.name!r} needs ({sizes[key]} < {end} bytes)")
    return set(sizes)


def to_kind(model: ir.Model, kind: str, source=None):
    """`model` as the kind of thing the caller handed in (`source`: that thing)."""
    if kind == "ir" or kind == "path":
        return model
    if kind == "onnxprogram":
        return source
    proto = _given_locations(ir.to_proto(model), model)
    if kind == "proto":
        return proto
    return _graphsurgeon().import_onnx(proto)


def _given_locations(proto: onnx.ModelProto, model: ir.Model) -> onnx.ModelProto:
    """External data read through a link is written back under the location it was given."""
    given = {str(v.const_value.location): v.const_value.meta[GIVEN_LOCATION] for v in initializers(model)
             if isinstance(v.const_value, ir.ExternalTensor) and GIVEN_LOCATION in v.const_value.meta}
    if given:
        for tensor in proto_tensors(proto.graph):
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value in given:
                    entry.value = given[entry.value]
    return proto


def _graphsurgeon():
    """onnx_graphsurgeon, an optional dependency: only graphsurgeon inputs need it."""
    try:
        import onnx_graphsurgeon
    except ImportError as exc:
        raise UsageError("a graphsurgeon Graph needs onnx-graphsurgeon: pip install 'flashnorm-onnx[graphsurgeon]'"
                         ) from exc
    return onnx_graphsurgeon






def _referenced_files(model: ir.Model) -> set[str]:
    files = set()
    for value in initializers(model):
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and (tensor.base_dir or GIVEN_LOCATION in tensor.meta):
            files.add(str(Path(tensor.path).resolve()))
    return files


SAVE_INLINE_BYTES = 256    # ir.save's size_threshold_bytes: tensors this small stay in the proto


@contextlib.contextmanager
def _fold_ahead(model: ir.Model):
    """While ir.save writes one tensor, compute the next lazily folded one in the background.

    ir.save writes (serially) the initializers of `model.graphs()` in order; the lazy ones among
    them are swapped for thunks that hand over a result computed one step ahead, so folding
    overlaps writing (and the in-kernel copies of the unchanged tensors in between). One
    worker, one tensor ahead: at most one folded tensor beyond the one being written is held."""
    values = [v for graph in model.graphs() for v in graph.initializers.values()
              if isinstance(v.const_value, ir.LazyTensor) and not isinstance(v.const_value, SpanTensor)
              and v.const_value.nbytes > SAVE_INLINE_BYTES]
    lazies = [v.const_value for v in values]
    pool = ThreadPoolExecutor(1, thread_name_prefix="fold-ahead")
    pending: dict = {}

    def start(i: int) -> None:
        if i < len(lazies) and i not in pending:
            pending[i] = pool.submit(lazies[i].raw)

    def take(i: int):
        start(i)
        future = pending.pop(i)
        start(i + 1)
        return future.result()

    for i, (value, lazy) in enumerate(zip(values, lazies)):
        value.const_value = ir.LazyTensor(lambda i=i: take(i), dtype=lazy.dtype, shape=lazy.shape,
                                          name=lazy.name)
    start(0)        # the first fold overlaps the copies written before it
    try:
        yield
    finally:
        for value, lazy in zip(values, lazies):
            value.const_value = lazy
        pending.clear()
        pool.shutdown(wait=False, cancel_futures=True)


def _copy_source(source: Path, tmp_model: Path, data_name: str | None) -> bool:
    """Write the model file `source` unchanged as `tmp_model` (its weights in `data_name` beside
    it): its own bytes, and its data file's, so a run that rewrote nothing hands on what it read.
    When the data file is renamed, only the model's location entries change. False (nothing
    written) where a copy cannot be the output: weights inline in one and external in the other,
    or several data files to gather into one."""
    proto = _proto_without_weights(source) if mentions_external_data(source) else None
    locations = {entry.value for entry in _location_entries(proto)} if proto is not None else set()
    if not locations:
        if data_name is not None:
            return False
        shutil.copyfile(source, tmp_model)
        return True
    if data_name is None or len(locations) != 1:
        return False
    (location,) = locations
    shutil.copyfile(source.parent / location, tmp_model.parent / data_name)
    if location == data_name:
        shutil.copyfile(source, tmp_model)
    else:
        for entry in _location_entries(proto):
            entry.value = data_name
        tmp_model.write_bytes(proto.SerializeToString())
    return True


def _proto_without_weights(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), format="protobuf", load_external_data=False)


def _location_entries(proto: onnx.ModelProto):
    """The "location" entries of every external tensor of `proto` (its graphs and subgraphs)."""
    for tensor in proto_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield from (entry for entry in tensor.external_data if entry.key == "location")


def save(model: ir.Model, path, *, external_data: str | None = None, overwrite: bool = False,
         source: str | os.PathLike | None = None, check: bool = True, progress=None,
         before_commit=None, also_writes: dict | None = None, unchanged: bool = False) -> Path:
    """Write `model` to `path` atomically: the graph is validated, everything goes to a
    temporary folder beside the target, is checked, then renamed into place (external data
    first, the model last); on any failure — an exception, Ctrl-C — nothing is left behind
    and a file that was there is restored. External data is used when asked for, when the
    source had it, or when the weights pass protobuf's 2 GiB limit.

    Nothing is replaced that is not a regular file, that belongs to the input (except the input
    itself with `overwrite`), or that another model in the folder references as external data.
    `before_commit(temporary_model_path)` runs on the complete, checked files before the rename
    (verification): when it raises, nothing is written. `also_writes` ({what: path}) names
    files the caller writes afterwards (the report): refused if they are any of these files.
    `unchanged`: `model` is `source` as it was read; its bytes are written (see _copy_source)."""
    path = Path(path)
    target_dir = path.parent if str(path.parent) else Path(".")
    if not target_dir.is_dir():
        raise OutputError(f"{target_dir}: output directory does not exist")
    check_target(path, "output")
    inputs = set(model.meta.get(INPUT_FILES, ())) | _referenced_files(model)
    source_path = str(Path(source).resolve()) if source is not None else None
    if source_path:
        inputs.add(source_path)
    out_model = str(path.resolve())
    if out_model == source_path and not overwrite:
        raise OutputError(f"{path}: refusing to write over the input (pass --overwrite to allow)")
    if out_model in inputs and out_model != source_path:
        raise OutputError(f"{path}: is one of the input's files (its external data); refusing to write over it")
    siblings = Siblings(replaced=out_model)
    users = siblings.users(path)
    if users:
        raise OutputError(f"output {path}: is the external data of {', '.join(users)}; refusing to "
                          "write over it")
    replacing_input = out_model == source_path
    inline_ok = not has_external_data(model) and len(model.meta.get(INPUT_FILES, ())) <= 1 \
        and weight_bytes(model) <= PROTOBUF_LIMIT
    external_data = output_data_name(model, path, external_data, inputs, replacing_input, siblings, inline_ok)
    written = {out_model} | ({str((target_dir / external_data).resolve())} if external_data else set())
    check_also_written(also_writes or {}, inputs, written, siblings)
    if check:
        try:
            check_graph(model)
        except Unsupported as exc:
            raise InternalError(f"rewritten model is invalid, not written (a bug: rerun with --debug and "
                                f"report it): {exc}") from exc
    remove_stale_temporaries(target_dir)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), suffix=".tmp", dir=target_dir))
    except OSError as exc:
        raise OutputError(f"{target_dir}: cannot write ({exc.strerror or exc})") from exc
    try:
        tmp_model = tmp / temporary_model_name(external_data)
        callback = None
        if progress is not None:
            def callback(tensor, info):
                progress(info.index + 1, info.total, tensor.name)
        try:
            # one weight written at a time (onnx-ir's default: serial; unchanged external ones
            # copied in the kernel), the next folded one computed meanwhile: bounded memory
            streamed = False
            if not (unchanged and _copy_source(Path(source), tmp_model, external_data)):
                if external_data:
                    with _fold_ahead(model):
                        ir.save(model, tmp_model, format="protobuf", external_data=external_data,
                                callback=callback, size_threshold_bytes=SAVE_INLINE_BYTES)
                else:       # serialized once, each large tensor streamed into its place
                    streamed = write_inline(model, tmp_model)
                    if not streamed:
                        ir.save(model, tmp_model, format="protobuf")
        except (OSError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise OutputError(f"{path}: cannot serialize the model ({type(exc).__name__}: "
                              f"{first_line(exc)})") from exc
        if check:
            try:
                # the graph was checked before writing (check_graph): what is left to check is
                # that the file parses (read without the streamed weights' bytes)
                check_structure(tmp_model, framing_only=streamed)
            except OutputError as exc:
                raise InternalError(f"{exc} (a bug: rerun with --debug and report it; nothing written)") from exc
        if before_commit is not None:
            before_commit(tmp_model)
        moves = []
        if external_data and (tmp / external_data).exists():
            moves.append((tmp / external_data, target_dir / external_data))
        moves.append((tmp_model, path))
        commit(moves, tmp)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path

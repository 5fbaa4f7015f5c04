"""Single-file models (weights inline) without a protobuf copy of their weights.

Reading: the file's protobuf framing is walked (nothing parsed but the structure); each large
initializer of the main graph whose bytes are one `raw_data` field becomes a `SpanTensor`, the
span of the file its bytes occupy, read with plain file reads only when a rule needs it. The
rest (nodes, small tensors, every header field) is parsed by protobuf as usual.

Writing: the model is serialized once with a short unique marker as each large tensor's bytes,
then written piece by piece, each marker replaced by its tensor's bytes (copied from the input
file in the kernel when unchanged) and every enclosing length fixed: the bytes protobuf would
write for the whole ModelProto, without that ModelProto or its serialization in memory.
Anything this does not expect (a field twice, a marker found elsewhere) is left to the
ordinary serializer: `write_inline` returns False, `read_structure` returns no spans.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import secrets

import numpy as np
import onnx
import onnx_ir as ir

SPAN_MIN_BYTES = 1024          # raw_data above this size stays in the file until read
_LEN = 2                        # protobuf wire type of a length-delimited field
# field numbers (onnx.proto): ModelProto.graph, GraphProto.initializer/node,
# NodeProto.attribute, AttributeProto.g/graphs, TensorProto.data_type/raw_data
_MODEL_GRAPH, _GRAPH_INITIALIZER, _GRAPH_NODE, _NODE_ATTRIBUTE = 7, 5, 1, 5
_ATTR_GRAPH, _ATTR_GRAPHS, _TENSOR_DATA_TYPE, _TENSOR_RAW_DATA = 6, 11, 2, 9
# TensorProto fields a SpanTensor reproduces when serialized: dims, data_type, name, raw_data,
# doc_string, metadata_props (any other field: the tensor is parsed as it is)
_SPAN_TENSOR_FIELDS = {1, 2, 8, 9, 12, 16}


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(buf, start: int, end: int):
    """(field number, wire type, field start, payload start, payload end) of each field."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            payload = pos
            _, pos = _varint(buf, pos)
            yield number, wire, field_start, payload, pos
            continue
        if wire == _LEN:
            length, pos = _varint(buf, pos)
            payload = pos
            pos += length
        elif wire == 1:
            payload, pos = pos, pos + 8
        elif wire == 5:
            payload, pos = pos, pos + 4
        else:
            raise ValueError(f"unexpected wire type {wire}")
        if pos > end:
            raise ValueError("field runs past its message")
        yield number, wire, field_start, payload, pos


# -- reading ------------------------------------------------------------------------------------

class SpanTensor(ir.LazyTensor):
    """A tensor whose bytes lie inline in a model file at [offset, offset + length): read with
    plain reads (not a memory map, so its pages do not stay in the process's memory) when
    needed, copied in the kernel when written; serialized inline like any in-memory tensor."""

    __slots__ = ("path", "offset", "length")

    def __init__(self, path: str, offset: int, length: int, dtype: ir.DataType, shape: ir.Shape, *,
                 name: str | None = None, doc_string: str | None = None, metadata_props=None):
        super().__init__(lambda: ir.Tensor(self.numpy(), dtype=dtype), dtype, shape, name=name,
                         doc_string=doc_string, metadata_props=metadata_props)
        self.path, self.offset, self.length = path, offset, length

    def tobytes(self) -> bytes:
        return self._read().tobytes()

    def numpy(self) -> np.ndarray:
        return self._read().view(self.dtype.numpy()).reshape(self.shape.numpy())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        return f"{self._repr_base()}(path={self.path!r}, offset={self.offset}, length={self.length})"

    def _read(self) -> np.ndarray:
        data = np.empty(self.length, np.uint8)
        with open(self.path, "rb") as f:
            done = 0
            while done < self.length:
                n = os.preadv(f.fileno(), [data[done:]], self.offset + done)
                if n == 0:
                    raise OSError(f"{self.path}: shorter than tensor {self.name!r} needs")
                done += n
        return data

    def tofile(self, file) -> None:
        """Write the bytes at `file`'s position: copied in the kernel where it can."""
        file.flush()
        start, done = file.tell(), 0
        with open(self.path, "rb") as src:
            try:
                while done < self.length:
                    n = os.copy_file_range(src.fileno(), file.fileno(), min(1 << 30, self.length - done),
                                           self.offset + done, start + done)
                    if n == 0:
                        raise OSError(f"{self.path}: shorter than tensor {self.name!r} needs")
                    done += n
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EXDEV):
                    raise
        file.seek(start + done)
        if done < self.length:          # no kernel copy here (another file system, a pipe)
            file.write(self._read()[done:])


def _span_of(buf, start: int, end: int) -> tuple[int, int, bytes] | None:
    """(payload offset, length, the tensor's fields without raw_data) for a TensorProto at
    [start, end) that a SpanTensor can stand for, else None."""
    raw, numbers, dtype = None, [], None
    for number, wire, field_start, payload, field_end in _fields(buf, start, end):
        numbers.append(number)
        if number == _TENSOR_RAW_DATA and wire == _LEN:
            raw = (field_start, payload, field_end)
        elif number == _TENSOR_DATA_TYPE and wire == 0:
            dtype, _ = _varint(buf, payload)
    if raw is None or numbers.count(_TENSOR_RAW_DATA) != 1 or not set(numbers) <= _SPAN_TENSOR_FIELDS:
        return None
    field_start, payload, field_end = raw
    try:
        data_type = ir.DataType(dtype)
        # STRING has no raw bytes: kept as a span only for check_tensors to report the model invalid
        packed = data_type != ir.DataType.STRING and data_type.numpy().itemsize * 8 != data_type.bitwidth
    except Exception:     # noqa: BLE001 - unknown or undefined dtype: parsed as it is
        return None
    if packed or field_end - payload <= SPAN_MIN_BYTES:      # INT4, FLOAT4E2M1: parsed as they are
        return None
    return payload, field_end - payload, bytes(buf[start:field_start]) + bytes(buf[field_end:end])


def read_structure(path: str) -> tuple[onnx.ModelProto, dict[str, tuple[int, int]]] | None:
    """The model at `path` parsed without the bytes of its large main-graph initializers, and
    for each of them (by name) the (offset, length) of its bytes in the file. None when the
    file has nothing to leave out or a framing this does not expect: parse it as a whole."""
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:         # empty
            return None
    with buf:
        try:
            return _split(buf)
        except (ValueError, IndexError):
            return None


def _split(buf) -> tuple[onnx.ModelProto, dict[str, tuple[int, int]]] | None:
    graphs = [f for f in _fields(buf, 0, len(buf)) if f[0] == _MODEL_GRAPH]
    if len(graphs) != 1 or graphs[0][1] != _LEN:
        return None
    _, _, graph_field, graph_start, graph_end = graphs[0]
    graph_parts, spans, names = [], {}, []
    for number, wire, field_start, payload, field_end in _fields(buf, graph_start, graph_end):
        span = _span_of(buf, payload, field_end) if number == _GRAPH_INITIALIZER and wire == _LEN else None
        if span is None:
            graph_parts.append(bytes(buf[field_start:field_end]))
            continue
        offset, length, header = span
        tensor = onnx.TensorProto.FromString(header)
        names.append(tensor.name)
        spans[tensor.name] = (offset, length)
        graph_parts.append(_encode_varint(_GRAPH_INITIALIZER << 3 | _LEN) + _encode_varint(len(header)) + header)
    if not spans or len(spans) != len(names):     # nothing left out, or two tensors of one name
        return None
    proto = onnx.ModelProto.FromString(bytes(buf[:graph_field]) + bytes(buf[graph_end:]))
    proto.graph.ParseFromString(b"".join(graph_parts))
    return proto, spans


def attach_spans(model: ir.Model, path: str, spans: dict[str, tuple[int, int]]) -> None:
    """The main graph's initializers named in `spans` read their bytes from `path`."""
    for name, (offset, length) in spans.items():
        value = model.graph.initializers[name]
        header = value.const_value
        value.const_value = SpanTensor(path, offset, length, header.dtype, header.shape, name=header.name,
                                       doc_string=header.doc_string, metadata_props=header.metadata_props)


# -- writing ------------------------------------------------------------------------------------

# where a marker may lie: message -> {field number: the message type of that field}
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _TENSOR = "model", "graph", "node", "attribute", "tensor"
_NESTING = {_MODEL: {_MODEL_GRAPH: _GRAPH},
            _GRAPH: {_GRAPH_INITIALIZER: _TENSOR, _GRAPH_NODE: _NODE},
            _NODE: {_NODE_ATTRIBUTE: _ATTRIBUTE},
            _ATTRIBUTE: {_ATTR_GRAPH: _GRAPH, _ATTR_GRAPHS: _GRAPH},
            _TENSOR: {}}


def _holes(model: ir.Model) -> list[ir.Value]:
    """Initializers whose bytes are written straight from the tensor: large ones held in
    memory, read from a file span, or computed (a folded weight); not a TensorProtoTensor
    (serialized as the proto it is), an external or a string tensor."""
    chosen = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, (ir.ExternalTensor, ir.StringTensor, ir.serde.TensorProtoTensor)):
                continue
            if tensor.dtype == ir.DataType.STRING or tensor.nbytes <= SPAN_MIN_BYTES:
                continue
            chosen.append(value)
    return chosen


def _pieces(buf: bytes, start: int, end: int, kind: str, markers: list[int], holes: dict[int, int]):
    """The message `kind` at buf[start:end] as (pieces, length): bytes, or the index of a hole
    (its marker's position) whose `holes[index]` bytes go there. Fields holding no marker are
    copied as they are; the length prefixes of those that do are recomputed."""
    pieces, total = [], 0
    for number, wire, field_start, payload, field_end in _fields(buf, start, end):
        lo = bisect.bisect_left(markers, payload)
        inside = wire == _LEN and lo < len(markers) and markers[lo] < field_end
        if not inside:
            pieces.append(buf[field_start:field_end])
            total += field_end - field_start
            continue
        key = buf[field_start:payload - len(_encode_varint(field_end - payload))]
        if kind == _TENSOR and number == _TENSOR_RAW_DATA and markers[lo] == payload:
            length = holes[payload]
            sub, sub_len = [payload], length
        elif number in _NESTING[kind]:
            sub, sub_len = _pieces(buf, payload, field_end, _NESTING[kind][number], markers, holes)
        else:
            raise ValueError(f"a marker inside field {number} of a {kind}")
        head = key + _encode_varint(sub_len)
        pieces.append(head)
        pieces.extend(sub)
        total += len(head) + sub_len
    return pieces, total


def write_inline(model: ir.Model, path) -> bool:
    """Write `model` to `path` with its weights inline, serializing its structure once and
    streaming each large tensor into place. False (nothing written) when its serialization
    is not what this expects; the caller then serializes it whole."""
    values = _holes(model)
    if not values:
        return False
    token = secrets.token_bytes(12)
    originals = [value.const_value for value in values]
    marks = [token + i.to_bytes(4, "little") for i in range(len(values))]
    try:
        for value, tensor, mark in zip(values, originals, marks):
            value.const_value = ir.LazyTensor(lambda mark=mark: ir.tensor(np.frombuffer(mark, np.uint8)),
                                              dtype=tensor.dtype, shape=tensor.shape, name=tensor.name,
                                              doc_string=tensor.doc_string, metadata_props=tensor.metadata_props)
        skeleton = ir.serde.serialize_model(model).SerializeToString()
    finally:
        for value, tensor in zip(values, originals):
            value.const_value = tensor
    positions = [skeleton.find(mark) for mark in marks]
    if any(p < 0 or skeleton.count(token) != len(marks) for p in positions):
        return False
    holes = {p: tensor.nbytes for p, tensor in zip(positions, originals)}
    by_position = dict(zip(positions, originals))
    try:
        pieces, _ = _pieces(skeleton, 0, len(skeleton), _MODEL, sorted(positions), holes)
    except ValueError:
        return False
    with open(path, "wb") as f:
        for piece in pieces:
            if not isinstance(piece, int):
                f.write(piece)
                continue
            tensor, start = by_position[piece], f.tell()
            tensor.tofile(f)
            if f.tell() - start != holes[piece]:
                raise ValueError(f"tensor {tensor.name!r} wrote {f.tell() - start} bytes, its type and "
                                 f"shape need {holes[piece]}")
    return True

"""Model weights that every worker maps from one file, so N workers hold one copy, not N.

A plain ``InferenceSession(path)`` copies every weight into memory private to the process (so does
an ONNX file with external data). What shares, measured with onnxruntime 1.32 (bench/bench_memory.py):
the weights in a raw file mapped read-only, each tensor a ``numpy.frombuffer`` view handed to
onnxruntime with ``SessionOptions.add_initializer`` and prepacking off (``session.disable_prepacking``;
prepacking makes a private, re-laid-out copy of every weight).

The *shared form* of a model is two files beside the original, written once by the supervisor's
load-check process (``split_model``) and opened by each worker (``open_shared_session``):

- ``<stem>.graph.onnx``: the original model with every large initializer replaced by an external-data
  reference into the weights file (so it stays a valid ONNX model on its own), a few KB;
- ``<stem>.weights``: the raw tensors. Layout (little-endian)::

      0     8          16                       header_size (4096-aligned)
      +-----+----------+------------------------+------------------------------------------+
      |magic| index    | index: JSON, UTF-8     | tensors, each at a 4096-aligned offset   |
      |     | len u64  | {"tensors": [...]}     | (page-aligned views, nothing straddles)   |
      +-----+----------+------------------------+------------------------------------------+

  one index item: {"name", "dtype" (numpy), "shape", "offset", "nbytes"}.

The split reads and rewrites the ONNX protobuf by its wire format (the few fields of ModelProto,
GraphProto and TensorProto it needs; every other field is copied byte for byte), so the server needs
no ``onnx`` package. Models without large initializers (tree ensembles keep their trees in node
attributes) have no shared form: ``split_model`` returns None and they load the plain way.

Importing this module loads no model runtime (``split_model`` runs where onnxruntime must not be
imported); ``open_shared_session`` imports onnxruntime when called.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.store import protobuf_wire as wire
from conf.datadir import write_atomically

GRAPH_SUFFIX = ".graph.onnx"
WEIGHTS_SUFFIX = ".weights"
WEIGHTS_MAGIC = b"SIRAWTS1"
PAGE = 4096
MIN_SHARED_TENSOR_BYTES = 64 * 1024  # smaller tensors stay inline: a page each would waste more
FILE_MODE = 0o644  # beside the downloaded model files (app/store/buckets.py), which are 0644 too

_HEADER = struct.Struct("<8sQ")

# Field numbers of onnx.proto (stable since IR version 3); the wire format is app/store/protobuf_wire.py.
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_FLOAT_DATA = 1, 2, 4
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_NAME, _TENSOR_RAW_DATA, _TENSOR_DOC_STRING = 8, 9, 12
_TENSOR_DATA_LOCATION = 14
_DATA_LOCATION_EXTERNAL = 1
_ONNX_FLOAT = 1
# TensorProto.DataType -> numpy dtype, for the element types a raw weight may have.
_NUMPY_DTYPES = {1: "<f4", 2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4", 7: "<i8", 9: "?",
                 10: "<f2", 11: "<f8", 12: "<u4", 13: "<u8"}


class SharedFormError(ValueError):
    """A model file or weights file that the shared route cannot read."""


def graph_path_for(model_path: str) -> str:
    """Where the shared form's graph of ``<stem>.onnx`` lives."""
    return _stem(model_path) + GRAPH_SUFFIX


def weights_path_for(graph_path: str) -> str:
    """The weights file that belongs to a shared-form graph."""
    if not graph_path.endswith(GRAPH_SUFFIX):
        raise SharedFormError(f"{graph_path} is not a shared-form graph (*{GRAPH_SUFFIX})")
    return graph_path[:-len(GRAPH_SUFFIX)] + WEIGHTS_SUFFIX


def is_shared_form(path: str) -> bool:
    """True for a graph written by ``split_model``: its name says so and its weights file is beside it."""
    return path.endswith(GRAPH_SUFFIX) and os.path.isfile(weights_path_for(path))


def _stem(model_path: str) -> str:
    return model_path.removesuffix(".onnx")


# Splitting (in the supervisor's load-check process) ---------------------------------------------

@dataclass
class _Tensor:
    """One initializer that moves to the weights file, and where it goes there."""

    name: str
    data_type: int
    dims: list[int]
    data: memoryview
    offset: int = 0


def split_model(model_path: str, min_tensor_bytes: int = MIN_SHARED_TENSOR_BYTES) -> str | None:
    """Write the shared form of a model beside it; returns the graph path, or None if nothing shares.

    Both files go to temporary names, are fsynced and renamed, the weights first: a graph that
    exists always has its weights.
    """
    with open(model_path, "rb") as handle:
        model = memoryview(handle.read())
    try:
        graph_field = _graph_field(model)
        movable = _movable_initializers(graph_field[4], min_tensor_bytes)
    except wire.ProtobufError as exc:
        raise SharedFormError(f"{model_path}: {exc}") from None
    if not movable:
        return None
    header = _lay_out(list(movable.values()))
    graph_path = graph_path_for(model_path)
    weights_path = weights_path_for(graph_path)
    graph = _graph_with_references(graph_field[4], movable, os.path.basename(weights_path))
    write_atomically(weights_path, _weights_chunks(header, list(movable.values())), FILE_MODE)
    write_atomically(graph_path, [bytes(model[:graph_field[2]]),
                                  wire.tag(_MODEL_GRAPH, wire.LENGTH), wire.varint(len(graph)), graph,
                                  bytes(model[graph_field[3]:])], FILE_MODE)
    return graph_path


def _graph_field(model: memoryview) -> tuple:
    """The one GraphProto field of a ModelProto (number, wire, start, end, value)."""
    graphs = [field for field in wire.fields(model) if field[0] == _MODEL_GRAPH and field[1] == wire.LENGTH]
    if len(graphs) != 1:
        raise SharedFormError(f"not an ONNX model: {len(graphs)} graph fields")
    return graphs[0]


def _movable_initializers(graph: memoryview, min_tensor_bytes: int) -> dict[int, _Tensor]:
    """{field start in the graph: tensor} for each initializer to move, in file order."""
    movable = {}
    for number, wire_type, start, _end, value in wire.fields(graph):
        if number == _GRAPH_INITIALIZER and wire_type == wire.LENGTH:
            tensor = _movable_tensor(value, min_tensor_bytes)
            if tensor is not None:
                movable[start] = tensor
    return movable


def _movable_tensor(tensor: memoryview, min_tensor_bytes: int) -> _Tensor | None:
    """The tensor's name, type, dims and data when it is large and held inline, else None."""
    name, data_type, dims, data, from_float_data = "", 0, [], None, False
    for number, wire_type, _start, _end, value in wire.fields(tensor):
        if number == _TENSOR_DIMS:
            dims.extend(wire.packed_varints(value) if wire_type == wire.LENGTH else [value])
        elif number == _TENSOR_DATA_TYPE and wire_type == wire.VARINT:
            data_type = value
        elif number == _TENSOR_NAME and wire_type == wire.LENGTH:
            name = bytes(value).decode("utf-8")
        elif number == _TENSOR_RAW_DATA and wire_type == wire.LENGTH:
            data = value
        elif number == _TENSOR_FLOAT_DATA and wire_type == wire.LENGTH:
            data, from_float_data = value, True  # packed little-endian floats, as raw_data
        elif number == _TENSOR_DOC_STRING:
            continue
        else:
            return None  # external, segmented or other typed data: leave the tensor as it is
    if data is None or not name or data_type not in _NUMPY_DTYPES \
            or (from_float_data and data_type != _ONNX_FLOAT):
        return None
    if len(data) < min_tensor_bytes \
            or len(data) != np.dtype(_NUMPY_DTYPES[data_type]).itemsize * _product(dims):
        return None
    return _Tensor(name, data_type, dims, data)


def _lay_out(tensors: list[_Tensor]) -> bytes:
    """Give each tensor its page-aligned offset; returns the weights file's header and index."""
    header_size = PAGE
    while True:
        offset = header_size
        for tensor in tensors:
            tensor.offset = offset
            offset = _align(offset + len(tensor.data))
        index = json.dumps({"tensors": [
            {"name": t.name, "dtype": _NUMPY_DTYPES[t.data_type], "shape": t.dims,
             "offset": t.offset, "nbytes": len(t.data)} for t in tensors]},
            separators=(",", ":")).encode("utf-8")
        header = _HEADER.pack(WEIGHTS_MAGIC, len(index)) + index
        if len(header) <= header_size:
            return header
        header_size = _align(len(header))


def _graph_with_references(graph: memoryview, movable: dict[int, _Tensor],
                           weights_name: str) -> bytes:
    """GraphProto bytes with each moved initializer replaced by its external reference."""
    out = []
    for _number, _wire, start, end, _value in wire.fields(graph):
        tensor = movable.get(start)
        if tensor is None:
            out.append(bytes(graph[start:end]))
        else:
            out.append(wire.length_field(_GRAPH_INITIALIZER, _external_tensor(tensor, weights_name)))
    return b"".join(out)


def _external_tensor(tensor: _Tensor, weights_name: str) -> bytes:
    """A TensorProto whose data lives in the weights file (ONNX external data)."""
    parts = [wire.tag(_TENSOR_DIMS, wire.VARINT) + wire.varint(dim) for dim in tensor.dims]
    parts.append(wire.tag(_TENSOR_DATA_TYPE, wire.VARINT) + wire.varint(tensor.data_type))
    parts.append(wire.length_field(_TENSOR_NAME, tensor.name.encode("utf-8")))
    for key, value in (("location", weights_name), ("offset", str(tensor.offset)),
                       ("length", str(len(tensor.data)))):
        entry = wire.length_field(1, key.encode("utf-8")) + wire.length_field(2, value.encode("utf-8"))
        parts.append(wire.length_field(_TENSOR_EXTERNAL_DATA, entry))
    parts.append(wire.tag(_TENSOR_DATA_LOCATION, wire.VARINT) + wire.varint(_DATA_LOCATION_EXTERNAL))
    return b"".join(parts)


def _weights_chunks(header: bytes, tensors: list[_Tensor]) -> list[bytes | memoryview]:
    """The weights file as chunks: header and index, then each tensor after its zero padding."""
    chunks: list[bytes | memoryview] = [header]
    written = len(header)
    for tensor in tensors:
        chunks += [bytes(tensor.offset - written), tensor.data]
        written = tensor.offset + len(tensor.data)
    return chunks


# Opening (in each worker) ------------------------------------------------------------------------

class MappedWeights:
    """A weights file mapped read-only and shared, with one array view per tensor.

    The session that uses the views must be dropped before this object: hold both together
    (``open_shared_session`` returns them as a pair). The mapping is unmapped when the last view
    is garbage collected.
    """

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER.size:
                raise SharedFormError(f"{path}: {size} bytes, shorter than its header")
            # Shared and populated: every worker maps the same page-cache pages, faulted in now
            # rather than on the first requests.
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                  mmap.PROT_READ)
        finally:
            os.close(fd)
        self.arrays = self._views(self._read_index())
        self.ort_values: list[Any] = []  # onnxruntime OrtValues over the views, kept alive here

    def _read_index(self) -> list[dict]:
        magic, length = _HEADER.unpack_from(self._map, 0)
        if magic != WEIGHTS_MAGIC or _HEADER.size + length > len(self._map):
            raise SharedFormError(f"{self.path}: not a SIRA weights file or truncated")
        try:
            return json.loads(self._map[_HEADER.size:_HEADER.size + length])["tensors"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SharedFormError(f"{self.path}: unreadable index ({exc})") from None

    def _views(self, index: list[dict]) -> dict[str, np.ndarray]:
        """A read-only array over each tensor's bytes, every bound checked."""
        arrays = {}
        for item in index:
            try:
                dtype, shape = np.dtype(item["dtype"]), tuple(int(d) for d in item["shape"])
                offset, nbytes = int(item["offset"]), int(item["nbytes"])
            except (KeyError, TypeError, ValueError) as exc:
                raise SharedFormError(f"{self.path}: bad index entry {item!r} ({exc})") from None
            if offset % PAGE or nbytes != dtype.itemsize * _product(shape) \
                    or offset + nbytes > len(self._map):
                raise SharedFormError(f"{self.path}: tensor {item.get('name')!r} is out of bounds")
            count = nbytes // dtype.itemsize
            arrays[item["name"]] = np.frombuffer(self._map, dtype, count, offset).reshape(shape)
        return arrays

    @property
    def nbytes(self) -> int:
        """Bytes of weights that this file shares."""
        return sum(array.nbytes for array in self.arrays.values())



def open_shared_session(graph_path: str, options: Any) -> tuple[Any, MappedWeights]:
    """An onnxruntime session over a shared-form graph whose weights are the mapped file's pages.

    ``options`` is a fresh ``SessionOptions``; prepacking is turned off on it (it would copy every
    weight). Returns (session, weights): keep the weights as long as the session.
    """
    import onnxruntime as ort

    weights = MappedWeights(weights_path_for(graph_path))
    for name, array in weights.arrays.items():
        value = ort.OrtValue.ortvalue_from_numpy(array)
        weights.ort_values.append(value)
        options.add_initializer(name, value)
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(graph_path, sess_options=options,
                                   providers=["CPUExecutionProvider"])
    return session, weights


def _align(offset: int) -> int:
    return (offset + PAGE - 1) // PAGE * PAGE


def _product(dims) -> int:
    total = 1
    for dim in dims:
        total *= dim
    return total

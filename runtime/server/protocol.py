"""Open Inference Protocol (KServe v2 / Triton HTTP) codec: JSON tensors and the binary data extension.

A request body is JSON, or, with the header ``Inference-Header-Content-Length: n``, n bytes of
JSON followed by the inputs that carry ``parameters.binary_data_size`` in the order they are
listed. Responses put an output in the binary section when the request asked for it (the
output's ``parameters.binary_data``, else the request's ``parameters.binary_data_output``).
BYTES elements in binary form are each a 4-byte little-endian length then the bytes.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

try:   # 5-10x faster than the json module both ways (the serve extra installs it)
    import orjson
except ImportError:  # pragma: no cover - the stdlib does the same, slower
    orjson = None

HEADER_LENGTH = "Inference-Header-Content-Length"

DTYPES = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}


class ProtocolError(Exception):
    """A request the server cannot take: ``status`` is the HTTP code, the message says what to send."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Tensor:
    """One input tensor as sent: ``data`` is a numpy array, or a list of bytes for BYTES."""

    name: str
    datatype: str
    shape: tuple
    data: object


@dataclass
class InferRequest:
    """A decoded inference request."""

    inputs: list
    id: Optional[str] = None
    parameters: dict = field(default_factory=dict)
    outputs: Optional[list] = None          # [(name, binary or None)], None: every output
    binary_output: bool = False              # parameters.binary_data_output

    @property
    def timeout_s(self) -> Optional[float]:
        """The request's own deadline: Triton's ``timeout`` parameter, in microseconds."""
        t = self.parameters.get("timeout")
        if t is None:
            return None
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise ProtocolError(f"parameter 'timeout' must be a positive number of microseconds, "
                                f"got {t!r}")
        return float(t) / 1e6


def decompress(body: bytes, encoding: Optional[str], limit: int) -> bytes:
    """Undo ``Content-Encoding`` gzip/deflate, refusing (413) more than ``limit`` bytes out."""
    if not encoding or encoding == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding.lower())
    if wbits is None:
        raise ProtocolError(f"Content-Encoding {encoding!r} not supported; send gzip, deflate or "
                            f"uncompressed", 415)
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise ProtocolError(f"body is not valid {encoding} ({e})") from None
    if len(out) > limit:
        raise ProtocolError(f"decompressed body over the limit of {limit} bytes; send fewer rows "
                            f"per request", 413)
    return out


def loads(raw: bytes):
    """JSON to Python: orjson when installed; the json module for what orjson refuses (``NaN``
    and ``Infinity`` literals, integers past 64 bits) and for its error messages."""
    if orjson is not None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


def dumps(doc) -> bytes:
    """Compact JSON bytes (orjson when installed; NaN as the json module writes it otherwise)."""
    if orjson is not None:
        try:
            return orjson.dumps(doc)
        except TypeError:   # an integer past 64 bits
            pass
    return json.dumps(doc, separators=(",", ":")).encode()


def _split(body: bytes, header_length) -> tuple:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 <= n <= len(body):
        raise ProtocolError(f"header {HEADER_LENGTH} is {header_length!r}; it must be the byte "
                            f"length of the JSON part (0..{len(body)})")
    return body[:n], body[n:]


def _shape(value, name: str) -> tuple:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                              and d >= 0 for d in value):
        raise ProtocolError(f"input '{name}': 'shape' must be a list of non-negative integers, "
                            f"got {value!r}")
    return tuple(value)


def _flatten(data):
    """Nested JSON lists to a flat list (the protocol allows either form)."""
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        if any(isinstance(d, list) for d in data):
            raise ValueError("ragged nesting")
        return data
    out = []
    for d in data:
        out.extend(_flatten(d))
    return out


def _unpack_bytes(raw: bytes, name: str) -> list:
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ProtocolError(f"input '{name}': BYTES binary data is truncated (each element is "
                                f"a 4-byte little-endian length, then the bytes)")
        n = int.from_bytes(raw[i:i + 4], "little")
        if i + 4 + n > len(raw):
            raise ProtocolError(f"input '{name}': BYTES element {len(out)} claims {n} bytes, "
                                f"past the end of its binary data")
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


def pack_bytes(items) -> bytes:
    """BYTES elements in the binary extension's form (for clients and tests)."""
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


def _tensor(spec, binary: bytes, offset: int) -> tuple:
    if not isinstance(spec, dict):
        raise ProtocolError("each entry of 'inputs' must be an object with name, shape, "
                            "datatype and data")
    name = spec.get("name")
    if not isinstance(name, str):
        raise ProtocolError("an input has no 'name' (a string)")
    dt = spec.get("datatype")
    if dt != "BYTES" and dt not in DTYPES:
        raise ProtocolError(f"input '{name}': unknown datatype {dt!r}; use one of "
                            f"{', '.join(list(DTYPES) + ['BYTES'])}")
    shape = _shape(spec.get("shape"), name)
    count = math.prod(shape)
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(f"input '{name}': 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise ProtocolError(f"input '{name}': binary_data_size {size!r} does not fit the "
                                f"{len(binary) - offset} bytes left after the JSON header")
        raw = binary[offset:offset + size]
        offset += size
        if dt == "BYTES":
            data = _unpack_bytes(raw, name)
        else:
            if size != count * DTYPES[dt].itemsize:
                raise ProtocolError(f"input '{name}': shape {list(shape)} of {dt} needs "
                                    f"{count * DTYPES[dt].itemsize} bytes, got {size}")
            # bytearray: a writable copy made holding the GIL (numpy releases it to copy more
            # than 500 elements, and getting it back waits on the batcher thread)
            data = np.frombuffer(bytearray(raw), dtype=DTYPES[dt])
    else:
        if "data" not in spec:
            raise ProtocolError(f"input '{name}' has neither 'data' nor "
                                f"parameters.binary_data_size")
        try:
            flat = _flatten(spec["data"])
        except ValueError:
            raise ProtocolError(f"input '{name}': 'data' is ragged; send a flat list in "
                                f"row-major order") from None
        if dt == "BYTES":
            if not all(isinstance(s, str) for s in flat):
                raise ProtocolError(f"input '{name}': BYTES data in JSON must be strings")
            data = flat
        else:
            kinds = set(map(type, flat))   # exact types: True is not a number here
            if not kinds <= ({bool, int, float} if dt == "BOOL" else {int, float}):
                raise ProtocolError(f"input '{name}': {dt} data must be numbers")
            try:
                data = np.asarray(flat, dtype=DTYPES[dt])
            except (ValueError, TypeError, OverflowError) as e:
                raise ProtocolError(f"input '{name}': data is not {dt} ({e})") from None
    if len(data) != count:
        raise ProtocolError(f"input '{name}': shape {list(shape)} needs {count} elements, got "
                            f"{len(data)}")
    return Tensor(name, dt, shape, data), offset


def parse_request(body: bytes, header_length=None) -> InferRequest:
    """Decode an infer request body; ProtocolError (400) names what is wrong."""
    head, binary = _split(body, header_length)
    try:
        doc = loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"request is not valid JSON ({e}); send "
                            f'{{"inputs": [{{"name", "shape", "datatype", "data"}}]}}') from None
    if not isinstance(doc, dict):
        raise ProtocolError('request must be a JSON object with an "inputs" list')
    specs = doc.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise ProtocolError('request has no "inputs" list; send '
                            '{"inputs": [{"name", "shape", "datatype", "data"}]}')
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    inputs, offset = [], 0
    for spec in specs:
        t, offset = _tensor(spec, binary, offset)
        inputs.append(t)
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes after the JSON header belong to no "
                            f"input (check binary_data_size)")
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise ProtocolError("'outputs' must be a list of {\"name\": ...}")
        outputs = []
        for o in doc["outputs"]:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise ProtocolError("each requested output must be an object with a 'name'")
            p = o.get("parameters") or {}
            outputs.append((o["name"], p.get("binary_data") if isinstance(p, dict) else None))
    rid = doc.get("id")
    return InferRequest(inputs=inputs, id=None if rid is None else str(rid), parameters=params,
                        outputs=outputs, binary_output=bool(params.get("binary_data_output", False)))


def datatype_of(array: np.ndarray) -> str:
    for name, dt in DTYPES.items():
        if array.dtype == dt:
            return name
    raise TypeError(f"no protocol datatype for {array.dtype}")


def encode_response(model_name: str, version: str, request: InferRequest, outputs: dict) -> tuple:
    """(body bytes, extra headers) for ``outputs`` (name -> numpy array), as the request asked.

    Raises ProtocolError if the request names an output the model does not have.
    """
    if request.outputs is None:
        wanted = [(name, None) for name in outputs]
    else:
        wanted = request.outputs
        for name, _ in wanted:
            if name not in outputs:
                raise ProtocolError(f"unknown output '{name}'; this model has "
                                    f"{', '.join(repr(n) for n in outputs)}")
    doc = {"model_name": model_name, "model_version": version}
    if request.id is not None:
        doc["id"] = request.id
    tensors, chunks = [], []
    for name, binary in wanted:
        arr = np.ascontiguousarray(outputs[name])
        t = {"name": name, "datatype": datatype_of(arr), "shape": list(arr.shape)}
        if request.binary_output if binary is None else bool(binary):
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            t["data"] = arr.reshape(-1).tolist()
        tensors.append(t)
    doc["outputs"] = tensors
    head = dumps(doc)
    if not chunks:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(chunks), {"Content-Type": "application/octet-stream",
                                     HEADER_LENGTH: str(len(head))}

"""Versioned, checksummed binary snapshots of ``to_state()`` payloads, optionally signed.

Layout: ``MAGIC | u16 format | u32 crc32(body) | body``.  Format 2 (written) has
``body = u32 len(meta) | u32 len(zmeta) | u64 len(blob) | zmeta | zblob``, the JSON
metadata and the array bytes each compressed with zstd (level 1, through pyarrow: ~3x
faster than zlib at a smaller size, which matters for snapshots of entity aggregates
taken several times a second); format 1 (still read) is zlib-compressed
``u32 len(meta) | meta | array bytes``.  Arrays are lifted out of the nested state into
the blob; mostly-zero arrays (hashed weights) are stored as (index, value) pairs, which
keeps snapshots small enough to publish twice a second to a broker that never compacts.

Snapshots that travel over Kafka may be *signed* (:func:`sign`): the envelope
``SIGNED_MAGIC | HMAC-SHA256(key, domain | len(context) | context | payload) |
payload`` authenticates the payload and its context (the Kafka key
``<model>/<replica>``, so a valid snapshot cannot be replayed under another
replica's key).  :func:`decode` verifies it when given the key.

:func:`decode` treats its input as hostile: it bounds the payload size, the
metadata size and every declared array *before* decompressing or allocating
(:class:`Limits`), so a decompression bomb or a forged shape costs at most the
limits, and every failure is a :class:`SnapshotError` with a short ``reason``
(never a ``KeyError`` or a ``MemoryError``).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson
import pyarrow as pa

MAGIC = b"SLSNAP"
SIGNED_MAGIC = b"SLSIG1"
FORMAT_VERSION = 2
_HEADER = struct.Struct("<6sHI")
_SIZES = struct.Struct("<IIQ")  # format 2: raw metadata, compressed metadata, raw blob
_ZSTD = pa.Codec("zstd", compression_level=1)
_MAC_SIZE = hashlib.sha256().digest_size
_MAC_DOMAIN = b"streamlearn.snapshot.hmac-sha256.v1\n"
_SPARSE_MARGIN = 0.5  # (index, value) pairs when under half the break-even share


def _sparse_share(arr: np.ndarray) -> float:
    """Non-zero share below which (uint32 index, value) pairs beat the dense bytes."""
    size = arr.dtype.itemsize
    return _SPARSE_MARGIN * size / (size + 4)
#: dtypes an array in a snapshot may have (no objects, no structured or void types).
_ARRAY_KINDS = frozenset("biuf")
_MAX_NDIM = 4


class SnapshotError(ValueError):
    """A payload that is not a valid (or not an acceptable) streamlearn snapshot.

    ``reason`` is a short, stable label for counting (``undecodable``, ``truncated``,
    ``too_large``, ``unsigned``, ``bad_signature``, ``bad_array``...).
    """

    def __init__(self, message: str, reason: str = "undecodable") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds :func:`decode` enforces before it decompresses or allocates.

    Attributes
    ----------
    max_payload_bytes
        Largest payload accepted, as received (compressed, with its envelope).
    max_meta_bytes
        Largest JSON metadata block.
    max_decoded_bytes
        Largest total of decompressed bytes and of the arrays' dense sizes.
    max_array_elements
        Most elements one array may declare (``None``: only the total bounds it).

    Examples
    --------
    >>> Limits().max_payload_bytes // 2**20
    64
    """

    max_payload_bytes: int = 64 * 2**20
    max_meta_bytes: int = 4 * 2**20
    max_decoded_bytes: int = 2**30
    max_array_elements: int | None = None


DEFAULT_LIMITS = Limits()


class _Secret(Protocol):
    def get_secret_value(self) -> str: ...


KeyLike = bytes | str | _Secret | None


def key_bytes(key: KeyLike) -> bytes | None:
    """Normalize a signing key (bytes, str or pydantic ``SecretStr``); empty means none.

    Examples
    --------
    >>> key_bytes("s3cret"), key_bytes(""), key_bytes(None)
    (b's3cret', None, None)
    """
    if key is None:
        return None
    if hasattr(key, "get_secret_value"):
        key = key.get_secret_value()
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return raw or None


def _mac(key: bytes, context: bytes, payload: bytes) -> bytes:
    h = hmac.new(key, _MAC_DOMAIN, hashlib.sha256)
    h.update(struct.pack("<I", len(context)))
    h.update(context)
    h.update(payload)
    return h.digest()


def _ctx(context: bytes | str) -> bytes:
    return context.encode("utf-8") if isinstance(context, str) else bytes(context)


def sign(payload: bytes, key: KeyLike, *, context: bytes | str = b"") -> bytes:
    """Wrap ``payload`` in an HMAC-SHA256 envelope; without a key, return it unchanged.

    ``context`` is authenticated with the payload: pass the Kafka key.

    Examples
    --------
    >>> signed = sign(encode({"n": 1}), "k", context="m/r1")
    >>> is_signed(signed), decode(signed, key="k", context="m/r1")
    (True, {'n': 1})
    >>> try:
    ...     decode(signed, key="k", context="m/r2")
    ... except SnapshotError as exc:
    ...     print(exc.reason)
    bad_signature
    >>> sign(b"x", None)
    b'x'
    """
    raw = key_bytes(key)
    if raw is None:
        return payload
    return SIGNED_MAGIC + _mac(raw, _ctx(context), payload) + payload


def is_signed(value: bytes) -> bool:
    """True when ``value`` is a :func:`sign` envelope."""
    return value[: len(SIGNED_MAGIC)] == SIGNED_MAGIC


def verify(
    value: bytes,
    key: KeyLike,
    *,
    context: bytes | str = b"",
    require: bool | None = None,
) -> bytes:
    """Check and strip a signature envelope; return the inner payload.

    With a key, the envelope must be present and its MAC valid.  Without one, a
    signed payload is unwrapped unverified, and an unsigned one passes, unless
    ``require`` (default: whether a key is given) says a signature is required.
    """
    raw = key_bytes(key)
    required = raw is not None if require is None else require
    if not is_signed(value):
        if required:
            raise SnapshotError("snapshot is not signed and signatures are required", "unsigned")
        return value
    if len(value) < len(SIGNED_MAGIC) + _MAC_SIZE:
        raise SnapshotError("signed snapshot envelope is truncated", "truncated")
    mac = value[len(SIGNED_MAGIC) : len(SIGNED_MAGIC) + _MAC_SIZE]
    payload = value[len(SIGNED_MAGIC) + _MAC_SIZE :]
    if raw is None:
        if required:
            raise SnapshotError("signed snapshot but no key to verify it", "unsigned")
        return payload
    if not hmac.compare_digest(mac, _mac(raw, _ctx(context), payload)):
        raise SnapshotError("snapshot signature does not match (wrong key, forged or "
                            "replayed under another key)", "bad_signature")
    return payload


def encode(state: dict[str, Any], *, fmt: int = FORMAT_VERSION) -> bytes:
    """Serialize a state dict whose leaves are JSON values or NumPy arrays.

    Examples
    --------
    >>> state = {"w": np.array([0.0, 1.5, 0.0], dtype=np.float32), "meta": {"n": 3}}
    >>> out = decode(encode(state))
    >>> out["meta"], out["w"].tolist(), out["w"].dtype
    ({'n': 3}, [0.0, 1.5, 0.0], dtype('float32'))
    """
    chunks: list[bytes] = []
    offset = 0

    def lift(value: Any) -> Any:
        nonlocal offset
        if isinstance(value, np.ndarray):
            arr = np.ascontiguousarray(value)
            desc: dict[str, Any] = {"dtype": arr.dtype.str, "shape": list(arr.shape)}
            # Sparse when (index, value) pairs take fewer bytes than the dense array (with
            # a margin): a count first, so a dense array costs no index array.
            small = arr.size > 64 and np.count_nonzero(arr) < _sparse_share(arr) * arr.size
            nz = np.flatnonzero(arr) if small else None
            if nz is not None:
                idx = nz.astype(np.uint32 if arr.size < 2**32 else np.uint64)
                parts = [idx.tobytes(), arr.reshape(-1)[nz].tobytes()]
                desc["sparse"] = [idx.dtype.str, len(nz)]
            else:
                parts = [arr.tobytes()]
            desc["offset"] = offset
            for part in parts:
                chunks.append(part)
                offset += len(part)
            desc["end"] = offset
            return {"__nd__": desc}
        if isinstance(value, dict):
            return {k: lift(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [lift(v) for v in value]
        return value

    meta = orjson.dumps(lift(state), option=orjson.OPT_SERIALIZE_NUMPY)
    if fmt == 1:  # kept for tests of the reader's format-1 path
        body = zlib.compress(struct.pack("<I", len(meta)) + meta + b"".join(chunks), 1)
        return _HEADER.pack(MAGIC, 1, zlib.crc32(body)) + body
    blob = b"".join(chunks)
    zmeta = _ZSTD.compress(meta, asbytes=True)
    body = _SIZES.pack(len(meta), len(zmeta), len(blob)) + zmeta + _ZSTD.compress(
        blob, asbytes=True)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(body)) + body


@dataclass(frozen=True, slots=True)
class _ArraySpec:
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    size: int
    offset: int
    end: int
    sparse: tuple[np.dtype[Any], int] | None


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SnapshotError(f"array {what} must be a non-negative integer", "bad_array")
    return value


def _dtype(value: Any) -> np.dtype[Any]:
    try:
        dtype = np.dtype(value) if isinstance(value, str) and len(value) <= 8 else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in _ARRAY_KINDS or dtype.itemsize > 8:
        raise SnapshotError(f"array dtype {str(value)[:20]!r} is not allowed", "bad_array")
    return dtype


def _array_spec(desc: Any, limits: Limits) -> _ArraySpec:
    """Validate one array descriptor, from metadata alone (nothing allocated yet)."""
    if not isinstance(desc, dict):
        raise SnapshotError("array descriptor is not an object", "bad_array")
    dtype = _dtype(desc.get("dtype"))
    shape_raw = desc.get("shape")
    if not isinstance(shape_raw, list) or len(shape_raw) > _MAX_NDIM:
        raise SnapshotError("array shape must be a list of at most 4 sizes", "bad_array")
    shape = tuple(_int(n, "shape") for n in shape_raw)
    size = math.prod(shape)
    if limits.max_array_elements is not None and size > limits.max_array_elements:
        raise SnapshotError(f"array of {size} elements is larger than the model allows "
                            f"({limits.max_array_elements})", "too_large")
    offset, end = _int(desc.get("offset"), "offset"), _int(desc.get("end"), "end")
    sparse: tuple[np.dtype[Any], int] | None = None
    if "sparse" in desc:
        sp = desc["sparse"]
        if not isinstance(sp, list) or len(sp) != 2:
            raise SnapshotError("sparse descriptor must be [index dtype, count]", "bad_array")
        idx_dtype, nnz = _dtype(sp[0]), _int(sp[1], "sparse count")
        if idx_dtype.kind != "u" or nnz > size:
            raise SnapshotError("sparse indices must be unsigned and no more than the "
                                "array's size", "bad_array")
        expected = nnz * (idx_dtype.itemsize + dtype.itemsize)
        sparse = (idx_dtype, nnz)
    else:
        expected = size * dtype.itemsize
    if end - offset != expected:
        raise SnapshotError(f"array declares {end - offset} bytes, its shape needs {expected}",
                            "bad_array")
    return _ArraySpec(dtype, shape, size, offset, end, sparse)


def _collect(meta: Any, limits: Limits) -> list[_ArraySpec]:
    """Every array descriptor in the metadata (iteratively: no recursion limit to hit)."""
    found: list[_ArraySpec] = []
    stack = [meta]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            desc = value.get("__nd__")
            if desc is not None:
                found.append(_array_spec(desc, limits))
            else:
                stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return found


class _Zstd:
    """Format 2's body: sizes up front, then the metadata and the blob compressed apart;
    each part is decompressed only when asked for, once its declared size is known to be
    within the limits the caller checks."""

    def __init__(self, body: bytes) -> None:
        if len(body) < _SIZES.size:
            raise SnapshotError("snapshot body is truncated", "truncated")
        self._meta_len, zmeta_len, self._blob_len = _SIZES.unpack_from(body)
        self._zmeta = body[_SIZES.size : _SIZES.size + zmeta_len]
        self._zblob = body[_SIZES.size + zmeta_len :]
        if len(self._zmeta) < zmeta_len:
            raise SnapshotError("snapshot body is truncated", "truncated")

    def meta_len(self) -> int:
        return self._meta_len

    def meta(self, n: int) -> bytes:
        return self._inflate(self._zmeta, self._meta_len)

    def blob(self, n: int) -> bytes:
        """The blob, of its declared size: more than ``n`` is refused unread, fewer
        comes back short (the caller names it truncated)."""
        if self._blob_len > n:
            raise SnapshotError("snapshot decompresses to more bytes than it declares",
                                "too_large")
        return self._inflate(self._zblob, self._blob_len)

    def finished(self) -> bool:
        return True  # each part was decompressed to exactly its declared size

    @staticmethod
    def _inflate(data: bytes, n: int) -> bytes:
        if not n:
            return b""
        try:
            return _ZSTD.decompress(data, decompressed_size=n, asbytes=True)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise SnapshotError(f"snapshot body unreadable: {exc}", "undecodable") from exc


class _Inflater:
    """Format 1's body, one zlib stream: a 4-byte metadata length, the metadata, the
    blob; decompressed incrementally, never more than asked for."""

    def __init__(self, body: bytes) -> None:
        self._z = zlib.decompressobj()
        self._tail = body

    def meta_len(self) -> int:
        head = self._take(4)
        if len(head) < 4:
            raise SnapshotError("snapshot body is truncated", "truncated")
        return int(struct.unpack("<I", head)[0])

    def meta(self, n: int) -> bytes:
        return self._take(n)

    def blob(self, n: int) -> bytes:
        return self._take(n)

    def finished(self) -> bool:
        return not self._take(1) and self._z.eof and not self._z.unused_data

    def _take(self, n: int) -> bytes:
        out = bytearray()
        try:
            while len(out) < n and (self._tail or not self._z.eof):
                chunk = self._z.decompress(self._tail, n - len(out))
                self._tail = self._z.unconsumed_tail
                out += chunk
                if not chunk and not self._tail:
                    out += self._z.flush(n - len(out)) if not self._z.eof else b""
                    break
        except zlib.error as exc:
            raise SnapshotError(f"snapshot body unreadable: {exc}", "undecodable") from exc
        return bytes(out)


def decode(
    payload: bytes,
    *,
    key: KeyLike = None,
    context: bytes | str = b"",
    require_signature: bool | None = None,
    limits: Limits = DEFAULT_LIMITS,
    vet: Callable[[dict[str, Any]], Limits | None] | None = None,
) -> dict[str, Any]:
    """Parse :func:`encode` output (optionally :func:`sign` ed); raise :class:`SnapshotError`.

    Parameters
    ----------
    key, context, require_signature
        See :func:`verify`; with a key, only a valid signature is accepted.
    limits
        Size bounds, checked before anything is decompressed or allocated.
    vet
        Called with the metadata (arrays still undecoded, as ``{"__nd__": ...}``)
        before any array is read: raise :class:`SnapshotError` to refuse the
        snapshot, or return tighter :class:`Limits` (say, from its model spec).

    Examples
    --------
    >>> bomb = _HEADER.pack(MAGIC, 1, 0)[:-4]
    >>> body = zlib.compress(struct.pack("<I", 2) + b"{}" + bytes(50_000_000), 9)
    >>> payload = bomb + struct.pack("<I", zlib.crc32(body)) + body
    >>> len(payload) < 100_000
    True
    >>> try:
    ...     decode(payload, limits=Limits(max_decoded_bytes=2**20))
    ... except SnapshotError as exc:
    ...     print(exc.reason)
    too_large
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise SnapshotError(f"snapshot must be bytes, not {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > limits.max_payload_bytes:
        raise SnapshotError(f"snapshot of {len(payload)} bytes is over the limit of "
                            f"{limits.max_payload_bytes}", "too_large")
    payload = verify(payload, key, context=context, require=require_signature)
    if len(payload) < _HEADER.size:
        raise SnapshotError(f"snapshot too short ({len(payload)} bytes)", "truncated")
    magic, version, crc = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise SnapshotError("not a streamlearn snapshot (bad magic bytes)")
    if version > FORMAT_VERSION:
        raise SnapshotError(f"snapshot format {version} is newer than supported {FORMAT_VERSION}",
                            "unsupported_format")
    body = payload[_HEADER.size :]
    if zlib.crc32(body) != crc:
        raise SnapshotError("snapshot checksum mismatch (corrupt or truncated)", "bad_checksum")
    reader: _Inflater | _Zstd = _Inflater(body) if version == 1 else _Zstd(body)
    return _decode_body(reader, limits, vet)


def _decode_body(body: _Inflater | _Zstd, limits: Limits,
                 vet: Callable[[dict[str, Any]], Limits | None] | None) -> dict[str, Any]:
    meta_len = body.meta_len()
    if meta_len > min(limits.max_meta_bytes, limits.max_decoded_bytes):
        raise SnapshotError(f"snapshot metadata of {meta_len} bytes is over the limit of "
                            f"{limits.max_meta_bytes}", "too_large")
    meta_raw = body.meta(meta_len)
    if len(meta_raw) < meta_len:
        raise SnapshotError("snapshot metadata is truncated", "truncated")
    try:
        meta = orjson.loads(meta_raw)
    except orjson.JSONDecodeError as exc:
        raise SnapshotError(f"snapshot metadata unreadable: {exc}") from exc
    if not isinstance(meta, dict):
        raise SnapshotError("snapshot metadata is not an object")
    if vet is not None:
        limits = vet(meta) or limits
    arrays = _collect(meta, limits)
    blob_len = max((a.end for a in arrays), default=0)
    dense = sum(a.size * a.dtype.itemsize for a in arrays)
    if blob_len + meta_len > limits.max_decoded_bytes or dense > limits.max_decoded_bytes:
        raise SnapshotError(f"snapshot arrays need {max(blob_len, dense)} bytes, over the "
                            f"limit of {limits.max_decoded_bytes}", "too_large")
    blob = body.blob(blob_len)
    if len(blob) < blob_len:
        raise SnapshotError("snapshot arrays are truncated", "truncated")
    if not body.finished():
        raise SnapshotError("snapshot decompresses to more bytes than it declares",
                            "too_large")
    view = memoryview(blob)

    def lower(value: Any) -> Any:
        if isinstance(value, dict):
            if "__nd__" in value:
                return _array(_array_spec(value["__nd__"], limits), view)
            return {k: lower(v) for k, v in value.items()}
        if isinstance(value, list):
            return [lower(v) for v in value]
        return value

    try:
        return lower(meta)  # type: ignore[no-any-return]
    except RecursionError as exc:
        raise SnapshotError("snapshot metadata is nested too deeply", "undecodable") from exc


def _array(spec: _ArraySpec, blob: memoryview) -> np.ndarray:
    raw = blob[spec.offset : spec.end]
    if spec.sparse is not None:
        idx_dtype, nnz = spec.sparse
        split = nnz * idx_dtype.itemsize
        idx = np.frombuffer(raw[:split], dtype=idx_dtype)
        if nnz and int(idx.max()) >= spec.size:
            raise SnapshotError("sparse index out of the array's range", "bad_array")
        out = np.zeros(spec.size, dtype=spec.dtype)
        out[idx] = np.frombuffer(raw[split:], dtype=spec.dtype)
        return out.reshape(spec.shape)
    return np.frombuffer(raw, dtype=spec.dtype).reshape(spec.shape).copy()


def tighten(limits: Limits, **bounds: int | None) -> Limits:
    """``limits`` with each given bound lowered (never raised).

    Examples
    --------
    >>> tighten(Limits(max_decoded_bytes=100), max_decoded_bytes=500).max_decoded_bytes
    100
    """
    changes: dict[str, int | None] = {}
    for name, value in bounds.items():
        current = getattr(limits, name)
        changes[name] = value if current is None else (
            current if value is None else min(current, value))
    return replace(limits, **changes)


def save(path: str | os.PathLike[str], payload: bytes) -> None:
    """Write atomically: a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Read and decode a snapshot file (an unverified signature envelope is unwrapped)."""
    return decode(Path(path).read_bytes(), limits=limits)

"""Versioned, checksummed binary snapshots of ``to_state()`` payloads.

Layout: ``MAGIC | u16 format | u32 crc32(body) | body`` where ``body`` is
zlib-compressed ``u32 len(meta) | meta (JSON) | array bytes``.  Arrays are
lifted out of the nested state into the blob; mostly-zero arrays (hashed
weights) are stored as (index, value) pairs, which keeps snapshots small
enough to publish twice a second to a broker that never compacts.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import orjson

MAGIC = b"SLSNAP"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<6sHI")
_SPARSE_BELOW = 0.25  # store as (index, value) when under a quarter is non-zero


class SnapshotError(ValueError):
    """A payload that is not a valid streamlearn snapshot."""


def encode(state: dict[str, Any], *, level: int = 1) -> bytes:
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
            nz = np.flatnonzero(arr) if arr.size else np.empty(0, dtype=np.int64)
            if arr.size > 64 and len(nz) < _SPARSE_BELOW * arr.size:
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
    body = zlib.compress(struct.pack("<I", len(meta)) + meta + b"".join(chunks), level)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(body)) + body


def decode(payload: bytes) -> dict[str, Any]:
    """Parse :func:`encode` output; raise :class:`SnapshotError` on anything else."""
    if len(payload) < _HEADER.size:
        raise SnapshotError(f"snapshot too short ({len(payload)} bytes)")
    magic, version, crc = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise SnapshotError("not a streamlearn snapshot (bad magic bytes)")
    if version > FORMAT_VERSION:
        raise SnapshotError(f"snapshot format {version} is newer than supported {FORMAT_VERSION}")
    body = payload[_HEADER.size :]
    if zlib.crc32(body) != crc:
        raise SnapshotError("snapshot checksum mismatch (corrupt or truncated)")
    try:
        raw = zlib.decompress(body)
        (meta_len,) = struct.unpack_from("<I", raw)
        meta = orjson.loads(raw[4 : 4 + meta_len])
    except (zlib.error, struct.error, orjson.JSONDecodeError) as exc:
        raise SnapshotError(f"snapshot body unreadable: {exc}") from exc
    blob = memoryview(raw)[4 + meta_len :]

    def lower(value: Any) -> Any:
        if isinstance(value, dict):
            desc = value.get("__nd__")
            if desc is not None:
                return _array(desc, blob)
            return {k: lower(v) for k, v in value.items()}
        if isinstance(value, list):
            return [lower(v) for v in value]
        return value

    if not isinstance(meta, dict):
        raise SnapshotError("snapshot metadata is not an object")
    return lower(meta)  # type: ignore[no-any-return]


def _array(desc: dict[str, Any], blob: memoryview) -> np.ndarray:
    dtype, shape = np.dtype(desc["dtype"]), tuple(desc["shape"])
    raw = blob[desc["offset"] : desc["end"]]
    if "sparse" in desc:
        idx_dtype, nnz = np.dtype(desc["sparse"][0]), desc["sparse"][1]
        split = nnz * idx_dtype.itemsize
        idx = np.frombuffer(raw[:split], dtype=idx_dtype)
        out = np.zeros(int(np.prod(shape)), dtype=dtype)
        out[idx] = np.frombuffer(raw[split:], dtype=dtype)
        return out.reshape(shape)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


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


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and decode a snapshot file."""
    return decode(Path(path).read_bytes())

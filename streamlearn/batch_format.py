"""Batch records: many events in one Kafka message, columnar, for high-throughput producers.

Why: a JSON event costs a Kafka record, a Faust message, an ``orjson`` parse and a
dict walk; a batch record of thousands of events costs one of each, and its columns
become the model's arrays with ``np.frombuffer`` and no per-event Python at all.

Wire format, version 1 (all integers little-endian)
----------------------------------------------------
::

    offset  size  field
    0       4     magic  b"\\xffSLB"   (0xFF never starts UTF-8 JSON, so a JSON event
                                       -- which starts with "{" -- is never mistaken for one)
    4       2     u16 format version (1)
    6       2     u16 flags (0; reserved)
    8       4     u32 header length H
    12      H     header: a UTF-8 JSON object (below)
    12+H    pad   zero bytes up to the next multiple of 8: the data block starts there
    ...           column data; each column at its own 8-aligned offset in the data block

The header::

    {"n": 4096,                          # rows in the batch
     "columns": [
        {"name": "amount",  "dtype": "<f8", "offset": 0,     "nbytes": 32768},
        {"name": "country", "dtype": "<i1", "offset": 32768, "nbytes": 4096,
         "values": ["FR", "DE", ...]},   # dictionary-encoded categorical: code i means
                                         # values[i], code -1 means missing
        {"name": "channel", "dtype": "<u4", "encoding": "crc32", ...},
                                         # pre-hashed categorical: stable_hash(field, value)
        {"name": "is_fraud", "dtype": "<f4", ...},          # label, NaN = no label
        {"name": "event_id", "dtype": "<i8", ...},          # ids as integers, or
        {"name": "event_id", "dtype": "json", "values": ["tx-1", ...], "nbytes": 0, ...}
     ],
     "meta": {...}}                      # optional, free-form (prediction records use it)

Schema rules, checked against the model spec when a batch is turned into features
(a batch that breaks any of them is rejected whole, with the reason):

- every ``spec.numeric`` field is a column of dtype ``<f8`` or ``<f4``; NaN marks a
  missing value, infinities and magnitudes above ``features.MAX_ABS_VALUE`` (1e15) are
  refused, as in JSON events;
- every ``spec.categorical`` field is a dictionary-encoded column (integer codes
  ``<i1``/``<i2``/``<i4`` with a ``values`` list of strings or integers) or a pre-hashed
  ``<u4`` column with ``"encoding": "crc32"``;
- the label column (``spec.label``) is optional, ``<f4`` or ``<f8``, and for binary
  and ranking tasks holds 0, 1 or NaN (for regression: finite, within the same bound);
- the id column (``spec.id_field``) is optional, ``<i8`` or ``json``;
- other columns are allowed and ignored, as extra fields of a JSON event are;
  column names are unique; offsets and lengths must lie inside the payload.

The format is spec-free: :func:`decode_batch` reads any batch record (for example
prediction records, which carry ``id`` and ``score`` columns and the model name and
version in ``meta``); :func:`to_feature_batch` applies a spec.

Why raw columns with a JSON header, and not msgpack (``load_tests/bench_worker.py
--format-only``, 4,096 rows): msgpack with one list per column decodes to model inputs
at ~0.7M rows/s, because every value becomes a Python object; this format decodes at
~18M rows/s with its schema checks.  msgpack holding the same raw column bytes is
the same idea with another header (~32M rows/s without the checks); a fixed prefix and
a JSON header were kept because the magic and version can be checked before parsing
anything, and orjson is already a dependency.

Examples
--------
>>> from streamlearn.config import ModelSpec
>>> spec = ModelSpec(name="m", topic="t", numeric=("x",), categorical=("c",), label="y",
...                  hash_bits=4)
>>> payload = encode_batch([{"event_id": 1, "x": 2.5, "c": "a", "y": 1},
...                         {"event_id": 2, "c": "b"}], spec)
>>> is_batch(payload), is_batch(b'{"x": 1}')
(True, False)
>>> fb = to_feature_batch(decode_batch(payload), spec, Vectorizer(spec))
>>> fb.numeric.tolist(), fb.labels.tolist(), fb.ids.tolist()
([[2.5], [nan]], [1.0, nan], [1, 2])
>>> fb.hashed.tolist() == [[Vectorizer(spec).slot("c", "a")], [Vectorizer(spec).slot("c", "b")]]
True
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import orjson

from streamlearn.aggregates import AggregateInputs
from streamlearn.config import ModelSpec
from streamlearn.features import _MISSING, MAX_ABS_VALUE, FeatureBatch, Vectorizer, stable_hash
from streamlearn.keys import MAX_KEY_CHARS

MAGIC = b"\xffSLB"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHHI")
_ALIGN = 8

NUMERIC_DTYPES = ("<f8", "<f4")
CODE_DTYPES = ("<i1", "<i2", "<i4")
LABEL_DTYPES = ("<f4", "<f8")
ID_DTYPES = ("<i8", "json")
_TABLE_CACHE = 1024
#: Values the cached dictionaries hold in all; a dictionary with a value longer than
#: ``keys.MAX_KEY_CHARS`` is not cached.  Why: counted in dictionaries only, the cache
#: kept 1,024 records' worth of dictionaries (1 MB each grew a worker by 1.2 GB).
_TABLE_VALUES = 1 << 16
_KNOWN_DTYPES = {"<f8", "<f4", "<i1", "<i2", "<i4", "<i8", "<u4", "json"}


class BatchFormatError(ValueError):
    """A payload that is not a valid batch record, or does not fit the model spec."""


class Categorical(NamedTuple):
    """A dictionary-encoded column for :func:`encode_batch`: ``values[codes[i]]``, -1 = missing."""

    codes: np.ndarray
    values: Sequence[str | int]


@dataclass(frozen=True, slots=True)
class Column:
    """One decoded column: a zero-copy array view, plus its dictionary if it has one."""

    name: str
    dtype: str
    data: np.ndarray | None
    values: list[Any] | None = None
    encoding: str | None = None


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """A decoded batch record (format level only; :func:`to_feature_batch` applies a spec)."""

    n: int
    columns: dict[str, Column]
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION


def is_batch(payload: bytes | None) -> bool:
    """True when ``payload`` starts with the batch-record magic (JSON starts with ``{``)."""
    return payload is not None and payload[:4] == MAGIC


# -- decoding ------------------------------------------------------------------------------


def decode_batch(payload: bytes) -> BatchRecord:
    """Parse and check the framing; raise :class:`BatchFormatError` naming what is wrong."""
    if len(payload) < _PREFIX.size:
        raise BatchFormatError(f"truncated batch record ({len(payload)} bytes)")
    magic, version, _flags, header_len = _PREFIX.unpack_from(payload)
    if magic != MAGIC:
        raise BatchFormatError("not a batch record (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise BatchFormatError(
            f"batch format version {version} is not supported (this worker reads "
            f"{FORMAT_VERSION})"
        )
    header_end = _PREFIX.size + header_len
    if header_end > len(payload):
        raise BatchFormatError("truncated batch record (header runs past the payload)")
    try:
        header = orjson.loads(memoryview(payload)[_PREFIX.size : header_end])
    except orjson.JSONDecodeError as exc:
        raise BatchFormatError(f"batch header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("columns"), list):
        raise BatchFormatError("batch header must be an object with a 'columns' list")
    n = header.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise BatchFormatError(f"batch header 'n' must be a non-negative integer, got {n!r}")
    meta = header.get("meta") or {}
    if not isinstance(meta, dict):
        raise BatchFormatError("batch header 'meta' must be an object")
    data_start = _align(header_end)
    data_len = len(payload) - data_start
    columns: dict[str, Column] = {}
    for desc in header["columns"]:
        col = _column(desc, n, payload, data_start, data_len)
        if col.name in columns:
            raise BatchFormatError(f"column {col.name!r} appears twice")
        columns[col.name] = col
    return BatchRecord(n, columns, meta, version)


def _column(desc: Any, n: int, payload: bytes, data_start: int, data_len: int) -> Column:
    if not isinstance(desc, dict) or not isinstance(desc.get("name"), str):
        raise BatchFormatError("each column needs a 'name'")
    name, dtype = desc["name"], desc.get("dtype")
    if dtype not in _KNOWN_DTYPES:
        raise BatchFormatError(f"column {name!r}: unknown dtype {dtype!r}")
    values = desc.get("values")
    if values is not None and not isinstance(values, list):
        raise BatchFormatError(f"column {name!r}: 'values' must be a list")
    encoding = desc.get("encoding")
    if dtype == "json":
        if values is None or len(values) != n:
            raise BatchFormatError(f"column {name!r}: a json column needs {n} values")
        return Column(name, dtype, None, values, encoding)
    offset, nbytes = desc.get("offset"), desc.get("nbytes")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, nbytes)):
        raise BatchFormatError(f"column {name!r}: 'offset' and 'nbytes' must be integers >= 0")
    itemsize = int(dtype[-1])
    if nbytes != n * itemsize:
        raise BatchFormatError(
            f"column {name!r}: {nbytes} bytes for {n} rows of {dtype} (want {n * itemsize})"
        )
    if offset + nbytes > data_len:
        raise BatchFormatError(f"truncated batch record (column {name!r} runs past the payload)")
    data = np.frombuffer(payload, dtype=np.dtype(dtype), count=n, offset=data_start + offset)
    return Column(name, dtype, data, values, encoding)


def _align(pos: int) -> int:
    return (pos + _ALIGN - 1) // _ALIGN * _ALIGN


# -- applying a model spec -----------------------------------------------------------------


class FeatureDecoder:
    """Turn batch records into model inputs under one spec, caching per-dictionary slot tables.

    Why a class: a producer sends the same small dictionaries (country codes, merchant
    categories) in every batch, so their hashed slots are computed once, not per batch.
    """

    def __init__(self, spec: ModelSpec, vectorizer: Vectorizer | None = None) -> None:
        self.spec = spec
        self.vectorizer = vectorizer or Vectorizer(spec)
        self._tables: dict[tuple[str, tuple[Any, ...]], np.ndarray] = {}
        self._held = 0  # values of the cached dictionaries

    def decode(self, payload: bytes) -> FeatureBatch:
        """:func:`decode_batch` then :meth:`features`."""
        return self.features(decode_batch(payload))

    def features(self, record: BatchRecord) -> FeatureBatch:
        """Apply the schema rules; raise :class:`BatchFormatError` for a mismatch.

        ``ids`` comes back as an int64 array for ``<i8`` id columns (no per-row
        objects), else as a list.
        """
        spec, n, cols = self.spec, record.n, record.columns
        missing = [f for f in (*spec.numeric, *spec.categorical) if f not in cols]
        if missing:
            raise BatchFormatError(f"schema mismatch: missing feature columns {missing}")
        numeric = np.full((n, spec.n_numeric), np.nan)  # aggregate columns: filled later
        _check_numeric([cols[name] for name in spec.numeric], numeric)
        hashed = np.empty((n, len(spec.categorical)), dtype=np.int64)
        for j, name in enumerate(spec.categorical):
            hashed[:, j] = self._slots(cols[name], n)
        labels = _labels(cols.get(spec.label), spec, n)
        ids = _ids(cols.get(spec.id_field), n)
        return FeatureBatch(numeric, hashed, labels, ids, self._aggregate_inputs(cols, n))

    def _aggregate_inputs(self, cols: dict[str, Column], n: int) -> AggregateInputs | None:
        """What the spec's aggregates read: the event time, each aggregated field and the
        entity keys (dictionary-encoded strings, or integers)."""
        spec = self.spec
        if not spec.aggregates:
            return None
        entities = spec.aggregate_entities
        wanted = (spec.time_field, *(a.field for a in spec.aggregates), *entities)
        missing = [f for f in dict.fromkeys(wanted) if f not in cols]
        if missing:
            raise BatchFormatError(f"schema mismatch: the model's aggregates need columns "
                                   f"{missing}")
        times = _check_numeric([cols[spec.time_field]])[:, 0]
        if n and np.isnan(times).any():
            row = int(np.flatnonzero(np.isnan(times))[0])
            raise BatchFormatError(f"column {spec.time_field!r}, row {row}: the event time "
                                   "is required by the model's aggregates")
        values = _check_numeric([cols[a.field] for a in spec.aggregates])
        return AggregateInputs(times, values, [_keys(cols[name]) for name in entities])

    def _slots(self, col: Column, n: int) -> np.ndarray:
        spec = self.spec
        if col.encoding == "crc32":
            if col.dtype != "<u4" or col.data is None:
                raise BatchFormatError(f"schema mismatch: crc32 column {col.name!r} must be <u4")
            return spec.first_slot + (col.data.astype(np.int64) & ((1 << spec.hash_bits) - 1))
        if col.dtype not in CODE_DTYPES or col.values is None or col.data is None:
            raise BatchFormatError(
                f"schema mismatch: categorical column {col.name!r} must be dictionary-encoded "
                f"({'/'.join(CODE_DTYPES)} codes with 'values') or crc32 <u4"
            )
        codes, values = col.data, col.values
        if n and (int(codes.min()) < -1 or int(codes.max()) >= len(values)):
            raise BatchFormatError(
                f"categorical column {col.name!r}: codes outside -1..{len(values) - 1}"
            )
        key = (col.name, tuple(values))
        try:
            table = self._tables.get(key)
        except TypeError:  # an unhashable value (a list, an object): _table names it
            table = None
        if table is None:
            table = self._table(col.name, values)
            if len(values) <= _TABLE_VALUES and all(
                    not isinstance(v, str) or len(v) <= MAX_KEY_CHARS for v in values):
                if len(self._tables) >= _TABLE_CACHE or self._held + len(values) > _TABLE_VALUES:
                    self._tables.clear()
                    self._held = 0
                self._tables[key] = table
                self._held += len(values)
        return table[codes]  # code -1 picks the trailing "missing" slot

    def _table(self, name: str, values: list[Any]) -> np.ndarray:
        _check_dictionary("categorical", name, values)
        slot = self.vectorizer.slot
        return np.array([slot(name, v) for v in values] + [slot(name, _MISSING)], dtype=np.int64)


def to_feature_batch(record: BatchRecord, spec: ModelSpec, vectorizer: Vectorizer) -> FeatureBatch:
    """One-off :meth:`FeatureDecoder.features` (the worker keeps a decoder per model)."""
    return FeatureDecoder(spec, vectorizer).features(record)


def _check_numeric(columns: list[Column], out: np.ndarray | None = None) -> np.ndarray:
    """Numeric columns as float64 under the value rules (NaN: missing), into the first
    ``len(columns)`` columns of ``out`` (a new array when None); every bad column named."""
    n = len(columns[0].data) if columns and columns[0].data is not None else 0
    x = np.empty((n, len(columns))) if out is None else out
    for j, col in enumerate(columns):
        if col.dtype not in NUMERIC_DTYPES:
            raise BatchFormatError(f"schema mismatch: numeric column {col.name!r} has dtype "
                                   f"{col.dtype}, want one of {NUMERIC_DTYPES}")
        x[:, j] = col.data
    part = x[:, : len(columns)]
    over = np.abs(part) > MAX_ABS_VALUE  # +-inf too; NaN (missing) is not
    if n and over.any():
        if np.isinf(part).any():
            bad = [columns[j].name for j in np.flatnonzero(np.isinf(part).any(axis=0))]
            raise BatchFormatError(f"numeric columns {bad} hold infinite values")
        bad = [columns[j].name for j in np.flatnonzero(over.any(axis=0))]
        raise BatchFormatError(
            f"numeric columns {bad} hold values of magnitude above {MAX_ABS_VALUE:g}")
    return x


def _keys(col: Column) -> list[Any]:
    """Entity keys: a dictionary-encoded column's values (code -1: none), or integers."""
    if col.values is not None and col.data is not None and col.dtype in CODE_DTYPES:
        values = col.values
        if len(col.data) and (int(col.data.min()) < -1 or int(col.data.max()) >= len(values)):
            raise BatchFormatError(f"entity column {col.name!r}: codes outside "
                                   f"-1..{len(values) - 1}")
        # Keys of the aggregates' tables: a list escaped as a TypeError, which stops the
        # worker's learner (found by fuzzing).
        _check_dictionary("entity", col.name, values)
        return [None if c < 0 else values[c] for c in col.data.tolist()]
    if col.dtype == "<i8" and col.data is not None:
        return col.data.tolist()
    raise BatchFormatError(f"schema mismatch: entity column {col.name!r} must be "
                           f"dictionary-encoded or <i8 integers, got {col.dtype}")


def _check_dictionary(kind: str, name: str, values: list[Any]) -> None:
    """A dictionary's values are strings or integers (not bools), as in JSON events."""
    for v in values:
        if not isinstance(v, str | int) or isinstance(v, bool):
            raise BatchFormatError(
                f"{kind} column {name!r}: dictionary values must be strings or "
                f"integers, got {type(v).__name__}"
            )


def _labels(col: Column | None, spec: ModelSpec, n: int) -> np.ndarray:
    if col is None:
        return np.full(n, np.nan, dtype=np.float32)
    if col.dtype not in LABEL_DTYPES:
        raise BatchFormatError(
            f"schema mismatch: label column {col.name!r} has dtype {col.dtype}, "
            f"want one of {LABEL_DTYPES}"
        )
    labels = np.asarray(col.data, dtype=np.float32)
    if spec.task != "regression":
        present = labels[~np.isnan(labels)]
        if ((present != 0.0) & (present != 1.0)).any():
            raise BatchFormatError(f"label column {col.name!r}: labels must be 0, 1 or NaN")
    elif np.isinf(labels).any():
        raise BatchFormatError(f"label column {col.name!r} holds infinite values")
    elif (np.abs(labels) > MAX_ABS_VALUE).any():
        raise BatchFormatError(
            f"label column {col.name!r} holds values of magnitude above {MAX_ABS_VALUE:g}"
        )
    return labels


def _ids(col: Column | None, n: int) -> Any:
    if col is None:
        return [None] * n
    if col.dtype not in ID_DTYPES:
        raise BatchFormatError(
            f"schema mismatch: id column {col.name!r} has dtype {col.dtype}, want {ID_DTYPES}"
        )
    if col.dtype == "json":
        return list(col.values or [])
    return col.data


# -- encoding ------------------------------------------------------------------------------


def encode_columns(
    columns: Mapping[str, np.ndarray | Categorical | Sequence[Any]],
    *,
    crc32: Sequence[str] = (),
    meta: Mapping[str, Any] | None = None,
) -> bytes:
    """Frame named columns into one batch record (spec-free; see :func:`encode_batch`).

    NumPy arrays keep their dtype (float64/float32 numerics and labels, int64 ids); a
    :class:`Categorical` is written dictionary-encoded; a sequence named in ``crc32`` is
    pre-hashed; any other sequence becomes a ``json`` column.
    """
    descs: list[dict[str, Any]] = []
    blocks: list[bytes] = []
    offset = 0
    n: int | None = None
    for name, data in columns.items():
        desc: dict[str, Any] = {"name": name}
        arr: np.ndarray | None = None
        if isinstance(data, Categorical):
            arr = _codes(np.asarray(data.codes), len(data.values))
            desc["values"] = list(data.values)
        elif isinstance(data, np.ndarray) and data.dtype.kind in "fiu":
            arr = data
        elif name in crc32:
            arr = np.array([stable_hash(name, _MISSING if v is None else str(v)) for v in data],
                           dtype="<u4")
            desc["encoding"] = "crc32"
        else:
            desc["values"] = list(data)
        rows = len(desc["values"]) if arr is None else len(arr)
        if n is not None and rows != n:
            raise ValueError(f"column {name!r} has {rows} rows, the others {n}")
        n = rows
        if arr is None:
            desc.update(dtype="json", offset=0, nbytes=0)
        else:
            arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
            dtype = arr.dtype.str.replace("|", "<")
            if dtype not in _KNOWN_DTYPES or dtype == "json":
                raise ValueError(f"column {name!r}: dtype {arr.dtype} is not in the format")
            raw = arr.tobytes()
            desc.update(dtype=dtype, offset=offset, nbytes=len(raw))
            blocks.append(raw + b"\0" * (_align(len(raw)) - len(raw)))
            offset += len(blocks[-1])
        descs.append(desc)
    header = orjson.dumps({"n": n or 0, "columns": descs, "meta": dict(meta or {})})
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header)) + header
    return prefix + b"\0" * (_align(len(prefix)) - len(prefix)) + b"".join(blocks)


def encode_batch(
    data: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    spec: ModelSpec,
    *,
    categorical: str = "dict",
    meta: Mapping[str, Any] | None = None,
) -> bytes:
    """Encode events (a list of dicts) or columns (a mapping of arrays) for ``spec``.

    Only the spec's fields travel: numerics as float64 with NaN for missing, the label
    as float32 with NaN, categoricals dictionary-encoded (``categorical="dict"``) or
    pre-hashed (``"crc32"``), ids as int64 when they all are integers, else as JSON.
    A column given as a :class:`Categorical` is used as is.  Raises ``ValueError`` for
    a value the worker would reject anyway.
    """
    if categorical not in ("dict", "crc32"):
        raise ValueError("categorical must be 'dict' or 'crc32'")
    if isinstance(data, Mapping):
        cols, n = data, _length(next(iter(data.values()), ()))
    else:
        fields = (*spec.numeric, *spec.categorical, spec.label, spec.id_field)
        cols, n = {f: [e.get(f) for e in data] for f in fields}, len(data)
    out: dict[str, Any] = {}
    for name in spec.numeric:
        out[name] = _float_column(cols.get(name), name, n, np.float64)
    for name in spec.categorical:
        out[name] = _categorical(cols.get(name), name, n, hashed=categorical == "crc32")
    if _present(cols.get(spec.label)):
        out[spec.label] = _float_column(cols[spec.label], spec.label, n, np.float32)
    ids = cols.get(spec.id_field)
    if _present(ids):
        if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
            out[spec.id_field] = ids.astype(np.int64)
        elif all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            out[spec.id_field] = np.asarray(list(ids), dtype=np.int64)
        else:
            out[spec.id_field] = list(ids)
    crc = spec.categorical if categorical == "crc32" else ()
    return encode_columns(out, crc32=crc, meta=meta)


def _length(col: Any) -> int:
    return len(col.codes) if isinstance(col, Categorical) else len(col)


def _present(col: Any) -> bool:
    if col is None:
        return False
    if isinstance(col, np.ndarray):
        return True
    return any(v is not None for v in col)


def _float_column(values: Any, name: str, n: int, dtype: type) -> np.ndarray:
    if values is None:
        return np.full(n, np.nan, dtype=dtype)
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiu":
        arr = values.astype(dtype)
    else:
        for v in values:
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                raise ValueError(f"field {name!r}: expected a number, got {type(v).__name__}")
        arr = np.array([math.nan if v is None else v for v in values], dtype=dtype)
    if np.isinf(arr).any():
        raise ValueError(f"field {name!r}: values must be finite")
    if (np.abs(arr) > MAX_ABS_VALUE).any():
        raise ValueError(f"field {name!r}: magnitude must be at most {MAX_ABS_VALUE:g}")
    return arr


def _categorical(values: Any, name: str, n: int, *, hashed: bool) -> Categorical | list[Any]:
    if values is None:
        values = [None] * n
    if isinstance(values, Categorical):
        if not hashed:
            return values
        codes = np.asarray(values.codes)
        return [None if c < 0 else values.values[c] for c in codes.tolist()]
    seq = list(values)
    for v in seq:
        if v is not None and (isinstance(v, bool) or not isinstance(v, str | int)):
            raise ValueError(
                f"field {name!r}: expected a string or integer, got {type(v).__name__}"
            )
    if hashed:
        return seq
    index: dict[Any, int] = {}
    codes = np.fromiter((-1 if v is None else index.setdefault(v, len(index)) for v in seq),
                        dtype=np.int64, count=len(seq))
    return Categorical(codes, list(index))


def _codes(codes: np.ndarray, n_values: int) -> np.ndarray:
    for dt in CODE_DTYPES:
        if n_values < np.iinfo(np.dtype(dt)).max:
            return codes.astype(dt)
    raise ValueError("too many distinct categorical values")

"""Event dicts to feature arrays: numeric fields plus hashed categorical fields.

Validation lives here too, because a field that cannot be vectorized is exactly
what makes an event malformed.  The rules, one home for all input paths (event
dicts here, JSON via ``pipeline.JsonDecoder``, batch records via ``batch_format``):

- a numeric field (and the label) is a JSON number, or null/absent (missing);
  never a string, a bool, NaN or an infinity;
- its magnitude is at most :data:`MAX_ABS_VALUE` (``1e15``): one ``1e308`` would
  otherwise overflow the running variance and silence the feature for good;
- a categorical field is a string or an integer (not a bool), or null/absent;
- a binary or ranking label is 0 or 1;
- an event is a JSON object.

How it is fast (``load_tests/bench_vectorize.py``): event dicts are checked against
these rules by msgspec, in C, as typed structs derived from the spec (a bound on a float
field rejects NaN and infinities too), and only an event that fails goes through the
per-field Python checks, which say why.  The structs' fields become one float64 row per
event through ``struct.pack`` (no per-value Python call) and the categoricals go through
a per-field cache of hashed slots.  JSON messages skip the dicts altogether
(:mod:`streamlearn.json_columns`).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Annotated, Any

import msgspec
import numpy as np
from numba import njit

from streamlearn.aggregates import AggregateInputs, concat_inputs
from streamlearn.config import ModelSpec
from streamlearn.keys import MAX_KEY_CHARS

_MISSING = "\x00missing"
_CACHE_LIMIT = 100_000

MAX_ABS_VALUE = 1e15
"""Largest magnitude a numeric field or label may have; larger values are invalid.

Why 1e15: it admits amounts in minor currency units up to ten trillion, millisecond
timestamps (~1.7e12), counters and ids far beyond any real stream, while the square of
a difference stays below 4e30: running sums stay finite in float64 over any stream, and
one square is far inside float32's range (3.4e38; labels are float32).  Microsecond or
nanosecond timestamps exceed it: send seconds or milliseconds.
"""

# msgspec types of the fast paths (dicts here, JSON bodies in services/api/fast.py).
# Ints are accepted for floats (as the Python rules do); a bool is neither.  For dicts a
# bound also rejects NaN and +-inf; JSON has neither (msgspec refuses numbers past double
# range), so there :meth:`Vectorizer.assemble` checks the bound on the packed floats,
# which measured cheaper than msgspec's check.
_Number = Annotated[float, msgspec.Meta(ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)] | None
_JsonNumber = float | None
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_Category = str | _Int64 | None
# JSON ids: what orjson decodes to the same value (it turns integers past 64 bits into
# floats); anything else takes the orjson path, so ids stay byte-identical.
_JsonId = _Int64 | str | None
# Whatever the fast path refuses (a DecodeError, a RecursionError on deep nesting, a
# TypeError for a None message...) goes the careful way, which decides and says why.
_CHUNK_ERRORS = (Exception,)


def stable_hash(field: str, value: str) -> int:
    """Hash a categorical ``field=value`` pair, identically in every process.

    Python's ``hash()`` is salted per process, so replicas would disagree.

    Examples
    --------
    >>> stable_hash("country", "FR") == stable_hash("country", "FR")
    True
    >>> stable_hash("country", "FR") != stable_hash("merchant", "FR")
    True
    """
    return zlib.crc32(f"{field}\x1f{value}".encode())


@dataclass(slots=True)
class FeatureBatch:
    """A mini-batch of events, columnar.

    Attributes
    ----------
    numeric
        float64 ``(n, n_numeric)``; NaN marks a missing value.
    hashed
        int64 ``(n, n_categorical)`` column indices, already offset past the numeric
        block and its missing block (:attr:`ModelSpec.first_slot`), so each row's CSR
        indices are its numeric entries (:func:`numeric_entry`), then ``hashed``.
    labels
        float32 ``(n,)``; NaN where the event carried no label.
    ids
        The events' ids, for prediction records and label joins.
    aux
        What the model's aggregates read (event time, entity keys, aggregated values),
        for a spec with aggregates; their columns of ``numeric`` are NaN until
        :meth:`OnlineModel.fill_aggregates` fills them (``aux`` is then None).
    """

    numeric: np.ndarray
    hashed: np.ndarray
    labels: np.ndarray
    ids: list[Any]
    aux: AggregateInputs | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_label(self) -> np.ndarray:
        """Boolean mask of labelled rows."""
        return ~np.isnan(self.labels)

    def take(self, mask_or_index: np.ndarray) -> FeatureBatch:
        """Rows selected by a boolean mask or index array."""
        idx = np.flatnonzero(mask_or_index) if mask_or_index.dtype == bool else mask_or_index
        return FeatureBatch(
            numeric=self.numeric[idx],
            hashed=self.hashed[idx],
            labels=self.labels[idx],
            ids=[self.ids[i] for i in idx],
            aux=None if self.aux is None else self.aux.take(idx),
        )


def concat_batches(parts: Sequence[FeatureBatch]) -> FeatureBatch:
    """The rows of ``parts``, in order, as one batch."""
    if len(parts) == 1:
        return parts[0]
    ids: Any
    if all(isinstance(b.ids, np.ndarray) for b in parts):
        ids = np.concatenate([b.ids for b in parts])
    else:
        ids = [i for b in parts for i in b.ids]
    auxes = [b.aux for b in parts]
    aux = None if any(a is None for a in auxes) else concat_inputs(auxes)  # type: ignore[arg-type]
    return FeatureBatch(np.concatenate([b.numeric for b in parts]),
                        np.concatenate([b.hashed for b in parts]),
                        np.concatenate([b.labels for b in parts]), ids, aux)


class InvalidEvent(ValueError):
    """An event that cannot be vectorized; the message names the field."""


class Vectorizer:
    """Turn event dicts into a :class:`FeatureBatch` under one model spec.

    Examples
    --------
    >>> spec = ModelSpec(name="m", topic="t", numeric=("amount",), categorical=("country",),
    ...                  label="y", hash_bits=4)
    >>> vec = Vectorizer(spec)
    >>> batch, rejects = vec.transform_many([
    ...     {"event_id": 1, "amount": 12.5, "country": "FR", "y": 1},
    ...     {"event_id": 2, "country": "DE"},
    ...     {"event_id": 3, "amount": "lots"},
    ...     {"event_id": 4, "amount": 1e308},
    ... ])
    >>> batch.numeric.tolist(), batch.labels.tolist()[0], rejects[0]
    ([[12.5], [nan]], 1.0, (2, "field 'amount': expected a number, got str"))
    >>> rejects[1]
    (3, "field 'amount': magnitude must be at most 1e+15, got 1e+308")
    >>> bool((batch.hashed >= spec.first_slot).all() and (batch.hashed < spec.n_weights).all())
    True
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._mask = (1 << spec.hash_bits) - 1
        self._cache: dict[tuple[str, str], int] = {}
        self._slots: dict[str, dict[Any, int]] = {}
        self.inputs = _Inputs.of(spec)
        num_fields, cat_fields = self.inputs.numeric, self.inputs.categorical
        d1 = len(num_fields) + 1
        # One row's numerics and label as float64, from the whole row tuple: "?" takes any
        # object (the categoricals and the id), so no slice is needed; padded to 8 bytes.
        tail = len(cat_fields) + 1
        self._pack = struct.Struct(f"<{d1}d{tail}?{-tail % 8}x").pack
        self._width = d1 + (tail + 7) // 8  # float64 slots per packed row
        self._cat_get = [itemgetter(d1 + j) for j in range(len(cat_fields))]
        self._id_get = itemgetter(d1 + len(cat_fields))
        self._dict_row = _row_type(spec, _Number, Any)

    def slot(self, field: str, value: Any) -> int:
        """Weight index of a categorical value (from :attr:`ModelSpec.first_slot`)."""
        key = (field, value if isinstance(value, str) else str(value))
        idx = self._cache.get(key)
        if idx is None:
            idx = self._slot_of(*key)
            # The caches are bounded in entries, not bytes: a value longer than an entity
            # key (keys.MAX_KEY_CHARS) is hashed each time (distinct 100 KB values grew
            # the process by 125 MiB per 1,000 messages when cached).
            if len(key[1]) > MAX_KEY_CHARS:
                return idx
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = idx
        return idx

    def _slot_of(self, field: str, value: str) -> int:
        return self.spec.first_slot + (stable_hash(field, value) & self._mask)

    def feature_names(self, event: Mapping[str, Any]) -> list[str]:
        """Names of one event's features, in the order of its CSR row."""
        cats = [f"{f}={event.get(f, _MISSING)}" for f in self.spec.categorical]
        return list(self.spec.numeric_features) + cats

    def transform_many(self, events: Sequence[Any]) -> tuple[FeatureBatch, list[tuple[int, str]]]:
        """Vectorize events; return the batch of valid ones and ``(index, reason)`` rejects.

        Rejects come in event order, each with the reason of the first rule it breaks.
        """
        rows: list[tuple[Any, ...]] | None = None
        if self._dict_row is not None:
            try:
                rows = list(map(msgspec.structs.astuple,
                                msgspec.convert(list(events), list[self._dict_row])))
            except _CHUNK_ERRORS:
                rows = None
        if rows is not None:
            kept = list(range(len(events)))
            rejects: list[tuple[int, str]] = []
        else:
            rows, kept, rejects = self._rows_one_by_one(events)
        batch, bad = self.assemble(rows)
        if bad is None:
            return batch, rejects
        for r in np.flatnonzero(bad).tolist():  # a label the struct types cannot rule out
            reason = self._reason(events[kept[r]])
            if reason is None:  # the Python rules have the last word
                bad[r] = False
            else:
                rejects.append((kept[r], reason))
        rejects.sort()
        return batch.take(~bad), rejects

    def row(self, event: Any) -> tuple[Any, ...]:
        """One event as a row for :meth:`assemble`; raise :class:`InvalidEvent` naming the
        first field that breaks a rule (the careful path, in Python)."""
        if not isinstance(event, Mapping):
            raise InvalidEvent(f"event must be a JSON object, got {type(event).__name__}")
        spec, inputs = self.spec, self.inputs
        nums = [_number(event.get(name), name, allow_missing=True) for name in inputs.numeric]
        if inputs.time is not None and math.isnan(nums[inputs.time]):
            raise InvalidEvent(_NO_TIME.format(spec.time_field))
        cats = []
        for name in inputs.categorical:
            value = event.get(name)
            if value is not None and (not isinstance(value, str | int) or isinstance(value, bool)):
                raise InvalidEvent(
                    f"field {name!r}: expected a string or integer, got {type(value).__name__}"
                )
            cats.append(value)
        label = label_value(spec, event.get(spec.label), allow_missing=True)
        return (*nums, label, *cats, event.get(spec.id_field))

    def assemble(self, rows: list[tuple[Any, ...]]) -> tuple[FeatureBatch, np.ndarray | None]:
        """Columns of checked rows (:meth:`row`'s layout); also the mask of rows that
        break a rule the struct types leave to this vectorized check (a binary label
        neither 0 nor 1, a magnitude above :data:`MAX_ABS_VALUE`), None when none does."""
        spec, inputs = self.spec, self.inputs
        n, d = len(rows), len(inputs.numeric)
        pack = self._pack
        try:
            packed = [pack(*t) for t in rows]
        except struct.error:  # an explicit null (None) somewhere: those rows one by one
            packed = [_pack_nulls(pack, t, d + 1) for t in rows]
        flat = np.frombuffer(b"".join(packed), dtype=np.float64).reshape(n, self._width)
        flat = flat[:, : d + 1]
        with np.errstate(over="ignore"):  # a label past float32 is caught below, on flat
            labels = flat[:, d].astype(np.float32)
        hashed = np.empty((n, len(spec.categorical)), dtype=np.int64)
        for j, name in enumerate(spec.categorical):
            hashed[:, j] = self._hash(name, list(map(self._cat_get[j], rows)))
        if inputs.time is None:
            numeric = np.ascontiguousarray(flat[:, :d])
            aux = None
        else:  # aggregate columns stay NaN until the model fills them from ``aux``
            numeric = np.full((n, spec.n_numeric), np.nan)
            numeric[:, : len(spec.numeric)] = flat[:, : len(spec.numeric)]
            aux = AggregateInputs(
                np.ascontiguousarray(flat[:, inputs.time]),
                np.ascontiguousarray(flat[:, list(inputs.values)]),
                [list(map(self._cat_get[j], rows)) for j in inputs.entities])
        batch = FeatureBatch(numeric, hashed, labels, list(map(self._id_get, rows)), aux)
        wrong = (np.abs(flat) > MAX_ABS_VALUE).any(axis=1)  # NaN (missing) compares False
        if inputs.time is not None:
            wrong |= np.isnan(flat[:, inputs.time])
        if spec.task != "regression":  # on float64: 1 + 1e-10 is 1.0 in float32
            y = flat[:, d]
            wrong |= ~((y == 0.0) | (y == 1.0) | np.isnan(y))
        return batch, (wrong if wrong.any() else None)

    def _rows_one_by_one(
        self, events: Sequence[Any]
    ) -> tuple[list[tuple[Any, ...]], list[int], list[tuple[int, str]]]:
        rows: list[tuple[Any, ...]] = []
        kept: list[int] = []
        rejects: list[tuple[int, str]] = []
        dict_row, astuple = self._dict_row, msgspec.structs.astuple
        for i, event in enumerate(events):
            try:
                if dict_row is None:
                    raise TypeError
                row = astuple(msgspec.convert(event, dict_row))
            except _CHUNK_ERRORS:
                try:
                    row = self.row(event)
                except InvalidEvent as exc:
                    rejects.append((i, str(exc)))
                    continue
            rows.append(row)
            kept.append(i)
        return rows, kept, rejects

    def _reason(self, event: Any) -> str | None:
        try:
            self.row(event)
        except InvalidEvent as exc:
            return str(exc)
        return None  # pragma: no cover - the vectorized checks mirror the rules (tested)

    def _hash(self, name: str, col: list[Any]) -> list[int]:
        """Slots of one categorical column, through a per-field cache (None = missing)."""
        cache = self._slots.get(name)
        if cache is None or len(cache) > _CACHE_LIMIT:
            cache = self._slots[name] = {None: self.slot(name, _MISSING)}
        out = list(map(cache.get, col))
        if None in out:  # new values: hashed once, into this field's cache only
            slot_of = self._slot_of
            for i, s in enumerate(out):
                if s is None:
                    v = col[i]
                    out[i] = s = slot_of(name, v if isinstance(v, str) else str(v))
                    if not isinstance(v, str) or len(v) <= MAX_KEY_CHARS:  # as slot()
                        cache[v] = s
        return out  # type: ignore[return-value]


_NO_TIME = "field {!r}: the event time (Unix seconds) is required by the model's aggregates"


@dataclass(frozen=True, slots=True)
class _Inputs:
    """The event fields a spec reads, in row order: numbers (the numeric features, then
    the event time and aggregated fields they lack), categories (the categorical
    features, then the entity fields they lack), and where the aggregates find theirs."""

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    time: int | None  # index in ``numeric`` of the event time (None: no aggregates)
    values: tuple[int, ...]  # per aggregate: index in ``numeric`` of its field
    entities: tuple[int, ...]  # per entity field: index in ``categorical``

    @classmethod
    def of(cls, spec: ModelSpec) -> _Inputs:
        if not spec.aggregates:
            return cls(spec.numeric, spec.categorical, None, (), ())
        numeric, categorical = list(spec.numeric), list(spec.categorical)
        for name in (spec.time_field, *(a.field for a in spec.aggregates)):
            if name not in numeric:
                numeric.append(name)
        entities: list[int] = []
        for a in spec.aggregates:
            if a.entity not in categorical:
                categorical.append(a.entity)
            j = categorical.index(a.entity)
            if j not in entities:
                entities.append(j)
        return cls(tuple(numeric), tuple(categorical), numeric.index(spec.time_field),
                   tuple(numeric.index(a.field) for a in spec.aggregates), tuple(entities))


def _pack_nulls(pack: Any, row: tuple[Any, ...], d1: int) -> bytes:
    try:
        return pack(*row)
    except struct.error:
        return pack(*[math.nan if v is None else v for v in row[:d1]], *row[d1:])


def _row_type(spec: ModelSpec, number: Any, id_type: Any) -> Any:
    """The msgspec struct of one event under ``spec`` (fields renamed from the spec's, so
    any field name works); None when the spec's names collide (the careful path only)."""
    inputs = _Inputs.of(spec)
    num = [(f"n{j}", number, math.nan) for j in range(len(inputs.numeric))]
    cat = [(f"c{j}", _Category, None) for j in range(len(inputs.categorical))]
    fields = [*num, ("y", number, math.nan), *cat, ("id", id_type, None)]
    names = [*inputs.numeric, spec.label, *inputs.categorical, spec.id_field]
    if len(set(names)) != len(names):
        return None
    rename = {f[0]: name for f, name in zip(fields, names, strict=True)}
    return msgspec.defstruct("Event", fields, rename=rename, gc=False)


def label_value(spec: ModelSpec, value: Any, *, allow_missing: bool) -> float:
    """A label under ``spec``'s rules (a number; 0 or 1 unless regression), NaN when
    missing and allowed; else :class:`InvalidEvent` naming the field.

    >>> spec = ModelSpec(name="m", topic="t", numeric=("x",), label="y")
    >>> label_value(spec, 1, allow_missing=False)
    1.0
    >>> label_value(spec, 2, allow_missing=False)
    Traceback (most recent call last):
    ...
    streamlearn.features.InvalidEvent: field 'y': label must be 0 or 1, got 2.0
    """
    if value is None and not allow_missing:
        raise InvalidEvent(f"field {spec.label!r}: the label is missing")
    label = _number(value, spec.label, allow_missing=True)
    if spec.task != "regression" and not (math.isnan(label) or label in (0.0, 1.0)):
        raise InvalidEvent(f"field {spec.label!r}: label must be 0 or 1, got {label!r}")
    return label


def _number(value: Any, name: str, *, allow_missing: bool) -> float:
    if value is None and allow_missing:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidEvent(f"field {name!r}: expected a number, got {type(value).__name__}")
    if isinstance(value, int) and abs(value) > MAX_ABS_VALUE:  # before float(): 10**400
        raise InvalidEvent(_too_large(name, value))
    x = float(value)
    if not math.isfinite(x):
        raise InvalidEvent(f"field {name!r}: must be finite, got {value!r}")
    if abs(x) > MAX_ABS_VALUE:
        raise InvalidEvent(_too_large(name, value))
    return x


def _too_large(name: str, value: float) -> str:
    if isinstance(value, int) and abs(value) >= 10**300:  # no float (nor, past 4300 digits, str)
        shown = f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    else:
        shown = f"{value:.6g}"
    return f"field {name!r}: magnitude must be at most {MAX_ABS_VALUE:g}, got {shown}"


@njit(inline="always")
def numeric_entry(z, r, j):  # pragma: no cover - compiled
    """Row ``r``'s entry for numeric column ``j`` of the z-scores ``z`` (float32, NaN
    where missing): ``(j, z[r, j])``, or for a missing value its indicator in the missing
    block, ``(d + j, 1.0)`` (:attr:`ModelSpec.first_slot`). The one home of that rule:
    the CSR rows, the fused per-event loop and the reason codes read it."""
    x = z[r, j]
    if x != x:
        return z.shape[1] + j, np.float32(1.0)
    return j, x


@njit(cache=True, inline="always")
def csr_assemble(z, hashed):  # pragma: no cover - compiled
    """:func:`csr_rows` on float32 ``z`` and int64 ``hashed``, compiled (``models.fused``
    inlines it)."""
    n, d = z.shape
    width = d + hashed.shape[1]
    indptr = np.empty(n + 1, dtype=np.int64)
    indices = np.empty(n * width, dtype=np.int32)
    values = np.empty(n * width, dtype=np.float32)
    for r in range(n):
        base = r * width
        indptr[r] = base
        for j in range(d):
            i, x = numeric_entry(z, r, j)
            indices[base + j] = i
            values[base + j] = x
        for j in range(hashed.shape[1]):
            indices[base + d + j] = hashed[r, j]
            values[base + d + j] = 1.0
    indptr[n] = n * width
    return indptr, indices, values


def csr_rows(
    numeric_z: np.ndarray, hashed: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Assemble CSR ``(indptr, indices, values)`` from scaled numerics and hashed slots.

    Every row has the same width: one entry per numeric column first (column ``j``, or
    for a missing value, NaN, its indicator ``d + j`` of value 1: :func:`numeric_entry`),
    then the hashed slots.

    Examples
    --------
    >>> indptr, indices, values = csr_rows(np.array([[0.5], [np.nan]]), np.array([[3], [4]]))
    >>> indptr.tolist(), indices.tolist(), values.tolist()
    ([0, 2, 4], [0, 3, 1, 4], [0.5, 1.0, 1.0, 1.0])
    """
    return csr_assemble(np.ascontiguousarray(numeric_z, dtype=np.float32),
                        np.ascontiguousarray(hashed, dtype=np.int64))

"""Event dicts to feature arrays: numeric fields plus hashed categorical fields.

Validation lives here too, because a field that cannot be vectorized is exactly
what makes an event malformed.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from streamlearn.config import ModelSpec

_MISSING = "\x00missing"
_CACHE_LIMIT = 100_000


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
        int64 ``(n, n_categorical)`` column indices, already offset past the
        numeric block, so each row's CSR indices are ``[0..n_numeric) + hashed``.
    labels
        float32 ``(n,)``; NaN where the event carried no label.
    ids
        The events' ids, for prediction records and label joins.
    """

    numeric: np.ndarray
    hashed: np.ndarray
    labels: np.ndarray
    ids: list[Any]

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
        )


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
    ... ])
    >>> batch.numeric.tolist(), batch.labels.tolist()[0], rejects
    ([[12.5], [nan]], 1.0, [(2, "field 'amount': expected a number, got str")])
    >>> bool((batch.hashed >= spec.n_numeric).all() and (batch.hashed < spec.n_weights).all())
    True
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._mask = (1 << spec.hash_bits) - 1
        self._cache: dict[tuple[str, str], int] = {}

    def slot(self, field: str, value: Any) -> int:
        """Weight index of a categorical value (offset past the numeric block)."""
        key = (field, value if isinstance(value, str) else str(value))
        idx = self._cache.get(key)
        if idx is None:
            idx = self.spec.n_numeric + (stable_hash(*key) & self._mask)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = idx
        return idx

    def feature_names(self, event: Mapping[str, Any]) -> list[str]:
        """Names of one event's features, in the order of its CSR row."""
        cats = [f"{f}={event.get(f, _MISSING)}" for f in self.spec.categorical]
        return list(self.spec.numeric) + cats

    def transform_many(self, events: Sequence[Any]) -> tuple[FeatureBatch, list[tuple[int, str]]]:
        """Vectorize events; return the batch of valid ones and ``(index, reason)`` rejects."""
        spec = self.spec
        n_num, n_cat = spec.n_numeric, len(spec.categorical)
        numeric = np.empty((len(events), n_num), dtype=np.float64)
        hashed = np.empty((len(events), n_cat), dtype=np.int64)
        labels = np.empty(len(events), dtype=np.float32)
        ids: list[Any] = []
        rejects: list[tuple[int, str]] = []
        row = 0
        for i, event in enumerate(events):
            try:
                self._fill(event, numeric[row], hashed[row], labels, row)
            except InvalidEvent as exc:
                rejects.append((i, str(exc)))
                continue
            ids.append(event.get(spec.id_field))
            row += 1
        batch = FeatureBatch(numeric[:row], hashed[:row], labels[:row], ids)
        return batch, rejects

    def _fill(
        self, event: Any, num_row: np.ndarray, cat_row: np.ndarray, labels: np.ndarray, row: int
    ) -> None:
        if not isinstance(event, Mapping):
            raise InvalidEvent(f"event must be a JSON object, got {type(event).__name__}")
        spec = self.spec
        for j, name in enumerate(spec.numeric):
            num_row[j] = _number(event.get(name), name, allow_missing=True)
        for j, name in enumerate(spec.categorical):
            value = event.get(name, _MISSING)
            if value is None:
                value = _MISSING
            elif not isinstance(value, str | int) or isinstance(value, bool):
                raise InvalidEvent(
                    f"field {name!r}: expected a string or integer, got {type(value).__name__}"
                )
            cat_row[j] = self.slot(name, value)
        label = _number(event.get(spec.label), spec.label, allow_missing=True)
        if spec.task != "regression" and not (math.isnan(label) or label in (0.0, 1.0)):
            raise InvalidEvent(f"field {spec.label!r}: label must be 0 or 1, got {label!r}")
        labels[row] = label


def _number(value: Any, name: str, *, allow_missing: bool) -> float:
    if value is None and allow_missing:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidEvent(f"field {name!r}: expected a number, got {type(value).__name__}")
    x = float(value)
    if not math.isfinite(x):
        raise InvalidEvent(f"field {name!r}: must be finite, got {value!r}")
    return x


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
            indices[base + j] = j
            values[base + j] = z[r, j]
        for j in range(hashed.shape[1]):
            indices[base + d + j] = hashed[r, j]
            values[base + d + j] = 1.0
    indptr[n] = n * width
    return indptr, indices, values


def csr_rows(
    numeric_z: np.ndarray, hashed: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Assemble CSR ``(indptr, indices, values)`` from scaled numerics and hashed slots.

    Every row has the same width: numeric slots ``0..d-1`` first, then the hashed ones.

    Examples
    --------
    >>> indptr, indices, values = csr_rows(np.array([[0.5], [-1.0]]), np.array([[3], [4]]))
    >>> indptr.tolist(), indices.tolist(), values.tolist()
    ([0, 2, 4], [0, 3, 0, 4], [0.5, 1.0, -1.0, 1.0])
    """
    return csr_assemble(np.ascontiguousarray(numeric_z, dtype=np.float32),
                        np.ascontiguousarray(hashed, dtype=np.int64))

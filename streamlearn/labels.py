"""Delayed labels: scored events wait, with their features, for a label that comes later.

In fraud the label (a chargeback, an analyst's verdict) arrives hours or days after the
event.  An event scored without a label keeps its feature row (numeric fields and
aggregates as they were when it arrived, hashed slots), the score it got, and its
arrival time, keyed by id, for ``spec.label_ttl_s`` seconds.  A label on
``<model>.labels`` (``{id_field: ..., label: ...}``) is joined to its row, and the
model learns the row then; its prequential metrics take the score the event got on
arrival, so delayed learning is measured honestly.

Every label ends in one counter:

- ``joined``: its event was waiting; learned once;
- ``late``: its event waited longer than the TTL, or was pushed out by the cap;
- ``duplicate``: its event was already joined;
- ``unknown``: no such event (never seen, or forgotten long ago).

Memory is bounded: at most ``spec.max_pending`` rows.  Past the cap the oldest row is
dropped (``evicted``; its label will count as late).  ``late`` and ``duplicate`` are
told apart from ``unknown`` for the last ``RECENT`` expired and joined ids.

The state travels in the model's snapshot with the offsets it matches, so a restart
resumes it exactly where Kafka redelivers from.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamlearn.config import ModelSpec
from streamlearn.keys import pack_keys, unpack_keys

#: Expired and joined ids remembered, to count their labels as late or duplicate.
RECENT = 20_000
OUTCOMES = ("joined", "late", "duplicate", "unknown")


@dataclass
class _Block:
    """Rows added by one call, in arrival order."""

    ids: list[Any]
    numeric: np.ndarray
    hashed: np.ndarray
    scores: np.ndarray
    arrived: float
    alive: np.ndarray  # bool per row: still waiting
    n_alive: int
    partitions: np.ndarray  # int64 per row: the event's partition (-1: unknown)


@dataclass
class Joined:
    """Rows whose labels arrived: what the model learns, and the scores they got."""

    numeric: np.ndarray
    hashed: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    ids: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


class PendingLabels:
    """Scored, unlabelled events waiting for their labels (see the module docstring).

    Examples
    --------
    >>> spec = ModelSpec(name="m", topic="t", numeric=("x",), categorical=("c",),
    ...                  hash_bits=2, label_ttl_s=60)
    >>> pending = PendingLabels(spec)
    >>> pending.add(["a", "b"], np.array([[1.0], [2.0]]), np.array([[3], [4]]),
    ...             np.array([0.1, 0.9], dtype=np.float32), now=0.0)
    >>> joined = pending.join(["b", "b", "zz"], np.array([1.0, 1.0, 0.0]), now=1.0)
    >>> joined.ids, joined.scores.tolist(), joined.numeric.tolist()
    (['b'], [0.8999999761581421], [[2.0]])
    >>> pending.expire(now=100.0)
    >>> _ = pending.join(["a"], np.array([0.0]), now=100.0)
    >>> pending.counts
    {'joined': 1, 'late': 1, 'duplicate': 1, 'unknown': 1, 'expired': 1, 'evicted': 0}
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.ttl = spec.label_ttl_s
        self.cap = spec.max_pending
        self.width = (spec.n_numeric, len(spec.categorical))
        self.n_weights = spec.n_weights  # hashed slots index the weights: below this
        self.enabled = self.ttl > 0 and self.cap > 0
        self._reset()

    def _reset(self) -> None:
        self.blocks: deque[_Block] = deque()
        self.where: dict[Any, tuple[_Block, int]] = {}
        self.gone: dict[Any, None] = {}  # recently expired or evicted ids (insertion order)
        self.done: dict[Any, None] = {}  # recently joined ids
        self.counts = dict.fromkeys((*OUTCOMES, "expired", "evicted"), 0)
        self.waiting: int | None = None  # rows not loaded (a served model): how many

    def __len__(self) -> int:
        return len(self.where) if self.waiting is None else self.waiting

    def add(self, ids: list[Any], numeric: np.ndarray, hashed: np.ndarray,
            scores: np.ndarray, *, now: float, partitions: np.ndarray | None = None) -> None:
        """Keep unlabelled scored rows (a repeated id replaces its older row)."""
        if not self.enabled or not len(ids) or self.waiting is not None:
            return
        ids = list(ids)
        parts = (np.full(len(ids), -1, dtype=np.int64) if partitions is None
                 else np.array(partitions, dtype=np.int64))
        block = _Block(ids, np.array(numeric, dtype=np.float64),
                       np.array(hashed, dtype=np.int64), np.array(scores, dtype=np.float32),
                       now, np.ones(len(ids), dtype=bool), len(ids), parts)
        where = self.where
        for r, key in enumerate(ids):
            if key is None:  # an event without an id: no label can name it
                self._drop(block, r)
                continue
            old = where.get(key)
            if old is not None:
                self._drop(*old)
            where[key] = (block, r)
        self.blocks.append(block)
        self._trim()

    def _trim(self) -> None:
        excess = len(self.where) - self.cap
        while excess > 0 and self.blocks:
            block = self.blocks[0]
            for r in np.flatnonzero(block.alive).tolist():
                if excess <= 0:
                    break
                self._forget(block, r, "evicted")
                excess -= 1
            if not block.n_alive:
                self.blocks.popleft()

    def expire(self, *, now: float) -> None:
        """Drop rows older than the TTL."""
        while self.blocks and now - self.blocks[0].arrived > self.ttl:
            block = self.blocks.popleft()
            for r in np.flatnonzero(block.alive).tolist():
                self._forget(block, r, "expired")

    def _forget(self, block: _Block, r: int, why: str) -> None:
        key = block.ids[r]
        self._drop(block, r)
        self.where.pop(key, None)
        self.counts[why] += 1
        _remember(self.gone, key)

    def _drop(self, block: _Block, r: int) -> None:
        if block.alive[r]:
            block.alive[r] = False
            block.n_alive -= 1

    def join(self, ids: list[Any], labels: np.ndarray, *, now: float) -> Joined:
        """Match labels to waiting rows, in order; count every label's outcome."""
        self.expire(now=now)
        rows: list[tuple[_Block, int]] = []
        kept: list[int] = []
        counts = self.counts
        for i, key in enumerate(ids):
            found = self.where.pop(key, None)
            if found is not None:
                self._drop(*found)
                rows.append(found)
                kept.append(i)
                counts["joined"] += 1
                _remember(self.done, key)
            elif key in self.done:
                counts["duplicate"] += 1
            elif key in self.gone:
                counts["late"] += 1
            else:
                counts["unknown"] += 1
        while self.blocks and not self.blocks[0].n_alive:
            self.blocks.popleft()
        d, c = self.width
        if not rows:
            return Joined(np.empty((0, d)), np.empty((0, c), dtype=np.int64),
                          np.empty(0, dtype=np.float32), np.empty(0, dtype=np.float32))
        return Joined(np.array([b.numeric[r] for b, r in rows]).reshape(len(rows), d),
                      np.array([b.hashed[r] for b, r in rows], dtype=np.int64).reshape(
                          len(rows), c),
                      np.asarray(labels, dtype=np.float32)[kept],
                      np.array([b.scores[r] for b, r in rows], dtype=np.float32),
                      [ids[i] for i in kept])

    def report(self) -> dict[str, Any]:
        """``labels`` of ``GET /models/{name}``: counters and what waits."""
        return {**self.counts, "pending": len(self), "max_pending": self.cap, "ttl_s": self.ttl}

    # -- state -------------------------------------------------------------------------
    def to_state(self, partitions: set[int] | None = None) -> dict[str, Any]:
        """Waiting rows in arrival order (only those of ``partitions`` when given), the
        recent ids and the counters."""
        d, c = self.width
        masks = [b.alive if partitions is None
                 else b.alive & np.isin(b.partitions, list(partitions)) for b in self.blocks]
        parts = [(b, m) for b, m in zip(self.blocks, masks, strict=True) if m.any()]

        def rows(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            if not parts:
                return np.empty(shape, dtype=dtype)
            return np.concatenate([getattr(b, name)[m] for b, m in parts]).astype(dtype)

        return {  # block by block, in arrival order (a snapshot takes it several times a second)
            "ids": pack_keys([i for b, m in parts for i, keep in zip(b.ids, m.tolist(),
                                                                     strict=True) if keep]),
            "numeric": rows("numeric", (0, d), np.float64),
            "hashed": rows("hashed", (0, c), np.int64),
            "scores": rows("scores", (0,), np.float32),
            "arrived": (np.concatenate([np.full(int(m.sum()), b.arrived) for b, m in parts])
                        if parts else np.empty(0)),
            "partition": rows("partitions", (0,), np.int64),
            "gone": pack_keys(list(self.gone)),
            "done": pack_keys(list(self.done)),
            "counts": dict(self.counts),
        }

    def load(self, state: dict[str, Any], *, rows: bool = True, replace: bool = True) -> None:
        """Resume from :meth:`to_state`; ``ValueError`` when it does not fit this spec.
        Without ``rows``, only the counters and the number waiting (for reports); without
        ``replace``, the rows join those waiting here (a partition handed over)."""
        if replace:
            self._reset()
            counts = {k: int(v) for k, v in dict(state.get("counts", {})).items()
                      if k in self.counts}
            if any(v < 0 for v in counts.values()):
                raise ValueError("pending labels: negative counters")
            self.counts.update(counts)
        if not rows:
            self.waiting = len(np.asarray(state["scores"]))
            return
        ids = unpack_keys(state["ids"])
        d, c = self.width
        n = len(ids)
        numeric = np.asarray(state["numeric"], dtype=np.float64)
        hashed = np.asarray(state["hashed"], dtype=np.int64)
        scores = np.asarray(state["scores"], dtype=np.float32)
        arrived = np.asarray(state["arrived"], dtype=np.float64)
        parts = np.asarray(state.get("partition", np.full(n, -1)), dtype=np.int64)
        if (numeric.shape != (n, d) or hashed.shape != (n, c) or scores.shape != (n,)
                or arrived.shape != (n,) or parts.shape != (n,)):
            raise ValueError("pending labels have the wrong shapes for this spec")
        if n > max(self.cap, 0) or not np.isfinite(arrived).all():
            raise ValueError("pending labels: too many rows, or a non-finite arrival time")
        # A joined row is learned by the compiled step, which indexes the weights with
        # its hashed slots unchecked (one out of range crashed the process, seen); its
        # score goes into the prequential window (NaN there is NaN in every report).
        if hashed.size and not 0 <= hashed.min() <= hashed.max() < self.n_weights:
            raise ValueError(f"pending labels: hashed slots outside 0..{self.n_weights - 1}")
        if not np.isfinite(scores).all() or np.isinf(numeric).any():  # numeric: NaN = missing
            raise ValueError("pending labels: NaN or infinite scores, or infinite features")
        cuts = (np.flatnonzero(np.diff(arrived)) + 1).tolist()  # a block per arrival time
        for a, b in zip([0, *cuts], [*cuts, n], strict=True) if n else ():
            self.add(ids[a:b], numeric[a:b], hashed[a:b], scores[a:b],
                     now=float(arrived[a]), partitions=parts[a:b])
        for key in unpack_keys(state["gone"])[-RECENT:]:
            self.gone[key] = None
        for key in unpack_keys(state["done"])[-RECENT:]:
            self.done[key] = None


def sum_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """:meth:`PendingLabels.report` of several replicas as one (counters add up)."""
    out = dict(reports[0])
    for key in (*OUTCOMES, "expired", "evicted", "pending"):
        out[key] = sum(int(r.get(key, 0)) for r in reports)
    return out


def _remember(recent: dict[Any, None], key: Any) -> None:
    recent[key] = None
    if len(recent) > RECENT:
        del recent[next(iter(recent))]

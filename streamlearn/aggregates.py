"""In-stream entity features: windowed statistics per entity, in event time.

A model spec may declare aggregates (``[[model.aggregate]]``): for each event, the
count, sum and mean of a numeric field over the entity's events in the last hour, day,
week... (``card_id.amount.1h.count``).  They are numeric features like any other: the
scaler standardizes them and the model learns their weights.

How a window is kept.  Each (entity, aggregate, window) holds a ring of
``spec.aggregate_tiles`` tiles of ``length / tiles`` seconds each (the count and the sum
of the values that fell in it) and the index of its newest tile.  A window at time ``t``
is the sum of the tiles that end within it, the tile of ``t`` included: a 1-hour window
with 8 tiles covers the last 52.5 to 60 minutes.  So an entity costs a fixed
``windows x (8 + 8 x tiles)`` bytes per aggregate, whatever its event rate, and an event
costs a fixed number of operations.  An event older than its window's oldest tile still
gets its features but no longer changes the state.

Training and serving see the same numbers.  The worker computes an event's features from
the state *including the event itself*, then keeps the updated state
(:meth:`EntityAggregates.apply` with ``update=True``); the API computes a request's
features from the newest snapshot of that state plus the request's own event, without
changing anything (``update=False``).  Both run the same compiled function
(:func:`window_stats`), so a ``/predict`` carrying only the raw event gets exactly the
values the model would learn from if that event arrived next (tested).

Memory is bounded: at most ``spec.max_entities`` entities per replica.  When the table is
full, entities idle for longer than the longest window (whose every window is empty) are
dropped first (``expired``); if that frees nothing, the least recently seen 1% go
(``evicted``).  Both are counted.  Entities of the batch being computed are never
dropped for another of the same batch; a new entity that finds the table full of them
gets its features from its own event only, and is not kept.

Entities follow partitions.  Each entity's state lives with the replica that consumes
its partition, so events must be keyed by entity (the producer keys by ``card_id``): an
entity seen on two partitions is counted (``misrouted``) and logged by the worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np
import orjson
from numba import njit

from streamlearn.config import AGGREGATE_STATS, ModelSpec
from streamlearn.keys import bounded, pack_keys, pack_texts, unpack_keys

_EMPTY_HEAD = -(2**62)  # the newest tile of an entity with no events yet
_INITIAL_SLOTS = 1024
_UNSEEN = -2  # a key the table does not hold (yet)


@njit(cache=True, nogil=True)
def window_stats(slots, times, values, widths, tiles, head, counts, sums, last_seen, update,
                 columns, out):  # pragma: no cover - compiled
    """Per row ``r`` and (aggregate ``k``, window ``w``): the count, sum and mean of the
    entity's values in the window ending at ``times[r]``, the row's own value included,
    into ``out[r, columns[k, w, 0..2]]`` (-1: a statistic not asked for); with ``update``,
    the row's value is added to the state first (rows in order).

    ``slots[r]`` is the entity's row in the state (-1: no entity, so no history);
    ``values[r, k]`` is NaN when the event lacks the field (it is then not counted);
    ``widths[k, w]`` is the tile width, 0 for a window the aggregate does not have; the
    mean of an empty window is NaN (missing: the model's missing-value weight scores it).
    """
    n = slots.shape[0]
    n_agg, n_win = widths.shape
    for r in range(n):
        s = slots[r]
        t = times[r]
        if update and s >= 0 and t > last_seen[s]:
            last_seen[s] = t
        for k in range(n_agg):
            v = values[r, k]
            has = v == v
            for w in range(n_win):
                width = widths[k, w]
                if width <= 0.0:
                    continue
                tid = np.int64(math.floor(t / width))
                pt = tid % tiles  # ring position of tile tid; the others follow from it
                c = 0.0
                total = 0.0
                if s >= 0:
                    d = tid - head[s, k, w]  # tiles from the entity's newest to this one
                    # The window holds the ring's tiles (max(tid, h) - tiles, min(tid, h)],
                    # tiles - |d| of them, read oldest first (one modulo per window, not
                    # one per tile: the divisions were most of this function's time).
                    n_in = tiles - abs(d)
                    if n_in > 0:
                        top = pt if d <= 0 else pt - d  # the position of min(tid, h)
                        top = top + tiles if top < 0 else top
                        p = top - n_in + 1
                        p = p + tiles if p < 0 else p
                        for _ in range(n_in):
                            c += counts[s, k, w, p]
                            total += sums[s, k, w, p]
                            p = p + 1 if p + 1 < tiles else 0
                    if has and d > -tiles:  # its tile is still in the ring
                        c += 1.0
                        total += v
                        if update:
                            if d > 0:  # clear the tiles the ring moves past
                                m = min(d, tiles)
                                p = pt - m + 1
                                p = p + tiles if p < 0 else p
                                for _ in range(m):
                                    counts[s, k, w, p] = 0.0
                                    sums[s, k, w, p] = 0.0
                                    p = p + 1 if p + 1 < tiles else 0
                                head[s, k, w] = tid
                            counts[s, k, w, pt] += 1.0
                            sums[s, k, w, pt] += v
                elif has:
                    c = 1.0
                    total = v
                if columns[k, w, 0] >= 0:
                    out[r, columns[k, w, 0]] = c
                if columns[k, w, 1] >= 0:
                    out[r, columns[k, w, 1]] = total
                if columns[k, w, 2] >= 0:
                    out[r, columns[k, w, 2]] = total / c if c > 0.0 else np.nan


@dataclass
class AggregateInputs:
    """What aggregates read from a batch of events, beside the features.

    Attributes
    ----------
    times
        float64 ``(n,)`` event times (``spec.time_field``, Unix seconds).
    values
        float64 ``(n, n_aggregates)``: each aggregate's field; NaN when absent.
    keys
        One list of ``n`` entity values per entity field (``spec.aggregate_entities``);
        None where the event has none.
    partitions
        int64 ``(n,)`` source partition of each event, or None (serving).
    """

    times: np.ndarray
    values: np.ndarray
    keys: list[list[Any]]
    partitions: np.ndarray | None = None

    def take(self, idx: np.ndarray) -> AggregateInputs:
        """Rows ``idx``."""
        rows = idx.tolist()
        return AggregateInputs(self.times[idx], self.values[idx],
                               [[col[i] for i in rows] for col in self.keys],
                               None if self.partitions is None else self.partitions[idx])


def concat_inputs(parts: list[AggregateInputs]) -> AggregateInputs:
    """Several batches' inputs, end to end."""
    if len(parts) == 1:
        return parts[0]
    keys = [[k for p in parts for k in p.keys[j]] for j in range(len(parts[0].keys))]
    with_parts = all(p.partitions is not None for p in parts)
    return AggregateInputs(np.concatenate([p.times for p in parts]),
                           np.concatenate([p.values for p in parts]), keys,
                           np.concatenate([p.partitions for p in parts])  # type: ignore[misc]
                           if with_parts else None)


@dataclass
class _Group:
    """The aggregates of one entity field, and the state of its entities."""

    field: str
    members: list[int]  # indices into spec.aggregates
    lengths: np.ndarray  # (k, w) seconds, 0 where absent
    widths: np.ndarray  # (k, w) tile widths, seconds, 0 where absent
    columns: np.ndarray  # (k, w, 3) feature column of count, sum, mean (-1: not asked)
    slots: dict[Any, int] = field(default_factory=dict)
    keys: list[Any] = field(default_factory=list)  # slot -> key (None: free)
    free: list[int] = field(default_factory=list)
    head: np.ndarray = field(default_factory=lambda: np.empty((0, 0, 0), dtype=np.int64))
    counts: np.ndarray = field(default_factory=lambda: np.empty((0, 0, 0, 0), np.float32))
    sums: np.ndarray = field(default_factory=lambda: np.empty((0, 0, 0, 0), np.float32))
    last_seen: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    partition: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    used: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))
    texts: list[bytes] | None = field(default_factory=list)  # slot -> key as JSON (lazy)
    packed: dict[str, np.ndarray] | None = None  # the packed keys, until they change


class EntityAggregates:
    """The aggregate state of one model replica (see the module docstring).

    Examples
    --------
    >>> from streamlearn.config import AggregateSpec
    >>> spec = ModelSpec(name="m", topic="t", numeric=("amount",), label="y", hash_bits=2,
    ...                  aggregates=(AggregateSpec("card", "amount", ("1h",),
    ...                                            ("count", "sum", "mean")),))
    >>> agg = EntityAggregates(spec)
    >>> inputs = AggregateInputs(np.array([0.0, 60.0, 120.0]), np.array([[5.0], [7.0], [1.0]]),
    ...                          [["a", "a", "b"]])
    >>> agg.features(inputs, update=True).tolist()
    [[1.0, 5.0, 5.0], [2.0, 12.0, 6.0], [1.0, 1.0, 1.0]]
    >>> probe = AggregateInputs(np.array([180.0]), np.array([[3.0]]), [["a"]])
    >>> agg.features(probe, update=False).tolist(), agg.n_entities
    ([[3.0, 15.0, 5.0]], 2)
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.tiles = spec.aggregate_tiles
        self.capacity = spec.max_entities
        self.longest = max((s for a in spec.aggregates for s in a.seconds), default=0.0)
        self.n_features = spec.n_numeric - len(spec.numeric)
        self.groups: list[_Group] = []
        first = [sum(len(b.windows) * len(b.stats) for b in spec.aggregates[:i])
                 for i in range(len(spec.aggregates))]  # each aggregate's first column
        for name in spec.aggregate_entities:
            members = [i for i, a in enumerate(spec.aggregates) if a.entity == name]
            width = max(len(spec.aggregates[i].windows) for i in members)
            lengths = np.zeros((len(members), width))
            columns = np.full((len(members), width, 3), -1, dtype=np.int64)
            for k, i in enumerate(members):
                a = spec.aggregates[i]
                lengths[k, : len(a.windows)] = a.seconds
                for w in range(len(a.windows)):  # names() order: window-major, then stats
                    for j, stat in enumerate(a.stats):
                        columns[k, w, AGGREGATE_STATS.index(stat)] = (
                            first[i] + w * len(a.stats) + j)
            group = _Group(name, members, lengths, lengths / self.tiles, columns)
            self._resize(group, 0)
            self.groups.append(group)
        self.expired = 0
        self.evicted = 0
        self.misrouted = 0
        self.max_time = -math.inf

    @property
    def n_entities(self) -> int:
        """Entities held, over all entity fields."""
        return sum(len(g.slots) for g in self.groups)

    # -- features ------------------------------------------------------------------
    def features(self, inputs: AggregateInputs, *, update: bool) -> np.ndarray:
        """The ``(n, len(spec.aggregate_names))`` aggregate features of ``inputs``' rows.

        ``update``: the worker's step (rows in order, each added to its entity's
        windows); else serving: each row read against the state, which is not changed.
        """
        n = len(inputs.times)
        out = np.empty((n, self.n_features), dtype=np.float64)
        if update and n:
            self.max_time = max(self.max_time, float(np.max(inputs.times)))
        times = np.ascontiguousarray(inputs.times, dtype=np.float64)
        for g, group in enumerate(self.groups):
            slots = self._slots(group, inputs.keys[g], inputs.partitions, update)
            values = np.ascontiguousarray(inputs.values[:, group.members], dtype=np.float64)
            window_stats(slots, times, values, group.widths, self.tiles, group.head,
                         group.counts, group.sums, group.last_seen, update, group.columns,
                         out)
        return out

    def _slots(self, group: _Group, keys: list[Any], partitions: np.ndarray | None,
               update: bool) -> np.ndarray:
        """State rows of ``keys`` (-1: no entity, or one unknown when serving)."""
        table = group.slots
        slots = np.fromiter(map(table.get, keys, repeat(_UNSEEN)), dtype=np.int64,
                            count=len(keys))
        # The rest one by one: no entity, a new one, or a long key (held digested).
        for r in np.flatnonzero(slots == _UNSEEN).tolist():
            key = keys[r]
            if key is None:
                slots[r] = -1
                continue
            key = bounded(key)
            s = table.get(key)
            if s is None:
                s = self._allocate(group, key, slots) if update else -1
            slots[r] = s
        if update and partitions is not None and len(slots):
            known = slots >= 0
            rows, parts = (slots, partitions) if known.all() else (slots[known],
                                                                   partitions[known])
            held = group.partition[rows]
            moved = held != parts
            if moved.any():  # a new entity, or one seen on another partition
                self.misrouted += int(np.count_nonzero(moved & (held >= 0)))
                group.partition[rows] = parts
        return slots

    def _allocate(self, group: _Group, key: Any, busy: np.ndarray) -> int:
        """A state row for a new entity (``busy``: the batch's rows so far, kept; negative
        entries are none); -1 when every row is in use by this batch (the entity then has
        no history: counted as evicted)."""
        if not group.free:
            if len(group.keys) < self.capacity:
                self._resize(group, min(self.capacity, max(_INITIAL_SLOTS, 2 * len(group.keys))))
            elif not self._make_room(group, busy):
                self.evicted += 1
                return -1
        s = group.free.pop()  # a free row is blank (made so, or cleared on release)
        group.slots[key] = s
        group.keys[s] = key
        if group.texts is not None:
            group.texts[s] = orjson.dumps(key)
        group.used[s] = True
        group.packed = None
        return s

    def _make_room(self, group: _Group, busy: np.ndarray) -> bool:
        """Free the idle entities (all windows empty); else the least recent 1%; False
        when every entity is in use by this batch."""
        free = group.used.copy()
        free[busy[busy >= 0]] = False
        idle = free & (group.last_seen < self.max_time - self.longest)
        if idle.any():
            self.expired += int(idle.sum())
            self._release(group, np.flatnonzero(idle))
            return True
        n = min(max(1, len(group.keys) // 100), int(free.sum()))
        if n == 0:
            return False
        oldest = np.argpartition(np.where(free, group.last_seen, np.inf), n - 1)[:n]
        self.evicted += n
        self._release(group, oldest)
        return True

    def _release(self, group: _Group, slots: np.ndarray) -> None:
        for s in slots.tolist():
            key = group.keys[s]
            if key is not None:
                del group.slots[key]
                group.keys[s] = None
                group.free.append(s)
        _blank(group, slots)
        group.packed = None

    def _resize(self, group: _Group, size: int) -> None:
        old = len(group.keys)
        k, w = group.lengths.shape
        t = self.tiles

        def grow(a: np.ndarray, shape: tuple[int, ...], fill: Any, dtype: Any) -> np.ndarray:
            b = np.full(shape, fill, dtype=dtype)
            if old:
                b[:old] = a[:old]
            return b

        group.head = grow(group.head, (size, k, w), _EMPTY_HEAD, np.int64)
        group.counts = grow(group.counts, (size, k, w, t), 0.0, np.float32)
        group.sums = grow(group.sums, (size, k, w, t), 0.0, np.float32)
        group.last_seen = grow(group.last_seen, (size,), -math.inf, np.float64)
        group.partition = grow(group.partition, (size,), -1, np.int64)
        group.used = grow(group.used, (size,), False, bool)
        group.packed = None
        group.keys.extend([None] * (size - old))
        if group.texts is not None:
            group.texts.extend([b"null"] * (size - old))
        group.free.extend(range(size - 1, old - 1, -1))  # pop() hands out low slots first

    # -- reports and state -----------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """``features.aggregates`` of ``GET /models/{name}``: the declared aggregates,
        their feature names, and the state's size and counters."""
        return {
            "declared": [a.to_dict() for a in self.spec.aggregates],
            "features": list(self.spec.aggregate_names),
            "time_field": self.spec.time_field,
            "tiles": self.tiles,
            "entities": self.n_entities,
            "max_entities": self.capacity,
            "expired": self.expired,
            "evicted": self.evicted,
            "misrouted": self.misrouted,
        }

    def to_state(self, partitions: set[int] | None = None) -> dict[str, Any]:
        """The entities held (only those of ``partitions`` when given), as copies.

        A snapshot takes it several times a second: the rows are picked in NumPy and the
        packed keys of all entities are cached until an entity comes or goes."""
        groups = []
        for group in self.groups:
            if partitions is None:
                rows = np.flatnonzero(group.used)
                if group.packed is None:  # each key's JSON text is kept from its arrival
                    if group.texts is None:
                        group.texts = list(map(orjson.dumps, group.keys))
                    text = group.texts
                    group.packed = pack_texts([text[s] for s in rows.tolist()])
                keys = group.packed
            else:
                rows = np.flatnonzero(group.used & np.isin(group.partition, list(partitions)))
                keys = pack_keys([group.keys[s] for s in rows.tolist()])
            groups.append({
                "field": group.field, "keys": keys,
                "head": group.head[rows], "counts": group.counts[rows], "sums": group.sums[rows],
                "last_seen": group.last_seen[rows], "partition": group.partition[rows],
            })
        return {"groups": groups, "expired": self.expired, "evicted": self.evicted,
                "misrouted": self.misrouted,
                "max_time": self.max_time if math.isfinite(self.max_time) else None}

    def load(self, state: dict[str, Any], *, replace: bool = True) -> None:
        """Take the entities of ``state`` (``replace``: drop the current ones first);
        ``ValueError`` when it does not fit this spec."""
        groups = state.get("groups")
        if not isinstance(groups, list) or len(groups) != len(self.groups):
            raise ValueError("aggregate state has another set of entity fields")
        counters = [int(state.get(k, 0)) for k in ("expired", "evicted", "misrouted")]
        mt = state.get("max_time")
        mt = None if mt is None else float(mt)
        if min(counters) < 0 or (mt is not None and not math.isfinite(mt)):
            raise ValueError("aggregate state: negative counters, or a non-finite max_time")
        if replace:
            self.expired, self.evicted, self.misrouted = counters
        if mt is not None:
            self.max_time = max(self.max_time, mt)
        for group, g in zip(self.groups, groups, strict=True):
            if g.get("field") != group.field:
                raise ValueError(f"aggregate state is for entity field {g.get('field')!r}")
            keys = unpack_keys(g["keys"])
            k, w = group.lengths.shape
            head = np.asarray(g["head"], dtype=np.int64)
            counts = np.asarray(g["counts"], dtype=np.float32)
            sums = np.asarray(g["sums"], dtype=np.float32)
            last = np.asarray(g["last_seen"], dtype=np.float64)
            part = np.asarray(g["partition"], dtype=np.int64)
            n = len(keys)
            if (head.shape != (n, k, w) or counts.shape != (n, k, w, self.tiles)
                    or sums.shape != counts.shape or last.shape != (n,) or part.shape != (n,)):
                raise ValueError(f"aggregate state of {group.field!r} has the wrong shapes")
            if not (np.isfinite(counts).all() and np.isfinite(sums).all()) or (counts < 0).any():
                raise ValueError(f"aggregate state of {group.field!r} is not finite, or has "
                                 "negative counts")
            # window_stats subtracts a head from a tile number without overflow checks: a
            # head near -2**63 (a NaN cast to int64) wrapped, and the process crashed (seen).
            if ((head < _EMPTY_HEAD) | (head > -_EMPTY_HEAD)).any():
                raise ValueError(f"aggregate state of {group.field!r}: a newest tile out of "
                                 "+-2**62")
            held = [r for r, key in enumerate(keys) if key is not None]
            if not np.isfinite(last[held]).all():
                raise ValueError(f"aggregate state of {group.field!r}: an entity's last-seen "
                                 "time is not finite")
            if len(held) > self.capacity or len({keys[r] for r in held}) < len(held):
                raise ValueError(f"aggregate state of {group.field!r}: over max_entities, "
                                 "or a repeated key")
            if replace:  # rows as they were (a snapshot restored, or served): the decoded
                # arrays become the state (no copy: the API takes several a second)
                group.head, group.counts, group.sums = (np.array(a, copy=False) for a in (
                    head, counts, sums))
                group.last_seen, group.partition = last, part
                group.keys, group.texts = list(keys), None  # texts: when a worker packs
                group.used = np.array([key is not None for key in keys], dtype=bool)
                group.free = np.flatnonzero(~group.used)[::-1].tolist()
                _blank(group, np.array(group.free, dtype=np.int64))
                group.slots = {keys[r]: r for r in held}
                group.packed = None
                continue
            taken = np.full(len(held), -1, dtype=np.int64)  # rows written so far: kept
            for i, r in enumerate(held):
                key = keys[r]
                s = group.slots.get(key)
                if s is None:
                    s = self._allocate(group, key, taken)
                    if s < 0:
                        continue
                taken[i] = s
                group.head[s], group.counts[s], group.sums[s] = head[r], counts[r], sums[r]
                group.last_seen[s], group.partition[s] = last[r], part[r]



def _blank(group: _Group, rows: np.ndarray) -> None:
    """Rows as a new entity starts: no tile, never seen, no partition, unused."""
    group.used[rows] = False
    group.head[rows] = _EMPTY_HEAD
    group.counts[rows] = 0.0
    group.sums[rows] = 0.0
    group.last_seen[rows] = -math.inf
    group.partition[rows] = -1


def union(states: list[dict[str, Any]], spec: ModelSpec) -> dict[str, Any] | None:
    """The aggregate states of several replicas as one (each holds its own partitions:
    an entity in two of them keeps the most recently seen copy)."""
    present = [s for s in states if isinstance(s, dict) and s.get("groups") is not None]
    if not present:
        return None
    agg = EntityAggregates(spec)
    for state in sorted(present, key=lambda s: s.get("max_time") or -math.inf):
        agg.load(state, replace=False)
    agg.expired = sum(int(s.get("expired", 0)) for s in present)
    agg.evicted = sum(int(s.get("evicted", 0)) for s in present)
    agg.misrouted = sum(int(s.get("misrouted", 0)) for s in present)
    return agg.to_state()

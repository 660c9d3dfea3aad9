"""Serve models from snapshots: decode, validate, merge replica shards, hot-swap.

Pure: no network or file I/O.  The API's snapshot feed hands raw Kafka values
to :meth:`ModelStore.offer`; request handlers read :meth:`ModelStore.get`.

A served model is immutable once published.  An offer builds the replacement
completely, then swaps one reference, so a reader holding a :class:`Served`
keeps a consistent model, version and metadata even while a newer one lands.

Snapshots are untrusted input.  A :class:`SnapshotPolicy` says what is accepted:
an HMAC signature (required whenever a key is set), the model specs this
process is configured for (a snapshot must carry exactly that spec), and size
bounds derived from the spec, checked before anything is decompressed or
allocated.  Every refused snapshot is counted by reason
(``StoreStats.rejected_by_reason``) and logged at most once a minute per
reason; nothing a record contains can make :meth:`ModelStore.offer` raise.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from streamlearn import aggregates, keys, labels, snapshots
from streamlearn import replicas as merging
from streamlearn.config import ModelSpec
from streamlearn.logs import RateLimitedLog
from streamlearn.models import OnlineModel, StateError
from streamlearn.models.online import upgraded
from streamlearn.scaler import RunningStandardScaler

log = logging.getLogger(__name__)

_reject_log = RateLimitedLog(log, interval_s=60.0)

_COUNTERS = ("consumed", "scored", "learned", "deadlettered")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_REPLICA = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces
_MAX_COUNT = 2**53  # counters and versions beyond this are not from a real stream
#: Builds (merges) cheaper than this are never deferred; costlier ones run at most once per
#: MERGE_BUDGET times their cost, so merging takes at most 1/MERGE_BUDGET of a core.
MERGE_DEFER_S = 0.02
MERGE_BUDGET = 4.0


def _empty_telemetry() -> dict[str, Any]:
    return {k: 0 for k in _COUNTERS} | {"learn_seconds": None}


def clean_telemetry(raw: Any) -> dict[str, Any]:
    """Normalize a snapshot's ``telemetry`` entry; bad or missing parts become defaults.

    The learn-latency histogram is kept only when it is well formed: increasing
    bucket bounds and cumulative counts, one per bound, none above ``count``.

    Examples
    --------
    >>> t = clean_telemetry({"consumed": 5, "learn_seconds": {"le": [0.1, 1.0],
    ...                      "counts": [1, 2], "sum": 0.3, "count": 2}})
    >>> t["consumed"], t["scored"], t["learn_seconds"]["counts"]
    (5, 0, [1, 2])
    >>> clean_telemetry({"learn_seconds": {"le": [1.0], "counts": [3], "sum": 1, "count": 2}})
    {'consumed': 0, 'scored': 0, 'learned': 0, 'deadlettered': 0, 'learn_seconds': None}
    """
    out = _empty_telemetry()
    if not isinstance(raw, Mapping):
        return out
    for k in _COUNTERS:
        v = raw.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out[k] = v
    hist = raw.get("learn_seconds")
    try:
        le = [float(x) for x in hist["le"]]  # type: ignore[index]
        counts = [int(c) for c in hist["counts"]]  # type: ignore[index]
        total, count = float(hist["sum"]), int(hist["count"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return out
    ok = (
        len(le) == len(counts)
        and all(a < b for a, b in zip(le, le[1:], strict=False))
        and all(0 <= a <= b for a, b in zip(counts, counts[1:], strict=False))
        and (not counts or counts[0] >= 0)
        and (not counts or counts[-1] <= count)
        and np.isfinite(total)
    )
    if ok:
        out["learn_seconds"] = {"le": le, "counts": counts, "sum": total, "count": count}
    return out


def sum_telemetry(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Add cleaned telemetry dicts; histograms add only when their buckets agree.

    Examples
    --------
    >>> a = clean_telemetry({"consumed": 2, "learn_seconds": {"le": [1.0], "counts": [1],
    ...                                                       "sum": 0.5, "count": 1}})
    >>> s = sum_telemetry([a, a])
    >>> s["consumed"], s["learn_seconds"]["counts"], s["learn_seconds"]["sum"]
    (4, [2], 1.0)
    """
    out = _empty_telemetry()
    hists = [t["learn_seconds"] for t in items if t.get("learn_seconds")]
    for t in items:
        for k in _COUNTERS:
            out[k] += int(t.get(k, 0))
    if hists and all(h["le"] == hists[0]["le"] for h in hists):
        out["learn_seconds"] = {
            "le": list(hists[0]["le"]),
            "counts": [int(sum(c)) for c in zip(*(h["counts"] for h in hists), strict=True)],
            "sum": float(sum(h["sum"] for h in hists)),
            "count": int(sum(h["count"] for h in hists)),
        }
    return out


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge replica shards of one model into the state that is served.

    Weights and optimizer state (``w``/``s1``/``s2``, the running average ``avg``,
    plus ``V``/``s1v``/``s2v`` for factorization machines) and the mixture gap
    (``mix``) are averaged, weighted by each shard's
    ``n_learned`` (equal weights while nobody has learned).  Scaler statistics
    merge exactly (Chan).  Counters add up; ``version``, ``step`` and
    ``updated_at`` take the maximum; offsets take the furthest per partition;
    the prequential windows are pooled.  Shards must share one spec.

    Examples
    --------
    >>> from streamlearn.config import ModelSpec
    >>> spec = ModelSpec(name="m", topic="t", numeric=("x",), label="y", hash_bits=2)
    >>> a, b = (OnlineModel(spec, device="cpu").to_state() for _ in range(2))
    >>> a["weights"]["w"][:] = 1.0; a["n_learned"] = 30; a["version"] = 3
    >>> b["weights"]["w"][:] = 4.0; b["n_learned"] = 10; b["version"] = 5
    >>> m = merge_states([a, b])
    >>> m["weights"]["w"].tolist(), m["n_learned"], m["version"]  # x, x missing, the bias
    ([1.75, 1.75, 1.75], 40, 5)
    >>> merge_states([a]) is not a and merge_states([a])["version"] == 3
    True
    """
    if not states:
        raise ValueError("merge_states needs at least one state")
    states = [upgraded(s) for s in states]  # a replica mid-upgrade: this version's layout
    if len(states) == 1:
        only = dict(states[0])
        only["weights"] = {k: np.array(v, copy=True) for k, v in states[0]["weights"].items()}
        return only
    first = states[0]
    for s in states[1:]:
        if s.get("spec") != first.get("spec"):
            raise ValueError("cannot merge shards with different model specs")
        if set(s["weights"]) != set(first["weights"]):
            raise ValueError("cannot merge shards with different weight sets")
    n = np.array([float(s["n_learned"]) for s in states])
    alpha = n / n.sum() if n.sum() > 0 else np.full(len(states), 1.0 / len(states))
    weights: dict[str, np.ndarray] = {}
    for name in first["weights"]:
        arrays = [np.asarray(s["weights"][name]) for s in states]
        shape = arrays[0].shape
        if any(a.shape != shape for a in arrays):
            raise ValueError(f"cannot merge weights {name!r} of different shapes")
        acc = np.zeros(shape, dtype=np.float64)
        for a_i, arr in zip(alpha, arrays, strict=True):
            acc += a_i * arr
        weights[name] = acc.astype(arrays[0].dtype)
    scaler = RunningStandardScaler.from_state(first["scaler"])
    for s in states[1:]:
        scaler.merge(RunningStandardScaler.from_state(s["scaler"]))
    offsets: dict[str, int] = {}
    for s in states:
        for k, v in s.get("offsets", {}).items():
            offsets[k] = max(int(v), offsets.get(k, -1))
    merged = dict(first)
    merged.update(
        version=max(int(s["version"]) for s in states),
        step=max(int(s["step"]) for s in states),
        n_seen=sum(int(s["n_seen"]) for s in states),
        n_learned=sum(int(s["n_learned"]) for s in states),
        n_imputed=np.sum([np.asarray(s["n_imputed"], dtype=np.int64) for s in states], axis=0),
        offsets=offsets,
        updated_at=max(float(s.get("updated_at", 0.0)) for s in states),
        weights=weights,
        scaler=scaler.to_state(),
        metrics=merging.pool_metrics([s["metrics"] for s in states]),
    )
    if "mix" in first:  # the averaged models' mixture gap, weighted as the weights
        merged["mix"] = np.sum([a * merging.mix_of(s) for a, s in zip(alpha, states,
                                                                      strict=True)], axis=0)
    if any("telemetry" in s for s in states):
        merged["telemetry"] = sum_telemetry([clean_telemetry(s.get("telemetry")) for s in states])
    if any("replica" in s for s in states):
        merged["replica"] = ",".join(sorted(str(s.get("replica", "?")) for s in states))
    return merged


@dataclass(frozen=True, slots=True)
class Replica:
    """What the latest snapshot of one replica shard said.

    Examples
    --------
    >>> r = Replica("r1", version=3, n_seen=10, n_learned=8, updated_at=100.0,
    ...             received_at=101.0, telemetry={}, metrics={}, size_bytes=512)
    >>> r.to_dict(now=102.5)["age_s"]
    2.5
    """

    replica: str
    version: int
    n_seen: int
    n_learned: int
    updated_at: float
    received_at: float
    telemetry: dict[str, Any]
    metrics: dict[str, Any]
    size_bytes: int
    partitions: tuple[int, ...] = ()
    adopted_version: int = 0
    published_at: float = 0.0  # when the replica shipped it (0: unknown, use received_at)
    labels: Mapping[str, Any] = field(default_factory=dict)  # PendingLabels.report()
    aggregates: Mapping[str, Any] = field(default_factory=dict)  # EntityAggregates.report()

    def staleness_s(self, now: float) -> float:
        """Seconds since the replica shipped this shard (or since it arrived)."""
        return max(0.0, now - (self.published_at or self.received_at))

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """JSON-ready summary, with the snapshot age at ``now``."""
        now = time.time() if now is None else now
        return {
            "replica": self.replica, "partitions": list(self.partitions),
            "version": self.version, "events_seen": self.n_seen,
            "events_learned": self.n_learned, "adopted_version": self.adopted_version,
            "staleness_s": round(self.staleness_s(now), 3), "updated_at": self.updated_at,
            "age_s": round(max(0.0, now - self.updated_at), 3), "received_at": self.received_at,
            "size_bytes": self.size_bytes, "metrics": self.metrics, "telemetry": self.telemetry,
        }


@dataclass(frozen=True, slots=True)
class Served:
    """The model served under one name, with where it came from.

    Attributes
    ----------
    model
        The (merged) model; never mutated after publication.
    version
        Highest version among the shards.
    updated_at
        Wall time of the newest learning step in the snapshot(s).
    loaded_at, loaded_monotonic
        When this object was published (wall clock and monotonic clock).
    replicas
        Latest snapshot summary per replica id.
    telemetry
        Worker counters summed over replicas.
    info
        ``model.info()`` computed once at load time.

    Examples
    --------
    >>> from streamlearn.config import ModelSpec
    >>> model = OnlineModel(ModelSpec(name="m", topic="t", numeric=("x",), hash_bits=2))
    >>> served = Served("m", model, version=0, updated_at=100.0, loaded_at=100.0,
    ...                 loaded_monotonic=0.0, replicas={}, telemetry={}, info=model.info())
    >>> served.age_s(now=130.0), served.age_s(now=90.0)
    (30.0, 0.0)
    """

    name: str
    model: OnlineModel
    version: int
    updated_at: float
    loaded_at: float
    loaded_monotonic: float
    replicas: Mapping[str, Replica]
    telemetry: dict[str, Any]
    info: dict[str, Any]
    #: Position of the newest merged model (``<model>/@merged``) in the chain; 0: none.
    merged_version: int = 0
    #: Replicas whose shards are in the served merge (fresh), and those left out (stale).
    in_merge: tuple[str, ...] = ()
    stale: tuple[str, ...] = ()

    def age_s(self, now: float | None = None) -> float:
        """Seconds since the snapshot's last learning step (never negative)."""
        now = time.time() if now is None else now
        return max(0.0, now - self.updated_at)


@dataclass(frozen=True, slots=True)
class _Shard:
    key: str
    state: dict[str, Any]
    summary: Replica
    crc: int
    model: OnlineModel


#: Spec fields a snapshot must share with the configured model: what the served model
#: reads from a request and the shape of its weights.  Learning-only settings (rates,
#: optimizer, batch size, the device...) may differ, say for a replica restored from an
#: older checkpoint whose rule is kept; forged weights are the signature's business.
SERVING_FIELDS = ("name", "task", "numeric", "categorical", "hash_bits", "fm_factors",
                  "label", "id_field")


def _spec_identity(spec: ModelSpec) -> tuple[Any, ...]:
    """The spec as compared between a snapshot and the configuration."""
    return tuple(getattr(spec, f) for f in SERVING_FIELDS)


def state_limits(spec: ModelSpec, base: snapshots.Limits = snapshots.DEFAULT_LIMITS
                 ) -> snapshots.Limits:
    """Decode bounds for a snapshot of ``spec``: arrays sized by its weights and window.

    Generous (twice the arrays the current learning rule keeps), but proportional
    to the model, so a forged size or a decompression bomb is refused before
    anything is allocated.

    Examples
    --------
    >>> spec = ModelSpec(name="m", topic="t", numeric=("x",), categorical=("c",), hash_bits=10,
    ...                  label_ttl_s=0)
    >>> lim = state_limits(spec)
    >>> lim.max_array_elements, lim.max_decoded_bytes // 2**20
    (87590, 24)

    Events waiting for labels (100,000 by default) and entity aggregates raise the bounds:

    >>> from dataclasses import replace
    >>> state_limits(replace(spec, label_ttl_s=3600)).max_decoded_bytes // 2**20
    440
    """
    k = spec.fm_factors + 1 if spec.task == "ranking" else 1
    per_array = 2 * (spec.n_weights + 1) * k + 2 * spec.rolling_window + 65_536
    # weights, optimizer state and FM factors: at most 6 such arrays, 8 bytes each, twice
    total = 2 * 6 * 8 * per_array + 16 * 2**20
    if spec.label_ttl_s > 0 and spec.max_pending > 0:  # events waiting for labels
        rows, ids = spec.max_pending, (spec.max_pending + 2 * labels.RECENT) * keys.MAX_KEY_BYTES
        per_array = max(per_array, rows * max(spec.n_numeric, len(spec.categorical)),
                        keys.TEXT_CHUNK)
        total += 2 * (rows * 8 * (spec.n_numeric + len(spec.categorical) + 2) + ids)
    if spec.aggregates:  # tiles of every entity
        cells = (spec.max_entities * spec.aggregate_tiles * len(spec.aggregates)
                 * max(len(a.windows) for a in spec.aggregates))
        text = spec.max_entities * keys.MAX_KEY_BYTES
        per_array = max(per_array, cells, keys.TEXT_CHUNK)
        total += 2 * (3 * 4 * cells + text + 16 * spec.max_entities)
    return snapshots.tighten(base, max_array_elements=per_array, max_decoded_bytes=total)


def model_bytes(spec: ModelSpec) -> int:
    """Bytes the weights of a model of ``spec`` take (before any is allocated)."""
    k = spec.fm_factors + 1 if spec.task == "ranking" else 1
    return 3 * 4 * (spec.n_weights + 1) * k


@dataclass(frozen=True)
class SnapshotPolicy:
    """What a :class:`ModelStore` accepts.

    Attributes
    ----------
    key
        HMAC key snapshots are signed with (bytes, str or a ``SecretStr``);
        ``None``: no verification.
    require_signature
        ``None``: required exactly when a key is set.  ``True`` without a key
        refuses every snapshot (callers turn that into a start-up error).
    specs
        Model name -> the configured spec.  When given, a snapshot must name a
        configured model and carry its spec (the device aside); ``None`` accepts
        any model whose weights fit in ``limits.max_decoded_bytes``.
    limits
        Base decode bounds; tightened per model by :func:`state_limits`.
    max_replicas
        Replica shards kept per model; snapshots of further replicas are refused.
    max_clock_skew_s
        How far in the future a snapshot's ``updated_at`` may be.

    Examples
    --------
    >>> SnapshotPolicy(key="k").signatures_required, SnapshotPolicy().signatures_required
    (True, False)
    """

    key: snapshots.KeyLike = None
    require_signature: bool | None = None
    specs: Mapping[str, ModelSpec] | None = None
    limits: snapshots.Limits = snapshots.DEFAULT_LIMITS
    max_replicas: int = 64
    max_clock_skew_s: float = 300.0
    #: A replica shard not refreshed for this long leaves the served merge (None: never).
    stale_after_s: float | None = None

    @property
    def key_bytes(self) -> bytes | None:
        """The key as bytes, ``None`` when unset or empty."""
        return snapshots.key_bytes(self.key)

    @property
    def signatures_required(self) -> bool:
        """Whether unsigned snapshots are refused."""
        if self.require_signature is None:
            return self.key_bytes is not None
        return self.require_signature

    def __repr__(self) -> str:  # never show the key
        return (f"SnapshotPolicy(key={'set' if self.key_bytes else None}, "
                f"require_signature={self.signatures_required}, "
                f"specs={sorted(self.specs) if self.specs is not None else None})")


def _finite(what: str, value: Any) -> None:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise StateError(f"{what} is not numeric")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise StateError(f"{what} holds NaN or infinite values")


def _count(state: Mapping[str, Any], name: str) -> int:
    v = state.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < _MAX_COUNT:
        raise StateError(f"{name!r} must be an integer in [0, 2**53)")
    return v


def validate_state(state: Any, *, now: float, max_clock_skew_s: float = 300.0) -> None:
    """Refuse a decoded state whose numbers cannot come from a real model.

    Weights, optimizer state, scaler, label statistics and the prequential window
    must be finite; counters and the version integers in [0, 2**53); ``updated_at``
    finite and not in the future beyond the clock skew.  (Consistent but forged
    numbers are caught only by the signature.)

    Examples
    --------
    >>> spec = ModelSpec(name="m", topic="t", numeric=("x",), hash_bits=2)
    >>> state = OnlineModel(spec, device="cpu").to_state()
    >>> validate_state(state, now=state["updated_at"])
    >>> state["weights"]["w"][0] = np.nan
    >>> validate_state(state, now=state["updated_at"])
    Traceback (most recent call last):
    ...
    streamlearn.models.online.StateError: weights 'w' holds NaN or infinite values
    """
    if not isinstance(state, Mapping):
        raise StateError("snapshot state is not an object")
    for name in ("version", "step", "n_seen", "n_learned"):
        _count(state, name)
    updated = state.get("updated_at", 0.0)
    if not isinstance(updated, int | float) or not math.isfinite(updated):
        raise StateError("'updated_at' must be a finite number")
    if updated > now + max_clock_skew_s:
        raise StateError(f"'updated_at' is {updated - now:.0f} s in the future")
    weights = state.get("weights")
    if not isinstance(weights, Mapping) or not weights:
        raise StateError("'weights' must be an object of arrays")
    for name, arr in weights.items():
        _finite(f"weights {name!r}", arr)
    scaler = state.get("scaler")
    if not isinstance(scaler, Mapping):
        raise StateError("'scaler' must be an object")
    for name, arr in scaler.items():
        _finite(f"scaler {name!r}", arr)
    if "target" in state:
        _finite("target statistics", state["target"])
    if "mix" in state:
        _finite("mixture gap", state["mix"])
    metrics = state.get("metrics")
    if isinstance(metrics, Mapping):
        for name in ("y", "p"):
            if name in metrics:
                _finite(f"metrics {name!r}", metrics[name])


@dataclass
class StoreStats:
    """Outcome counts of :meth:`ModelStore.offer`.

    Examples
    --------
    >>> StoreStats().accepted
    0
    """

    accepted: int = 0
    rejected: int = 0
    duplicate: int = 0
    stale: int = 0
    removed: int = 0
    last_error: str = ""
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


class ModelStore:
    """Latest model per name, built from replica snapshots and swapped atomically.

    Keys are ``"<model>/<replica>"`` (the Kafka message key).  Bad payloads are
    logged and counted, never raised.

    Parameters
    ----------
    device
        Where served models compute (``cpu``: scoring single requests does not
        pay for a GPU round trip).
    policy
        What is accepted: signatures, configured specs, size bounds.
    clock, monotonic
        Time sources, injectable for tests.

    Examples
    --------
    >>> from streamlearn.config import ModelSpec
    >>> spec = ModelSpec(name="m", topic="t", numeric=("x",), label="y", hash_bits=2)
    >>> model = OnlineModel(spec, device="cpu")
    >>> batch, _ = model.vectorizer.transform_many([{"x": 1.0, "y": 1}, {"x": -1.0, "y": 0}])
    >>> _ = model.process(batch)
    >>> store = ModelStore()
    >>> store.offer("m/r1", snapshots.encode(model.to_state()))
    True
    >>> served = store.get("m")
    >>> served.version, sorted(served.replicas), store.names()
    (1, ['r1'], ['m'])
    >>> store.offer("m/r1", b"garbage"), store.stats.rejected
    (False, 1)
    >>> store.get("m") is served
    True
    """

    def __init__(
        self,
        *,
        device: str = "cpu",
        policy: SnapshotPolicy | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self.policy = policy if policy is not None else SnapshotPolicy()
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._shards: dict[str, dict[str, _Shard]] = {}
        # Copy-on-write: readers take this reference without locking.
        self._served: Mapping[str, Served] = MappingProxyType({})
        # Merging many shards of a large model costs (bench_merge: ~0.6 s at 2^22): a
        # model whose last build took longer than MERGE_DEFER_S is rebuilt at most once
        # per MERGE_BUDGET x that time; offers meanwhile only update its shards (dirty).
        self._build_cost: dict[str, float] = {}
        self._built_at: dict[str, float] = {}
        self._dirty: set[str] = set()
        self.stats = StoreStats()

    # -- reads (lock-free) -----------------------------------------------------
    def get(self, name: str) -> Served | None:
        """The served model for ``name``, or ``None``."""
        return self._served.get(name)

    def names(self) -> list[str]:
        """Names of the served models, sorted."""
        return sorted(self._served)

    def all(self) -> list[Served]:
        """Every served model, sorted by name."""
        served = self._served
        return [served[n] for n in sorted(served)]

    def __len__(self) -> int:
        return len(self._served)

    # -- writes ----------------------------------------------------------------
    def offer(self, key: str, payload: bytes | None) -> bool:
        """Decode and serve one snapshot; return True when the served model changed."""
        return self.submit(key, payload) == "accepted"

    def screen(self, key: str, value: bytes | None) -> str | None:
        """Cheap checks of a raw Kafka record (key, tombstone, size, signature).

        Returns ``None`` when the record may be decoded, else the reason it was
        refused (counted and logged).  The snapshot feed screens every record, so
        an unauthenticated one never supersedes an authentic one.
        """
        try:
            if value is None:
                # A tombstone cannot carry a signature, so it cannot be trusted to
                # delete a served model; retiring a replica is an operator action.
                return self.count_reject(key, "tombstone", "null value ignored")
            name, replica = _split_key(key)
            if not _NAME.match(name) or not _REPLICA.match(replica):
                return self.count_reject(key, "bad_key", "key must be '<model>/<replica>'")
            if self.policy.specs is not None and name not in self.policy.specs:
                return self.count_reject(key, "unknown_model",
                                         f"no model {name!r} is configured here")
            if len(value) > self.policy.limits.max_payload_bytes:
                return self.count_reject(key, "too_large", f"{len(value)} bytes, over the "
                                         f"limit of {self.policy.limits.max_payload_bytes}")
            snapshots.verify(value, self.policy.key, context=key,
                             require=self.policy.signatures_required)
        except snapshots.SnapshotError as exc:
            return self.count_reject(key, exc.reason, str(exc))
        except Exception as exc:  # noqa: BLE001 - no record may raise out of the store
            return self.count_reject(key, "internal_error", f"{type(exc).__name__}: {exc}")
        return None

    def submit(self, key: str, payload: bytes | None) -> str:
        """Like :meth:`offer`, with the outcome: ``accepted``, ``duplicate``,
        ``stale`` or ``rejected:<reason>``."""
        reason = self.screen(key, payload)
        if reason is not None:
            return f"rejected:{reason}"
        assert payload is not None
        try:
            crc = zlib.crc32(payload)
            name, replica = _split_key(key)
            current = self._shards.get(name, {}).get(replica)
            if current is not None and current.crc == crc:
                self.stats.duplicate += 1
                return "duplicate"
            state = snapshots.decode(
                payload, key=self.policy.key, context=key,
                require_signature=self.policy.signatures_required,
                limits=self.policy.limits, vet=lambda meta: self._vet(name, meta),
            )
        except snapshots.SnapshotError as exc:
            return "rejected:" + self.count_reject(key, exc.reason, str(exc))
        except Exception as exc:  # noqa: BLE001 - MemoryError, anything: count, never raise
            return "rejected:" + self.count_reject(key, "internal_error",
                                                   f"{type(exc).__name__}: {exc}")
        return self._offer_state(key, state, crc=crc, size=len(payload))

    def offer_state(
        self, key: str, state: dict[str, Any], *, crc: int | None = None, size: int = 0
    ) -> bool:
        """Serve an already decoded snapshot state (see :meth:`offer`)."""
        return self._offer_state(key, state, crc=crc, size=size) == "accepted"

    def _vet(self, name: str, meta: dict[str, Any]) -> snapshots.Limits:
        """Check a snapshot's spec from its metadata, before any array is decoded."""
        spec = self._spec_of(name, meta)
        if model_bytes(spec) > self.policy.limits.max_decoded_bytes:
            raise snapshots.SnapshotError(
                f"a model of this spec needs {model_bytes(spec)} bytes, over the limit of "
                f"{self.policy.limits.max_decoded_bytes}", "too_large")
        return state_limits(spec, self.policy.limits)

    def _spec_of(self, name: str, state: Mapping[str, Any]) -> ModelSpec:
        raw = state.get("spec")
        try:
            spec = ModelSpec.from_dict(dict(raw))  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - any malformed spec is one reason
            raise snapshots.SnapshotError(f"snapshot has no valid model spec: {exc}",
                                          "invalid_state") from None
        if spec.name != name:
            raise snapshots.SnapshotError(
                f"key names {name!r}, state names {spec.name!r}", "name_mismatch")
        expected = None if self.policy.specs is None else self.policy.specs.get(name)
        if self.policy.specs is not None and expected is None:
            raise snapshots.SnapshotError(f"no model {name!r} is configured here",
                                          "unknown_model")
        if expected is not None and _spec_identity(spec) != _spec_identity(expected):
            diff = [f for f in SERVING_FIELDS if getattr(spec, f) != getattr(expected, f)]
            raise snapshots.SnapshotError(
                f"snapshot spec differs from the configured model in {diff}", "spec_mismatch")
        return spec

    def _offer_state(
        self, key: str, state: dict[str, Any], *, crc: int | None = None, size: int = 0
    ) -> str:
        try:
            return self._offer_checked(key, state, crc=crc, size=size)
        except snapshots.SnapshotError as exc:
            reason = exc.reason
            message = str(exc)
        except (StateError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                OverflowError, ZeroDivisionError, RecursionError) as exc:
            reason, message = "invalid_state", f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - MemoryError, numba errors: never raise
            reason, message = "internal_error", f"{type(exc).__name__}: {exc}"
        return "rejected:" + self.count_reject(key, reason, message)

    def _offer_checked(
        self, key: str, state: dict[str, Any], *, crc: int | None, size: int
    ) -> str:
        name, replica = _split_key(key)
        if not _NAME.match(name) or not _REPLICA.match(replica):
            return "rejected:" + self.count_reject(key, "bad_key",
                                                   "key must be '<model>/<replica>'")
        if not isinstance(state, dict) or state.get("kind") != "streamlearn.model":
            raise StateError("payload is not a streamlearn model state")
        spec = self._spec_of(name, state)
        if model_bytes(spec) > self.policy.limits.max_decoded_bytes:
            raise snapshots.SnapshotError("model too large for the configured limits",
                                          "too_large")
        validate_state(state, now=self._clock(), max_clock_skew_s=self.policy.max_clock_skew_s)
        shard_model = OnlineModel.from_state(state, device=self.device, serving=True)
        meta = merging.meta(state)
        summary = Replica(
            replica=replica,
            version=shard_model.version,
            n_seen=shard_model.n_seen,
            n_learned=shard_model.n_learned,
            updated_at=shard_model.updated_at,
            received_at=self._clock(),
            telemetry=clean_telemetry(state.get("telemetry")),
            metrics=shard_model.metrics.report(),
            size_bytes=size,
            partitions=tuple(int(p) for p in meta.get("partitions", ()))[:4096],
            adopted_version=int(meta.get("adopted_version", meta.get("merged_version", 0))),
            published_at=float(meta.get("published_at", meta.get("merged_at", 0.0))),
            labels=shard_model.pending.report(),
            aggregates={} if shard_model.aggregates is None else shard_model.aggregates.report(),
        )
        shard = _Shard(key, state, summary, crc if crc is not None else -1, shard_model)
        with self._lock:
            shards = dict(self._shards.get(name, {}))
            old = shards.get(replica)
            if old is None and len(shards) >= self.policy.max_replicas:
                return "rejected:" + self.count_reject(
                    key, "too_many_replicas",
                    f"model {name!r} already has {len(shards)} replicas")
            if (
                old is not None
                and summary.version < old.summary.version
                and summary.updated_at < old.summary.updated_at
            ):
                self.stats.stale += 1
                log.info("ignoring stale snapshot %s v%d (have v%d)", key, summary.version,
                         old.summary.version)
                return "stale"
            shards[replica] = shard
            spec_dict = state["spec"]
            dropped = [r for r, s in shards.items() if s.state["spec"] != spec_dict]
            for r in dropped:
                log.warning("dropping replica %s/%s: its spec differs from the newest", name, r)
                del shards[r]
            if self._defer(name):
                self._shards[name] = shards
                self._dirty.add(name)
                self.stats.accepted += 1
                return "accepted"
            try:
                served = self._timed_build(name, shards)
            except Exception as exc:  # noqa: BLE001 - a bad merge keeps the old model
                return "rejected:" + self.count_reject(key, "merge_failed",
                                                       f"{type(exc).__name__}: {exc}")
            self._shards[name] = shards
            self._publish(name, served)
            self.stats.accepted += 1
        log.info("serving %s v%d from %d replica(s)", name, served.version, len(shards))
        return "accepted"

    def _defer(self, name: str) -> bool:
        cost = self._build_cost.get(name, 0.0)
        return (cost > MERGE_DEFER_S and name in self._served
                and self._monotonic() - self._built_at.get(name, 0.0) < MERGE_BUDGET * cost)

    def _timed_build(self, name: str, shards: dict[str, _Shard]) -> Served:
        t0 = time.perf_counter()
        served = self._build(name, shards)
        self._build_cost[name] = time.perf_counter() - t0
        self._built_at[name] = self._monotonic()
        self._dirty.discard(name)
        return served

    def remove(self, key: str) -> bool:
        """Forget one replica (a tombstone); the model is rebuilt from the others."""
        name, replica = _split_key(key)
        with self._lock:
            shards = dict(self._shards.get(name, {}))
            if shards.pop(replica, None) is None:
                return False
            self.stats.removed += 1
            if not shards:
                self._shards.pop(name, None)
                self._served = MappingProxyType(
                    {k: v for k, v in self._served.items() if k != name}
                )
                return True
            self._shards[name] = shards
            self._publish(name, self._build(name, shards))
        return True

    def refresh(self) -> list[str]:
        """Rebuild the models whose set of fresh shards changed with time (a replica went
        quiet past ``policy.stale_after_s``), or whose costly rebuild was deferred and is
        due; returns their names. Cheap when none is."""
        changed = []
        with self._lock:
            for name, shards in self._shards.items():
                served = self._served.get(name)
                fresh = tuple(sorted(self._fresh(shards)))
                if name not in self._dirty and (served is None or fresh == tuple(sorted(
                        r for r in served.replicas if r not in served.stale))):
                    continue
                if name in self._dirty and self._defer(name):
                    continue
                try:
                    self._publish(name, self._timed_build(name, shards))
                except Exception as exc:  # noqa: BLE001 - keep the old model
                    self.count_reject(f"{name}/*", "merge_failed", f"{type(exc).__name__}: {exc}")
                    continue
                changed.append(name)
        for name in changed:
            log.warning("rebuilt %s: replica shards went stale", name)
        return changed

    # -- internals ---------------------------------------------------------------
    def _fresh(self, shards: Mapping[str, _Shard]) -> list[str]:
        """Replica shards (the merged model aside) refreshed within the staleness bound."""
        bound = self.policy.stale_after_s
        now = self._clock()
        return [r for r, s in shards.items() if r != merging.MERGED
                and (bound is None or s.summary.staleness_s(now) <= bound)]

    def _build(self, name: str, shards: dict[str, _Shard]) -> Served:
        merged = shards.get(merging.MERGED)
        live = {r: s for r, s in shards.items() if r != merging.MERGED}
        fresh = sorted(self._fresh(shards))
        stale = tuple(sorted(set(live) - set(fresh)))
        chained = merged is not None or any(merging.meta(s.state) for s in live.values())
        use = [live[r] for r in fresh]
        in_merge: tuple[str, ...] = tuple(fresh)
        if not chained:  # shards of workers that do not merge: the weighted average
            if not use:  # all stale: serve the newest rather than nothing
                use = [max(live.values(), key=lambda s: s.summary.updated_at)]
                in_merge = ()
            model = (use[0].model if len(use) == 1 else OnlineModel.from_state(
                merge_states([s.state for s in use]), device=self.device, serving=True))
        else:
            base = merged.state if merged is not None else OnlineModel(
                self._spec_of(name, next(iter(live.values())).state), device="cpu").to_state()
            names = merging.eligible(base, {r: live[r].state for r in fresh})
            in_merge = tuple(names)
            if not names:
                model = merged.model if merged is not None else use[0].model if use else max(
                    live.values(), key=lambda s: s.summary.updated_at).model
            elif len(names) == 1 and merged is None and len(fresh) == 1:
                model = live[names[0]].model  # one replica, nothing merged yet: its own state
            else:
                state = merging.merge(base, {r: live[r].state for r in names},
                                      merged_by="api", now=self._clock())
                model = OnlineModel.from_state(state, device=self.device, serving=True)
        parts = [live[r] for r in fresh] or list(live.values())
        if len(parts) > 1 or model is not parts[0].model:
            # Each replica holds the entities and the waiting events of its partitions.
            model = _with_replica_parts(model, [s.model for s in parts],
                                        [s.state for s in parts], list(shards.values()))
        telemetry = (parts[0].summary.telemetry if len(parts) == 1 else
                     sum_telemetry([s.summary.telemetry for s in parts]))
        info = model.info()
        ordered = [live[r] for r in sorted(live)]
        return Served(
            name=name,
            model=model,
            version=model.version,
            updated_at=model.updated_at,
            loaded_at=self._clock(),
            loaded_monotonic=self._monotonic(),
            replicas=MappingProxyType({s.summary.replica: s.summary for s in ordered}),
            telemetry=telemetry,
            info=info,
            merged_version=merging.merged_version(merged.state) if merged is not None else 0,
            in_merge=in_merge,
            stale=stale,
        )

    def _publish(self, name: str, served: Served) -> None:
        self._served = MappingProxyType({**self._served, name: served})

    def count_reject(self, key: str, reason: str, message: str) -> str:
        """Count and log (at most once a minute per reason) a refused snapshot; return reason."""
        key = key[:300]
        with self._stats_lock:  # not self._lock: rejects are counted while it is held
            self.stats.rejected += 1
            self.stats.rejected_by_reason[reason] = (
                self.stats.rejected_by_reason.get(reason, 0) + 1)
            self.stats.last_error = f"{key}: {message}"[:1000]
        _reject_log.warning(reason, "rejected snapshot %s (%s): %s", key, reason,
                            message[:500], snapshot_key=key, reason=reason)
        return reason


def _with_replica_parts(model: OnlineModel, shards: list[OnlineModel],
                        states: list[dict[str, Any]], cached: list[_Shard]) -> OnlineModel:
    """``model`` serving the union of the replicas' entity aggregates and reporting the
    sum of their label counters (a model ``cached`` for a shard is copied, not changed:
    requests may be reading it)."""
    mine = [s.state for s in cached if s.model is model]
    if mine:
        model = OnlineModel.from_state(mine[0], device=model.backend.name, serving=True)
    if model.aggregates is not None:
        union = aggregates.union([s.get("aggregates") for s in states], model.spec)
        if union is not None:
            model.aggregates.load(union)
    summed = labels.sum_reports([m.pending.report() for m in shards])
    model.pending.counts = {k: summed[k] for k in model.pending.counts}
    model.pending.waiting = sum(len(m.pending) for m in shards)
    return model


def _split_key(key: str) -> tuple[str, str]:
    name, _, replica = key.partition("/")
    return name, replica or "default"


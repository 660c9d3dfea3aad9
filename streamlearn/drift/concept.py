"""Concept drift: river's detectors watching the prequential loss stream.

The detector sees one value per mini-batch (the batch's mean pre-update loss),
not one per event: a batch mean is a smoother signal, and the cost stays
constant per batch at a million events a second.

``river.drift`` is imported on first use, not with this module: it pulls
scipy.stats, scikit-learn and pandas (seconds of CPU).  A process that must not
wait for it (the worker) calls :func:`load_detectors_in_background` early;
until that import finishes, monitors queue their values and replay them in
order once it has.
"""

from __future__ import annotations

import collections
import importlib
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

#: Detector names, checked without importing river.
DETECTORS: tuple[str, ...] = ("adwin", "page_hinkley", "kswin")
#: Parameters a detector gets unless the spec says otherwise.  The detectors see one
#: value per mini-batch, not per event, so: ADWIN checks for a cut at every value
#: (``clock=1``; its default of 32 would check every 8,192 events); Page-Hinkley watches
#: rises only (a falling loss is no harm) with a threshold in batch-loss units;
#: KSWIN tests its window at every value, so its level is strict (1e-5) against
#: repeated-test false alarms, and its random reference sample is seeded.
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "adwin": {"clock": 1},
    "page_hinkley": {"mode": "up", "threshold": 1.0, "min_instances": 10},
    "kswin": {"alpha": 1e-5, "seed": 42},
}
#: Events after a start (or an action) during which losses are not fed to the detector
#: (:meth:`ConceptDriftMonitor.for_spec`): a model that is still learning has a falling
#: loss, which a detector would report as drift.  ``drift_params.warmup`` overrides it.
WARMUP_EVENTS = 10_000
#: Weight of each batch loss in the slow average that tells a rise from a fall.
SLOW_ALPHA = 0.05
#: Batch losses averaged for the level after a change.
RECENT_BATCHES = 4
#: Values a monitor queues while river loads; past this, ``update`` waits for the import.
MAX_PENDING = 100_000
#: Drift points, times and directions kept (in memory and in snapshots).
RECENT_DRIFTS = 20


def _int_in(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _real_in(lo: float, hi: float, *, open_lo: bool = False) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        return (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                and (lo < v if open_lo else lo <= v) and v <= hi)
    return ok


#: The river parameters a snapshot may set, and their usable values.  river builds the
#: detector on the first update, past any caller's check: a value out of these ranges
#: panicked in ADWIN's Rust core (clock 0, max_buckets 0), aborted the process
#: (max_buckets 10**9: an allocation of its buckets), or raised a TypeError (an unknown
#: name) in the learning call.
DETECTOR_PARAMS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "adwin": {"delta": _real_in(0.0, 1.0, open_lo=True), "clock": _int_in(1, 1_000_000),
              "max_buckets": _int_in(1, 1_000), "min_window_length": _int_in(0, 1_000_000),
              "grace_period": _int_in(0, 1_000_000)},
    "page_hinkley": {"min_instances": _real_in(0.0, 1e9), "delta": _real_in(0.0, math.inf),
                     "threshold": _real_in(0.0, math.inf, open_lo=True),
                     "alpha": _real_in(0.0, 1.0, open_lo=True),
                     "mode": lambda v: v in ("up", "down", "both")},
    "kswin": {"alpha": _real_in(0.0, 1.0, open_lo=True), "window_size": _int_in(2, 100_000),
              "stat_size": _int_in(1, 100_000),
              "seed": lambda v: v is None or _int_in(-(2**63), 2**63 - 1)(v)},
}


def check_params(detector: str, params: dict[str, Any]) -> None:
    """``ValueError`` naming what river could not run: an unknown detector, parameters
    unknown or out of :data:`DETECTOR_PARAMS`' ranges, a KSWIN sample over half its
    window (its sample of the older half then raised in the learning call)."""
    if detector not in DETECTORS:
        raise ValueError(f"unknown drift detector {detector!r}; choose from {sorted(DETECTORS)}")
    rules = DETECTOR_PARAMS[detector]
    bad = sorted(str(k) for k, v in params.items() if k not in rules or not rules[k](v))
    if bad:
        raise ValueError(f"parameters {bad} of drift detector {detector!r} are unknown or "
                         f"out of range (known: {sorted(rules)})")
    merged = {**DEFAULT_PARAMS[detector], **params}
    if detector == "kswin" and 2 * merged.get("stat_size", 30) > merged.get("window_size", 100):
        raise ValueError("drift detector 'kswin': stat_size must be at most half its "
                         "window_size (river's defaults: 30 of 100)")


def detector_class(name: str) -> type:
    """River's detector class for ``name``, importing ``river.drift`` if needed."""
    drift = importlib.import_module("river.drift")
    return {"adwin": drift.ADWIN, "page_hinkley": drift.PageHinkley, "kswin": drift.KSWIN}[name]


class DetectorLoader:
    """Runs ``load`` (the import of ``river.drift``) once, on a daemon thread."""

    def __init__(self, load: Callable[[], object] | None = None) -> None:
        self._load = load or (lambda: importlib.import_module("river.drift"))
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.deferred = False  # a later start() is promised: monitors queue meanwhile
        self.done = threading.Event()
        self.error: BaseException | None = None

    def start(self) -> None:
        """Start the import unless it has already been started (thread-safe)."""
        with self._lock:
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._run, name="import-river-drift", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the next update
            self.error = exc
        finally:
            self.done.set()

    @property
    def loading(self) -> bool:
        """Started or deferred, and not finished yet."""
        return (self.deferred or self.thread is not None) and not self.done.is_set()


_loader = DetectorLoader()


def load_detectors_in_background() -> None:
    """Start importing ``river.drift`` on a daemon thread (idempotent).

    Monitors updated meanwhile queue their values instead of blocking; without
    this call, the first update imports river on the caller's thread.
    """
    _loader.start()


def detectors_ready() -> bool:
    """Whether river's detectors are imported (monitors then feed, never queue)."""
    return _loader.done.is_set() and _loader.error is None


def defer_detector_import() -> None:
    """Promise a later :func:`load_detectors_in_background`: monitors queue until then.

    For a process that has better uses for the GIL first (the worker, until it has
    caught up with its backlog); a monitor that queues ``MAX_PENDING`` values starts
    the import itself.
    """
    _loader.deferred = True


class ConceptDriftMonitor:
    """Count and locate drifts of the loss stream.

    Detector internals are not snapshotted (they would need pickle, which must
    never be read from a topic); a restored monitor keeps its counts and starts
    a fresh detector.  The detector is built on the first update (so invalid
    ``params`` surface there); values queued while river loads in the
    background are detector input too, and are not snapshotted either.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> losses = np.r_[rng.normal(0.1, 0.02, 300), rng.normal(0.6, 0.02, 300)]
    >>> m = ConceptDriftMonitor("adwin")
    >>> for i, loss in enumerate(losses):
    ...     _ = m.update(float(loss), events_seen=(i + 1) * 256)
    >>> m.n_drifts, m.drift_points[0] // 256, m.last_direction
    (1, 321, 'up')
    """

    def __init__(self, detector: str = "adwin", warmup: int = 0, batch: int = 0,
                 **params: Any) -> None:
        # river checks nothing until its detector sees a value, inside the learning call
        check_params(detector, params)
        self.detector_name = detector
        self.warmup = int(warmup)
        self.batch = int(batch)  # labelled rows per detector value (0: one per update)
        if self.warmup < 0 or self.batch < 0:  # a negative batch never filled its pool
            raise ValueError(f"drift warmup and batch must be >= 0, got {warmup}, {batch}")
        self._pool_sum, self._pool_n = 0.0, 0
        self.params = {**DEFAULT_PARAMS.get(detector, {}), **params}
        self.detector: Any = None  # river's detector, built by the first update
        # (loss, events_seen, arrival time) while river loads
        self.pending: list[tuple[float, int, float]] = []
        self.n_drifts = 0
        self.drift_points: list[int] = []  # events seen at each detection, newest last
        self.drift_times: list[float] = []  # wall-clock time of each detection, newest last
        self.n_updates = 0  # batch losses fed since the detector was (re)built
        self.last_loss: float | None = None
        self.loss_total = 0.0  # every batch loss fed, for the checkpoints' loss
        self.loss_count = 0
        self.directions: list[str] = []  # "up" (the loss rose) or "down", per drift point
        self._start: int | None = None  # events seen when feeding (re)started
        self._warmup_now = self.warmup
        self._restored_state: dict[str, float] = {}  # from a snapshot, until a detector runs
        self._restored_queued = 0  # values the snapshot's monitor had queued
        self._slow: float | None = None
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT_BATCHES)
        self._drifted = False

    def update(self, loss: float, events_seen: int, weight: int = 1) -> bool:
        """Feed one batch-mean loss over ``weight`` labelled rows; True when this call
        detected a drift (:meth:`update_many` with one value)."""
        return self.update_many((loss,), (events_seen,), (weight,))

    def update_many(self, losses: Iterable[float], events_seen: Iterable[int],
                    weights: Iterable[int]) -> bool:
        """Feed chunk-mean losses in order, each over its ``weights`` labelled rows and
        stamped with the events seen at its end; True when one of them was a drift.

        With :attr:`batch` set, the detector sees one value per ``batch`` labelled rows
        whatever the chunking: a chunk's mean stands for each of its rows, split across
        values at ``batch``-row boundaries.  A worker's partial mini-batch (a job of 300
        messages ends with a 44-row chunk) is then no noisy value of its own, and a
        detector accumulates evidence per event, not per call.  While river loads in
        the background values are queued; the first call after the import feeds the
        queue in order, then this call's values.  One call per ``process_many``, not
        one per chunk: the per-call bookkeeping cost 10% of learning a narrow stream.
        """
        values: list[tuple[float, int]] = []
        for loss, seen, weight in zip(losses, events_seen, weights, strict=True):
            self.last_loss = loss
            self.loss_total += loss
            self.loss_count += 1
            if not self.batch:
                values.append((loss, seen))
                continue
            left = max(1, int(weight))
            while left:
                take = min(left, self.batch - self._pool_n)
                self._pool_sum += loss * take
                self._pool_n += take
                left -= take
                if self._pool_n >= self.batch:
                    values.append((self._pool_sum / self._pool_n, seen))
                    self._pool_sum, self._pool_n = 0.0, 0
        now = time.time()
        if self.detector is None:
            if _loader.loading and len(self.pending) + len(values) <= MAX_PENDING:
                self.pending.extend((v, seen, now) for v, seen in values)
                self._drifted = False
                return False
            if not values and not self.pending:
                self._drifted = False
                return False
            self._build()
        drifted = False
        if self.pending:
            queued, self.pending = self.pending, []
            for value, seen, at in queued:
                drifted |= self._feed(value, seen, at)
        for value, seen in values:
            drifted |= self._feed(value, seen, now)
        self._drifted = drifted
        return drifted

    def replay(self) -> bool:
        """Feed the values queued while river loaded, once it has (never waits for it).

        For a worker whose stream paused before the import ended: without a next update
        the queue would wait for the next event.  True when a queued value was a drift.
        """
        if not self.pending or not detectors_ready():
            return False
        if self.detector is None:
            self._build()
        queued, self.pending = self.pending, []
        drifted = False
        for value, seen, at in queued:
            drifted |= self._feed(value, seen, at)
        self._drifted = drifted
        return drifted

    @classmethod
    def for_spec(cls, spec: Any) -> ConceptDriftMonitor:
        """The detector a :class:`~streamlearn.config.ModelSpec` names, with its params."""
        params = {"warmup": WARMUP_EVENTS, "batch": spec.batch_size, **dict(spec.drift_params)}
        return cls(spec.drift_detector, **params)

    def restart(self, warmup: int | None = None) -> None:
        """Forget the loss history (a fresh detector), keeping counts: after an action
        the loss stream starts over, and its transient must not read as a new drift.

        ``warmup``: events to wait before feeding the detector again (default
        :attr:`warmup`: a reset's fresh weights have a learning curve; a rollback's
        transient is shorter).
        """
        self._warmup_now = self.warmup if warmup is None else min(int(warmup), self.warmup)
        if self.detector is not None:
            self.detector = detector_class(self.detector_name)(**self.params)
        self.pending = []
        self.n_updates = 0
        self._start, self._slow = None, None
        self._recent.clear()

    def _build(self) -> None:
        if _loader.deferred:  # past MAX_PENDING: start it now if still deferred
            _loader.start()
        if _loader.thread is not None:  # done, or past MAX_PENDING: wait for it
            _loader.done.wait()
        if _loader.error is not None:
            raise _loader.error
        self.detector = detector_class(self.detector_name)(**self.params)

    def _feed(self, loss: float, events_seen: int, at: float) -> bool:
        if self._start is None:
            self._start = events_seen
        if events_seen - self._start < self._warmup_now:
            return False
        self.detector.update(loss)
        self.n_updates += 1
        self._recent.append(loss)
        slow = loss if self._slow is None else self._slow
        self._slow = slow + SLOW_ALPHA * (loss - slow)
        if self.detector.drift_detected:
            self.n_drifts += 1
            keep = RECENT_DRIFTS - 1
            self.drift_points = [*self.drift_points[-keep:], events_seen]
            self.drift_times = [*self.drift_times[-keep:], at]
            rise = sum(self._recent) / len(self._recent) > slow
            self.directions = [*self.directions[-keep:], "up" if rise else "down"]
            return True
        return False

    @property
    def last_direction(self) -> str | None:
        """``up`` when the latest drift raised the loss, ``down`` when it lowered it."""
        return self.directions[-1] if self.directions else None

    @property
    def drift_detected(self) -> bool:
        """Whether the latest update detected a drift (replayed values included)."""
        return self._drifted

    def report(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "detector": self.detector_name,
            "params": dict(self.params),
            "drifts": self.n_drifts,
            "last_drift_at_event": self.drift_points[-1] if self.drift_points else None,
            "last_drift_at_time": self.drift_times[-1] if self.drift_times else None,
            "recent_drifts_at_event": list(self.drift_points),
            "recent_drifts_at_time": list(self.drift_times),
            "recent_drift_directions": list(self.directions),
            "warmup_events": self.warmup,
            "last_batch_loss": self.last_loss,
            "updates": self.n_updates,
            "loading": self.detector is None and bool(self.pending or self._restored_queued),
            "queued": len(self.pending) or self._restored_queued,
            "state": self.detector_state(),
        }

    def detector_state(self) -> dict[str, float]:
        """The detector's numbers worth showing (ADWIN's window; Page-Hinkley's sums).

        A monitor rebuilt from a snapshot has no detector yet: it shows the state the
        snapshot carried.
        """
        if self.detector is None:
            return dict(self._restored_state)
        state: dict[str, float] = {}
        for attr in ("width", "estimation", "variance", "_x_mean", "_sum_increase",
                     "_min_increase"):
            value = getattr(self.detector, attr, None)
            if hasattr(value, "get"):  # river's running statistics (Mean)
                value = value.get()
            if isinstance(value, int | float) and math.isfinite(value):
                state[attr.lstrip("_")] = float(value)
        return state

    def to_state(self) -> dict[str, Any]:
        """Counts and configuration (see the class note on detector internals)."""
        return {
            "detector": self.detector_name,
            "params": dict(self.params),
            "n_drifts": self.n_drifts,
            "drift_points": list(self.drift_points),
            "drift_times": list(self.drift_times),
            "directions": list(self.directions),
            "warmup": self.warmup,
            "batch": self.batch,
            "last_loss": self.last_loss,
            "updates": self.n_updates,
            "detector_state": self.detector_state(),
            "queued": len(self.pending),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ConceptDriftMonitor:
        """Rebuild with a fresh detector and the saved counts; ``ValueError`` for a state
        no monitor could have written (it would crash, hang or poison a later update)."""
        counts = {name: int(state.get(name, 0))
                  for name in ("warmup", "batch", "updates", "queued", "n_drifts")}
        negative = [name for name, v in counts.items() if v < 0]
        if negative:
            raise ValueError(f"concept drift state: {negative} must be >= 0")
        params = state.get("params", {})
        if not isinstance(params, dict):
            raise ValueError("concept drift state 'params' is not an object")
        detector = state.get("detector", "adwin")
        m = cls(detector, warmup=counts["warmup"], batch=counts["batch"], **params)
        directions = [str(d) for d in _recent(state, "directions")]
        if not set(directions) <= {"up", "down"}:
            raise ValueError("concept drift state: directions must be 'up' or 'down'")
        m.directions = directions
        m.n_updates = counts["updates"]
        m._restored_queued = counts["queued"]
        m._restored_state = {str(k): _finite(v, "detector_state") for k, v in
                             dict(state.get("detector_state", {})).items()}
        m.n_drifts = counts["n_drifts"]
        m.drift_points = [int(p) for p in _recent(state, "drift_points")]
        m.drift_times = [_finite(t, "drift_times") for t in _recent(state, "drift_times")]
        last = state.get("last_loss")
        m.last_loss = None if last is None else _finite(last, "last_loss")
        return m


def _recent(state: dict[str, Any], name: str) -> list[Any]:
    """The newest :data:`RECENT_DRIFTS` entries of list ``name`` (as the monitor keeps)."""
    value = state.get(name, [])
    if not isinstance(value, list):
        raise ValueError(f"concept drift state {name!r} is not a list")
    return value[-RECENT_DRIFTS:]


def _finite(value: Any, name: str) -> float:
    """``value`` as a finite float (reports and snapshots carry it on: NaN is no JSON)."""
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"concept drift state {name!r} holds NaN or infinite values")
    return x

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

import importlib
import threading
from collections.abc import Callable
from typing import Any

#: Detector names, checked without importing river.
DETECTORS: tuple[str, ...] = ("adwin", "page_hinkley")
#: Values a monitor queues while river loads; past this, ``update`` waits for the import.
MAX_PENDING = 100_000


def detector_class(name: str) -> type:
    """River's detector class for ``name``, importing ``river.drift`` if needed."""
    drift = importlib.import_module("river.drift")
    return {"adwin": drift.ADWIN, "page_hinkley": drift.PageHinkley}[name]


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
    >>> m.n_drifts, m.drift_points[0] // 256
    (1, 352)
    """

    def __init__(self, detector: str = "adwin", **params: Any) -> None:
        if detector not in DETECTORS:
            raise ValueError(
                f"unknown drift detector {detector!r}; choose from {sorted(DETECTORS)}"
            )
        self.detector_name = detector
        self.params = params
        self.detector: Any = None  # river's detector, built by the first update
        self.pending: list[tuple[float, int]] = []  # (loss, events_seen) while river loads
        self.n_drifts = 0
        self.drift_points: list[int] = []  # events seen at each detection, newest last
        self.last_loss: float | None = None
        self._drifted = False

    def update(self, loss: float, events_seen: int) -> bool:
        """Feed one batch-mean loss; True when this call detected a drift.

        While river loads in the background the value is queued; the first call
        after the import feeds the queue in order, then this value.
        """
        self.last_loss = loss
        if self.detector is None:
            if _loader.loading and len(self.pending) < MAX_PENDING:
                self.pending.append((loss, events_seen))
                self._drifted = False
                return False
            self._build()
        drifted = False
        if self.pending:
            queued, self.pending = self.pending, []
            for value, seen in queued:
                drifted |= self._feed(value, seen)
        self._drifted = drifted | self._feed(loss, events_seen)
        return self._drifted

    def _build(self) -> None:
        if _loader.deferred:  # past MAX_PENDING: start it now if still deferred
            _loader.start()
        if _loader.thread is not None:  # done, or past MAX_PENDING: wait for it
            _loader.done.wait()
        if _loader.error is not None:
            raise _loader.error
        self.detector = detector_class(self.detector_name)(**self.params)

    def _feed(self, loss: float, events_seen: int) -> bool:
        self.detector.update(loss)
        if self.detector.drift_detected:
            self.n_drifts += 1
            self.drift_points = [*self.drift_points[-19:], events_seen]
            return True
        return False

    @property
    def drift_detected(self) -> bool:
        """Whether the latest update detected a drift (replayed values included)."""
        return self._drifted

    def report(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "detector": self.detector_name,
            "drifts": self.n_drifts,
            "last_drift_at_event": self.drift_points[-1] if self.drift_points else None,
            "recent_drifts_at_event": list(self.drift_points),
            "last_batch_loss": self.last_loss,
        }

    def to_state(self) -> dict[str, Any]:
        """Counts and configuration (see the class note on detector internals)."""
        return {
            "detector": self.detector_name,
            "params": dict(self.params),
            "n_drifts": self.n_drifts,
            "drift_points": list(self.drift_points),
            "last_loss": self.last_loss,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ConceptDriftMonitor:
        """Rebuild with a fresh detector and the saved counts."""
        m = cls(state.get("detector", "adwin"), **state.get("params", {}))
        m.n_drifts = int(state.get("n_drifts", 0))
        m.drift_points = [int(p) for p in state.get("drift_points", [])]
        m.last_loss = state.get("last_loss")
        return m

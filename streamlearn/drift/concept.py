"""Concept drift: river's detectors watching the prequential loss stream.

The detector sees one value per mini-batch (the batch's mean pre-update loss),
not one per event: a batch mean is a smoother signal, and the cost stays
constant per batch at a million events a second.
"""

from __future__ import annotations

from typing import Any

from river import drift

DETECTORS = {"adwin": drift.ADWIN, "page_hinkley": drift.PageHinkley}


class ConceptDriftMonitor:
    """Count and locate drifts of the loss stream.

    Detector internals are not snapshotted (they would need pickle, which must
    never be read from a topic); a restored monitor keeps its counts and starts
    a fresh detector.

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
        self.detector = DETECTORS[detector](**params)
        self.n_drifts = 0
        self.drift_points: list[int] = []  # events seen at each detection, newest last
        self.last_loss: float | None = None

    def update(self, loss: float, events_seen: int) -> bool:
        """Feed one batch-mean loss; True when this value triggered a drift."""
        self.last_loss = loss
        self.detector.update(loss)
        if self.detector.drift_detected:
            self.n_drifts += 1
            self.drift_points = [*self.drift_points[-19:], events_seen]
            return True
        return False

    @property
    def drift_detected(self) -> bool:
        """Whether the latest update was a drift."""
        return bool(self.detector.drift_detected)

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

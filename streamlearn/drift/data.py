"""Data drift per numeric feature: recent mean against a frozen reference window.

The score is the standardized mean shift ``|recent_mean - ref_mean| / ref_std``,
with the recent mean an exponentially weighted average of batch means
(half-life in events), so it needs no per-event work and no stored window.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit

from streamlearn.scaler import RunningStandardScaler


@njit(cache=True, nogil=True)
def _blend_batch_means(X, recent, halflife, size):  # pragma: no cover - compiled
    """Fold the feature means (NaN skipped) of each ``size``-row batch of ``X`` into ``recent``.

    An EWMA in place, one batch at a time.  The column sums repeat the first pass of
    ``kernels.cpu.scaler_update``: deriving the batch means from the scaler's
    before/after state instead was measured slower (seven small NumPy ops cost more
    than this compiled pass over a 256-row batch).
    """
    n, d = X.shape
    cnt = np.zeros(d)
    tot = np.zeros(d)
    for lo in range(0, n, size):
        cnt[:] = 0.0
        tot[:] = 0.0
        for r in range(lo, min(lo + size, n)):
            for j in range(d):
                x = X[r, j]
                if not math.isnan(x):
                    cnt[j] += 1.0
                    tot[j] += x
        for j in range(d):
            if cnt[j] > 0.0:
                batch_mean = tot[j] / cnt[j]
                if math.isnan(recent[j]):
                    recent[j] = batch_mean
                else:
                    alpha = 1.0 - 0.5 ** (cnt[j] / halflife)
                    recent[j] = (1 - alpha) * recent[j] + alpha * batch_mean


class DataDriftMonitor:
    """Standardized mean shift of each numeric feature.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> m = DataDriftMonitor(["a", "b"], reference_size=2000, halflife=500)
    >>> for _ in range(20):
    ...     m.update(rng.normal([0.0, 5.0], 1.0, size=(256, 2)))
    >>> m.report()["drifting"]
    []
    >>> for _ in range(10):
    ...     m.update(rng.normal([0.0, 8.0], 1.0, size=(256, 2)))
    >>> m.report()["drifting"], round(float(m.scores()[1]), 1)
    (['b'], 2.9)
    """

    def __init__(
        self,
        features: list[str],
        reference_size: int = 5000,
        halflife: float = 2000.0,
        threshold: float = 0.5,
    ) -> None:
        self.features = list(features)
        self.reference_size = reference_size
        self.halflife = halflife
        self.threshold = threshold
        self.reference = RunningStandardScaler(len(features))
        self.recent = np.full(len(features), np.nan)
        self.ready = not self.features  # the reference window is complete

    def update(self, X: np.ndarray, batch_size: int | None = None) -> None:
        """Fold raw numeric features (NaN = missing), as batches of ``batch_size`` rows.

        ``update(X, b)`` equals ``update`` on each ``b``-row slice of ``X`` in turn; the
        default is one batch.
        """
        n = X.shape[0]
        if n == 0 or not self.features:
            return
        size = batch_size or n
        start = 0
        while not self.ready and start < n:  # the batch that completes it is not blended
            self.reference.learn_many(X[start : start + size])
            self.ready = bool(self.reference.count.min() >= self.reference_size)
            start += size
        if start < n:
            _blend_batch_means(np.ascontiguousarray(X[start:], dtype=np.float64),
                               self.recent, float(self.halflife), size)

    def scores(self) -> np.ndarray:
        """Standardized mean shift per feature (NaN until the reference is complete)."""
        if not self.ready:
            return np.full(len(self.features), np.nan)
        return np.abs(self.recent - self.reference.mean) / self.reference.std

    def report(self) -> dict[str, Any]:
        """JSON-ready per-feature scores and the features above the threshold."""
        scores = self.scores()
        per = {
            name: {
                "score": None if np.isnan(s) else round(float(s), 4),
                "reference_mean": float(m),
                "reference_std": float(sd),
                "recent_mean": None if np.isnan(r) else float(r),
            }
            for name, s, m, sd, r in zip(
                self.features,
                scores,
                self.reference.mean,
                self.reference.std,
                self.recent,
                strict=True,
            )
        }
        return {
            "ready": self.ready,
            "threshold": self.threshold,
            "drifting": [
                n for n, s in zip(self.features, scores, strict=True) if s > self.threshold
            ],
            "features": per,
        }

    def to_state(self) -> dict[str, Any]:
        """Plain state for snapshots."""
        return {
            "features": self.features,
            "reference_size": self.reference_size,
            "halflife": self.halflife,
            "threshold": self.threshold,
            "reference": self.reference.to_state(),
            "recent": self.recent.copy(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DataDriftMonitor:
        """Rebuild from :meth:`to_state` output."""
        m = cls(
            list(state["features"]),
            int(state["reference_size"]),
            float(state["halflife"]),
            float(state["threshold"]),
        )
        m.reference = RunningStandardScaler.from_state(state["reference"])
        m.recent = np.asarray(state["recent"], dtype=np.float64).copy()
        m.ready = not m.features or bool(m.reference.count.min() >= m.reference_size)
        return m

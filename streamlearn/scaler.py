"""Running per-feature standardization, mergeable across replicas."""

from __future__ import annotations

from typing import Any

import numpy as np


class RunningStandardScaler:
    """Per-feature running mean and variance (Welford), merged exactly with Chan's formula.

    NaN inputs are treated as missing: they do not move the statistics, and
    :meth:`transform_many` imputes them with the running mean (a z-score of 0).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(5.0, 2.0, size=(1000, 2))
    >>> a, b = RunningStandardScaler(2), RunningStandardScaler(2)
    >>> a.learn_many(X[:300]); b.learn_many(X[300:])
    >>> a.merge(b)
    >>> bool(np.allclose(a.mean, X.mean(axis=0)) and np.allclose(a.var, X.var(axis=0)))
    True
    >>> a.transform_many(np.array([[np.nan, 5.0]])).round(1).tolist()
    [[0.0, 0.0]]
    """

    def __init__(self, n_features: int) -> None:
        self.n_features = n_features
        self.count = np.zeros(n_features)
        self.mean = np.zeros(n_features)
        self.m2 = np.zeros(n_features)
        self._std: np.ndarray | None = None  # cached until the statistics change

    @property
    def var(self) -> np.ndarray:
        """Population variance per feature (0 before two observations)."""
        return np.divide(self.m2, self.count, out=np.zeros_like(self.m2), where=self.count > 0)

    @property
    def std(self) -> np.ndarray:
        """Standard deviation, with 1 where it is still 0 so transforms stay finite."""
        if self._std is None:
            s = np.sqrt(self.var)
            s[s == 0] = 1.0
            self._std = s
        return self._std

    def learn_many(self, X: np.ndarray) -> None:
        """Fold a batch into the statistics (NaN entries skipped)."""
        if X.shape[0] == 0 or self.n_features == 0:
            return
        present = ~np.isnan(X)
        n_b = present.sum(axis=0).astype(np.float64)
        filled = np.where(present, X, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_b = np.where(n_b > 0, filled.sum(axis=0) / n_b, 0.0)
        dev = np.where(present, X - mean_b, 0.0)
        m2_b = (dev * dev).sum(axis=0)
        self._combine(n_b, mean_b, m2_b)

    def merge(self, other: RunningStandardScaler) -> None:
        """Fold another scaler's statistics into this one (exact, order-free)."""
        if other.n_features != self.n_features:
            raise ValueError(f"cannot merge {other.n_features} features into {self.n_features}")
        self._combine(other.count, other.mean, other.m2)

    def _combine(self, n_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a = self.count
        n = n_a + n_b
        safe_n = np.where(n > 0, n, 1.0)
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / safe_n)
        self.m2 = self.m2 + m2_b + delta * delta * (n_a * n_b / safe_n)
        self.count = n
        self._std = None

    def transform_many(self, X: np.ndarray) -> np.ndarray:
        """Z-scores as float32; missing values become 0 (the running mean)."""
        z = (X - self.mean) / self.std
        z[np.isnan(z)] = 0.0
        return z.astype(np.float32)

    def to_state(self) -> dict[str, Any]:
        """Plain state for snapshots."""
        return {"count": self.count.copy(), "mean": self.mean.copy(), "m2": self.m2.copy()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunningStandardScaler:
        """Rebuild from :meth:`to_state` output."""
        mean = np.asarray(state["mean"], dtype=np.float64)
        scaler = cls(len(mean))
        scaler.count = np.asarray(state["count"], dtype=np.float64).copy()
        scaler.mean = mean.copy()
        scaler.m2 = np.asarray(state["m2"], dtype=np.float64).copy()
        return scaler

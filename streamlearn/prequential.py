"""Rolling prequential (test-then-train) metrics over a fixed window of recent events."""

from __future__ import annotations

from typing import Any

import numpy as np

_EPS = 1e-7


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) statistic, ties averaged; NaN if one class.

    Examples
    --------
    >>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    y = np.asarray(y) > 0.5
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    sorted_p = np.asarray(p)[order]
    ranks = np.empty(len(p), dtype=np.float64)
    # Average ranks over runs of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_p)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(p)]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class PrequentialMetrics:
    """Rolling log loss and ROC AUC (binary, ranking) or MAE (regression).

    Keeps the last ``window`` (label, prediction) pairs in a ring buffer;
    the metrics are computed on demand, so updates cost one copy.

    Examples
    --------
    >>> m = PrequentialMetrics("binary", window=4)
    >>> m.update(np.array([0, 1, 1, 0, 1]), np.array([0.2, 0.9, 0.6, 0.4, 0.7]))
    >>> r = m.report()
    >>> r["n"], r["window"], r["auc"]
    (5, 4, 1.0)
    """

    def __init__(self, task: str, window: int = 10_000) -> None:
        self.task = task
        self.window = window
        self._y = np.zeros(window, dtype=np.float32)
        self._p = np.zeros(window, dtype=np.float32)
        self.n = 0

    def update(self, y: np.ndarray, p: np.ndarray) -> None:
        """Add labelled predictions (pre-update scores)."""
        k = len(y)
        if k == 0:
            return
        keep = min(k, self.window)
        idx = (self.n + k - keep + np.arange(keep)) % self.window
        self._y[idx] = y[k - keep :]
        self._p[idx] = p[k - keep :]
        self.n += k

    def _filled(self) -> tuple[np.ndarray, np.ndarray]:
        m = min(self.n, self.window)
        return self._y[:m], self._p[:m]

    def report(self) -> dict[str, Any]:
        """Metrics over the window (NaN-free: missing values are ``None``)."""
        y, p = self._filled()
        out: dict[str, Any] = {"n": self.n, "window": len(y)}
        if len(y) == 0:
            return out
        if self.task == "regression":
            out["mae"] = float(np.abs(y - p).mean())
            out["rmse"] = float(np.sqrt(((y - p) ** 2).mean()))
        else:
            pc = np.clip(p.astype(np.float64), _EPS, 1 - _EPS)
            out["log_loss"] = float(-(y * np.log(pc) + (1 - y) * np.log(1 - pc)).mean())
            auc = roc_auc(y, p)
            out["auc"] = None if np.isnan(auc) else round(auc, 6)
            out["positive_rate"] = float(y.mean())
        return out

    def to_state(self) -> dict[str, Any]:
        """Plain state for snapshots (only the filled part of the window)."""
        y, p = self._filled()
        return {"task": self.task, "window": self.window, "n": self.n, "y": y.copy(), "p": p.copy()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrequentialMetrics:
        """Rebuild from :meth:`to_state` output."""
        m = cls(state["task"], int(state["window"]))
        m.n = int(state["n"])
        k = len(state["y"])
        m._y[:k] = state["y"]
        m._p[:k] = state["p"]
        return m

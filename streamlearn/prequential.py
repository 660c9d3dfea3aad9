"""Rolling prequential (test-then-train) metrics over a fixed window of recent events."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from streamlearn.config import MAX_ROLLING_WINDOW, TASKS

_EPS = 1e-7
_DAY_S = 86_400
UNKNOWN_DAY = -1  # a window entry whose day is not known (a state written without days)

#: Default k of the precision at top-k per day.
TOP_K_PER_DAY = 100
#: The false positive rate at which recall is reported (``recall_at_1pct_fpr``).
FRAUD_FPR = 0.01


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


def _ranked(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Cumulative true and false positives at each distinct score, highest score first."""
    y = np.asarray(y) > 0.5
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(-p, kind="mergesort")
    y, p = y[order], p[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]  # last row of each run of ties
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    n_pos = int(y.sum())
    return tps, fps, n_pos, len(y) - n_pos


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve, step rule); NaN if no positive.

    ``sum((R_k - R_{k-1}) * P_k)`` over distinct score thresholds, ties counted together:
    the definition of ``sklearn.metrics.average_precision_score``.

    Examples
    --------
    >>> round(average_precision(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])), 6)
    0.833333
    >>> average_precision(np.array([1, 1, 0]), np.array([0.5, 0.5, 0.5]))  # one tie: P = 2/3
    0.666...
    """
    if len(y) == 0:
        return float("nan")
    return _average_precision(*_ranked(y, p))


def _average_precision(tps: np.ndarray, fps: np.ndarray, n_pos: int, n_neg: int) -> float:
    if n_pos == 0:
        return float("nan")
    recall_steps = np.diff(tps, prepend=0) / n_pos
    return float(np.sum(recall_steps * tps / (tps + fps)))


def recall_at_fpr(y: np.ndarray, p: np.ndarray, max_fpr: float = 0.01) -> float:
    """Highest recall (true positive rate) of any score threshold whose false positive rate
    is at most ``max_fpr``; NaN if one class.

    What a fraud team asks: flagging at most 1% of legitimate events, how much fraud is caught.

    Examples
    --------
    >>> y = np.array([0, 1, 0, 0, 1, 0, 1, 1, 0, 0])
    >>> p = np.array([.9, .8, .7, .7, .6, .5, .4, .3, .2, .1])
    >>> recall_at_fpr(y, p, 0.2), recall_at_fpr(y, p, 0.5), recall_at_fpr(y, p, 0.0)
    (0.25, 0.5, 0.0)
    """
    if len(y) == 0:
        return float("nan")
    return _recall_at_fpr(*_ranked(y, p), max_fpr)


def _recall_at_fpr(tps: np.ndarray, fps: np.ndarray, n_pos: int, n_neg: int,
                   max_fpr: float) -> float:
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ok = fps <= max_fpr * n_neg
    return float(tps[ok].max() / n_pos) if ok.any() else 0.0


def precision_at_k_per_day(y: np.ndarray, p: np.ndarray, days: np.ndarray, k: int) -> float:
    """Mean over days of the precision of each day's ``k`` highest scores; NaN if empty.

    What an analyst team with a daily budget of ``k`` reviews sees: the share of fraud
    among the cases it looks at.  A day with fewer than ``k`` events counts all of them;
    ties at the cut keep arrival order.

    Examples
    --------
    >>> y = np.array([1, 0, 0, 1, 1, 0])
    >>> p = np.array([.9, .8, .1, .2, .7, .6])
    >>> days = np.array([0, 0, 0, 1, 1, 1])
    >>> precision_at_k_per_day(y, p, days, 2)  # day 0: 1/2, day 1: 1/2
    0.5
    >>> precision_at_k_per_day(y, p, days, 1)  # day 0: 1, day 1: 1
    1.0
    """
    n = len(y)
    if n == 0 or k < 1:
        return float("nan")
    days = np.asarray(days)
    order = np.lexsort((-np.asarray(p, dtype=np.float64), days))  # by day, then score down
    d = days[order]
    hit = np.asarray(y)[order] > 0.5
    starts = np.r_[0, np.flatnonzero(np.diff(d)) + 1]
    sizes = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, sizes)
    hits = np.add.reduceat((hit & (rank < k)).astype(np.float64), starts)
    return float(np.mean(hits / np.minimum(sizes, k)))


def log_loss(y: np.ndarray, p: np.ndarray, eps: float = _EPS) -> float:
    """Mean binary cross-entropy, probabilities clipped to ``[eps, 1 - eps]``; NaN if empty.

    Examples
    --------
    >>> round(log_loss(np.array([1, 0]), np.array([0.8, 0.4])), 6)  # -(ln 0.8 + ln 0.6) / 2
    0.366985
    """
    if len(y) == 0:
        return float("nan")
    y = np.asarray(y, dtype=np.float64)
    pc = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return float(-(y * np.log(pc) + (1 - y) * np.log(1 - pc)).mean())


def mae(y: np.ndarray, p: np.ndarray) -> float:
    """Mean absolute error; NaN if empty.

    Examples
    --------
    >>> mae(np.array([1.0, 2.0, 4.0]), np.array([1.5, 2.0, 3.0]))
    0.5
    """
    if len(y) == 0:
        return float("nan")
    return float(np.abs(np.asarray(y, np.float64) - np.asarray(p, np.float64)).mean())


def rmse(y: np.ndarray, p: np.ndarray) -> float:
    """Root mean squared error; NaN if empty.

    Examples
    --------
    >>> rmse(np.array([1.0, 2.0, 4.0]), np.array([1.0, 2.0, 1.0]))
    1.7320508075688772
    """
    if len(y) == 0:
        return float("nan")
    err = np.asarray(y, np.float64) - np.asarray(p, np.float64)
    return float(np.sqrt((err * err).mean()))


class PrequentialMetrics:
    """Rolling log loss and ROC AUC (binary, ranking) or MAE (regression).

    Keeps the last ``window`` (label, prediction) pairs in a ring buffer;
    the metrics are computed on demand, so updates cost one copy.

    Binary and ranking models also get the fraud metrics: ``pr_auc`` (average
    precision), ``recall_at_1pct_fpr`` (:func:`recall_at_fpr` at :data:`FRAUD_FPR`) and
    ``precision_at_k_per_day`` (:func:`precision_at_k_per_day`, ``top_k_per_day`` =
    ``top_k``).  The day of a pair is the UTC day (``clock() // 86400``) it was scored
    and learned at, unless :meth:`update` is given the days of its events.

    Examples
    --------
    >>> m = PrequentialMetrics("binary", window=4)
    >>> m.update(np.array([0, 1, 1, 0, 1]), np.array([0.2, 0.9, 0.6, 0.4, 0.7]))
    >>> r = m.report()
    >>> r["n"], r["window"], r["auc"], r["pr_auc"]
    (5, 4, 1.0, 1.0)
    """

    def __init__(self, task: str, window: int = 10_000, top_k: int = TOP_K_PER_DAY,
                 clock: Callable[[], float] = time.time) -> None:
        self.task = task
        self.window = window
        self.top_k = top_k
        self.clock = clock
        self._y = np.zeros(window, dtype=np.float32)
        self._p = np.zeros(window, dtype=np.float32)
        self._day = np.full(window, UNKNOWN_DAY, dtype=np.int32)
        self.n = 0

    def update(self, y: np.ndarray, p: np.ndarray, days: np.ndarray | None = None) -> None:
        """Add labelled predictions (pre-update scores); ``days``: the UTC day numbers
        (``unix seconds // 86400``) of their events, by default today's."""
        k = len(y)
        if k == 0:
            return
        keep = min(k, self.window)
        y, p = y[k - keep :], p[k - keep :]
        day = int(self.clock() // _DAY_S) if days is None else np.asarray(days)[k - keep :]
        # The ring as at most two slices (a fancy index cost 2% of learning a narrow stream).
        start = (self.n + k - keep) % self.window
        first = min(keep, self.window - start)
        for dst, src in ((slice(start, start + first), slice(0, first)),
                         (slice(0, keep - first), slice(first, keep))):
            self._y[dst] = y[src]
            self._p[dst] = p[src]
            self._day[dst] = day if days is None else day[src]
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
            out["mae"] = mae(y, p)
            out["rmse"] = rmse(y, p)
        else:
            out["log_loss"] = log_loss(y, p)
            auc = roc_auc(y, p)
            out["auc"] = None if np.isnan(auc) else round(auc, 6)
            out["positive_rate"] = float(y.mean())
            out |= self._fraud(y, p)
        return out

    def _fraud(self, y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
        """PR AUC, recall at 1% FPR, precision at top-k per day (None when undefined)."""
        def clean(x: float) -> float | None:
            return None if np.isnan(x) else round(x, 6)

        days = self._day[: len(y)]
        # Days unknown (a state from before they were kept, a pooled merge): no per-day figure.
        per_day = (float("nan") if (days == UNKNOWN_DAY).any()
                   else precision_at_k_per_day(y, p, days, self.top_k))
        ranked = _ranked(y, p)  # one sort for both
        return {"pr_auc": clean(_average_precision(*ranked)),
                "recall_at_1pct_fpr": clean(_recall_at_fpr(*ranked, FRAUD_FPR)),
                "precision_at_k_per_day": clean(per_day), "top_k_per_day": self.top_k}

    def to_state(self) -> dict[str, Any]:
        """Plain state for snapshots (only the filled part of the window)."""
        y, p = self._filled()
        return {"task": self.task, "window": self.window, "n": self.n, "y": y.copy(), "p": p.copy(),
                "day": self._day[: len(y)].copy(), "top_k": self.top_k}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrequentialMetrics:
        """Rebuild from :meth:`to_state` output; ``ValueError`` for a state no window
        could have written."""
        task, window, n = state["task"], int(state["window"]), int(state["n"])
        top_k = int(state.get("top_k", TOP_K_PER_DAY))
        if task not in TASKS or not 1 <= window <= MAX_ROLLING_WINDOW or top_k < 1:
            # the window is allocated here (10**12 rows: unbounded), a 0 divides by zero
            raise ValueError(f"metrics state: task {task!r}, window {window} (1.."
                             f"{MAX_ROLLING_WINDOW:,}) or top_k {top_k} out of range")
        y = np.asarray(state["y"], dtype=np.float32)
        p = np.asarray(state["p"], dtype=np.float32)
        k = y.size
        # At most min(n, window) pairs (fewer after a pooled merge): n below that read the
        # ring from a negative end.
        if y.shape != (k,) or p.shape != (k,) or not 0 <= k <= min(n, window):
            raise ValueError(f"metrics state: {k} labels and {p.shape} scores for n={n}, "
                             f"window={window}")
        if not (np.isfinite(y).all() and np.isfinite(p).all()):  # NaN in every report
            raise ValueError("metrics state: labels or scores hold NaN or infinite values")
        m = cls(task, window, top_k)
        m.n = n
        m._y[:k] = y
        m._p[:k] = p
        day = state.get("day")
        if day is not None and len(day) == k:  # else unknown: pooled or older states
            m._day[:k] = day
        return m

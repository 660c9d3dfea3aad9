"""Fraud metrics in the prequential window: PR AUC, recall at 1% FPR, precision at top-k/day."""

from __future__ import annotations

import numpy as np
import pytest

from streamlearn.config import MAX_ROLLING_WINDOW
from streamlearn.prequential import (
    PrequentialMetrics,
    precision_at_k_per_day,
)


def brute_precision_at_k(y: np.ndarray, p: np.ndarray, days: np.ndarray, k: int) -> float:
    out = []
    for d in np.unique(days):
        sel = np.flatnonzero(days == d)
        top = sel[np.argsort(-p[sel], kind="stable")[:k]]
        out.append(y[top].mean())
    return float(np.mean(out))


@pytest.mark.parametrize("seed", range(5))
def test_precision_at_k_per_day_matches_a_per_day_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 600))
    y = (rng.random(n) < 0.1).astype(np.float32)
    p = rng.random(n).astype(np.float32)
    days = np.sort(rng.integers(19_000, 19_005, n))
    rng.shuffle(days)
    for k in (1, 5, 50, 1000):
        assert precision_at_k_per_day(y, p, days, k) == pytest.approx(
            brute_precision_at_k(y, p, days, k))


def test_report_carries_the_fraud_metrics_by_day_of_arrival() -> None:
    now = [19_000 * 86_400.0 + 10]
    m = PrequentialMetrics("binary", window=1000, top_k=2, clock=lambda: now[0])
    # Day one: the top two scores hold one fraud; day two: both are fraud.
    m.update(np.array([1, 0, 0, 0], dtype=np.float32), np.array([.9, .8, .1, .2], dtype=np.float32))
    now[0] += 86_400
    m.update(np.array([1, 1, 0], dtype=np.float32), np.array([.7, .6, .5], dtype=np.float32))
    r = m.report()
    y = np.array([1, 0, 0, 0, 1, 1, 0])
    p = np.array([.9, .8, .1, .2, .7, .6, .5])
    assert r["precision_at_k_per_day"] == pytest.approx(0.75)
    assert r["top_k_per_day"] == 2
    # By hand: precision 1, 2/3, 3/4 at the three positives (ranks 1, 3, 4): AP = 29/36;
    # no negative may rank above the threshold at 1% FPR, so only the 0.9 fraud: 1/3.
    assert r["pr_auc"] == pytest.approx(29 / 36, abs=1e-6)
    assert r["recall_at_1pct_fpr"] == pytest.approx(1 / 3)
    # Explicit event days win over arrival.
    m2 = PrequentialMetrics("binary", window=1000, top_k=2)
    m2.update(y.astype(np.float32), p.astype(np.float32), days=np.array([5] * 7))
    assert m2.report()["precision_at_k_per_day"] == pytest.approx(0.5)


def test_days_travel_in_the_state_and_unknown_days_give_none() -> None:
    rng = np.random.default_rng(1)
    m = PrequentialMetrics("binary", window=100, top_k=10)
    for _ in range(3):
        m.update((rng.random(70) < 0.2).astype(np.float32), rng.random(70).astype(np.float32))
    restored = PrequentialMetrics.from_state(m.to_state())
    assert restored.report() == m.report()
    assert restored.top_k == 10
    old = {k: v for k, v in m.to_state().items() if k not in ("day", "top_k")}
    report = PrequentialMetrics.from_state(old).report()
    assert report["precision_at_k_per_day"] is None and report["pr_auc"] is not None


def test_regression_and_single_class_windows() -> None:
    reg = PrequentialMetrics("regression", window=10)
    reg.update(np.array([1.0, 2.0], dtype=np.float32), np.array([1.5, 2.0], dtype=np.float32))
    assert "pr_auc" not in reg.report()
    neg = PrequentialMetrics("binary", window=10)
    neg.update(np.zeros(4, dtype=np.float32), np.full(4, 0.3, dtype=np.float32))
    r = neg.report()
    assert r["pr_auc"] is None and r["recall_at_1pct_fpr"] is None
    assert r["precision_at_k_per_day"] == 0.0


def test_the_window_keeps_the_newest_rows_whatever_the_batch_sizes() -> None:
    """Batches smaller than, straddling and larger than the ring, with and without days."""
    rng = np.random.default_rng(7)
    m = PrequentialMetrics("binary", window=100, clock=lambda: 5 * 86_400.0)
    ys: list[float] = []
    days: list[int] = []
    for _ in range(300):
        k = int(rng.integers(0, 250))
        y = rng.random(k).astype(np.float32)
        d = rng.integers(0, 9, k)
        given = bool(rng.random() < 0.5)
        m.update(y, y, d if given else None)
        ys += y.tolist()
        days += d.tolist() if given else [5] * k
        kept = min(m.n, m.window)
        ring = np.arange(m.n - kept, m.n) % m.window
        assert m._y[ring].tolist() == ys[m.n - kept :]
        assert m._day[ring].tolist() == days[m.n - kept :]


def _state() -> dict:
    rng = np.random.default_rng(2)
    m = PrequentialMetrics("binary", window=100, top_k=10)
    m.update((rng.random(70) < 0.2).astype(np.float32), rng.random(70).astype(np.float32))
    return m.to_state()


@pytest.mark.parametrize("forge", [
    {"window": 0, "n": 0, "y": [], "p": [], "day": []},  # the first update divided by zero
    {"window": MAX_ROLLING_WINDOW + 1},  # allocated up front: 10**12 is terabytes
    {"task": "other"},
    {"top_k": 0},
    {"n": -5},  # the report read the ring from a negative end
    {"n": 10},  # fewer events than the pairs it holds
    {"p": np.zeros(3, dtype=np.float32)},
    {"y": np.full(70, np.nan, dtype=np.float32)},  # NaN in every report
    {"p": np.full(70, np.inf, dtype=np.float32)},
], ids=["window_0", "window_huge", "task", "top_k", "n_negative", "n_short", "p_short",
        "y_nan", "p_inf"])
def test_a_forged_metrics_state_is_refused(forge) -> None:
    state = _state()
    PrequentialMetrics.from_state(dict(state, n=500))  # a pooled window: fewer pairs than n
    with pytest.raises(ValueError, match="metrics state"):
        PrequentialMetrics.from_state(dict(state, **forge))

"""Data drift on every feature: recent distributions against a reference window.

What is compared
----------------
- **Numeric features**: the population stability index (PSI) of the standardized value
  ``z = (x - ref_mean) / ref_std`` over ``bins`` quantile bins of the reference window,
  plus one bin for missing values (a jump in the missing rate is drift too); and the
  standardized mean shift ``|recent_mean - ref_mean| / ref_std``, reported beside it.
- **Categorical fields**: the model sees them only as hashed slots (column ``j`` of
  ``FeatureBatch.hashed`` is field ``j``'s slot), so no raw string is kept.  The bins are
  the reference's ``top_k`` most frequent slots, "another slot seen in the reference", and
  "unseen"; the score is the PSI over these bins.  The unseen rate is reported beside it,
  against the reference's own novelty rate (the share of its second half unseen in its
  first half), so that an id-like field with many new values is not drift by itself.

``PSI = sum((q - p) * ln(q / p))`` over bins, ``p`` the reference share and ``q`` the recent
one, both floored at ``1e-4``.  The usual reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25
a real shift; the per-feature threshold is the spec's ``drift_threshold`` (0.25).  The
model's **drift level** is ``none``, ``warning`` (worst score >= 0.4 x threshold) or
``drift`` (worst score >= threshold).

Reference policy
----------------
The reference is the first ``reference_size`` events the monitor sees, then frozen: a
slow drift stays visible instead of being absorbed by a sliding reference.  A drift
action that restarts learning (``reset``, ``rollback``) re-collects it, but only
``drift_cooldown`` events later (:meth:`DataDriftMonitor.rebase_in`): until then the
shift that came with the drift stays on the scores, the metrics and the dashboard; after
it, the new world is the reference.  A snapshot keeps the frozen reference
(bin edges and shares), not the raw window.

Cost
----
The recent shares are exponentially weighted averages of per-mini-batch shares (half-life
in events), folded in one compiled, GIL-free pass: vectorized counts of the values at or
above each bin edge for the numerics, a hash-table probe per categorical value.  The fold
runs when the shares are read (a snapshot, a report), not per call: the rows since the
last read are copied and held, at most the newest ``HOLD_HALFLIVES`` half-lives of them
(older rows would weigh < 0.4% of the recent shares, and are skipped).  The shares are
read every few seconds, so a read folds at most the window instead of every event: copying
a row costs a fraction of folding it (measured in the model: 15 against 46 ns per row at
32 features; 3 against 17 with 2 numeric and 5 categorical fields).  A read returns what
folding every call would have given, bit for bit, while no row was skipped (tested).
Reading folds, so a read changes state: like an update, it runs on the thread that owns
the model (the worker's learner thread takes its snapshots).  Until the reference is
complete, rows are buffered (``reference_size`` rows); the reference is then frozen from one
sort per column.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
from numba import njit

#: Shares are floored at this before the PSI's logarithm.
EPS = 1e-4
#: Fraction of the threshold from which the level reads ``warning``.
WARNING_FRACTION = 0.4
STATE_FORMAT = 5
#: Rows held for the next read: the newest ``HOLD_HALFLIVES`` half-lives (at least
#: ``HOLD_MIN`` rows). A row older than 8 half-lives weighs < 0.4% of the recent shares.
HOLD_HALFLIVES = 8
HOLD_MIN = 16_384
#: Bounds on what a snapshot may set: the half-life sizes the rows held between reads
#: (8 half-lives: at most 131,072), the reference size the rows buffered before the
#: freeze (``ModelSpec.drift_reference_size`` has the same bound).
MAX_HALFLIFE = 16_384.0
MAX_REFERENCE = 1_000_000


#: Empty slot of the lookup tables (hashed slots are >= 0).
_EMPTY = -1
#: Fibonacci hashing multiplier (2**64 / golden ratio, as a signed 64-bit integer).
_GOLDEN = -7046029254386353131


#: Reference slots kept per categorical field (the most frequent): bounds the lookup
#: tables and the snapshot; a rarer reference slot then counts as unseen, in the
#: reference's share as in the recent one.
MAX_SLOTS = 2048


@njit(cache=True, nogil=True)
def _fill_tables(slots, slot_bins, ptr, keys, bins):  # pragma: no cover - compiled
    """Open-addressing tables, one row per field, filled with the kernel's probe."""
    mask = keys.shape[1] - 1
    for j in range(len(ptr) - 1):
        for i in range(ptr[j], ptr[j + 1]):
            s = slots[i]
            h = ((s * _GOLDEN) >> 17) & mask
            while keys[j, h] != _EMPTY and keys[j, h] != s:
                h = (h + 1) & mask
            keys[j, h] = s
            bins[j, h] = slot_bins[i]


#: From this many numeric features on, the fold counts per edge (vectorized) rather than
#: binning each value: measured faster from 8 features up, slower at 2.
WIDE_FOLD = 8


@njit(cache=True, nogil=True)
def _fold(X, H, size, edges, keys, bins, halflife,
          recent_num, recent_cat, recent_mean, started):  # pragma: no cover - compiled
    """Fold each ``size``-row batch of ``X``/``H`` into the EWMA shares, in place.

    A numeric value's bin is the number of edges at or below it. With few features each
    value is binned by a branch-free pass over its edges. With ``WIDE_FOLD`` or more, the
    batch instead counts, per edge and feature, the values at or above the edge (``ge``):
    a compare-and-add across a row's features that the compiler vectorizes, four rows per
    pass over the counters; the bin counts are differences of these exact integer counts
    (the edges are non-decreasing), so both give the same shares. A slot's bin comes from
    the field's open-addressing table of reference slots (``keys`` -> ``bins``: top-k
    index, or "other seen"), anything else is unseen.
    """
    n = max(X.shape[0], H.shape[0])
    d = X.shape[1]
    c = H.shape[1]
    nb = recent_num.shape[1]  # quantile bins + missing
    ne = edges.shape[1]
    kc = recent_cat.shape[1]  # top_k + other + unseen
    mask = keys.shape[1] - 1
    wide = d >= WIDE_FOLD
    et = np.empty((ne, d))  # edges, one contiguous row per edge
    for j in range(d):
        for e in range(ne):
            et[e, j] = edges[j, e]
    ge = np.zeros((ne, d))
    cnt_num = np.zeros((d, nb))
    cnt_cat = np.zeros((c, kc))
    tot = np.zeros(d)
    obs = np.zeros(d)
    for lo in range(0, n, size):
        hi = min(lo + size, n)
        ge[:] = 0.0
        cnt_num[:] = 0.0
        cnt_cat[:] = 0.0
        tot[:] = 0.0
        obs[:] = 0.0
        for r in range(lo, hi):
            x = X[r]
            if not wide:  # (wide: counted with the edges below, in the same row order)
                for j in range(d):
                    v = x[j]
                    ok = v == v  # NaN: missing
                    obs[j] += 1.0 if ok else 0.0
                    tot[j] += v if ok else 0.0
                for j in range(d):
                    v = x[j]
                    if v == v:
                        b = 0
                        for e in range(ne):
                            b += edges[j, e] <= v
                        cnt_num[j, b] += 1.0
            for j in range(c):
                s = H[r, j]
                h = ((s * _GOLDEN) >> 17) & mask
                while True:  # linear probing; the table is at most half full
                    key = keys[j, h]
                    if key == s:
                        cnt_cat[j, bins[j, h]] += 1.0
                        break
                    if key == _EMPTY:
                        cnt_cat[j, kc - 1] += 1.0  # unseen in the reference
                        break
                    h = (h + 1) & mask
        if wide:
            r = lo
            while r + 4 <= hi:  # NaN compares false: a missing value counts nowhere
                x0 = X[r]
                x1 = X[r + 1]
                x2 = X[r + 2]
                x3 = X[r + 3]
                for j in range(d):
                    v0 = x0[j]
                    v1 = x1[j]
                    v2 = x2[j]
                    v3 = x3[j]
                    obs[j] += (((1.0 if v0 == v0 else 0.0) + (1.0 if v1 == v1 else 0.0))
                               + ((1.0 if v2 == v2 else 0.0) + (1.0 if v3 == v3 else 0.0)))
                    tj = tot[j]  # row by row, as ever
                    tj += v0 if v0 == v0 else 0.0
                    tj += v1 if v1 == v1 else 0.0
                    tj += v2 if v2 == v2 else 0.0
                    tj += v3 if v3 == v3 else 0.0
                    tot[j] = tj
                for e in range(ne):
                    ee = et[e]
                    gg = ge[e]
                    for j in range(d):
                        t = ee[j]
                        gg[j] += (((1.0 if t <= x0[j] else 0.0) + (1.0 if t <= x1[j] else 0.0))
                                  + ((1.0 if t <= x2[j] else 0.0)
                                     + (1.0 if t <= x3[j] else 0.0)))
                r += 4
            for tail in range(r, hi):
                x = X[tail]
                for j in range(d):
                    v = x[j]
                    ok = v == v
                    obs[j] += 1.0 if ok else 0.0
                    tot[j] += v if ok else 0.0
                for e in range(ne):
                    ee = et[e]
                    gg = ge[e]
                    for j in range(d):
                        gg[j] += 1.0 if ee[j] <= x[j] else 0.0
            for j in range(d):
                for b in range(ne + 1):  # edges[b - 1] <= x < edges[b]
                    above = obs[j] if b == 0 else ge[b - 1, j]
                    cnt_num[j, b] = above - (ge[b, j] if b < ne else 0.0)
        rows = hi - lo
        alpha = 1.0 - 0.5 ** (rows / halflife)
        first = started[0] == 0
        started[0] = 1
        for j in range(d):
            cnt_num[j, nb - 1] = rows - obs[j]  # missing
            for b in range(nb):
                share = cnt_num[j, b] / rows
                if first:
                    recent_num[j, b] = share
                else:
                    recent_num[j, b] += alpha * (share - recent_num[j, b])
            if obs[j] > 0.0:
                m = tot[j] / obs[j]
                if math.isnan(recent_mean[j]):
                    recent_mean[j] = m
                else:
                    a_m = 1.0 - 0.5 ** (obs[j] / halflife)
                    recent_mean[j] += a_m * (m - recent_mean[j])
        for j in range(c):
            for b in range(kc):
                share = cnt_cat[j, b] / rows
                if first:
                    recent_cat[j, b] = share
                else:
                    recent_cat[j, b] += alpha * (share - recent_cat[j, b])


@njit(cache=True, nogil=True)
def _rank_counts(ranked, n_obs, edges, counts):  # pragma: no cover - compiled
    """Per row ``j``: how many of the sorted ``ranked[j, :n_obs[j]]`` fall in each bin
    ``edges[j, b-1] <= x < edges[j, b]`` (``searchsorted(side="left")`` differences)."""
    ne = edges.shape[1]
    for j in range(ranked.shape[0]):
        n = n_obs[j]
        if n == 0:
            continue
        prev = 0
        for e in range(ne):
            lo, hi = 0, n  # first index whose value is >= the edge
            t = edges[j, e]
            while lo < hi:
                mid = (lo + hi) >> 1
                if ranked[j, mid] < t:
                    lo = mid + 1
                else:
                    hi = mid
            counts[j, e] = lo - prev
            prev = lo
        counts[j, ne] = n - prev


def sorted_quantiles(ranked: np.ndarray, n: int, qs: np.ndarray) -> np.ndarray:
    """``np.quantile(row[:n], qs)`` (the default ``linear`` method) for each row of
    ``ranked``, whose first ``n`` entries are sorted and not NaN: shape ``(rows, len(qs))``.

    numpy's own operations, in its order (virtual index ``(n - 1) * q``, neighbours,
    ``_lerp``), without its partition: the rows are sorted already, and partitioning them
    again cost a third of freezing a 32-feature reference. Held equal to ``np.quantile``
    by a test.
    """
    virtual = (n - 1) * qs
    prev = np.floor(virtual)
    nxt = prev + 1
    above = virtual >= n - 1  # numpy's index -1: the last value
    prev[above] = -1
    nxt[above] = -1
    below = virtual < 0
    prev[below] = 0
    nxt[below] = 0
    prev_i = prev.astype(np.intp)
    gamma = virtual - prev_i
    prev_i[prev_i < 0] += n
    nxt_i = nxt.astype(np.intp)
    nxt_i[nxt_i < 0] += n
    a = ranked[:, prev_i]
    b = ranked[:, nxt_i]
    diff = b - a
    out = a + diff * gamma
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5)
    return out


def psi(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Population stability index per row of share matrices ``p`` (reference), ``q``.

    >>> float(psi(np.array([[0.5, 0.5]]), np.array([[0.5, 0.5]]))[0])
    0.0
    >>> round(float(psi(np.array([[0.5, 0.5]]), np.array([[0.9, 0.1]]))[0]), 3)
    0.879
    """
    p = np.maximum(p, EPS)
    q = np.maximum(q, EPS)
    return ((q - p) * np.log(q / p)).sum(axis=1)


class _Folded:
    """A recent statistic of :class:`DataDriftMonitor`, stored as ``_<name>``: reading it
    folds the held rows first, so every reader sees every update."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, monitor: DataDriftMonitor | None, owner: type | None = None) -> Any:
        if monitor is None:
            return self
        monitor._settle()
        return getattr(monitor, self.slot)

    def __set__(self, monitor: DataDriftMonitor, value: np.ndarray) -> None:
        setattr(monitor, self.slot, value)


class DataDriftMonitor:
    """PSI and mean shift per numeric feature, PSI and unseen rate per categorical field.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> m = DataDriftMonitor(["a", "b"], reference_size=2000, halflife=500)
    >>> for _ in range(20):
    ...     m.update(rng.normal([0.0, 5.0], 1.0, size=(256, 2)))
    >>> m.report()["drifting"], m.level()
    ([], 'none')
    >>> for _ in range(10):
    ...     m.update(rng.normal([0.0, 8.0], 1.0, size=(256, 2)))
    >>> m.report()["drifting"], m.level(), m.ranked()[0][0]
    (['b'], 'drift', 'b')
    """

    def __init__(
        self,
        features: Sequence[str],
        categorical: Sequence[str] = (),
        reference_size: int = 5000,
        halflife: float = 2000.0,
        threshold: float = 0.25,
        bins: int = 10,
        top_k: int = 20,
    ) -> None:
        self.features = list(features)
        self.categorical = list(categorical)
        self.reference_size = int(reference_size)
        self.halflife = float(halflife)
        self.threshold = float(threshold)
        self.bins = int(bins)
        self.top_k = int(top_k)
        # A snapshot carries these: bound them, so a forged one is refused here and
        # cannot hold rows without end or divide by zero in the fold.
        if not 0.0 < self.halflife <= MAX_HALFLIFE:
            raise ValueError(f"data drift half-life must be in (0, {MAX_HALFLIFE:g}] events")
        if not 1 <= self.reference_size <= MAX_REFERENCE:
            raise ValueError(f"data drift reference size must be in 1..{MAX_REFERENCE}")
        if not (2 <= self.bins <= 100 and 1 <= self.top_k <= MAX_SLOTS
                and 0.0 < self.threshold < math.inf):
            raise ValueError("data drift bins, top_k or threshold out of range")
        self.restart()

    @classmethod
    def for_spec(cls, spec: Any) -> DataDriftMonitor:
        """The monitor of a :class:`~streamlearn.config.ModelSpec`: every field, its settings.

        Entity aggregates are left out: a windowed count grows for as long as its longest
        window fills, which reads as drift against any early reference; the fields they
        aggregate are monitored."""
        return cls(list(spec.numeric), list(spec.categorical),
                   reference_size=spec.drift_reference_size, threshold=spec.drift_threshold)

    def rebase_in(self, rows: int) -> None:
        """Collect a new reference after ``rows`` more rows (see the reference policy)."""
        self._rebase_in = max(0, int(rows))

    def restart(self) -> None:
        """Start collecting a new reference window now (see the module's reference policy)."""
        d, c, k = len(self.features), len(self.categorical), self.top_k
        self._rebase_in: int | None = None
        self.ready = False
        self._buf_x: list[np.ndarray] = []
        self._buf_h: list[np.ndarray] = []
        self._buffered = 0
        self.ref_mean = np.zeros(d)
        self.ref_std = np.ones(d)
        self.edges = np.zeros((d, self.bins - 1))
        self.ref_num = np.zeros((d, self.bins + 1))
        self.slots = np.zeros(0, dtype=np.int64)  # reference slots, field by field
        self.slot_bins = np.zeros(0, dtype=np.int64)  # their bins (top-k index or k)
        self.slot_ptr = np.zeros(c + 1, dtype=np.int64)
        self.keys = np.full((c, 2), _EMPTY, dtype=np.int64)  # per field: slot -> bin table
        self.bins_of = np.zeros((c, 2), dtype=np.int64)
        self.ref_cat = np.zeros((c, k + 2))
        self.ref_novelty = np.zeros(c)
        # Rows waiting to be folded, oldest first: (numeric, slots, batch size).
        self._held: deque[tuple[np.ndarray, np.ndarray, int]] = deque()
        self._held_rows = 0
        self._reset_recent()
        if not d and not c:
            self.ready = True

    def _reset_recent(self) -> None:
        d, c = len(self.features), len(self.categorical)
        self._recent_num = np.zeros((d, self.bins + 1))
        self._recent_cat = np.zeros((c, self.top_k + 2))
        self._recent_mean = np.full(d, np.nan)
        self._started = np.zeros(1, dtype=np.int64)

    # The recent statistics, folded up to the last update whenever they are read.
    recent_num = _Folded("Recent shares per numeric feature: ``bins`` quantile bins, then "
                         "missing.")
    recent_cat = _Folded("Recent shares per categorical field: top-k slots, another seen "
                         "slot, unseen.")
    recent_mean = _Folded("Recent mean per numeric feature (NaN until one value is seen).")

    @property
    def started(self) -> bool:
        """Whether any recent batch (or the reference) stands in the recent shares."""
        self._settle()
        return bool(self._started[0])

    # -- folding -----------------------------------------------------------------
    def update(self, X: np.ndarray, batch_size: int | None = None,
               hashed: np.ndarray | None = None) -> None:
        """Take raw numeric features ``X`` (NaN = missing) and hashed slots, by batches.

        ``update(X, b, H)`` equals ``update`` on each ``b``-row slice in turn; the default
        is one batch.  ``hashed`` is ``FeatureBatch.hashed`` (one column per categorical
        field); without it, categorical fields are not updated.  Past the reference
        window the rows are held and folded at the next read (see the module's Cost).
        """
        n = X.shape[0]
        if n == 0 or (not self.features and not self.categorical):
            return
        if X.ndim != 2 or X.shape[1] != len(self.features):  # the fold reads unchecked
            raise ValueError(f"data drift monitor of {len(self.features)} features got "
                             f"rows of shape {X.shape}")
        c = len(self.categorical)
        if hashed is None or hashed.shape[1] != c:  # no slots: fold the numerics only
            hashed = np.zeros((n, 0), dtype=np.int64)
        size = batch_size or n
        if self._rebase_in is not None:
            self._rebase_in -= n
            if self._rebase_in <= 0:  # at this call's granularity: a few hundred rows
                self.restart()
        start = 0
        while not self.ready and start < n:  # the batch that completes it is not folded
            # Column-major blocks: the freeze works on columns (small transposes are cheap).
            self._buf_x.append(np.array(X[start : start + size].T, dtype=np.float64,
                                        order="C"))
            self._buf_h.append(np.array(hashed[start : start + size], dtype=np.int64))
            self._buffered += self._buf_x[-1].shape[1]
            start += size
            if self._buffered >= self.reference_size:
                self._freeze()
        if start < n:
            self._hold(X[start:], hashed[start:], size)

    def _hold(self, X: np.ndarray, hashed: np.ndarray, size: int) -> None:
        """Keep copies of the rows for the next read (the caller may reuse its arrays):
        the fewest newest whole calls, or batches of one call, that cover the window."""
        window = max(HOLD_MIN, math.ceil(HOLD_HALFLIVES * self.halflife))
        n = X.shape[0]
        if n > window:  # cut at a batch boundary: the kept batches are the same
            cut = (n - window) // size * size
            X, hashed, n = X[cut:], hashed[cut:], n - cut
        self._held.append((np.array(X, dtype=np.float64, order="C"),
                           np.array(hashed, dtype=np.int64, order="C"), size))
        self._held_rows += n
        while self._held_rows - self._held[0][0].shape[0] >= window:
            self._held_rows -= self._held.popleft()[0].shape[0]

    def _settle(self) -> None:
        """Fold the held rows into the recent statistics, oldest first."""
        while self._held:
            X, hashed, size = self._held.popleft()
            _fold(X, hashed, size, self.edges, self.keys, self.bins_of, self.halflife,
                  self._recent_num, self._recent_cat, self._recent_mean, self._started)
        self._held_rows = 0

    def _freeze(self) -> None:
        """Turn the buffered window into the frozen reference."""
        d, c, k = len(self.features), len(self.categorical), self.top_k
        # The window column by column: one vectorized sort (NaN, missing, sorts last)
        # serves the quantiles and the reference counts; statistics of whole columns run
        # in one call.
        Xt = np.concatenate(self._buf_x, axis=1) if self._buf_x else np.zeros((d, 0))
        n_rows = Xt.shape[1]
        H = np.concatenate(self._buf_h)
        if H.shape[1] != len(self.categorical):  # collected without slots
            H = np.zeros((n_rows, len(self.categorical)), dtype=np.int64)
        self._buf_x, self._buf_h, self._buffered = [], [], 0
        ranked = np.sort(Xt, axis=1)
        qs = np.arange(1, self.bins) / self.bins
        n_obs_all = n_rows - np.isnan(Xt).sum(axis=1)
        full = n_obs_all == n_rows
        if d and full.all() and n_rows:  # no missing value: every column at once
            means, stds = Xt.mean(axis=1), Xt.std(axis=1)
            all_edges = sorted_quantiles(ranked, n_rows, qs)
        for j in range(d):
            col = Xt[j]
            n_obs = int(n_obs_all[j])
            if n_obs:
                if full.all():
                    mean, std, edges = float(means[j]), float(stds[j]), all_edges[j]
                else:
                    obs = col if full[j] else col[~np.isnan(col)]
                    mean = float(obs.mean())  # in stream order: the same rounding as ever
                    std = float(obs.std())
                    edges = sorted_quantiles(ranked[j : j + 1], n_obs, qs)[0]
                self.ref_mean[j] = mean
                self.ref_std[j] = std if std > 0 and math.isfinite(std) else 1.0
                # Edges in raw units: the same bins as quantiles of the standardized value
                # (an increasing map), compared exactly (a discrete feature's values sit
                # on its edges, where a rescaled copy could round to the other side).
                # Non-decreasing, as the fold needs (it is a no-op on np.quantile's).
                self.edges[j] = np.maximum.accumulate(edges)
            self.ref_num[j, self.bins] = 1.0 - n_obs / len(col)
        if d and n_rows:
            # Bin b holds edges[b-1] <= x < edges[b]: differences of ranks in the sorted
            # observed values (a column without any keeps zero shares).
            counts = np.zeros((d, self.bins))
            _rank_counts(ranked, n_obs_all.astype(np.int64), self.edges, counts)
            self.ref_num[:, : self.bins] = counts / n_rows
        kept_slots, kept_bins, counts_kept = [], [], [0]
        for j in range(c):
            col = H[:, j]
            slots, counts = np.unique(col, return_counts=True)
            by_freq = np.argsort(-counts, kind="stable")
            kept = by_freq[:MAX_SLOTS]
            order = by_freq[:k]
            share = counts[order] / len(col)
            dropped = float(counts[by_freq[MAX_SLOTS:]].sum()) / len(col)
            slot_bins = np.full(len(slots), k, dtype=np.int64)  # "another seen slot"
            slot_bins[order] = np.arange(len(order))
            half = len(col) // 2
            novelty = float(np.mean(~np.isin(col[half:], col[:half]))) if half else 0.0
            self.ref_novelty[j] = novelty
            self.ref_cat[j, : len(order)] = share * (1.0 - novelty)
            self.ref_cat[j, k] = max(0.0, 1.0 - share.sum() - dropped) * (1.0 - novelty)
            self.ref_cat[j, k + 1] = novelty + dropped * (1.0 - novelty)
            kept_slots.append(slots[kept])
            kept_bins.append(slot_bins[kept])
            counts_kept.append(len(kept))
        if c:
            self.slots = np.concatenate(kept_slots).astype(np.int64)
            self.slot_bins = np.concatenate(kept_bins).astype(np.int64)
            self.slot_ptr = np.cumsum(counts_kept).astype(np.int64)
            self._build_tables()
        # The recent shares start at the reference's, so the first batches move them
        # gradually instead of one noisy batch standing for the whole recent window.
        self.recent_num, self.recent_cat = self.ref_num.copy(), self.ref_cat.copy()
        self.recent_mean = self.ref_mean.copy()
        self._started[0] = 1
        self.ready = True

    def _build_tables(self) -> None:
        """The kernel's lookup tables from the compact slot lists (at most half full)."""
        c = len(self.categorical)
        widest = int(np.diff(self.slot_ptr).max()) if c else 0
        size = 1 << max(2, (2 * widest).bit_length())
        self.keys = np.full((c, size), _EMPTY, dtype=np.int64)
        self.bins_of = np.zeros((c, size), dtype=np.int64)
        _fill_tables(self.slots, self.slot_bins, self.slot_ptr, self.keys, self.bins_of)

    # -- reading -----------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Every monitored field: numeric first, then categorical."""
        return self.features + self.categorical

    def scores(self) -> np.ndarray:
        """PSI per field (numeric, then categorical); NaN until a recent batch is folded."""
        if not self.ready or not self.started:
            return np.full(len(self.names), np.nan)
        return np.concatenate([psi(self.ref_num, self.recent_num),
                               psi(self.ref_cat, self.recent_cat)])

    def mean_shift(self) -> np.ndarray:
        """Standardized mean shift per numeric feature (NaN before the reference)."""
        if not self.ready:
            return np.full(len(self.features), np.nan)
        return np.abs(self.recent_mean - self.ref_mean) / self.ref_std

    def unseen_rate(self) -> np.ndarray:
        """Recent share of slots never seen in the reference, per categorical field."""
        return self.recent_cat[:, -1].copy()

    def ranked(self) -> list[tuple[str, float]]:
        """``(field, score)`` pairs, worst first (fields without a score last)."""
        pairs = list(zip(self.names, self.scores().tolist(), strict=True))
        return sorted(pairs, key=lambda p: -p[1] if not math.isnan(p[1]) else math.inf)

    def level(self) -> str:
        """``none``, ``warning`` or ``drift``: the worst score against the threshold."""
        s = self.scores()
        worst = float(np.nanmax(s)) if len(s) and not np.isnan(s).all() else 0.0
        if worst >= self.threshold:
            return "drift"
        return "warning" if worst >= WARNING_FRACTION * self.threshold else "none"

    def report(self) -> dict[str, Any]:
        """JSON-ready per-field scores (worst first), the drifting fields and the level."""
        scores = dict(zip(self.names, self.scores().tolist(), strict=True))
        shift = self.mean_shift()
        unseen = self.unseen_rate()
        per: dict[str, dict[str, Any]] = {}
        for name, _ in self.ranked():
            s = scores[name]
            entry: dict[str, Any] = {"score": None if math.isnan(s) else round(s, 5)}
            if name in self.features:
                j = self.features.index(name)
                entry.update(kind="numeric", mean_shift=_num(shift[j]),
                             reference_mean=float(self.ref_mean[j]),
                             reference_std=float(self.ref_std[j]),
                             recent_mean=_num(self.recent_mean[j]),
                             missing_rate=_num(self.recent_num[j, -1]) if self.started
                             else None)
            else:
                j = self.categorical.index(name)
                entry.update(kind="categorical",
                             unseen_rate=_num(unseen[j]) if self.started else None,
                             reference_unseen_rate=float(self.ref_novelty[j]))
            per[name] = entry
        return {
            "ready": self.ready,
            "reference_events": self.reference_size,
            "reference_policy": "first reference_events events, frozen; re-collected "
                                "drift_cooldown events after a reset or rollback",
            "rebase_in_events": self._rebase_in,
            "statistic": "psi",
            "threshold": self.threshold,
            "level": self.level(),
            "drifting": [n for n, s in scores.items() if s >= self.threshold],
            "features": per,
        }

    # -- state -------------------------------------------------------------------
    _ARRAYS = ("ref_mean", "ref_std", "edges", "ref_num", "slots", "slot_bins", "slot_ptr",
               "ref_cat", "ref_novelty", "recent_num", "recent_cat", "recent_mean")

    def to_state(self) -> dict[str, Any]:
        """Plain state for snapshots: the frozen reference and the recent shares.

        A reference still being collected is not kept (the rows would bloat every
        snapshot): a restored monitor collects it again.
        """
        state: dict[str, Any] = {
            "format": STATE_FORMAT, "features": list(self.features),
            "categorical": list(self.categorical), "reference_size": self.reference_size,
            "halflife": self.halflife, "threshold": self.threshold, "bins": self.bins,
            "top_k": self.top_k, "ready": self.ready, "started": int(self.started),
            "rebase_in": self._rebase_in,
        }
        if self.ready:
            state |= {name: getattr(self, name).copy() for name in self._ARRAYS}
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DataDriftMonitor:
        """Rebuild from :meth:`to_state` output (an older format starts a new reference)."""
        m = cls(list(state["features"]), list(state.get("categorical", [])),
                int(state["reference_size"]), float(state["halflife"]),
                float(state["threshold"]) if state.get("format") == STATE_FORMAT else 0.25,
                int(state.get("bins", 10)), int(state.get("top_k", 20)))
        if state.get("format") != STATE_FORMAT or not state.get("ready"):
            return m
        for name in cls._ARRAYS:
            ref = getattr(m, name)
            arr = np.asarray(state[name], dtype=ref.dtype).copy()
            if name not in ("slots", "slot_bins") and arr.shape != ref.shape:
                raise ValueError(f"data drift state {name!r} has shape {arr.shape}")
            setattr(m, name, arr)
        # The tables are indexed without bounds checks: refuse anything malformed.
        ptr, per = m.slot_ptr, np.diff(m.slot_ptr)
        if (ptr[0] != 0 or (per < 0).any() or (per > MAX_SLOTS).any()
                or ptr[-1] != len(m.slots) or len(m.slot_bins) != len(m.slots)
                or (len(m.slot_bins) and not 0 <= m.slot_bins.min() <= m.slot_bins.max()
                    <= m.top_k) or (len(m.slots) and m.slots.min() < 0)):
            raise ValueError("data drift state has malformed reference slots")
        if not (np.diff(m.edges, axis=1) >= 0.0).all():  # the fold's counts rely on it
            raise ValueError("data drift state has decreasing or NaN bin edges")
        if m.categorical:
            m._build_tables()
        m._started[0] = int(state.get("started", 0))
        if state.get("rebase_in") is not None:
            m.rebase_in(int(state["rebase_in"]))
        m.ready = True
        return m


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)

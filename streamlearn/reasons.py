"""Reason codes and decision bands: why a score is high, and what to do about it.

Reason codes are the top-K features of a prediction by their contribution to the
margin, named by field.  Every row of a batch has one slot per field (numeric fields
first, then one hashed slot per categorical field: :mod:`streamlearn.features`), so a
categorical field's contribution is that of its value's hashed slot, summed back to the
field, and a missing numeric value's is that of its missing-value weight.
Contributions are those of :meth:`OnlineModel.explain_one`: ``w_i * z_i`` for linear
models, plus each slot's half of the factorization machine's pairwise terms; for
regression with the label prior they are in target units.  The K *largest* (signed)
contributions are the reasons: the features that push the score up most.

Cost: one compiled pass over the batch's rows (:func:`top_contributions`), no per-feature
Python; ``load_tests/bench_reasons.py`` measures it per single-event prediction.

Decision bands map scores to ``block`` (score >= ``decision_block``), ``review``
(score >= ``decision_review``) or ``allow``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit

from streamlearn.features import numeric_entry
from streamlearn.models.target import target_scale

#: Most reason codes one request may ask for (more than a spec's fields are clipped).
MAX_REASONS = 1000

_NO_FACTORS = np.zeros((0, 0), dtype=np.float32)


@njit(cache=True, nogil=True)
def top_contributions(z, hashed, w, V, k, scale):  # pragma: no cover - compiled
    """Top-``k`` field contributions per row, largest first.

    ``z`` float32 ``(n, d)`` scaled numerics (NaN: missing, its indicator's weight
    counts), ``hashed`` int64 ``(n, c)`` slots, ``w`` the weights, ``V`` the FM factors
    (``(0, 0)`` for a linear model), ``scale`` the unit factor (the target's std for
    regression with the label prior, else 1).  Returns the
    field positions ``(n, k)`` (numeric fields ``0..d-1``, then categorical) and their
    contributions ``(n, k)`` float64.  Ties keep field order.
    """
    n, d = z.shape
    c = hashed.shape[1]
    m = d + c
    kk = min(k, m)
    idx = np.empty((n, kk), dtype=np.int64)
    val = np.empty((n, kk), dtype=np.float64)
    contrib = np.empty(m, dtype=np.float64)
    slots = np.empty(m, dtype=np.int64)
    xs = np.empty(m, dtype=np.float64)
    taken = np.empty(m, dtype=np.bool_)
    fm = V.shape[0] > 0
    f = V.shape[1]
    total = np.zeros(f, dtype=np.float64)
    for r in range(n):
        for j in range(d):  # a missing value: its indicator's weight, named by its field
            slots[j], xs[j] = numeric_entry(z, r, j)
        for j in range(c):
            slots[d + j] = hashed[r, j]
            xs[d + j] = 1.0
        for p in range(m):
            contrib[p] = w[slots[p]] * xs[p]
        if fm:
            # explain_one's split: slot p gets 0.5 * sum_{q != p} <v_p, v_q> x_p x_q.
            for a in range(f):
                total[a] = 0.0
            for p in range(m):
                for a in range(f):
                    total[a] += V[slots[p], a] * xs[p]
            for p in range(m):
                s = 0.0
                for a in range(f):
                    vp = V[slots[p], a] * xs[p]
                    s += vp * (total[a] - vp)
                contrib[p] += 0.5 * s
        for p in range(m):
            taken[p] = False
        for t in range(kk):
            best = -1
            for p in range(m):
                if not taken[p] and (best < 0 or contrib[p] > contrib[best]):
                    best = p
            taken[best] = True
            idx[r, t] = best
            val[r, t] = contrib[best] * scale
    return idx, val


def reason_codes(model: Any, batch: Any, k: int) -> list[list[dict[str, Any]]]:
    """Per row of ``batch``, its top-``k`` reasons ``{"feature": field, "contribution": c}``.

    ``model`` is an :class:`~streamlearn.models.OnlineModel` (its scaler, weights, spec).

    Examples
    --------
    >>> from streamlearn.config import ModelSpec
    >>> from streamlearn.models import OnlineModel
    >>> spec = ModelSpec(name="m", topic="t", numeric=("x",), categorical=("c",),
    ...                  label="y", hash_bits=4)
    >>> model = OnlineModel(spec, device="cpu")
    >>> events = [{"x": float(i % 7), "c": "ab"[i % 2], "y": i % 2} for i in range(400)]
    >>> batch, _ = model.vectorizer.transform_many(events)
    >>> _ = model.process(batch)
    >>> [r["feature"] for r in reason_codes(model, batch.take(np.arange(2)), 2)[1]]
    ['c', 'x']
    """
    if len(batch) == 0 or k <= 0:
        return [[] for _ in range(len(batch))]
    spec = model.spec
    z = np.ascontiguousarray(model.scaler.transform_many(batch.numeric), dtype=np.float32)
    V = _host(model, model.V) if getattr(model, "is_fm", False) else _NO_FACTORS
    scale = 1.0
    if spec.task == "regression" and spec.label_prior:
        scale = float(target_scale(model.target)[1])
    idx, val = top_contributions(z, np.ascontiguousarray(batch.hashed, dtype=np.int64),
                                 model.served_weights(), V, int(k), scale)
    names = (*spec.numeric_features, *spec.categorical)
    return [[{"feature": names[i], "contribution": v} for i, v in zip(ri, rv, strict=True)]
            for ri, rv in zip(idx.tolist(), val.tolist(), strict=True)]


def _host(model: Any, arr: Any) -> np.ndarray:
    """``arr`` itself on the CPU (read only: no 1 MB copy per request), else a host copy."""
    return arr if isinstance(arr, np.ndarray) else model.backend.to_host(arr)


def has_bands(spec: Any) -> bool:
    """Whether ``spec`` configures decision bands."""
    return (getattr(spec, "decision_block", None) is not None
            or getattr(spec, "decision_review", None) is not None)


def decide(scores: list[float], block: float | None, review: float | None) -> list[str]:
    """``block`` / ``review`` / ``allow`` per score (an unset threshold never fires).

    Examples
    --------
    >>> decide([0.95, 0.5, 0.1, 0.9], block=0.9, review=0.5)
    ['block', 'review', 'allow', 'block']
    >>> decide([0.95, 0.5], block=None, review=0.5)
    ['review', 'review']
    """
    hi = math.inf if block is None else block
    lo = math.inf if review is None else review
    return ["block" if s >= hi else "review" if s >= lo else "allow" for s in scores]


def annotate(out: dict[str, Any], spec: Any, predictions: list[float], single: bool,
             reasons: list[list[dict[str, Any]]] | None) -> dict[str, Any]:
    """Add ``decisions`` (and ``decision`` for one event) when ``spec`` has bands, and
    ``reasons`` when asked: the one place both predict paths build these keys, so their
    answers stay identical."""
    if has_bands(spec):
        decisions = decide(predictions, spec.decision_block, spec.decision_review)
        out["decisions"] = decisions
        if single:
            out["decision"] = decisions[0]
    if reasons is not None:
        out["reasons"] = reasons
    return out


def serving_spec(store: Any, name: str, fallback: Any) -> Any:
    """The spec whose decision bands apply: the one this process is configured with
    (``store.policy.specs``), so bands change with the API's configuration without a new
    snapshot; else the served model's own (``fallback``)."""
    specs = getattr(getattr(store, "policy", None), "specs", None)
    configured = specs.get(name) if specs else None
    return fallback if configured is None else configured


def all_finite(reasons: list[list[dict[str, Any]]]) -> bool:
    """Whether every contribution is a finite number (JSON has no infinities)."""
    return all(math.isfinite(r["contribution"]) for row in reasons for r in row)

"""Slow, obviously-correct NumPy oracles for every kernel.

These functions define the semantics that ``cpu.py`` and ``cuda.py`` must reproduce; tests
compare the fast twins against them with ``assert_allclose``. They favour clarity over
speed (Python loops, float64 everywhere) and are not meant for production use.

Semantics shared by every ``*_learn_*`` function
------------------------------------------------
Shapes and storage
    ``w`` is float32 ``[D + 1]``; ``w[D]`` is the bias. ``s1``/``s2`` (and ``s1w``, ``s2w``,
    ``s1v``, ``s2v``) are float32 arrays shaped like the parameters they belong to. Arithmetic
    is done in float64 and the results are rounded to float32 when stored.
Mini-batch of ``n`` rows
    1. Margins ``m_r`` of every row use the pre-update parameters.
    2. The returned value is ``sum_r loss(m_r, y_r)`` (float64), also pre-update.
    3. The data gradient of coordinate ``i`` is ``(1/n) * sum_r dloss/dm(m_r, y_r) * dm_r/dw_i``;
       duplicate indices inside a row or across rows accumulate. The bias gradient is
       ``(1/n) * sum_r dloss/dm``.
    4. Touched coordinates: dense -> all ``D`` features; CSR -> every index that appears in
       ``indices`` of the batch (even with a stored value of 0). The bias is always touched
       when ``n > 0``. Untouched coordinates and their state are left bit-for-bit unchanged
       (lazy regularization). ``n == 0`` is a no-op returning 0.0.
    5. One optimizer step per touched coordinate (see below). The bias is never regularized
       (``l1 = l2 = 0`` for it), but otherwise uses the same optimizer.
Losses (``codes.LOSS_*``)
    logistic: ``loss = softplus(m) - y*m`` (equals ``log(1+exp(-m))`` for ``y=1`` and
    ``log(1+exp(m))`` for ``y=0``), computed stably as ``log1p(exp(-|m|)) + max(m, 0) - y*m``;
    ``dloss/dm = sigmoid(m) - y``. squared: ``0.5*(m-y)**2``, ``dloss/dm = m - y``.
Optimizers, for one coordinate with data gradient ``g`` and current weight ``w``
    ``lr, l1, l2, power_t, beta, cap, slot_lr, first_slot = hyper``. The weights of the
    hashed slots, ``w[first_slot:D]``, take ``slot_lr`` in place of ``lr`` (SGD's schedule
    too); the numeric block and its missing block ``w[:first_slot]``, the bias and FM
    factors take ``lr``. The dense kernels touch only ``w[:d]`` and the bias, the last
    weight: every weight takes ``lr`` there.

    The memory cap (``ModelSpec.horizon``): AdaGrad's ``s1`` and FTRL's ``n`` grow to at most
    ``cap`` and never shrink: ``acc_new = min(acc + g**2, max(cap, acc))``. Once capped, the
    step is constant (FTRL's ``sigma`` is 0, so ``z += g``: dual averaging at a fixed rate).
    ``cap = inf`` is the classic rule.

    SGD: ``g += l2*w``; ``eta = lr / (1 + step)**power_t``; ``w -= eta*g``;
    then, if ``l1 > 0``, ``w = sign(w) * max(|w| - eta*l1, 0)`` (proximal soft threshold).

    AdaGrad: ``g += l2*w``; ``s1 += g**2`` (capped); ``eta = lr / (sqrt(s1) + 1e-8)``;
    ``w -= eta*g``; then the same soft threshold with this per-coordinate ``eta``. No
    schedule (``power_t`` and ``step`` are ignored) and ``s2`` is untouched.

    FTRL-Proximal (McMahan et al. 2013, Algorithm 1), ``z = s1``, ``n = s2``, ``alpha = lr``:
    ``n_new = n + g**2`` (capped); ``sigma = (sqrt(n_new) - sqrt(n)) / alpha``;
    ``z += g - sigma*w``; ``n = n_new``;
    ``w = 0 if |z| <= l1 else -(z - sign(z)*l1) / ((beta + sqrt(n))/alpha + l2)``.
    Here L2 enters only through the closed form (it is *not* added to ``g``: that would
    regularize twice), and ``|z| <= l1`` yields exact zeros. The stored ``w`` is used in the
    ``z`` update, so a warm-started model stays consistent.

Factorization machine (``fm_*``)
    Second-order FM (Rendle 2010) over the entries ``e`` of a CSR row:
    ``m = w[D] + sum_e x_e w[i_e] + sum_{e<e'} <V[i_e], V[i_e']> x_e x_e'``. A duplicate index
    inside a row is two entries, so it also interacts with itself. ``V`` is float32 ``[D, k]``
    and uses ``s1v``/``s2v``; every row ``V[i]`` of a touched index is touched (all ``k``
    factors) and gets the same per-element optimizer, ``l1`` and ``l2`` as the linear weights.
"""

from __future__ import annotations

import math

import numpy as np

from streamlearn.kernels.codes import (
    ADAGRAD_EPS,
    AVG_UPDATES_PER_SQUARE,
    H_CAP,
    H_FIRST_SLOT,
    H_FTRL_BETA,
    H_L1,
    H_L2,
    H_LEARNING_RATE,
    H_POWER_T,
    H_SLOT_LR,
    LOSS_LOGISTIC,
    LOSS_SQUARED,
    OPT_ADAGRAD,
    OPT_FTRL,
    OPT_SGD,
)

__all__ = [
    "average_update",
    "fm_learn_csr",
    "fm_predict_csr",
    "linear_learn_csr",
    "linear_learn_dense",
    "linear_predict_csr",
    "linear_predict_dense",
    "loss_and_dloss",
    "scaler_update",
    "step_coordinate",
]


def loss_and_dloss(m: float, y: float, loss: int) -> tuple[float, float]:
    """Return ``(loss(m, y), dloss/dm)`` in float64 for one row."""
    m = float(m)
    y = float(y)
    if loss == LOSS_LOGISTIC:
        e = math.exp(-abs(m))  # one exp serves the loss and the stable sigmoid
        value = math.log1p(e) + max(m, 0.0) - y * m
        p = 1.0 / (1.0 + e) if m >= 0.0 else e / (1.0 + e)
        return value, p - y
    if loss == LOSS_SQUARED:
        r = m - y
        return 0.5 * r * r, r
    raise ValueError(f"unknown loss code {loss}")


def step_coordinate(
    w: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    i: int | tuple[int, int],
    g: float,
    opt: int,
    hyper: np.ndarray,
    step: int,
    regularize: bool,
    slot: bool = False,
) -> None:
    """Apply one optimizer step to ``w[i]`` (and its state) given the data gradient ``g``;
    ``slot``: ``w[i]`` is a hashed slot's weight (``slot_lr``)."""
    lr = float(hyper[H_SLOT_LR] if slot else hyper[H_LEARNING_RATE])
    l1 = float(hyper[H_L1]) if regularize else 0.0
    l2 = float(hyper[H_L2]) if regularize else 0.0
    wi = float(w[i])
    cap = float(hyper[H_CAP])
    if opt == OPT_FTRL:
        beta = float(hyper[H_FTRL_BETA])
        z_old = float(s1[i])
        n_old = float(s2[i])
        n_new = min(n_old + g * g, max(cap, n_old))
        sigma = (math.sqrt(n_new) - math.sqrt(n_old)) / lr
        z = z_old + g - sigma * wi
        s1[i] = z
        s2[i] = n_new
        if abs(z) <= l1:
            w[i] = 0.0
        else:
            w[i] = -(z - math.copysign(l1, z)) / ((beta + math.sqrt(n_new)) / lr + l2)
        return
    g = g + l2 * wi
    if opt == OPT_SGD:
        eta = lr / (1.0 + step) ** float(hyper[H_POWER_T])
    elif opt == OPT_ADAGRAD:
        acc = min(float(s1[i]) + g * g, max(cap, float(s1[i])))
        s1[i] = acc
        eta = lr / (math.sqrt(acc) + ADAGRAD_EPS)
    else:
        raise ValueError(f"unknown optimizer code {opt}")
    wi = wi - eta * g
    if l1 > 0.0:
        wi = math.copysign(max(abs(wi) - eta * l1, 0.0), wi)
    w[i] = wi


def is_slot(i: int, hyper: np.ndarray) -> bool:
    """Whether feature weight ``i`` (never the bias) is a hashed slot's."""
    return i >= int(hyper[H_FIRST_SLOT])


def _check_codes(loss: int, opt: int) -> None:
    if loss not in (LOSS_LOGISTIC, LOSS_SQUARED):
        raise ValueError(f"unknown loss code {loss}")
    if opt not in (OPT_SGD, OPT_ADAGRAD, OPT_FTRL):
        raise ValueError(f"unknown optimizer code {opt}")


def _rows(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray):
    """Yield ``(idx, val)`` of each CSR row, ``val`` as float64."""
    for r in range(len(indptr) - 1):
        lo, hi = int(indptr[r]), int(indptr[r + 1])
        yield indices[lo:hi].astype(np.int64), values[lo:hi].astype(np.float64)


def linear_predict_dense(X: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """Write the raw margins ``X @ w[:d] + w[-1]`` into ``out`` (the bias is the last
    weight; a model's missing block may lie between)."""
    d = X.shape[1]
    w64 = w.astype(np.float64)
    out[:] = X.astype(np.float64) @ w64[:d] + w64[-1]


def linear_predict_csr(
    indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, w: np.ndarray, out: np.ndarray
) -> None:
    """Write the raw margins of CSR rows (duplicates add up) into ``out``."""
    w64 = w.astype(np.float64)
    bias = w64[-1]
    for r, (idx, val) in enumerate(_rows(indptr, indices, values)):
        out[r] = bias + float(np.sum(val * w64[idx]))


def linear_learn_dense(
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    loss: int,
    opt: int,
    hyper: np.ndarray,
    step: int,
) -> float:
    """One mini-batch step on dense rows; returns the pre-update summed loss."""
    _check_codes(loss, opt)
    n, d = X.shape
    if n == 0:
        return 0.0
    X64 = X.astype(np.float64)
    w64 = w.astype(np.float64)
    margins = X64 @ w64[:d] + w64[-1]
    total = 0.0
    dm = np.empty(n)
    for r in range(n):
        value, dm[r] = loss_and_dloss(margins[r], y[r], loss)
        total += value
    grad = X64.T @ dm / n
    for j in range(d):
        step_coordinate(w, s1, s2, j, float(grad[j]), opt, hyper, step, True)
    step_coordinate(w, s1, s2, w.shape[0] - 1, float(dm.mean()), opt, hyper, step, False)
    return total


def linear_learn_csr(
    indptr: np.ndarray,
    indices: np.ndarray,
    values: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    loss: int,
    opt: int,
    hyper: np.ndarray,
    step: int,
    grad: np.ndarray,
) -> float:
    """One mini-batch step on CSR rows with lazy regularization; returns the summed loss.

    ``grad`` is the caller's zero scratch buffer; the oracle does not need it and leaves it
    untouched (all zero).
    """
    _check_codes(loss, opt)
    n = len(indptr) - 1
    if n == 0:
        return 0.0
    D = len(w) - 1
    w64 = w.astype(np.float64)
    g = np.zeros(D + 1)
    total = 0.0
    for r, (idx, val) in enumerate(_rows(indptr, indices, values)):
        m = w64[D] + float(np.sum(val * w64[idx]))
        value, dm = loss_and_dloss(m, y[r], loss)
        total += value
        np.add.at(g, idx, dm * val / n)
        g[D] += dm / n
    touched = np.unique(indices[int(indptr[0]) : int(indptr[n])])
    for i in touched:
        step_coordinate(w, s1, s2, int(i), float(g[i]), opt, hyper, step, True,
                        is_slot(int(i), hyper))
    step_coordinate(w, s1, s2, D, float(g[D]), opt, hyper, step, False)
    return total


def _fm_margin(idx: np.ndarray, val: np.ndarray, w64: np.ndarray, V64: np.ndarray) -> float:
    # Direct O(nnz^2) pairwise sum, deliberately not the sum-square trick used by the kernels.
    m = w64[-1] + float(np.sum(val * w64[idx]))
    for a in range(len(idx)):
        for b in range(a + 1, len(idx)):
            m += float(V64[idx[a]] @ V64[idx[b]]) * val[a] * val[b]
    return m


def fm_predict_csr(
    indptr: np.ndarray,
    indices: np.ndarray,
    values: np.ndarray,
    w: np.ndarray,
    V: np.ndarray,
    out: np.ndarray,
) -> None:
    """Write the raw second-order FM margins of CSR rows into ``out``."""
    w64 = w.astype(np.float64)
    V64 = V.astype(np.float64)
    for r, (idx, val) in enumerate(_rows(indptr, indices, values)):
        out[r] = _fm_margin(idx, val, w64, V64)


def fm_learn_csr(
    indptr: np.ndarray,
    indices: np.ndarray,
    values: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    V: np.ndarray,
    s1w: np.ndarray,
    s2w: np.ndarray,
    s1v: np.ndarray,
    s2v: np.ndarray,
    loss: int,
    opt: int,
    hyper: np.ndarray,
    step: int,
    gw: np.ndarray,
    gv: np.ndarray,
) -> float:
    """One FM mini-batch step on CSR rows; returns the pre-update summed loss.

    ``gw``/``gv`` are the caller's zero scratch buffers; the oracle leaves them untouched.
    """
    _check_codes(loss, opt)
    n = len(indptr) - 1
    if n == 0:
        return 0.0
    D, k = V.shape
    w64 = w.astype(np.float64)
    V64 = V.astype(np.float64)
    g_w = np.zeros(D + 1)
    g_v = np.zeros((D, k))
    total = 0.0
    for r, (idx, val) in enumerate(_rows(indptr, indices, values)):
        value, dm = loss_and_dloss(_fm_margin(idx, val, w64, V64), y[r], loss)
        total += value
        g_w[D] += dm / n
        for a in range(len(idx)):
            g_w[idx[a]] += dm * val[a] / n
            # d m / d V[i_a] = x_a * sum_{b != a} V[i_b] x_b
            others = np.zeros(k)
            for b in range(len(idx)):
                if b != a:
                    others += V64[idx[b]] * val[b]
            g_v[idx[a]] += dm * val[a] * others / n
    touched = np.unique(indices[int(indptr[0]) : int(indptr[n])])
    for i in touched:
        i = int(i)
        step_coordinate(w, s1w, s2w, i, float(g_w[i]), opt, hyper, step, True,
                        is_slot(i, hyper))
        for f in range(k):
            step_coordinate(V, s1v, s2v, (i, f), float(g_v[i, f]), opt, hyper, step, True)
    step_coordinate(w, s1w, s2w, D, float(g_w[D]), opt, hyper, step, False)
    return total


def average_update(touched: np.ndarray, w: np.ndarray, avg: np.ndarray, rate: float,
                   n: np.ndarray) -> None:
    """Move the weights' running average towards the weights, in place, at the (unique)
    coordinates ``touched``: ``avg[i] += r_i * (w[i] - avg[i])`` in float64 (``avg`` is
    float64: a step of ``1 / horizon`` would round away in float32), where
    ``r_i = max(rate, min(1, 2 / (1 + AVG_UPDATES_PER_SQUARE * n[i])))`` and ``n`` holds
    the coordinates' squared-gradient sums after the step (empty, for SGD: ``r_i = rate``).

    The average scores alongside the weights (:mod:`streamlearn.models.average`); a
    coordinate's average moves only when an optimizer step touches the coordinate.
    """
    a = avg[touched].astype(np.float64)
    r = np.full(len(touched), float(rate))
    if len(n):
        own = 2.0 / (1.0 + AVG_UPDATES_PER_SQUARE * n[touched].astype(np.float64))
        r = np.maximum(r, np.minimum(1.0, own))
    avg[touched] = a + r * (w[touched].astype(np.float64) - a)


def scaler_update(X: np.ndarray, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
    """Merge the batch ``X`` (NaN = missing) into per-feature Welford state in place.

    Each feature's batch statistics (count, mean, sum of squared deviations) come from a
    two-pass computation over its non-NaN values and are merged with Chan et al.'s formula:
    ``delta = mean_b - mean``, ``mean += delta * n_b / (n_a + n_b)``,
    ``m2 += m2_b + delta**2 * n_a * n_b / (n_a + n_b)``, ``count += n_b``. Features with no
    observed value in the batch are left unchanged. Only NaN counts as missing (an inf is a
    value). The variance is ``m2 / count`` (population) or ``m2 / (count - 1)`` (sample).
    """
    for j in range(X.shape[1]):
        col = X[:, j].astype(np.float64)
        col = col[~np.isnan(col)]
        n_b = float(len(col))
        if n_b == 0:
            continue
        mean_b = float(col.mean())
        m2_b = float(np.sum((col - mean_b) ** 2))
        n_a = float(count[j])
        total = n_a + n_b
        delta = mean_b - float(mean[j])
        mean[j] = float(mean[j]) + delta * n_b / total
        m2[j] = float(m2[j]) + m2_b + delta * delta * n_a * n_b / total
        count[j] = total

"""CPU kernels: ``@njit`` twins of :mod:`streamlearn.kernels.reference`.

The semantics (mini-batch, lazy regularization, optimizers, losses) are documented once in
``reference.py``; every function here has the same name, signature and results up to
floating-point rounding. Inputs are assumed validated by the caller (dtype, C-contiguity,
shapes, ``0 <= indices < D``): numba does no bounds checking.

Everything runs serially (no ``parallel=True``). A learn step on a 256-row batch takes
~0.1-0.5 ms, dominated by scattered memory access. For predict, ``load_tests/bench_kernels.py``
measured a ``prange`` variant on this 2-core machine at 0.01x-1.3x of serial for 256 rows and
0.6x-2.1x for 65,536 rows, depending on the load from other processes (thread wake-ups). Not
worth a dependence on numba's threading layer, which the service would drive from several
threads (API) and processes (one worker per partition) at once (and GNU OpenMP is not
fork-safe).

Margins and the dense gradient accumulate in float64; the CSR/FM scratch gradients are
float32 because they are caller-owned and reset in O(nnz).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

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
    "scaler_update",
]


@njit(cache=True)
def _loss_dloss(m, y, loss):
    if loss == LOSS_LOGISTIC:
        e = math.exp(-abs(m))  # one exp serves the loss and the stable sigmoid
        value = math.log1p(e) + max(m, 0.0) - y * m
        p = 1.0 / (1.0 + e) if m >= 0.0 else e / (1.0 + e)
        return value, p - y
    r = m - y
    return 0.5 * r * r, r


@njit(cache=True)
def _check_codes(loss, opt):
    if loss != LOSS_LOGISTIC and loss != LOSS_SQUARED:
        raise ValueError("unknown loss code")
    if opt != OPT_SGD and opt != OPT_ADAGRAD and opt != OPT_FTRL:
        raise ValueError("unknown optimizer code")


@njit(cache=True)
def _opt_scalars(hyper, step):
    """``(lr, l1, l2, beta, cap, eta_sgd)``, hoisted out of the per-coordinate loops."""
    lr = hyper[H_LEARNING_RATE]
    eta = lr / (1.0 + step) ** hyper[H_POWER_T]
    return lr, hyper[H_L1], hyper[H_L2], hyper[H_FTRL_BETA], hyper[H_CAP], eta


@njit(cache=True)
def _slot_scalars(hyper, step):
    """``(lr, eta_sgd, first)`` of the hashed slots: weights ``first .. len(w) - 2``."""
    lr = hyper[H_SLOT_LR]
    return lr, lr / (1.0 + step) ** hyper[H_POWER_T], np.int64(hyper[H_FIRST_SLOT])


@njit(inline="always")
def capped(grown, old, cap):  # pragma: no cover - compiled
    """A squared-gradient sum after a step: ``grown``, but never past ``max(cap, old)``
    (the memory cap, ``ModelSpec.horizon``: it stops growing, and never shrinks)."""
    return min(grown, max(cap, old))


@njit(cache=True)
def _update(wi, s1i, s2i, g, opt, lr, l1, l2, beta, cap, eta_sgd):
    """One coordinate step in float64; returns the new ``(w, s1, s2)``.

    Working on scalars lets the same helper serve ``w`` (1-D) and ``V`` (2-D).
    """
    if opt == OPT_FTRL:
        # One division: ``sigma`` and the denominator share ``1 / lr`` and ``sqrt(n_new)``.
        n_new = capped(s2i + g * g, s2i, cap)
        sq_new = math.sqrt(n_new)
        inv_lr = 1.0 / lr
        z = s1i + g - (sq_new - math.sqrt(s2i)) * inv_lr * wi
        if abs(z) <= l1:
            return 0.0, z, n_new
        return -(z - math.copysign(l1, z)) / ((beta + sq_new) * inv_lr + l2), z, n_new
    g = g + l2 * wi
    if opt == OPT_ADAGRAD:
        s1i = capped(s1i + g * g, s1i, cap)
        eta = lr / (math.sqrt(s1i) + ADAGRAD_EPS)
    else:
        eta = eta_sgd
    wi = wi - eta * g
    if l1 > 0.0:
        wi = math.copysign(max(abs(wi) - eta * l1, 0.0), wi)
    return wi, s1i, s2i


@njit(cache=True)
def _touched(indices, lo, hi, grad):
    """Unique indices of ``indices[lo:hi]`` and their ``grad`` values; zeroes ``grad`` there.

    O(nnz): each coordinate is claimed on first sight by overwriting its scratch value with
    a NaN marker (the value is saved first). The scratch cannot mark with zero, because a
    touched coordinate may have an exactly-zero gradient and still needs its L1/L2 step; and
    numba's ``np.sort`` alone costs several times the rest of a batch. A NaN already in the
    scratch (non-finite input) would be mistaken for the marker, so that rare case falls back
    to sorting.
    """
    m = hi - lo
    uniq = np.empty(m, np.int64)
    gvals = np.empty(m, np.float64)
    k = 0
    has_nan = False
    for e in range(lo, hi):
        if math.isnan(grad[indices[e]]):
            has_nan = True
            break
    if has_nan:
        ordered = np.sort(indices[lo:hi])
        prev = -1
        for t in range(m):
            i = ordered[t]
            if i != prev:
                uniq[k] = i
                gvals[k] = grad[i]
                k += 1
                prev = i
    else:
        for e in range(lo, hi):
            i = indices[e]
            g = grad[i]
            if math.isnan(g):
                continue
            uniq[k] = i
            gvals[k] = g
            k += 1
            grad[i] = np.nan
    for t in range(k):
        grad[uniq[t]] = 0.0
    return uniq[:k], gvals[:k]


# Inlined: called once per row, and a real call would refcount its array arguments.
@njit(cache=True, inline="always")
def _dense_margin(X, r, w):
    """``w[-1] + X[r] @ w[:d]`` in float64, as four interleaved partial sums (the bias is
    the last weight, as in the CSR kernels: a model's missing block may lie between).

    Feature ``j < 4 * (d // 4)`` goes to sum ``j % 4``; the bias starts sum 0, which
    also takes the ``d % 4`` last features; the result is ``(s0 + s1) + (s2 + s3)``.
    One running sum would chain every add on the previous one, and the margin is on a
    per-event learner's critical path (~4 cycles an add); four sums cut the chain to a
    quarter (dense-32 per-event step ~175 -> ~160 ns/row, measured). Every dense margin
    (CPU and CUDA kernels, the fused per-event loop) sums in this order, so the paths
    agree bit for bit.
    """
    d = X.shape[1]
    s0 = np.float64(w[w.shape[0] - 1])
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    j = 0
    while j + 4 <= d:
        s0 += np.float64(X[r, j]) * w[j]
        s1 += np.float64(X[r, j + 1]) * w[j + 1]
        s2 += np.float64(X[r, j + 2]) * w[j + 2]
        s3 += np.float64(X[r, j + 3]) * w[j + 3]
        j += 4
    while j < d:
        s0 += np.float64(X[r, j]) * w[j]
        j += 1
    return (s0 + s1) + (s2 + s3)


@njit(cache=True)
def linear_predict_dense(X, w, out):
    """Write raw margins ``X @ w[:d] + w[-1]`` into ``out`` (float64 accumulation)."""
    for r in range(X.shape[0]):
        out[r] = _dense_margin(X, r, w)


@njit(cache=True)
def linear_predict_csr(indptr, indices, values, w, out):
    """Write raw margins of CSR rows into ``out``; duplicate indices add up."""
    n = indptr.shape[0] - 1
    bias = np.float64(w[w.shape[0] - 1])
    for r in range(n):
        m = bias
        for e in range(indptr[r], indptr[r + 1]):
            m += np.float64(values[e]) * w[indices[e]]
        out[r] = m


@njit(cache=True)
def linear_learn_dense(X, y, w, s1, s2, loss, opt, hyper, step):
    """One mini-batch step on dense rows; returns the pre-update summed loss."""
    _check_codes(loss, opt)
    n, d = X.shape
    if n == 0:
        return 0.0
    grad = np.zeros(d + 1)
    total = 0.0
    inv_n = 1.0 / n
    for r in range(n):
        m = _dense_margin(X, r, w)
        value, dm = _loss_dloss(m, np.float64(y[r]), loss)
        total += value
        coef = dm * inv_n
        for j in range(d):
            grad[j] += coef * X[r, j]
        grad[d] += coef
    lr, l1, l2, beta, cap, eta = _opt_scalars(hyper, step)
    for j in range(d + 1):
        i = j
        if j == d:  # the bias (the last weight) is never regularized
            i = w.shape[0] - 1
            l1 = 0.0
            l2 = 0.0
        wj, a, b = _update(
            np.float64(w[i]),
            np.float64(s1[i]),
            np.float64(s2[i]),
            grad[j],
            opt,
            lr,
            l1,
            l2,
            beta,
            cap,
            eta,
        )
        w[i] = wj
        s1[i] = a
        s2[i] = b
    return total


@njit(cache=True)
def linear_learn_csr(indptr, indices, values, y, w, s1, s2, loss, opt, hyper, step, grad):
    """One mini-batch step on CSR rows, lazily regularized; returns the summed loss.

    ``grad`` (float32, shape of ``w``) must be all zero on entry and is all zero on return.
    """
    _check_codes(loss, opt)
    n = indptr.shape[0] - 1
    if n == 0:
        return 0.0
    D = w.shape[0] - 1
    total = 0.0
    g_bias = 0.0
    inv_n = 1.0 / n
    for r in range(n):
        m = np.float64(w[D])
        for e in range(indptr[r], indptr[r + 1]):
            m += np.float64(values[e]) * w[indices[e]]
        value, dm = _loss_dloss(m, np.float64(y[r]), loss)
        total += value
        coef = dm * inv_n
        for e in range(indptr[r], indptr[r + 1]):
            grad[indices[e]] += coef * values[e]
        g_bias += coef
    uniq, gvals = _touched(indices, indptr[0], indptr[n], grad)
    lr, l1, l2, beta, cap, eta = _opt_scalars(hyper, step)
    slot_lr, slot_eta, first = _slot_scalars(hyper, step)
    # The per-coordinate updates are written out rather than factored into a helper taking
    # the arrays: array arguments of a non-inlined call cost atomic refcounts, ~5x slower.
    for t in range(uniq.shape[0] + 1):
        if t < uniq.shape[0]:
            i = uniq[t]
            g = gvals[t]
        else:  # the bias, never regularized
            i = D
            g = g_bias
            l1 = 0.0
            l2 = 0.0
        slot = first <= i < D
        wi, a, b = _update(
            np.float64(w[i]), np.float64(s1[i]), np.float64(s2[i]), g, opt,
            slot_lr if slot else lr, l1, l2, beta, cap, slot_eta if slot else eta,
        )
        w[i] = wi
        s1[i] = a
        s2[i] = b
    return total


# Inlined: called once per row, and a real call would refcount its five array arguments.
@njit(cache=True, inline="always")
def _fm_row(indptr, indices, values, w, V, r, S):
    """Margin of row ``r``; leaves ``S[f] = sum_e V[i_e, f] x_e`` in the scratch ``S``."""
    k = V.shape[1]
    m = np.float64(w[w.shape[0] - 1])
    for f in range(k):
        S[f] = 0.0
    sq = 0.0
    for e in range(indptr[r], indptr[r + 1]):
        i = indices[e]
        x = np.float64(values[e])
        m += x * w[i]
        for f in range(k):
            v = V[i, f] * x
            S[f] += v
            sq += v * v
    inter = 0.0
    for f in range(k):
        inter += S[f] * S[f]
    return m + 0.5 * (inter - sq)


@njit(cache=True)
def fm_predict_csr(indptr, indices, values, w, V, out):
    """Write raw second-order FM margins of CSR rows into ``out`` in O(nnz * k)."""
    n = indptr.shape[0] - 1
    S = np.empty(V.shape[1])
    for r in range(n):
        out[r] = _fm_row(indptr, indices, values, w, V, r, S)


@njit(cache=True)
def fm_learn_csr(
    indptr, indices, values, y, w, V, s1w, s2w, s1v, s2v, loss, opt, hyper, step, gw, gv
):
    """One FM mini-batch step on CSR rows; returns the pre-update summed loss.

    ``gw``/``gv`` (float32, shapes of ``w``/``V``) are zero on entry and on return.
    """
    _check_codes(loss, opt)
    n = indptr.shape[0] - 1
    if n == 0:
        return 0.0
    D, k = V.shape
    S = np.empty(k)
    total = 0.0
    g_bias = 0.0
    inv_n = 1.0 / n
    for r in range(n):
        m = _fm_row(indptr, indices, values, w, V, r, S)
        value, dm = _loss_dloss(m, np.float64(y[r]), loss)
        total += value
        coef = dm * inv_n
        g_bias += coef
        for e in range(indptr[r], indptr[r + 1]):
            i = indices[e]
            x = np.float64(values[e])
            gw[i] += coef * x
            for f in range(k):
                gv[i, f] += coef * x * (S[f] - V[i, f] * x)
    uniq, gvals = _touched(indices, indptr[0], indptr[n], gw)
    lr, l1, l2, beta, cap, eta = _opt_scalars(hyper, step)
    slot_lr, slot_eta, first = _slot_scalars(hyper, step)
    for t in range(uniq.shape[0]):
        i = uniq[t]
        slot = i >= first  # the bias is not in ``uniq``
        wi, a, b = _update(
            np.float64(w[i]),
            np.float64(s1w[i]),
            np.float64(s2w[i]),
            gvals[t],
            opt,
            slot_lr if slot else lr,
            l1,
            l2,
            beta,
            cap,
            slot_eta if slot else eta,
        )
        w[i] = wi
        s1w[i] = a
        s2w[i] = b
        for f in range(k):
            g = np.float64(gv[i, f])
            gv[i, f] = 0.0
            vi, a, b = _update(
                np.float64(V[i, f]),
                np.float64(s1v[i, f]),
                np.float64(s2v[i, f]),
                g,
                opt,
                lr,
                l1,
                l2,
                beta,
                cap,
                eta,
            )
            V[i, f] = vi
            s1v[i, f] = a
            s2v[i, f] = b
    wi, a, b = _update(
        np.float64(w[D]),
        np.float64(s1w[D]),
        np.float64(s2w[D]),
        g_bias,
        opt,
        lr,
        0.0,
        0.0,
        beta,
        cap,
        eta,
    )
    w[D] = wi
    s1w[D] = a
    s2w[D] = b
    return total


@njit(inline="always")
def average_coordinate(a, wi, rate):  # pragma: no cover - compiled
    """One coordinate of the weights' running average, moved ``rate`` of the way to
    ``wi``, in float64 (the fused per-event loop inlines the same expression)."""
    a64 = np.float64(a)
    return a64 + rate * (np.float64(wi) - a64)


@njit(inline="always")
def coordinate_rate(rate, n):  # pragma: no cover - compiled
    """How far one weight's average moves at its update: ``rate``, or more for a weight
    updated rarely, from its squared-gradient sum ``n`` (codes.AVG_UPDATES_PER_SQUARE)."""
    x = 1.0 + AVG_UPDATES_PER_SQUARE * n
    # max(rate, min(1, 2 / x)), dividing only when the weight's own rate wins (rarely,
    # for a weight of a long stream): the per-event loop runs this for every coordinate
    return min(1.0, 2.0 / x) if rate * x < 2.0 else rate


@njit(inline="always")
def own_rate(rate, n, i):  # pragma: no cover - compiled
    """The rate of weight ``i``'s average: :func:`coordinate_rate` of its squared-gradient
    sum ``n[i]``, or ``rate`` where ``n`` is empty (SGD keeps no sums)."""
    return coordinate_rate(rate, np.float64(n[i])) if n.shape[0] > 0 else rate


@njit(cache=True)
def average_update(touched, w, avg, rate, n):
    """``avg[i] += r_i * (w[i] - avg[i])`` for each index in ``touched`` (unique), ``r_i``
    :func:`own_rate` of ``n``."""
    for t in range(touched.shape[0]):
        i = touched[t]
        avg[i] = average_coordinate(avg[i], w[i], own_rate(rate, n, i))


@njit(cache=True)
def scaler_update(X, count, mean, m2):
    """Merge the batch ``X`` (NaN = missing) into per-feature Welford state (Chan merge)."""
    n, d = X.shape
    nb = np.zeros(d)
    sb = np.zeros(d)
    # Row-major passes keep the C-contiguous X streaming through the cache.
    for r in range(n):
        for j in range(d):
            x = X[r, j]
            if not math.isnan(x):
                nb[j] += 1.0
                sb[j] += x
    for j in range(d):
        if nb[j] > 0.0:
            sb[j] /= nb[j]
    m2b = np.zeros(d)
    for r in range(n):
        for j in range(d):
            x = X[r, j]
            if not math.isnan(x):
                dx = x - sb[j]
                m2b[j] += dx * dx
    for j in range(d):
        if nb[j] == 0.0:
            continue
        na = count[j]
        tot = na + nb[j]
        delta = sb[j] - mean[j]
        mean[j] += delta * nb[j] / tot
        m2[j] += m2b[j] + delta * delta * na * nb[j] / tot
        count[j] = tot

"""CUDA twins of :mod:`streamlearn.kernels.cpu` (``numba.cuda``), imported lazily by the core.

Every host launcher has the name, signature and semantics of its CPU twin (documented in
``reference.py``). Parameters, optimizer state and scratch buffers may be host NumPy arrays
(copied to the device and back) or device arrays (updated in place on the device, so a model
can keep its weights resident and ship only the mini-batch). Mini-batch inputs may be either.

Learning is split into two launches so that every row's margin uses the pre-update weights:
a per-row kernel (margin, loss, ``dloss/dm``, and for CSR/FM a race-free ``cuda.atomic.add``
of the row's gradient into the float32 scratch), then a per-coordinate update kernel over the
touched coordinates (for CSR/FM the unique batch indices, found on the host with
``np.unique``, plus the bias) that reads and re-zeroes the scratch. Margins are accumulated in
float64, as on the CPU; the atomics make CSR/FM results order-dependent at float32 rounding.

``THREADS_PER_BLOCK`` is read at every launch, so tests can patch it to tiny values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda, float32, float64

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
    LOSSES,
    OPT_ADAGRAD,
    OPT_FTRL,
    OPTIMIZERS,
)

__all__ = [
    "ROWS_PER_THREAD",
    "THREADS_PER_BLOCK",
    "average_update",
    "fm_learn_csr",
    "fm_predict_csr",
    "is_available",
    "linear_learn_csr",
    "linear_learn_dense",
    "linear_predict_csr",
    "linear_predict_dense",
    "scaler_update",
]

THREADS_PER_BLOCK = 256
"""Threads per block of every launch (1-D grids)."""

ROWS_PER_THREAD = 64
"""Rows each thread of the dense gradient reduction sums before its one atomic add."""


def is_available() -> bool:
    """Whether a CUDA device (or the CUDA simulator) can run these kernels; never raises."""
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install must read as "no GPU", not crash the caller
        return False


# --------------------------------------------------------------------------- device helpers


@cuda.jit(device=True)
def _loss_dloss(m, y, loss):
    if loss == LOSS_LOGISTIC:
        # No max()/min() in device code: the simulator accepts them, the CUDA target does not.
        e = math.exp(-abs(m))  # one exp serves the loss and the stable sigmoid
        value = math.log1p(e) + (m if m > 0.0 else 0.0) - y * m
        p = 1.0 / (1.0 + e) if m >= 0.0 else e / (1.0 + e)
        return value, p - y
    r = m - y
    return 0.5 * r * r, r


@cuda.jit(device=True)
def _capped(grown, old, cap):
    """``min(grown, max(cap, old))``: builtin ``min``/``max`` do not type on the CUDA target."""
    top = cap if cap > old else old
    return top if grown > top else grown


@cuda.jit(device=True)
def _update(wi, s1i, s2i, g, opt, lr, l1, l2, beta, cap, eta_sgd):
    """One coordinate step in float64; returns the new ``(w, s1, s2)`` (see reference.py)."""
    if opt == OPT_FTRL:
        n_new = _capped(s2i + g * g, s2i, cap)
        sigma = (math.sqrt(n_new) - math.sqrt(s2i)) / lr
        z = s1i + g - sigma * wi
        if abs(z) <= l1:
            return 0.0, z, n_new
        return -(z - math.copysign(l1, z)) / ((beta + math.sqrt(n_new)) / lr + l2), z, n_new
    g = g + l2 * wi
    if opt == OPT_ADAGRAD:
        s1i = _capped(s1i + g * g, s1i, cap)
        eta = lr / (math.sqrt(s1i) + ADAGRAD_EPS)
    else:
        eta = eta_sgd
    wi = wi - eta * g
    if l1 > 0.0:
        shrunk = abs(wi) - eta * l1
        wi = math.copysign(shrunk if shrunk > 0.0 else 0.0, wi)
    return wi, s1i, s2i


@cuda.jit(device=True)
def _step_vec(w, s1, s2, i, g, opt, lr, l1, l2, beta, cap, eta_sgd):
    wi, a, b = _update(
        float64(w[i]), float64(s1[i]), float64(s2[i]), g, opt, lr, l1, l2, beta, cap, eta_sgd
    )
    w[i] = wi
    s1[i] = a
    s2[i] = b


@cuda.jit(device=True)
def _csr_margin(indptr, indices, values, w, r):
    m = float64(w[w.shape[0] - 1])
    for e in range(indptr[r], indptr[r + 1]):
        m += float64(values[e]) * float64(w[indices[e]])
    return m


@cuda.jit(device=True)
def _fm_margin(indptr, indices, values, w, V, r):
    # Loop factors outside entries: no per-thread array of runtime length k is needed.
    m = _csr_margin(indptr, indices, values, w, r)
    lo = indptr[r]
    hi = indptr[r + 1]
    for f in range(V.shape[1]):
        s = 0.0
        sq = 0.0
        for e in range(lo, hi):
            v = float64(V[indices[e], f]) * float64(values[e])
            s += v
            sq += v * v
        m += 0.5 * (s * s - sq)
    return m


# --------------------------------------------------------------------------- kernels


@cuda.jit(device=True)
def _dense_margin(X, r, w):
    # The CPU kernels' order (cpu._dense_margin): four interleaved partial sums, the
    # d % 4 last features into s0, then (s0 + s1) + (s2 + s3).
    d = X.shape[1]
    s0 = float64(w[w.shape[0] - 1])
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    j = 0
    while j + 4 <= d:
        s0 += float64(X[r, j]) * float64(w[j])
        s1 += float64(X[r, j + 1]) * float64(w[j + 1])
        s2 += float64(X[r, j + 2]) * float64(w[j + 2])
        s3 += float64(X[r, j + 3]) * float64(w[j + 3])
        j += 4
    while j < d:
        s0 += float64(X[r, j]) * float64(w[j])
        j += 1
    return (s0 + s1) + (s2 + s3)


@cuda.jit
def linear_predict_dense_kernel(X, w, out):
    """One thread per row: ``out[r] = X[r] @ w[:d] + w[-1]``."""
    r = cuda.grid(1)
    if r < X.shape[0]:
        out[r] = _dense_margin(X, r, w)


@cuda.jit
def linear_predict_csr_kernel(indptr, indices, values, w, out):
    """One thread per CSR row."""
    r = cuda.grid(1)
    if r < out.shape[0]:
        out[r] = _csr_margin(indptr, indices, values, w, r)


@cuda.jit
def linear_rows_dense_kernel(X, y, w, loss, losses, dm):
    """One thread per row: pre-update loss and ``dloss/dm``."""
    r = cuda.grid(1)
    if r < X.shape[0]:
        m = _dense_margin(X, r, w)
        value, g = _loss_dloss(m, float64(y[r]), loss)
        losses[r] = value
        dm[r] = g


@cuda.jit
def linear_grad_dense_kernel(X, dm, rows_per_thread, grad):
    """Thread ``t`` sums coordinate ``t % (d + 1)`` over one chunk of rows into ``grad``.

    A thread per coordinate alone would leave a 32-feature batch with 33 busy threads; chunking
    the rows gives ``(d + 1) * ceil(n / rows_per_thread)`` threads, with consecutive threads
    reading consecutive columns of the same rows (coalesced) and one float64 atomic each.
    """
    t = cuda.grid(1)
    n, d = X.shape
    j = t % (d + 1)
    lo = (t // (d + 1)) * rows_per_thread
    if lo < n:
        hi = lo + rows_per_thread
        if hi > n:
            hi = n
        s = 0.0
        if j < d:
            for r in range(lo, hi):
                s += dm[r] * float64(X[r, j])
        else:
            for r in range(lo, hi):
                s += dm[r]
        cuda.atomic.add(grad, j, s)


@cuda.jit
def linear_update_dense_kernel(grad, n, w, s1, s2, opt, lr, l1, l2, beta, cap, eta_sgd):
    """One thread per coordinate (``d`` features, then the unregularized bias, the last
    weight)."""
    j = cuda.grid(1)
    d = grad.shape[0] - 1
    if j < d:
        _step_vec(w, s1, s2, j, grad[j] / n, opt, lr, l1, l2, beta, cap, eta_sgd)
    elif j == d:
        _step_vec(w, s1, s2, w.shape[0] - 1, grad[j] / n, opt, lr, 0.0, 0.0, beta, cap,
                  eta_sgd)


@cuda.jit
def linear_rows_csr_kernel(indptr, indices, values, y, w, loss, inv_n, losses, grad):
    """One thread per row: loss, then atomically add the row's mean gradient into ``grad``.

    Rows that hash to the same weight add into the same scratch slot, hence the atomics.
    """
    r = cuda.grid(1)
    if r < losses.shape[0]:
        m = _csr_margin(indptr, indices, values, w, r)
        value, g = _loss_dloss(m, float64(y[r]), loss)
        losses[r] = value
        coef = g * inv_n
        for e in range(indptr[r], indptr[r + 1]):
            cuda.atomic.add(grad, indices[e], float32(coef * float64(values[e])))
        cuda.atomic.add(grad, grad.shape[0] - 1, float32(coef))


@cuda.jit
def linear_update_csr_kernel(touched, grad, w, s1, s2, opt, lr, l1, l2, beta, cap, eta_sgd,
                            slot_lr, slot_eta, first):
    """One thread per unique touched coordinate; consumes and re-zeroes ``grad``. Hashed
    slots (``first`` up to the bias) take ``slot_lr`` and ``slot_eta``."""
    t = cuda.grid(1)
    if t < touched.shape[0]:
        i = touched[t]
        g = float64(grad[i])
        grad[i] = 0.0
        if i == w.shape[0] - 1:  # the bias is never regularized
            _step_vec(w, s1, s2, i, g, opt, lr, 0.0, 0.0, beta, cap, eta_sgd)
        elif i >= first:
            _step_vec(w, s1, s2, i, g, opt, slot_lr, l1, l2, beta, cap, slot_eta)
        else:
            _step_vec(w, s1, s2, i, g, opt, lr, l1, l2, beta, cap, eta_sgd)


@cuda.jit
def average_update_kernel(touched, w, avg, rate, n):
    """One thread per unique touched coordinate: ``avg[i] += r * (w[i] - avg[i])``, ``r``
    the rate of ``n[i]`` (``n`` empty: ``rate``), as ``cpu.coordinate_rate``."""
    t = cuda.grid(1)
    if t < touched.shape[0]:
        i = touched[t]
        if n.shape[0] > 0:  # written out: max/min of floats do not type on the target
            own = 2.0 / (1.0 + AVG_UPDATES_PER_SQUARE * float64(n[i]))
            if own > 1.0:
                own = 1.0
            if own > rate:
                rate = own
        a = float64(avg[i])
        avg[i] = a + rate * (float64(w[i]) - a)


@cuda.jit
def fm_predict_csr_kernel(indptr, indices, values, w, V, out):
    """One thread per CSR row; sum-square trick, O(nnz * k)."""
    r = cuda.grid(1)
    if r < out.shape[0]:
        out[r] = _fm_margin(indptr, indices, values, w, V, r)


@cuda.jit
def fm_rows_csr_kernel(indptr, indices, values, y, w, V, loss, inv_n, losses, gw, gv):
    """One thread per row: loss, then atomic adds of the row's ``w`` and ``V`` gradients."""
    r = cuda.grid(1)
    if r < losses.shape[0]:
        m = _fm_margin(indptr, indices, values, w, V, r)
        value, g = _loss_dloss(m, float64(y[r]), loss)
        losses[r] = value
        coef = g * inv_n
        lo = indptr[r]
        hi = indptr[r + 1]
        for e in range(lo, hi):
            cuda.atomic.add(gw, indices[e], float32(coef * float64(values[e])))
        cuda.atomic.add(gw, gw.shape[0] - 1, float32(coef))
        for f in range(V.shape[1]):
            s = 0.0
            for e in range(lo, hi):
                s += float64(V[indices[e], f]) * float64(values[e])
            for e in range(lo, hi):
                i = indices[e]
                x = float64(values[e])
                cuda.atomic.add(gv, (i, f), float32(coef * x * (s - float64(V[i, f]) * x)))


@cuda.jit
def fm_update_csr_kernel(touched, gw, gv, w, V, s1w, s2w, s1v, s2v, opt, lr, l1, l2, beta, cap,
                         eta_sgd, slot_lr, slot_eta, first):
    """One thread per (touched index, slot): slot ``k`` is the linear weight, ``f < k`` a factor.

    ``touched`` holds the unique batch indices followed by the bias index ``D``, which has
    only the linear slot (unregularized) and no factors.
    """
    t = cuda.grid(1)
    k = V.shape[1]
    if t < touched.shape[0] * (k + 1):
        u = t // (k + 1)
        f = t - u * (k + 1)
        i = touched[u]
        bias = i == V.shape[0]
        if f == k:
            g = float64(gw[i])
            gw[i] = 0.0
            if bias:
                _step_vec(w, s1w, s2w, i, g, opt, lr, 0.0, 0.0, beta, cap, eta_sgd)
            elif i >= first:
                _step_vec(w, s1w, s2w, i, g, opt, slot_lr, l1, l2, beta, cap, slot_eta)
            else:
                _step_vec(w, s1w, s2w, i, g, opt, lr, l1, l2, beta, cap, eta_sgd)
        elif not bias:
            g = float64(gv[i, f])
            gv[i, f] = 0.0
            vi, a, b = _update(
                float64(V[i, f]),
                float64(s1v[i, f]),
                float64(s2v[i, f]),
                g,
                opt,
                lr,
                l1,
                l2,
                beta,
                cap,
                eta_sgd,
            )
            V[i, f] = vi
            s1v[i, f] = a
            s2v[i, f] = b


@cuda.jit
def scaler_update_kernel(X, count, mean, m2):
    """One thread per feature: two-pass batch moments over non-NaN values, then Chan merge."""
    j = cuda.grid(1)
    n, d = X.shape
    if j < d:
        nb = 0.0
        s = 0.0
        for r in range(n):
            x = X[r, j]
            if not math.isnan(x):
                nb += 1.0
                s += x
        if nb > 0.0:
            mb = s / nb
            q = 0.0
            for r in range(n):
                x = X[r, j]
                if not math.isnan(x):
                    q += (x - mb) * (x - mb)
            na = count[j]
            tot = na + nb
            delta = mb - mean[j]
            mean[j] += delta * nb / tot
            m2[j] += q + delta * delta * na * nb / tot
            count[j] = tot


# --------------------------------------------------------------------------- host side


def _blocks(n: int) -> int:
    return (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK


def _launch(kernel: Any, n_threads: int, *args: Any) -> None:
    if n_threads > 0:
        kernel[_blocks(n_threads), THREADS_PER_BLOCK](*args)


def _is_device(a: Any) -> bool:
    return hasattr(a, "copy_to_host")


def _dev(a: Any) -> Any:
    """A device view of ``a``: itself if it already lives on the device, else a copy."""
    if _is_device(a):
        return a
    if hasattr(a, "__cuda_array_interface__"):  # e.g. CuPy arrays
        return cuda.as_cuda_array(a)
    return cuda.to_device(a)


class _Mutable:
    """Device views of in-place arguments; copies results back into the host ones on exit."""

    def __init__(self, *arrays: Any) -> None:
        self._host = arrays
        self.dev = [_dev(a) for a in arrays]

    def __enter__(self) -> list[Any]:
        return self.dev

    def __exit__(self, *exc: object) -> None:
        for host, dev in zip(self._host, self.dev, strict=True):
            if dev is not host and not hasattr(host, "__cuda_array_interface__"):
                dev.copy_to_host(host)


def _host(a: Any) -> np.ndarray:
    return a.copy_to_host() if _is_device(a) else np.asarray(a)


def _check_codes(loss: int, opt: int) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss code {loss}")
    if opt not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer code {opt}")


def _opt_args(hyper: np.ndarray, step: int) -> tuple[float, float, float, float, float, float]:
    """``(lr, l1, l2, beta, cap, eta_sgd)`` as plain floats for the update kernels."""
    h = _host(hyper).astype(np.float64)
    lr = float(h[H_LEARNING_RATE])
    eta = lr / (1.0 + step) ** float(h[H_POWER_T])
    return lr, float(h[H_L1]), float(h[H_L2]), float(h[H_FTRL_BETA]), float(h[H_CAP]), eta


def _slot_args(hyper: np.ndarray, step: int) -> tuple[float, float, int]:
    """``(slot_lr, slot_eta_sgd, first_slot)`` for the update kernels."""
    h = _host(hyper).astype(np.float64)
    lr = float(h[H_SLOT_LR])
    return lr, lr / (1.0 + step) ** float(h[H_POWER_T]), int(h[H_FIRST_SLOT])


def _touched(indptr: Any, indices: Any, n: int, bias: int) -> np.ndarray:
    ptr = _host(indptr)
    idx = _host(indices)[int(ptr[0]) : int(ptr[n])]
    return np.append(np.unique(idx).astype(np.int64), np.int64(bias))


def _n_rows(indptr: Any) -> int:
    return int(indptr.shape[0]) - 1


def average_update(touched: Any, w: Any, avg: Any, rate: float, n: Any) -> None:
    """The weights' running average at the unique coordinates ``touched`` (host or
    device), moved towards the weights: ``rate``, or more where the squared-gradient sums
    ``n`` are small (empty ``n``: ``rate``)."""
    with _Mutable(avg) as (d_avg,):
        _launch(average_update_kernel, int(touched.shape[0]), _dev(touched), _dev(w), d_avg,
                float(rate), _dev(n))


def linear_predict_dense(X: Any, w: Any, out: Any) -> None:
    """Raw margins of dense rows into ``out`` (host or device)."""
    with _Mutable(out) as (d_out,):
        _launch(linear_predict_dense_kernel, X.shape[0], _dev(X), _dev(w), d_out)


def linear_predict_csr(indptr: Any, indices: Any, values: Any, w: Any, out: Any) -> None:
    """Raw margins of CSR rows into ``out`` (host or device)."""
    with _Mutable(out) as (d_out,):
        _launch(
            linear_predict_csr_kernel,
            _n_rows(indptr),
            _dev(indptr),
            _dev(indices),
            _dev(values),
            _dev(w),
            d_out,
        )


def linear_learn_dense(
    X: Any, y: Any, w: Any, s1: Any, s2: Any, loss: int, opt: int, hyper: Any, step: int
) -> float:
    """One mini-batch step on dense rows; returns the pre-update summed loss."""
    _check_codes(loss, opt)
    n, d = X.shape
    if n == 0:
        return 0.0
    lr, l1, l2, beta, cap, eta = _opt_args(hyper, step)
    d_X = _dev(X)
    losses = cuda.device_array(n, dtype=np.float64)
    dm = cuda.device_array(n, dtype=np.float64)
    grad = cuda.to_device(np.zeros(d + 1))
    rows = ROWS_PER_THREAD
    with _Mutable(w, s1, s2) as (d_w, d_s1, d_s2):
        _launch(linear_rows_dense_kernel, n, d_X, _dev(y), d_w, loss, losses, dm)
        _launch(linear_grad_dense_kernel, (d + 1) * -(-n // rows), d_X, dm, rows, grad)
        _launch(
            linear_update_dense_kernel,
            d + 1,
            grad,
            n,
            d_w,
            d_s1,
            d_s2,
            opt,
            lr,
            l1,
            l2,
            beta,
            cap,
            eta,
        )
    return float(losses.copy_to_host().sum())


def linear_learn_csr(
    indptr: Any,
    indices: Any,
    values: Any,
    y: Any,
    w: Any,
    s1: Any,
    s2: Any,
    loss: int,
    opt: int,
    hyper: Any,
    step: int,
    grad: Any,
) -> float:
    """One mini-batch step on CSR rows (lazy regularization); returns the summed loss.

    ``grad`` (float32, shape of ``w``) is zero on entry and zero on return.
    """
    _check_codes(loss, opt)
    n = _n_rows(indptr)
    if n == 0:
        return 0.0
    lr, l1, l2, beta, cap, eta = _opt_args(hyper, step)
    D = w.shape[0] - 1
    touched = cuda.to_device(_touched(indptr, indices, n, D))
    losses = cuda.device_array(n, dtype=np.float64)
    with _Mutable(w, s1, s2, grad) as (d_w, d_s1, d_s2, d_grad):
        _launch(
            linear_rows_csr_kernel,
            n,
            _dev(indptr),
            _dev(indices),
            _dev(values),
            _dev(y),
            d_w,
            loss,
            1.0 / n,
            losses,
            d_grad,
        )
        _launch(
            linear_update_csr_kernel,
            touched.shape[0],
            touched,
            d_grad,
            d_w,
            d_s1,
            d_s2,
            opt,
            lr,
            l1,
            l2,
            beta,
            cap,
            eta,
            *_slot_args(hyper, step),
        )
    return float(losses.copy_to_host().sum())


def fm_predict_csr(indptr: Any, indices: Any, values: Any, w: Any, V: Any, out: Any) -> None:
    """Raw second-order FM margins of CSR rows into ``out`` (host or device)."""
    with _Mutable(out) as (d_out,):
        _launch(
            fm_predict_csr_kernel,
            _n_rows(indptr),
            _dev(indptr),
            _dev(indices),
            _dev(values),
            _dev(w),
            _dev(V),
            d_out,
        )


def fm_learn_csr(
    indptr: Any,
    indices: Any,
    values: Any,
    y: Any,
    w: Any,
    V: Any,
    s1w: Any,
    s2w: Any,
    s1v: Any,
    s2v: Any,
    loss: int,
    opt: int,
    hyper: Any,
    step: int,
    gw: Any,
    gv: Any,
) -> float:
    """One FM mini-batch step on CSR rows; returns the pre-update summed loss.

    ``gw``/``gv`` (float32, shapes of ``w``/``V``) are zero on entry and zero on return.
    """
    _check_codes(loss, opt)
    n = _n_rows(indptr)
    if n == 0:
        return 0.0
    lr, l1, l2, beta, cap, eta = _opt_args(hyper, step)
    k = V.shape[1]
    touched = cuda.to_device(_touched(indptr, indices, n, V.shape[0]))
    losses = cuda.device_array(n, dtype=np.float64)
    with _Mutable(w, V, s1w, s2w, s1v, s2v, gw, gv) as (
        d_w,
        d_V,
        d_s1w,
        d_s2w,
        d_s1v,
        d_s2v,
        d_gw,
        d_gv,
    ):
        _launch(
            fm_rows_csr_kernel,
            n,
            _dev(indptr),
            _dev(indices),
            _dev(values),
            _dev(y),
            d_w,
            d_V,
            loss,
            1.0 / n,
            losses,
            d_gw,
            d_gv,
        )
        _launch(
            fm_update_csr_kernel,
            touched.shape[0] * (k + 1),
            touched,
            d_gw,
            d_gv,
            d_w,
            d_V,
            d_s1w,
            d_s2w,
            d_s1v,
            d_s2v,
            opt,
            lr,
            l1,
            l2,
            beta,
            cap,
            eta,
            *_slot_args(hyper, step),
        )
    return float(losses.copy_to_host().sum())


def scaler_update(X: Any, count: Any, mean: Any, m2: Any) -> None:
    """Merge the batch ``X`` (NaN = missing) into per-feature Welford state (Chan merge)."""
    with _Mutable(count, mean, m2) as (d_count, d_mean, d_m2):
        _launch(scaler_update_kernel, X.shape[1], _dev(X), d_count, d_mean, d_m2)

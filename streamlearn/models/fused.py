"""The CPU model's prequential step over many mini-batches in one compiled call.

``OnlineModel.process`` composes the step from Python: scaler update, z-scores, CSR
rows, margins, link, learn.  That costs ~50 us of Python per mini-batch, as much as
the kernels themselves at ``batch_size = 256``, and all of it holds the GIL, so the
worker's learner thread and its consuming event loop cannot run at once.  Here the
same kernels run chunk by chunk inside one ``nogil`` function: a batch record of
4,096 events is one call that leaves the GIL to the consumer.  The monitors stay
outside and take the per-chunk results afterwards: river's drift detector and the
metrics ring buffer (Python) and the data-drift monitor (it holds the raw features and
folds them in its own compiled pass when read).  Tests hold this path equal to
``process``, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from streamlearn.features import csr_assemble, numeric_entry
from streamlearn.kernels.codes import (
    H_FTRL_BETA,
    H_LEARNING_RATE,
    H_POWER_T,
    LOSS_LOGISTIC,
    OPT_FTRL,
    OPT_SGD,
)
from streamlearn.kernels.cpu import (
    _dense_margin,
    _loss_dloss,
    _opt_scalars,
    _slot_scalars,
    _update,
    average_coordinate,
    average_update,
    capped,
    coordinate_rate,
    fm_learn_csr,
    fm_predict_csr,
    linear_learn_csr,
    linear_learn_dense,
    linear_predict_csr,
    linear_predict_dense,
    own_rate,
    scaler_update,
)
from streamlearn.models.average import (
    DISCOUNT,
    avg_rate,
    loss_gap,
    mix_learn,
    mix_margin,
    mix_margins,
    share_of,
    weight_share,
)
from streamlearn.models.target import (
    T_COUNT,
    T_M2,
    T_MEAN,
    T_OFFSET,
    base_logit,
    label_std,
    merge_moments,
    move_bias,
    shift_bias_to_prior,
    standardize,
    target_scale,
    target_update,
)
from streamlearn.scaler import _std, _zscore

KIND_DENSE = 0
KIND_CSR = 1
KIND_FM = 2


@njit(cache=True, nogil=True)
def sigmoid_into(m, out):  # pragma: no cover - compiled
    """``out = 1 / (1 + exp(-clip(m, -50, 50)))``, evaluated in float64."""
    for i in range(m.shape[0]):
        out[i] = _sigmoid(m[i])


@njit(cache=True, nogil=True, inline="always")
def _sigmoid(m):  # pragma: no cover - compiled
    x = min(max(np.float64(m), -50.0), 50.0)
    return 1.0 / (1.0 + math.exp(-x))


@njit(inline="always")
def _csr_margin(z, hashed, r, w):  # pragma: no cover - compiled
    """Row ``r``'s margin in the CSR kernel's order (bias, numeric entries, hashed slots
    of value 1), read from the z-scores and slots directly."""
    m = np.float64(w[w.shape[0] - 1])
    for j in range(z.shape[1]):
        i, x = numeric_entry(z, r, j)
        m += np.float64(x) * w[i]
    one = np.float64(np.float32(1.0))
    for c in range(hashed.shape[1]):
        m += one * w[hashed[r, c]]
    return m


@njit(inline="always", error_model="numpy")
def _ftrl_coordinate(g, j, w, s1, s2, avg, rate, inv_lr, l1, l2, beta, cap,
                     at_cap, capped_block=False):  # pragma: no cover - compiled
    """One FTRL-Proximal step of weight ``j`` (``s1``: z, ``s2``: n), written out for
    the per-event loop: the same arithmetic as ``kernels.cpu``'s update.

    ``at_cap``: the caller found ``n >= cap`` (the memory cap, ``ModelSpec.horizon``).
    Then ``n`` stays as it is, so the square roots of the old and the new ``n`` are
    the same number: one is taken, not two (the same values, bit for bit). Most
    coordinates of a long stream are at their cap, and these square roots and the one
    division bound the per-coordinate step. Then the running average ``avg`` (empty: a
    model that does not average) moves towards the new weight: ``rate``, or the weight's
    own faster rate while its sum ``n`` is small (``kernels.cpu.coordinate_rate``).
    ``capped_block``: the numeric block's loop when all of it is at the cap, where that
    own rate is below the floor ``1 / horizon`` and ``rate`` is exact (one division less).
    """
    wj = np.float64(w[j])
    s2j = np.float64(s2[j])
    sq_old = math.sqrt(s2j)
    if at_cap:
        n_new = s2j
        sq_new = sq_old
    else:
        n_new = capped(s2j + g * g, s2j, cap)
        sq_new = math.sqrt(n_new)
    zj = np.float64(s1[j]) + g - (sq_new - sq_old) * inv_lr * wj
    wn = -(zj - math.copysign(l1, zj)) / ((beta + sq_new) * inv_lr + l2)
    w[j] = 0.0 if abs(zj) <= l1 else wn
    s1[j] = zj
    s2[j] = n_new
    if avg.shape[0] > 0:  # the running average follows, in the same pass
        own = rate if capped_block else coordinate_rate(rate, np.float64(s2[j]))
        avg[j] = average_coordinate(avg[j], w[j], own)


@njit(inline="always")
def _squared_sums(opt, s1, s2):  # pragma: no cover - compiled
    """Each weight's squared-gradient sum (FTRL: ``s2``, AdaGrad: ``s1``); SGD: empty."""
    if opt == OPT_FTRL:
        return s2
    return s1[:0] if opt == OPT_SGD else s1


@njit(inline="always")
def _own_rate(rate, opt, s1, s2, i):  # pragma: no cover - compiled
    """:func:`~streamlearn.kernels.cpu.own_rate` of weight ``i`` under optimizer ``opt``,
    for the per-event loop's written-out non-FTRL updates."""
    return own_rate(rate, _squared_sums(opt, s1, s2), i)


@njit(inline="always")
def _at_cap(s2, d, cap):  # pragma: no cover - compiled
    """Whether the first ``d`` squared-gradient sums all reached the memory cap."""
    full = True
    for j in range(d):
        full &= np.float64(s2[j]) >= cap
    return full


@njit(inline="always")
def _has_missing(z, r):  # pragma: no cover - compiled
    """Whether row ``r`` of the z-scores misses a value (NaN), without a branch."""
    miss = False
    for j in range(z.shape[1]):
        miss |= z[r, j] != z[r, j]
    return miss


@njit(inline="always")
def _any_missing(z):  # pragma: no cover - compiled
    """Whether any row of ``z`` misses a value."""
    for r in range(z.shape[0]):
        if _has_missing(z, r):
            return True
    return False


@njit(inline="always")
def _has_repeat(hashed, r):  # pragma: no cover - compiled
    """Whether two fields of row ``r`` share a hashed slot (a hash collision: rare).
    Every pair compared without a branch: a search per slot, with its early exits,
    cost 13% of the per-event loop on a stream with five categorical fields."""
    rep = False
    for a in range(1, hashed.shape[1]):
        for b in range(a):
            rep |= hashed[r, a] == hashed[r, b]
    return rep


@njit(inline="always")
def _repeat_gradient(hashed, r, c, coef):  # pragma: no cover - compiled
    """The gradient of row ``r``'s slot in column ``c`` when the row repeats a slot: the
    slot's gradients summed in float32 in column order (the CSR kernel's scratch), or
    NaN when an earlier column holds the slot (it was updated there)."""
    i = hashed[r, c]
    for f in range(c):
        if hashed[r, f] == i:
            return math.nan
    one = np.float32(1.0)
    g32 = np.float32(0.0 + coef * one)
    for f in range(c + 1, hashed.shape[1]):
        if hashed[r, f] == i:
            g32 = np.float32(np.float64(g32) + coef * one)
    return np.float64(g32)


# error_model="numpy": a float division by zero gives inf/NaN instead of a Python
# exception; without the check per division the per-coordinate FTRL loop vectorizes.
# _nrt=False: this loop allocates nothing, and without the Numba runtime its inlined
# helpers stop taking and dropping atomic reference counts on the arrays they are handed,
# per row and coordinate (the same numbers; fertility 5.0-5.2M -> 6.1-6.2M rows/s, the
# dense stream 2.95-2.98M -> 3.43-3.47M, bench_learning's speed streams, two runs each).
@njit(cache=True, nogil=True, error_model="numpy", _nrt=False)
def per_event_linear(  # pragma: no cover - compiled
    z, hashed, csr, labels, link, prior, target,
    w, s1, s2, avg, mix, inv_horizon, loss, opt, hyper, step, scores,
):
    """``update_rows = 1`` for the linear kinds: each row scored, then learned, in turn.

    The generic window loop would assemble CSR rows, then call a predict and a learn
    kernel per row, computing the margin twice and allocating scratch arrays. This loop
    reads the z-scores and hashed slots directly, computes each margin once and updates
    the touched coordinates in place. It performs the same floating-point operations in
    the same order as those kernels on one-row batches (with ``csr``, the CSR kernel's
    float32 gradient scratch too), so the two paths agree bit for bit (tested). Hashed
    slots sit past the numeric block, so only they can repeat within a row.

    The label prior's bookkeeping (:func:`.target.target_update` on one label,
    :func:`.target.prior_delta`, :func:`.target.shift_bias`) runs on scalars here,
    through the inlined rules those functions share (:mod:`.target`): the array calls
    cost more than the arithmetic. FTRL's
    per-coordinate step on the numeric block is written out too (the operations of
    :func:`~streamlearn.kernels.cpu._update`), branch-free, so the compiler vectorizes it.
    A non-empty ``avg`` scores with the weights' running average too (:mod:`.average`:
    the rules on scalars, ``mix`` and the average updated in place).
    Returns ``(summed loss, labelled rows, next step)``.
    """
    k, d = z.shape
    n_cat = hashed.shape[1]
    big_d = w.shape[0] - 1
    logistic = loss == LOSS_LOGISTIC
    lr, l1, l2, beta, cap, eta = _opt_scalars(hyper, step)
    slot_lr, slot_eta, _ = _slot_scalars(hyper, step)  # the hashed slots' step
    power_t = hyper[H_POWER_T]
    ftrl = opt == OPT_FTRL
    inv_lr = 1.0 / lr
    inv_slot_lr = 1.0 / slot_lr
    h_lr = hyper[H_LEARNING_RATE]
    h_beta = hyper[H_FTRL_BETA]
    one = np.float32(1.0)
    t_count = target[T_COUNT]
    t_mean = target[T_MEAN]
    t_m2 = target[T_M2]
    t_offset = target[T_OFFSET]
    averaged = avg.shape[0] > 0
    gap = mix[0]
    share = weight_share(gap)  # fixed for the mini-batch
    total = 0.0
    n_lab = 0
    moved = True  # the prior moves only with a new label
    for r in range(k):
        if prior and logistic and moved:  # shift_bias_to_prior
            offset = base_logit(t_count, t_mean)
            delta = offset - t_offset
            t_offset = offset
            if delta != 0.0:
                move_bias(w, s1, s2, avg, delta, ftrl, h_lr, h_beta)
            moved = False
        # A row with a missing value takes the CSR kernel's path (its indicator is an
        # entry of the row, not a column of the dense block), as OnlineModel.process does.
        miss = _has_missing(z, r)
        row_csr = csr or miss
        m = _csr_margin(z, hashed, r, w) if row_csr else _dense_margin(z, r, w)
        m32 = np.float32(m)
        ma = m
        if averaged:  # the running average's margin, summed as the weights' is
            ma = _csr_margin(z, hashed, r, avg) if row_csr else _dense_margin(z, r, avg)
            scores[r] = _sigmoid(mix_margin(m, ma, share))
        elif link:
            scores[r] = _sigmoid(m32)
        elif prior:
            scores[r] = t_mean + label_std(t_count, t_m2) * np.float64(m32)
        else:
            scores[r] = m32
        yv = labels[r]
        if math.isnan(yv):
            continue
        yy = np.float64(yv)
        if prior:  # target_update on one label: its mean is the label, no spread
            t_count, t_mean, t_m2 = merge_moments(t_count, t_mean, t_m2, 1, yy, 0.0)
            moved = True
            if not logistic:
                t_std = label_std(t_count, t_m2)
                yy = np.float64(np.float32((yy - t_mean) * (1.0 / t_std)))
        value, dm = _loss_dloss(m, yy, loss)
        total += value
        if averaged:  # the experts' log-loss gap, from the learner's gradient
            gap = DISCOUNT * gap + loss_gap(dm, yy, m, ma)
        coef = dm * 1.0
        if opt == OPT_SGD and power_t != 0.0:  # SGD's schedule moves with every step
            eta = lr / (1.0 + step) ** power_t
            slot_eta = slot_lr / (1.0 + step) ** power_t
        rate = avg_rate(step, inv_horizon) if averaged else 0.0
        # Each coordinate's step moves its running average in the same pass. FTRL's
        # numeric block runs in branch-free loops, so that they vectorize: one for a block
        # all at its memory cap (one square root per coordinate, not two). The CSR kernel
        # accumulates gradients in a float32 scratch, hence the rounding.
        if ftrl and not miss and _at_cap(s2, d, cap):
            for j in range(d):
                g = 0.0 + coef * z[r, j]
                _ftrl_coordinate(np.float64(np.float32(g)) if csr else g, j, w, s1, s2, avg,
                                 rate, inv_lr, l1, l2, beta, cap, True, True)
        elif ftrl and not miss:
            for j in range(d):
                g = 0.0 + coef * z[r, j]
                _ftrl_coordinate(np.float64(np.float32(g)) if csr else g, j, w, s1, s2, avg,
                                 rate, inv_lr, l1, l2, beta, cap, False)
        else:  # the other optimizers, and FTRL on a row that misses a value: each entry is
            for j in range(d):  # the column, or its missing-value indicator
                i, x = numeric_entry(z, r, j)
                g = 0.0 + coef * x
                if row_csr:
                    g = np.float64(np.float32(g))
                if ftrl:
                    _ftrl_coordinate(g, i, w, s1, s2, avg, rate, inv_lr, l1, l2, beta, cap,
                                     np.float64(s2[i]) >= cap)
                    continue
                wi, a, b = _update(np.float64(w[i]), np.float64(s1[i]), np.float64(s2[i]),
                                   g, opt, lr, l1, l2, beta, cap, eta)
                w[i] = wi
                s1[i] = a
                s2[i] = b
                if averaged:
                    avg[i] = average_coordinate(avg[i], w[i], _own_rate(rate, opt, s1, s2, i))
        repeats = _has_repeat(hashed, r)
        g_slot = np.float64(np.float32(0.0 + coef * one))
        for c in range(n_cat):
            i = hashed[r, c]
            g = g_slot
            if repeats:  # rare: a slot twice in the row is updated once, at its first
                g = _repeat_gradient(hashed, r, c, coef)
                if math.isnan(g):
                    continue
            if ftrl:
                _ftrl_coordinate(g, i, w, s1, s2, avg, rate, inv_slot_lr, l1, l2, beta, cap,
                                 np.float64(s2[i]) >= cap)
            else:  # written out: a helper here, inlined or called, slowed FTRL's path 40%
                wi, a, b = _update(np.float64(w[i]), np.float64(s1[i]), np.float64(s2[i]),
                                   g, opt, slot_lr, l1, l2, beta, cap, slot_eta)
                w[i] = wi
                s1[i] = a
                s2[i] = b
                if averaged:
                    avg[i] = average_coordinate(avg[i], w[i], _own_rate(rate, opt, s1, s2, i))
        if ftrl:  # the bias: no L1/L2
            _ftrl_coordinate(0.0 + coef, big_d, w, s1, s2, avg, rate, inv_lr, 0.0, 0.0, beta,
                             cap, np.float64(s2[big_d]) >= cap)
        else:
            wb, a, b = _update(np.float64(w[big_d]), np.float64(s1[big_d]),
                               np.float64(s2[big_d]), 0.0 + coef, opt, lr, 0.0, 0.0, beta,
                               cap, eta)
            w[big_d] = wb
            s1[big_d] = a
            s2[big_d] = b
            if averaged:
                avg[big_d] = average_coordinate(avg[big_d], w[big_d],
                                                _own_rate(rate, opt, s1, s2, big_d))
        n_lab += 1
        step += 1
    target[T_COUNT] = t_count
    target[T_MEAN] = t_mean
    target[T_M2] = t_m2
    target[T_OFFSET] = t_offset
    mix[0] = gap
    return total, n_lab, step


@njit(cache=True, nogil=True)
def prequential_chunks(  # pragma: no cover - compiled
    X, hashed, labels, size, rows_per_step, kind, link, prior,
    fold, count, mean, m2, target,
    w, s1, s2, grad, V, s1v, s2v, gv, avg, mix, inv_horizon,
    loss, opt, hyper, step,
    scores, chunk_loss, chunk_learned,
):
    """Score then learn ``X`` in chunks of ``size`` rows; return the next step number.

    Per chunk, exactly what ``OnlineModel.process`` does: fold the raw features into
    the scaler (``count, mean, m2`` in place; not when ``fold`` is false, for rows the
    scaler counted before: delayed labels) and z-score with the updated statistics.
    Then, window by window of ``rows_per_step`` rows: score the window with the current
    weights (``link``: through the sigmoid), then learn one optimizer step from its
    labelled rows (NaN label = unlabelled). ``rows_per_step = 1`` is per-event SGD; equal
    to ``size`` it is one averaged step per chunk. ``prior`` anchors the model on its
    label statistics ``target`` (:mod:`.target`). Each chunk's summed pre-update loss and
    number of labelled rows go to ``chunk_loss[c]`` and ``chunk_learned[c]``. ``kind`` is
    ``KIND_DENSE`` (numeric only), ``KIND_CSR`` or ``KIND_FM``; the FM arrays may be empty
    for the linear kinds. A non-empty ``avg`` (linear kinds) scores each window with the
    mixture of the weights and their running average (:mod:`.average`), the mixture's
    share fixed within the chunk (a mini-batch), and moves the average after each step.
    """
    n, d = X.shape
    n_chunks = (n + size - 1) // size
    margins = np.empty(min(size, rows_per_step), dtype=np.float32)
    # An averaged model's margins stay float64 until scored: its mixture weighs the loss
    # gap at the float64 margins, as the per-event loop does (from the learner's gradient).
    margins64 = np.empty(margins.shape[0])
    margins_avg = np.empty(margins.shape[0])
    mixed = np.empty_like(margins)
    averaged = avg.shape[0] > 0
    logistic = loss == LOSS_LOGISTIC
    dense_coords = np.append(np.arange(d), w.shape[0] - 1)  # what a dense step touches
    sums = _squared_sums(opt, s1, s2)  # what the averages' own rates read
    for c in range(n_chunks):
        share = share_of(mix)  # the mixture is fixed for the mini-batch
        lo = c * size
        hi = min(lo + size, n)
        k = hi - lo
        Xc = X[lo:hi]
        if fold:
            scaler_update(Xc, count, mean, m2)
        z = np.empty((k, d), dtype=np.float32)
        _zscore(Xc, mean, _std(count, m2), z)
        hc = hashed[lo:hi]
        total = 0.0
        n_chunk = 0
        if rows_per_step == 1 and kind != KIND_FM:
            total, n_chunk, step = per_event_linear(
                z, hc, kind == KIND_CSR, labels[lo:hi], link, prior,
                target, w, s1, s2, avg, mix, inv_horizon, loss, opt, hyper, step,
                scores[lo:hi],
            )
            chunk_learned[c] = n_chunk
            chunk_loss[c] = total
            continue
        if kind == KIND_DENSE:
            indptr = np.zeros(1, dtype=np.int64)  # unused: typed like the CSR branch
            indices = np.zeros(0, dtype=np.int32)
            values = np.zeros(0, dtype=np.float32)
        else:
            indptr, indices, values = csr_assemble(z, hc)
        for a in range(0, k, rows_per_step):
            b = min(a + rows_per_step, k)
            # A dense model's window with a missing value takes CSR rows, whose entries
            # hold the missing-value indicators (as OnlineModel.process does).
            dense = kind == KIND_DENSE and not _any_missing(z[a:b])
            ip, ix, vx = indptr[a : b + 1], indices, values
            if kind == KIND_DENSE and not dense:
                ip, ix, vx = csr_assemble(z[a:b], hc[a:b])
            m = margins[: b - a]
            m64 = margins64[: b - a]
            if prior and logistic:
                shift_bias_to_prior(target, w, s1, s2, avg, opt, hyper)
            ma = margins_avg[: b - a]
            if averaged:
                if dense:
                    linear_predict_dense(z[a:b], w, m64)
                    linear_predict_dense(z[a:b], avg, ma)
                else:
                    linear_predict_csr(ip, ix, vx, w, m64)
                    linear_predict_csr(ip, ix, vx, avg, ma)
            elif dense:
                linear_predict_dense(z[a:b], w, m)
            elif kind == KIND_FM:
                fm_predict_csr(ip, ix, vx, w, V, m)
            else:
                linear_predict_csr(ip, ix, vx, w, m)
            out = scores[lo + a : lo + b]
            if averaged:
                mm = mixed[: b - a]
                mix_margins(m64, ma, share, mm)
                sigmoid_into(mm, out)
            elif link:
                sigmoid_into(m, out)
            elif prior:
                t_mean, t_std = target_scale(target)
                for i in range(b - a):
                    out[i] = t_mean + t_std * np.float64(m[i])
            else:
                out[:] = m
            yw = labels[lo + a : lo + b]
            keep = np.flatnonzero(~np.isnan(yw))  # labelled rows learn, in order
            n_lab = keep.shape[0]
            if n_lab == 0:
                continue
            y = yw[keep]
            if averaged:
                mix_learn(mix, m64[keep], ma[keep], y)
            if prior:
                target_update(target, y)
                if not logistic:
                    t_mean, t_std = target_scale(target)
                    y = standardize(y, t_mean, t_std)
            if dense:
                zl = z[a:b] if n_lab == b - a else np.ascontiguousarray(z[a:b][keep])
                total += linear_learn_dense(zl, y, w, s1, s2, loss, opt, hyper, step)
                if averaged:  # every coordinate of the numeric block took a step, and the bias
                    average_update(dense_coords, w, avg, avg_rate(step, inv_horizon), sums)
            else:
                if n_lab < b - a:
                    ip, ix, vx = csr_assemble(z[a:b][keep], hc[a:b][keep])
                if kind == KIND_FM:
                    total += fm_learn_csr(ip, ix, vx, y, w, V, s1, s2, s1v, s2v,
                                          loss, opt, hyper, step, grad, gv)
                else:
                    total += linear_learn_csr(ip, ix, vx, y, w, s1, s2,
                                              loss, opt, hyper, step, grad)
                    if averaged:  # the coordinates the step touched, and the bias
                        rate = avg_rate(step, inv_horizon)
                        touched = np.append(np.unique(ix[ip[0] : ip[n_lab]]), w.shape[0] - 1)
                        average_update(touched, w, avg, rate, sums)
            n_chunk += n_lab
            step += 1
        chunk_learned[c] = n_chunk
        chunk_loss[c] = total
    return step

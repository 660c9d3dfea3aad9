"""The CPU model's prequential step over many mini-batches in one compiled call.

``OnlineModel.process`` composes the step from Python: scaler update, z-scores, CSR
rows, margins, link, learn.  That costs ~50 us of Python per mini-batch, as much as
the kernels themselves at ``batch_size = 256``, and all of it holds the GIL, so the
worker's learner thread and its consuming event loop cannot run at once.  Here the
same kernels run chunk by chunk inside one ``nogil`` function: a batch record of
4,096 events is one call that leaves the GIL to the consumer.  The monitors stay
outside and take the per-chunk results afterwards: river's drift detector and the
metrics ring buffer (Python) and the data-drift fold (its own compiled pass over the
raw features).  Tests hold this path equal to ``process``, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from streamlearn.features import csr_assemble
from streamlearn.kernels.cpu import (
    fm_learn_csr,
    fm_predict_csr,
    linear_learn_csr,
    linear_learn_dense,
    linear_predict_csr,
    linear_predict_dense,
    scaler_update,
)
from streamlearn.scaler import _std, _zscore

KIND_DENSE = 0
KIND_CSR = 1
KIND_FM = 2


@njit(cache=True, nogil=True)
def sigmoid_into(m, out):  # pragma: no cover - compiled
    """``out = 1 / (1 + exp(-clip(m, -50, 50)))``, evaluated in float64."""
    for i in range(m.shape[0]):
        x = min(max(np.float64(m[i]), -50.0), 50.0)
        out[i] = 1.0 / (1.0 + math.exp(-x))


@njit(cache=True, nogil=True)
def prequential_chunks(  # pragma: no cover - compiled
    X, hashed, labels, size, kind, link,
    count, mean, m2,
    w, s1, s2, grad, V, s1v, s2v, gv,
    loss, opt, hyper, step,
    scores, chunk_loss, chunk_learned,
):
    """Score then learn ``X`` in chunks of ``size`` rows; return the next step number.

    Per chunk, exactly what ``OnlineModel.process`` does: fold the raw features into
    the scaler (``count, mean, m2`` in place), z-score with the updated statistics,
    write the chunk's scores (``link``: through the sigmoid), then learn one step from
    its labelled rows (NaN label = unlabelled), writing the summed pre-update loss and
    the number of labelled rows into ``chunk_loss[c]`` and ``chunk_learned[c]``.
    ``kind`` is ``KIND_DENSE`` (numeric only), ``KIND_CSR`` or ``KIND_FM``; the FM
    arrays may be empty for the linear kinds.
    """
    n, d = X.shape
    n_chunks = (n + size - 1) // size
    for c in range(n_chunks):
        lo = c * size
        hi = min(lo + size, n)
        k = hi - lo
        Xc = X[lo:hi]
        scaler_update(Xc, count, mean, m2)
        z = np.empty((k, d), dtype=np.float32)
        _zscore(Xc, mean, _std(count, m2), z)
        yc = labels[lo:hi]
        keep = np.flatnonzero(~np.isnan(yc))  # labelled rows learn, in order
        n_lab = keep.shape[0]
        y = yc[keep]
        margins = np.empty(k, dtype=np.float32)
        total = 0.0
        if kind == KIND_DENSE:
            linear_predict_dense(z, w, margins)
            if n_lab:
                zl = z if n_lab == k else z[keep]
                total = linear_learn_dense(zl, y, w, s1, s2, loss, opt, hyper, step)
        else:
            hc = hashed[lo:hi]
            indptr, indices, values = csr_assemble(z, hc)
            if kind == KIND_FM:
                fm_predict_csr(indptr, indices, values, w, V, margins)
            else:
                linear_predict_csr(indptr, indices, values, w, margins)
            if n_lab:
                if n_lab < k:
                    indptr, indices, values = csr_assemble(z[keep], hc[keep])
                if kind == KIND_FM:
                    total = fm_learn_csr(indptr, indices, values, y, w, V, s1, s2, s1v, s2v,
                                         loss, opt, hyper, step, grad, gv)
                else:
                    total = linear_learn_csr(indptr, indices, values, y, w, s1, s2,
                                             loss, opt, hyper, step, grad)
        if link:
            sigmoid_into(margins, scores[lo:hi])
        else:
            scores[lo:hi] = margins
        chunk_learned[c] = n_lab
        chunk_loss[c] = total
        if n_lab:
            step += 1
    return step

"""Averaged scoring: score with a mixture of the weights and their running average.

Why: on streams whose signal is weak (every system at 0.51-0.56 AUC: bananas, cowles,
smarket in the README's table), the per-event FTRL weights keep moving with the noise of
each event's gradient, and a smaller step wins there, while streams with more signal want
the default step. The *average* of the weights is the low-noise estimate; the current
weights track what is still being learned. Neither wins everywhere, so each event is
scored by both, mixed by how well each has been doing:

* the learner is unchanged: FTRL (or any optimizer) updates ``w`` as before;
* ``avg`` is a tail average of ``w``: after each optimizer step, every coordinate that the
  step touched moves ``avg[j] += r_j * (w[j] - avg[j])``, with ``rate = max(2 / t,
  1 / horizon)`` at step ``t`` (1-based), so the average forgets as the memory cap does,
  and ``r_j = max(rate, min(1, 2 / (1 + 8 n_j)))`` from the weight's squared-gradient sum
  ``n_j`` (``kernels.cpu.coordinate_rate``; SGD keeps no sums: ``rate``). A weight updated
  rarely (a hashed value seen a few times in a long stream) thus averages its own recent
  values; with ``rate`` alone its average stayed near 0 and the averaged expert ignored it;
* the score's margin is ``share * m_w + (1 - share) * m_avg``: one linear model, with the
  weights ``share * w + (1 - share) * avg`` (what serving and reason codes use). ``share``
  comes from exponential weights on the two experts' log losses, discounted by
  :data:`DISCOUNT` per labelled event: ``share = sigmoid(gap)``, ``gap`` the discounted
  sum of ``loss(avg) - loss(w)`` (to second order: :func:`loss_gap`), kept in
  ``mix = [gap]`` and fixed for each mini-batch (``batch_size`` rows);
* when the label prior moves the bias (:mod:`.target`), ``avg``'s bias moves with it.

Measured in the product against ``average = false``, paired over 8 row orders on the 30
binary real sets (README, Learning quality): cowles +0.0166 and bananas +0.0112 AUC, the
worst loss stackoverflow -0.0016. It cost 18-21 ns per event in the compiled loop when it
landed (a second margin, an average update per touched weight). Binary models only (the
mixture weighs log losses); :attr:`ModelSpec.averaged`.

The rules live here once, on scalars and inlined, so the fused per-event loop
(:func:`.fused.per_event_linear`), the fused window loop and the composed step
(:meth:`OnlineModel.process`) do the same floating-point operations (tested bit for bit).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from streamlearn.kernels.codes import LOSS_LOGISTIC
from streamlearn.kernels.cpu import _loss_dloss

DISCOUNT = 0.999
"""Per labelled event discount of the log-loss gap: a memory of ~1,000 events."""

MIX_LEN = 1  # mix = [gap]: the discounted sum of loss(avg) - loss(w)


def new_mix() -> np.ndarray:
    """The log-loss gap before any label: 0 (share 1/2)."""
    return np.zeros(MIX_LEN)


@njit(inline="always")
def avg_rate(step, inv_horizon):  # pragma: no cover - compiled
    """How far step ``step`` (0-based) moves the average: ``max(2/(step+1), 1/horizon)``,
    at most 1 (the first step copies the weights)."""
    return min(1.0, max(2.0 / (step + 1.0), inv_horizon))


@njit(inline="always")
def weight_share(gap):  # pragma: no cover - compiled
    """The current weights' share of the margin: ``sigmoid(gap)``."""
    x = min(max(gap, -50.0), 50.0)
    return 1.0 / (1.0 + math.exp(-x))


@njit(inline="always")
def mix_margin(m_w, m_avg, share):  # pragma: no cover - compiled
    """The served margin from the two experts' margins, each first rounded to float32 as
    a lone model's margin is, then mixed in float64 and rounded to float32."""
    w32 = np.float64(np.float32(m_w))
    return np.float32(share * w32 + (1.0 - share) * np.float64(np.float32(m_avg)))


@njit(inline="always")
def loss_gap(g, y, m_w, m_avg):  # pragma: no cover - compiled
    """``loss(m_avg) - loss(m_w)`` of the logistic loss, to second order around ``m_w``,
    from the learner's gradient ``g = p - y`` there (curvature ``p (1 - p)``): no
    transcendental call beyond the learner's own, so the mixture costs a few
    multiply-adds per event."""
    step = m_avg - m_w
    p = g + y
    return g * step + 0.5 * p * (1.0 - p) * step * step


@njit(cache=True, nogil=True)
def mix_margins(m_w, m_avg, share, out):  # pragma: no cover - compiled
    """:func:`mix_margin` over a window's float64 margins, into ``out`` (float32)."""
    for i in range(m_w.shape[0]):
        out[i] = mix_margin(m_w[i], m_avg[i], share)


@njit(cache=True, nogil=True)
def mix_learn(mix, m_w, m_avg, y):  # pragma: no cover - compiled
    """Fold the labelled rows' loss gaps (float64 margins, in order) into ``mix``."""
    gap = mix[0]
    for i in range(y.shape[0]):
        yy = np.float64(y[i])
        _, g = _loss_dloss(m_w[i], yy, LOSS_LOGISTIC)
        gap = DISCOUNT * gap + loss_gap(g, yy, m_w[i], m_avg[i])
    mix[0] = gap


@njit(cache=True, nogil=True)
def share_of(mix):  # pragma: no cover - compiled
    """:func:`weight_share` of a ``mix`` array."""
    return weight_share(mix[0])


def served_weights(w: np.ndarray, avg: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """``share * w + (1 - share) * avg`` in float32: the one linear model that is served."""
    share = float(share_of(mix))
    out = np.asarray(w, dtype=np.float64) * share
    out += (1.0 - share) * np.asarray(avg, dtype=np.float64)
    return out.astype(np.float32)

"""Averaged scoring: score with a mixture of the weights and their running average.

Why: on streams whose signal is weak (every system at 0.51-0.56 AUC: bananas, cowles,
smarket in the README's table), the per-event FTRL weights keep moving with the noise of
each event's gradient, and a smaller step wins there, while streams with more signal want
the default step. The *average* of the weights is the low-noise estimate; the current
weights track what is still being learned. Neither wins everywhere, so each event is
scored by both, mixed by how well each has been doing:

* the learner is unchanged: FTRL (or any optimizer) updates ``w`` as before;
* ``avg`` is a tail average of ``w``: after each optimizer step, every coordinate that the
  step touched moves ``avg[j] += rate * (w[j] - avg[j])``, with ``rate = max(2 / t,
  1 / horizon)`` at step ``t`` (1-based), so the average forgets as the memory cap does;
* the score's margin is ``share * m_w + (1 - share) * m_avg``: one linear model, with the
  weights ``share * w + (1 - share) * avg`` (what serving and reason codes use). ``share``
  comes from exponential weights on the two experts' log losses, discounted by
  :data:`DISCOUNT` per labelled event: ``share = sigmoid(loss_avg - loss_w)``, kept in
  ``mix = [loss_w, loss_avg]`` and fixed within an optimizer window (one event by default);
* when the label prior moves the bias (:mod:`.target`), ``avg``'s bias moves with it.

Measured first in ``load_tests/step_rules.py`` (``ftrl+avg``, paired over 8 row orders on
the 30 binary real sets): bananas +0.0103 and cowles +0.0144 AUC, the worst loss -0.0014.
Binary models only (the mixture weighs log losses); :attr:`ModelSpec.averaged`.

The rules live here once, on scalars and inlined, so the fused per-event loop
(:func:`.fused.per_event_linear`), the fused window loop and the composed step
(:meth:`OnlineModel.process`) do the same floating-point operations (tested bit for bit).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

DISCOUNT = 0.999
"""Per labelled event discount of the experts' log losses: a memory of ~1,000 events."""

MIX_LEN = 2  # mix = [loss_w, loss_avg]


def new_mix() -> np.ndarray:
    """The experts' discounted log losses before any label: ``[0, 0]`` (share 1/2)."""
    return np.zeros(MIX_LEN)


@njit(inline="always")
def avg_rate(step, inv_horizon):  # pragma: no cover - compiled
    """How far step ``step`` (0-based) moves the average: ``max(2/(step+1), 1/horizon)``,
    at most 1 (the first step copies the weights)."""
    return min(1.0, max(2.0 / (step + 1.0), inv_horizon))


@njit(inline="always")
def weight_share(loss_w, loss_avg):  # pragma: no cover - compiled
    """The current weights' share of the margin: ``sigmoid(loss_avg - loss_w)``."""
    x = min(max(loss_avg - loss_w, -50.0), 50.0)
    return 1.0 / (1.0 + math.exp(-x))


@njit(inline="always")
def mix_margin(m_w, m_avg, share):  # pragma: no cover - compiled
    """The served margin from the two experts' float32 margins, rounded to float32."""
    return np.float32(share * np.float64(m_w) + (1.0 - share) * np.float64(m_avg))


@njit(inline="always")
def log_loss(m, y):  # pragma: no cover - compiled
    """Log loss of the float32 margin ``m`` on the label ``y`` (0 or 1), in float64."""
    x = np.float64(m)
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0) - y * x


@njit(cache=True, nogil=True)
def mix_margins(m_w, m_avg, share, out):  # pragma: no cover - compiled
    """:func:`mix_margin` over a window's margins, into ``out`` (float32)."""
    for i in range(m_w.shape[0]):
        out[i] = mix_margin(m_w[i], m_avg[i], share)


@njit(cache=True, nogil=True)
def mix_learn(mix, m_w, m_avg, y):  # pragma: no cover - compiled
    """Fold the labelled rows' log losses (in order) into ``mix`` in place."""
    loss_w, loss_avg = mix[0], mix[1]
    for i in range(y.shape[0]):
        yy = np.float64(y[i])
        loss_w = DISCOUNT * loss_w + log_loss(m_w[i], yy)
        loss_avg = DISCOUNT * loss_avg + log_loss(m_avg[i], yy)
    mix[0] = loss_w
    mix[1] = loss_avg


@njit(cache=True, nogil=True)
def share_of(mix):  # pragma: no cover - compiled
    """:func:`weight_share` of a ``mix`` array."""
    return weight_share(mix[0], mix[1])


def served_weights(w: np.ndarray, avg: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """``share * w + (1 - share) * avg`` in float32: the one linear model that is served."""
    share = float(share_of(mix))
    out = np.asarray(w, dtype=np.float64) * share
    out += (1.0 - share) * np.asarray(avg, dtype=np.float64)
    return out.astype(np.float32)

"""Integer codes shared by every kernel backend.

Plain Python ints so that the core can import them without numba, and so that
``@njit`` functions see them as compile-time constants.
"""

LOSS_LOGISTIC = 0
"""Logistic loss, ``y`` in {0, 1}; ``dloss/dm = sigmoid(m) - y``."""
LOSS_SQUARED = 1
"""Squared loss ``0.5 * (m - y)**2``; ``dloss/dm = m - y``."""

OPT_SGD = 0
"""Plain SGD with the schedule ``learning_rate / (1 + step)**power_t``."""
OPT_ADAGRAD = 1
"""AdaGrad: ``s1`` accumulates squared gradients, ``s2`` is unused."""
OPT_FTRL = 2
"""FTRL-Proximal (McMahan et al. 2013): ``s1 = z``, ``s2 = n``."""

HYPER_LEN = 8
"""Length of the ``hyper`` vector: see the ``H_*`` positions below."""
H_LEARNING_RATE = 0
H_L1 = 1
H_L2 = 2
H_POWER_T = 3
H_FTRL_BETA = 4
H_CAP = 5
"""Cap on the adaptive optimizers' squared-gradient sums (``inf``: none); see
``ModelSpec.horizon``."""
H_SLOT_LR = 6
"""Learning rate of the hashed slots' weights (``H_LEARNING_RATE`` serves the numeric
block, the bias and FM factors); see ``ModelSpec.slot_step_norm``."""
H_FIRST_SLOT = 7
"""Index of the first hashed slot (``ModelSpec.first_slot``: past the numeric block and its
missing block): weights from here up to, not including, the bias take ``H_SLOT_LR``."""

AVG_UPDATES_PER_SQUARE = 8.0
"""A weight's running average moves at least ``2 / (1 + 8 n)`` of the way at each of its
updates, ``n`` its squared-gradient sum: ``8 n`` counts its updates at half a typical squared
logistic gradient (1/4), so the rate comes down to about ``1 / horizon`` (the floor of every
weight's rate) when ``n`` reaches the memory cap, ``horizon`` typical updates. A weight
updated rarely keeps an average of its own recent values, not one lagging ~0."""

ADAGRAD_EPS = 1e-8
"""Added to ``sqrt(s1)`` in the AdaGrad denominator."""

LOSSES = (LOSS_LOGISTIC, LOSS_SQUARED)
OPTIMIZERS = (OPT_SGD, OPT_ADAGRAD, OPT_FTRL)

__all__ = [
    "ADAGRAD_EPS",
    "AVG_UPDATES_PER_SQUARE",
    "HYPER_LEN",
    "H_CAP",
    "H_FIRST_SLOT",
    "H_FTRL_BETA",
    "H_L1",
    "H_L2",
    "H_LEARNING_RATE",
    "H_POWER_T",
    "H_SLOT_LR",
    "LOSSES",
    "LOSS_LOGISTIC",
    "LOSS_SQUARED",
    "OPTIMIZERS",
    "OPT_ADAGRAD",
    "OPT_FTRL",
    "OPT_SGD",
]

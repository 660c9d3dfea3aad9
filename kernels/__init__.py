"""Numerical kernels: mini-batch SGD/AdaGrad/FTRL steps, FM and scaler updates.

Only the integer codes and the CPU (``@njit``) kernels are re-exported here; the CUDA twins
live in :mod:`streamlearn.kernels.cuda` and are imported explicitly, so importing this package
never touches ``numba.cuda``. Semantics are documented in :mod:`streamlearn.kernels.reference`.
"""

from streamlearn.kernels.codes import (
    ADAGRAD_EPS,
    H_CAP,
    H_FIRST_SLOT,
    H_FTRL_BETA,
    H_L1,
    H_L2,
    H_LEARNING_RATE,
    H_POWER_T,
    H_SLOT_LR,
    HYPER_LEN,
    LOSS_LOGISTIC,
    LOSS_SQUARED,
    LOSSES,
    OPT_ADAGRAD,
    OPT_FTRL,
    OPT_SGD,
    OPTIMIZERS,
)
from streamlearn.kernels.cpu import (
    fm_learn_csr,
    fm_predict_csr,
    linear_learn_csr,
    linear_learn_dense,
    linear_predict_csr,
    linear_predict_dense,
    scaler_update,
)

__all__ = [
    "ADAGRAD_EPS",
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
    "fm_learn_csr",
    "fm_predict_csr",
    "linear_learn_csr",
    "linear_learn_dense",
    "linear_predict_csr",
    "linear_predict_dense",
    "scaler_update",
]

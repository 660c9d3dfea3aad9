"""Seeded data factories shared by the CPU and CUDA kernel tests.

A plain module (not conftest) so both test files can import it; the name is unique because
pytest's default import mode puts this folder on ``sys.path``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamlearn.kernels import HYPER_LEN, LOSS_LOGISTIC


@dataclass
class CSRBatch:
    """A CSR mini-batch in the kernels' dtypes."""

    indptr: np.ndarray  # int64[n+1]
    indices: np.ndarray  # int32[nnz]
    values: np.ndarray  # float32[nnz]
    y: np.ndarray  # float32[n]

    @property
    def n(self) -> int:
        return len(self.indptr) - 1


FIRST_SLOT = 4
"""Weights from here up take the slots' rate (``H_SLOT_LR``) in the factories' hyper."""


def hyper(
    lr: float = 0.1, l1: float = 0.0, l2: float = 0.0, power_t: float = 0.5, beta: float = 1.0,
    cap: float = np.inf, slot_gain: float = 2.5, first_slot: int = FIRST_SLOT,
) -> np.ndarray:
    """Build the float64 ``hyper`` vector; hashed slots (``first_slot`` up to the bias)
    learn at ``slot_gain * lr``, so every parity test covers both rates."""
    h = np.array([lr, l1, l2, power_t, beta, cap, slot_gain * lr, first_slot], dtype=np.float64)
    assert h.shape == (HYPER_LEN,)
    return h


def labels(rng: np.random.Generator, n: int, loss: int) -> np.ndarray:
    """Binary labels for the logistic loss, real targets for the squared loss."""
    if loss == LOSS_LOGISTIC:
        return (rng.random(n) < 0.5).astype(np.float32)
    return rng.normal(size=n).astype(np.float32)


def make_csr(
    rng: np.random.Generator,
    n: int,
    D: int,
    nnz_per_row: int = 5,
    loss: int = LOSS_LOGISTIC,
    scale: float = 1.0,
    empty_every: int = 5,
) -> CSRBatch:
    """Random CSR rows with duplicate indices and an empty row every ``empty_every`` rows.

    Indices are drawn from a small hot range half of the time so that rows collide on the
    same hashed weights, as the hashing trick does.
    """
    counts = rng.integers(1, nnz_per_row + 1, size=n)
    counts[::empty_every] = 0
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    hot = rng.integers(0, min(D, 4), size=nnz)
    cold = rng.integers(0, D, size=nnz)
    indices = np.where(rng.random(nnz) < 0.5, hot, cold).astype(np.int32)
    # Force an explicit duplicate inside the first non-empty multi-entry row.
    for r in range(n):
        lo, hi = indptr[r], indptr[r + 1]
        if hi - lo >= 2:
            indices[lo + 1] = indices[lo]
            break
    values = (rng.normal(size=nnz) * scale).astype(np.float32)
    return CSRBatch(indptr, indices, values, labels(rng, n, loss))


def make_dense(
    rng: np.random.Generator, n: int, d: int, loss: int = LOSS_LOGISTIC, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Dense float32 rows (every fourth row all-zero) and matching labels."""
    X = (rng.normal(size=(n, d)) * scale).astype(np.float32)
    X[::4] = 0.0
    return np.ascontiguousarray(X), labels(rng, n, loss)


def make_state(
    rng: np.random.Generator, shape: tuple[int, ...], opt: int
) -> tuple[np.ndarray, ...]:
    """Small non-zero weights and valid optimizer state (non-negative accumulators)."""
    w = (rng.normal(size=shape) * 0.1).astype(np.float32)
    s1 = np.zeros(shape, dtype=np.float32)
    s2 = np.zeros(shape, dtype=np.float32)
    if opt == 1:  # AdaGrad accumulator
        s1[...] = rng.random(shape).astype(np.float32)
    return w, s1, s2

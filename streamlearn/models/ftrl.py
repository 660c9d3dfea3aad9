"""FTRL-Proximal's closed form between its state ``(z, n)`` and its weights, on arrays.

The kernels keep ``z`` (``s1``) and ``n`` (``s2``) and derive each weight as
``w = -(z - sign(z) l1) / ((beta + sqrt(n)) / lr + l2)``, 0 when ``|z| <= l1`` (the bias has
no L1/L2). Two places work on whole arrays outside the kernels, and both use these rules:

* the replica merge (:mod:`streamlearn.replicas`) sums ``z`` and ``n`` and derives ``w``;
  a summed ``n`` past the memory cap is brought back under it, ``z`` re-derived so that
  ``w`` stays;
* a restore (:meth:`OnlineModel.from_state`) whose learning rates differ from the ones the
  state was learned with (an upgrade that changed a default step): ``z`` is re-derived so
  that the stored weights stay, instead of jumping by the ratio of the rates at their next
  update.

``lr`` is one rate, or one per weight (:func:`weight_rates`: the hashed slots take their own).
"""

from __future__ import annotations

import numpy as np

from streamlearn.config import ModelSpec


def weight_rates(spec: ModelSpec) -> np.ndarray:
    """The learning rate of each linear weight, as the kernels take it
    (``ModelSpec.learning_rates``: the hashed slots take their own)."""
    lr, slot_lr = spec.learning_rates
    rates = np.full(spec.n_weights + 1, lr)
    rates[spec.first_slot : spec.n_weights] = slot_lr
    return rates


def _terms(shape: tuple[int, ...], n: np.ndarray, lr: float | np.ndarray, l1: float,
           l2: float, beta: float, bias: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each weight's L1 and its denominator ``(beta + sqrt(n)) / lr + l2`` (the last
    weight, when ``bias``, has no L1/L2)."""
    l1s, l2s = np.full(shape, l1), np.full(shape, l2)
    if bias:
        l1s[-1] = l2s[-1] = 0.0
    lr = np.broadcast_to(np.asarray(lr, dtype=np.float64), shape)
    return l1s, (beta + np.sqrt(np.maximum(n, 0.0))) / lr + l2s


def weights_of(z: np.ndarray, n: np.ndarray, lr: float | np.ndarray, l1: float, l2: float,
               beta: float, bias: bool) -> np.ndarray:
    """The weights of ``(z, n)`` (float64)."""
    l1s, denom = _terms(z.shape, n, lr, l1, l2, beta, bias)
    return np.where(np.abs(z) <= l1s, 0.0, -(z - np.sign(z) * l1s) / denom)


def z_of(w: np.ndarray, n: np.ndarray, lr: float | np.ndarray, l1: float, l2: float,
         beta: float, bias: bool) -> np.ndarray:
    """A ``z`` whose weights under ``(n, lr)`` are ``w`` (float64); ``w = 0`` gives 0."""
    l1s, denom = _terms(w.shape, n, lr, l1, l2, beta, bias)
    return -w * denom - np.sign(w) * l1s


def keep_weights(w: np.ndarray, z: np.ndarray, n: np.ndarray, lr: float | np.ndarray, l1: float,
                 l2: float, beta: float, bias: bool) -> int:
    """Re-derive ``z`` in place where the stored weights ``w`` are not those of ``(z, n)``
    under ``lr`` beyond float32 rounding (state learned under other rates); return how many.
    ``w = 0`` with ``|z| <= l1`` is consistent under any rate and stays; so does a weight
    never updated (``n = 0``: its ``z`` is 0 whatever its value, as FM factors start)."""
    w64 = np.asarray(w, dtype=np.float64)
    derived = weights_of(np.asarray(z, dtype=np.float64), n, lr, l1, l2, beta, bias)
    off = (n > 0) & (np.abs(derived - w64) > 1e-4 * np.abs(w64) + 1e-7)
    count = int(off.sum())
    if count:
        new = z_of(w64, n, lr, l1, l2, beta, bias)
        z[off] = new[off]
    return count


def cap_sums(w: np.ndarray, z: np.ndarray, n: np.ndarray, cap: float, lr: float | np.ndarray,
             l1: float, l2: float, beta: float, bias: bool) -> None:
    """Bring ``n`` back under ``cap`` in place, ``z`` re-derived so that ``w`` stays (each
    replica capped its own sums, and the sum of their deltas can pass the cap). ``w = 0``
    (``|z| <= l1``) stays so under any ``n``."""
    over = (n > cap) & (w != 0.0)  # only these move: few, past the cap
    if over.any():
        capped_n = np.where(over, cap, n)
        z[over] = z_of(w, capped_n, lr, l1, l2, beta, bias)[over]
    np.minimum(n, cap, out=n)


__all__ = ["cap_sums", "keep_weights", "weight_rates", "weights_of", "z_of"]

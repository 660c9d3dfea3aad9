"""Alternative per-weight step rules, prototyped outside the kernels, on the binary real sets.

Asks whether a step rule tells weak-signal streams (bananas, cowles, smarket: every system
at 0.51-0.56 AUC, where a smaller step wins) from streams with more signal (attrition, hmda,
oj: a larger step wins) without a per-data-set setting. Each rule runs on the product's
inputs and settings: the running scaler (:class:`RunningStandardScaler`, folded and applied
per ``batch_size`` rows as the fused loop does), the :class:`Vectorizer`'s hashed slots
(``bench_learning.sl_slots``), the label prior (:func:`~streamlearn.models.target.base_logit`
of the running labels, a residual bias learned on top), the ``ModelSpec`` defaults' step,
normalization and memory cap, and one step per event, scored before it learns. ``ftrl`` is
``OnlineModel``'s rule, through the kernels' own coordinate update (``kernels.cpu._update``);
it differs from the product's scores (``average = false``) only in float32 rounding and the
bias being added in float64 (the table's figures are reproduced closely, not bit for bit).
The others:

- ``cocob``: parameter-free coin betting per weight (COCOB-Backprop, Orabona and Tommasi
  2017), ``--cocob-alpha`` its damping of the first steps;
- ``ftrl-q``: FTRL with ``n ** q`` in place of ``sqrt(n)`` (``--q``), so that the step of a
  weight whose gradients stay noisy (``n`` growing with every event) shrinks faster;
- ``ftrl+avg``: FTRL learns as ``ftrl``, but each event is scored by a mixture of two experts:
  the current weights and their running average (a tail average: rate ``max(2 / t,
  1 / horizon)``, so the average forgets as the memory cap does). The experts are weighed by
  exponential weights on their log losses, discounted by ``--discount`` per event. The
  average is the low-noise estimate that weak-signal streams want; the current weights
  track what is still being learned. A weight's average moves only when the weight is
  updated. ``--margin-mix`` mixes the two margins instead of the two probabilities.
  The product now scores binary models this way by default (``ModelSpec.average``,
  :mod:`streamlearn.models.average`), with the margin mix, the loss gap taken to second
  order and the share fixed per mini-batch; ``ftrl`` here is its learner with
  ``average = false``.

Usage::

    .venv/bin/python load_tests/step_rules.py                      # 30 data sets
    .venv/bin/python load_tests/step_rules.py --datasets bananas,attrition --q 0.75 --scale 2
    .venv/bin/python load_tests/step_rules.py --orders 8           # paired, over row orders
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
from numba import njit
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_learning  # noqa: E402
import real_data  # noqa: E402

from streamlearn.config import ModelSpec  # noqa: E402
from streamlearn.features import csr_rows  # noqa: E402
from streamlearn.kernels.codes import OPT_FTRL  # noqa: E402
from streamlearn.kernels.cpu import _update  # noqa: E402
from streamlearn.models.target import base_logit  # noqa: E402
from streamlearn.scaler import RunningStandardScaler  # noqa: E402

RULE_FTRL, RULE_COCOB, RULE_MIX = 0, 1, 2


def design(rs: real_data.RealStream) -> tuple[tuple[np.ndarray, ...], ModelSpec]:
    """The rows as the product sees them: CSR ``(indptr, indices, values)`` of the z-scores
    and hashed slots (:func:`csr_rows`), and the data set's default spec."""
    spec = bench_learning.real_spec(rs)
    scaler = RunningStandardScaler(spec.n_numeric)
    z = np.empty(rs.numeric.shape, dtype=np.float32)
    for a, b in rs.slices(spec.batch_size):  # fold a chunk, then z-score it, as fused does
        scaler.learn_many(rs.numeric[a:b])
        z[a:b] = scaler.transform_many(rs.numeric[a:b])
    return csr_rows(z, bench_learning.sl_slots(rs, spec)), spec


@njit(cache=True)
def prequential(indptr, indices, values, y, n_weights, rule, lr, l1, l2, beta, cap,
                horizon, q, cocob_alpha, discount, margin_mix):  # pragma: no cover
    """Score each row, then learn it; returns the scores."""
    n = len(indptr) - 1
    bias = n_weights  # the residual bias: the last weight
    w = np.zeros(n_weights + 1)
    s1 = np.zeros(n_weights + 1)  # FTRL: z; COCOB: the sum of negative gradients
    s2 = np.zeros(n_weights + 1)  # FTRL: n; COCOB: the sum of |gradient|
    big_l = np.zeros(n_weights + 1)  # COCOB: the largest |gradient|
    reward = np.zeros(n_weights + 1)  # COCOB: the wealth won
    avg = np.zeros(n_weights + 1)  # ftrl+avg: the running average of the weights
    loss_w, loss_avg = 0.0, 0.0  # ftrl+avg: the experts' discounted log losses
    count, mean = 0.0, 0.0  # the labels seen: the prior's statistics
    out = np.empty(n)
    for i in range(n):
        lo, hi = indptr[i], indptr[i + 1]
        m = base_logit(count, mean) + w[bias]
        m_avg = base_logit(count, mean) + avg[bias]
        for t in range(lo, hi):
            m += w[indices[t]] * values[t]
            m_avg += avg[indices[t]] * values[t]
        p = 1.0 / (1.0 + math.exp(-min(50.0, max(-50.0, m))))
        out[i] = p
        if rule == RULE_MIX:
            p_avg = 1.0 / (1.0 + math.exp(-min(50.0, max(-50.0, m_avg))))
            share = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, loss_avg - loss_w))))
            if margin_mix:  # one linear model: the weights share * w + (1 - share) * avg
                mm = share * m + (1.0 - share) * m_avg
                out[i] = 1.0 / (1.0 + math.exp(-min(50.0, max(-50.0, mm))))
            else:
                out[i] = share * p + (1.0 - share) * p_avg
            hit, hit_avg = (p, p_avg) if y[i] > 0.5 else (1.0 - p, 1.0 - p_avg)
            loss_w = discount * loss_w - math.log(max(hit, 1e-12))
            loss_avg = discount * loss_avg - math.log(max(hit_avg, 1e-12))
        coef = p - y[i]
        count += 1.0
        mean += (y[i] - mean) / count
        rho = min(1.0, max(2.0 / count, 1.0 / horizon)) if horizon > 0 else 2.0 / count
        for t in range(lo, hi + 1):  # the row's weights, then the bias
            j = indices[t] if t < hi else bias
            g = coef * (values[t] if t < hi else 1.0)
            if rule == RULE_COCOB:
                big_l[j] = max(big_l[j], abs(g))
                s2[j] += abs(g)
                reward[j] = max(reward[j] - w[j] * g, 0.0)
                s1[j] -= g
                lj = big_l[j]
                if lj > 0.0:
                    w[j] = s1[j] / (lj * max(s2[j] + lj, cocob_alpha * lj)) * (lj + reward[j])
                continue
            l1j, l2j = (0.0, 0.0) if j == bias else (l1, l2)  # no L1/L2 on the bias
            if q == 0.5:  # the product's rule, the kernels' own code
                w[j], s1[j], s2[j] = _update(w[j], s1[j], s2[j], g, OPT_FTRL, lr, l1j, l2j,
                                             beta, cap, 0.0)
            else:  # FTRL with n ** q (no L1 here)
                n_new = min(s2[j] + g * g, max(s2[j], cap))
                root = n_new**q
                s1[j] += g - (root - s2[j] ** q) / lr * w[j]
                s2[j] = n_new
                w[j] = -s1[j] / ((beta + root) / lr + l2j)
            avg[j] += rho * (w[j] - avg[j])
    return out


def run_rule(csr: tuple[np.ndarray, ...], y: np.ndarray, spec: ModelSpec, rule: int,
             scale: float, q: float, args: argparse.Namespace) -> np.ndarray:
    """One rule at the spec's settings, its step ``scale`` times the default: the product's
    default step for a model that scores as the rule does (with the average or without)."""
    scored_as = spec if rule == RULE_MIX else dataclasses.replace(spec, average=False)
    lr = scale * scored_as.step_size / spec.step_norm
    return prequential(*csr, y, spec.n_weights, rule, lr, spec.l1, spec.l2, spec.ftrl_beta,
                       spec.gradient_cap, float(spec.horizon), q, args.cocob_alpha,
                       args.discount, args.margin_mix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="", help="comma list (default: every binary set)")
    ap.add_argument("--q", type=float, default=0.75, help="ftrl-q: the power of n")
    ap.add_argument("--scale", type=float, default=1.0, help="ftrl-q: times the default step")
    ap.add_argument("--cocob-alpha", type=float, default=100.0)
    ap.add_argument("--discount", type=float, default=0.999,
                    help="ftrl+avg: per-event discount of the experts' log losses")
    ap.add_argument("--margin-mix", action="store_true",
                    help="ftrl+avg: mix the experts' margins, not their probabilities (the "
                         "score is then one linear model's: share * w + (1 - share) * avg)")
    ap.add_argument("--orders", type=int, default=1,
                    help="also K - 1 seeded shuffles of each data set; prints each rule's mean "
                         "AUC and its paired difference to ftrl (+- one standard error)")
    args = ap.parse_args()
    names = [n for n in args.datasets.split(",") if n] or [
        ds.name for ds in real_data.TABLE if ds.task == "binary"]
    rules = [("ftrl", RULE_FTRL, 1.0, 0.5), (f"ftrl-q{args.q:g}x{args.scale:g}", RULE_FTRL,
             args.scale, args.q), (f"cocob{args.cocob_alpha:g}", RULE_COCOB, 1.0, 0.5),
             ("ftrl+avg", RULE_MIX, 1.0, 0.5)]
    k = max(args.orders, 1)
    print(f"prequential AUC, one step per event (rules: see the docstring); {k} row order(s)"
          + (": mean, then the paired difference to ftrl" if k > 1 else ""))
    print(f"{'data set':<15}" + "".join(f"{r[0]:>22}" for r in rules), flush=True)
    for name in names:
        own = real_data.load(real_data.BY_NAME[name])
        aucs = np.empty((k, len(rules)))
        for seed in range(k):
            rs = own if seed == 0 else own.reordered(seed)
            csr, spec = design(rs)
            for r, (_, rule, scale, q) in enumerate(rules):
                scores = run_rule(csr, rs.y, spec, rule, scale, q, args)
                aucs[seed, r] = roc_auc_score(rs.y, scores)
        cells = []
        for r in range(len(rules)):
            if k == 1:
                cells.append(f"{aucs[0, r]:22.4f}")
                continue
            diff = aucs[:, r] - aucs[:, 0]
            se = diff.std(ddof=1) / math.sqrt(k)
            cells.append(f"{aucs[:, r].mean():8.4f} {diff.mean():+.4f}±{se:.4f}")
        print(f"{name:<15}" + "".join(f"{x:>22}" for x in cells), flush=True)

if __name__ == "__main__":
    main()

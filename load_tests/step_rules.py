"""Alternative per-weight step rules, prototyped outside the kernels, on the binary real sets.

Asks whether a step rule tells weak-signal streams (bananas, cowles, smarket: every system
at 0.51-0.56 AUC, where a smaller step wins) from streams with more signal (attrition, hmda,
oj: a larger step wins) without a per-data-set setting. Each rule runs on the same inputs:
running z-scores of the numeric columns (clipped at 10), one weight per categorical value,
the label prior (the logit of the running base rate, add-half smoothed) plus a learned
residual bias, and one step per event, scored before it learns. ``ftrl`` is the default
rule of ``OnlineModel`` (per-weight FTRL-Proximal, ``learning_rate / d ** norm_power``, the
memory cap at 500 = 2,000 updates of 1/4); it reproduces the benchmark's streamlearn AUCs
closely (not bit for bit: one-hot in place of hashing, no float32). The others:

- ``cocob``: parameter-free coin betting per weight (COCOB-Backprop, Orabona and Tommasi
  2017), ``--cocob-alpha`` its damping of the first steps;
- ``ftrl-q``: FTRL with ``n ** q`` in place of ``sqrt(n)`` (``--q``), so that the step of a
  weight whose gradients stay noisy (``n`` growing with every event) shrinks faster;
- ``ftrl+avg``: FTRL learns as ``ftrl``, but each event is scored by a mixture of two experts:
  the current weights and their running average (a tail average: rate ``max(2 / t,
  1 / 2000)``, so the average forgets as the memory cap does). The experts are weighed by
  exponential weights on their log losses, discounted by ``--discount`` per event. The
  average is the low-noise estimate that weak-signal streams want; the current weights
  track what is still being learned. A categorical value's average moves only when the
  value is seen. ``--margin-mix`` mixes the two margins instead of the two probabilities.

Usage::

    .venv/bin/python load_tests/step_rules.py                      # ~1 min, 30 data sets
    .venv/bin/python load_tests/step_rules.py --datasets bananas,attrition --q 0.75 --scale 2
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from numba import njit
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_data  # noqa: E402

RULE_FTRL, RULE_COCOB, RULE_MIX = 0, 1, 2
AVG_HORIZON = 2000.0  # the tail average's longest memory, in events: the cap's horizon
NORM_POWER = 0.75  # ModelSpec.norm_power's default
N_CAP = 500.0  # ModelSpec.gradient_cap at the default horizon (2,000 updates of 1/4)


def design(rs: real_data.RealStream) -> tuple[np.ndarray, np.ndarray, int]:
    """Prequential z-scores (each row folded into the running statistics, then scaled)
    and the weight index of each categorical value; returns ``(Z, C, n_weights)``."""
    x = rs.numeric
    n, d = x.shape
    z = np.zeros((n, d))
    count, mean, m2 = np.zeros(d), np.zeros(d), np.zeros(d)
    for i in range(n):
        for j in range(d):
            v = x[i, j]
            if v != v:  # missing: 0, the mean
                continue
            count[j] += 1
            delta = v - mean[j]
            mean[j] += delta / count[j]
            m2[j] += delta * (v - mean[j])
            sd = math.sqrt(m2[j] / count[j]) if count[j] > 1 else 0.0
            z[i, j] = max(-10.0, min(10.0, (v - mean[j]) / sd)) if sd > 0 else 0.0
    offsets = np.cumsum([d] + [len(v) + 1 for v in rs.vocab])
    c = np.empty((n, len(rs.vocab)), dtype=np.int64)
    for j, vocab in enumerate(rs.vocab):
        codes = rs.codes[:, j].astype(np.int64)
        codes[codes < 0] = len(vocab)  # missing: a value of its own
        c[:, j] = offsets[j] + codes
    return z, c, int(offsets[-1])


@njit(cache=True)
def prequential(z, c, y, n_weights, rule, lr, q, cocob_alpha, discount,  # pragma: no cover
                 margin_mix=False):
    """Score each row, then learn it; returns the scores."""
    n, d = z.shape
    k = c.shape[1]
    bias = n_weights  # the residual bias: the last weight
    w = np.zeros(n_weights + 1)
    s1 = np.zeros(n_weights + 1)  # FTRL: z; COCOB: the sum of negative gradients
    s2 = np.zeros(n_weights + 1)  # FTRL: n; COCOB: the sum of |gradient|
    big_l = np.zeros(n_weights + 1)  # COCOB: the largest |gradient|
    reward = np.zeros(n_weights + 1)  # COCOB: the wealth won
    avg = np.zeros(n_weights + 1)  # ftrl+avg: the running average of the weights
    loss_w, loss_avg = 0.0, 0.0  # ftrl+avg: the experts' discounted log losses
    idx = np.empty(d + k + 1, np.int64)
    val = np.empty(d + k + 1)
    seen, positives = 0.0, 0.0
    out = np.empty(n)
    for i in range(n):
        for j in range(d):
            idx[j] = j
            val[j] = z[i, j]
        for j in range(k):
            idx[d + j] = c[i, j]
            val[d + j] = 1.0
        idx[d + k] = bias
        val[d + k] = 1.0
        rate = (positives + 0.5) / (seen + 1.0)
        m = math.log(rate / (1.0 - rate))
        m_avg = m
        for t in range(d + k + 1):
            m += w[idx[t]] * val[t]
            m_avg += avg[idx[t]] * val[t]
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
        seen += 1.0
        positives += y[i]
        rho = min(1.0, max(2.0 / seen, 1.0 / AVG_HORIZON))
        for t in range(d + k + 1):
            j = idx[t]
            g = coef * val[t]
            if rule != RULE_COCOB:
                n_new = min(s2[j] + g * g, max(s2[j], N_CAP))
                root = n_new**q
                s1[j] += g - (root - s2[j] ** q) / lr * w[j]
                s2[j] = n_new
                w[j] = -s1[j] / ((1.0 + root) / lr + 1e-6)
                avg[j] += rho * (w[j] - avg[j])
            else:
                big_l[j] = max(big_l[j], abs(g))
                s2[j] += abs(g)
                reward[j] = max(reward[j] - w[j] * g, 0.0)
                s1[j] -= g
                lj = big_l[j]
                if lj > 0.0:
                    w[j] = s1[j] / (lj * max(s2[j] + lj, cocob_alpha * lj)) * (lj + reward[j])
    return out


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
        fields = own.numeric.shape[1] + len(own.vocab)
        aucs = np.empty((k, len(rules)))
        for seed in range(k):
            rs = own if seed == 0 else own.reordered(seed)
            z, c, n_weights = design(rs)
            for r, (_, rule, scale, q) in enumerate(rules):
                scores = prequential(z, c, rs.y, n_weights, rule, scale / fields**NORM_POWER,
                                     q, args.cocob_alpha, args.discount, args.margin_mix)
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

"""Cost of the drift monitors per mini-batch against the learning step, in one run.

Times, on the same pre-vectorized batches: ``OnlineModel.process_many`` (the worker's
step, which includes the monitors), ``DataDriftMonitor.update`` alone (it holds the rows),
one read of the data-drift scores (which folds the held rows: the newest ~16k), the
data-drift fold of every call (a read after each: what each call cost before the rows were
held) and the concept detector's update alone, and prints each as a share of the step.

    .venv/bin/python load_tests/bench_drift.py [--events 200000] [--fields 74]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from streamlearn.config import ModelSpec
from streamlearn.drift import ConceptDriftMonitor, DataDriftMonitor
from streamlearn.models import OnlineModel
from streamlearn.synthetic import FraudStream


def _wide_events(n: int, fields: int, seed: int = 0) -> tuple[ModelSpec, list[dict]]:
    rng = np.random.default_rng(seed)
    n_num = fields * 2 // 3
    n_cat = fields - n_num
    spec = ModelSpec(name="b", topic="t", label="y", numeric=tuple(f"x{i}" for i in range(n_num)),
                     categorical=tuple(f"c{i}" for i in range(n_cat)), hash_bits=18)
    X = rng.normal(size=(n, n_num))
    C = rng.integers(0, 50, size=(n, n_cat))
    y = (X[:, 0] + rng.normal(size=n) > 0).astype(int)
    events = [{**{f"x{i}": float(X[r, i]) for i in range(n_num)},
               **{f"c{i}": f"v{C[r, i]}" for i in range(n_cat)}, "y": int(y[r]), "event_id": r}
              for r in range(n)]
    return spec, events


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--fields", type=int, default=0, help="0: the fraud stream's 8 fields")
    p.add_argument("--chunk", type=int, default=4096, help="rows per process_many call")
    args = p.parse_args()
    if args.fields:
        spec, events = _wide_events(args.events, args.fields)
    else:
        spec = ModelSpec(name="fraud", topic="t", label="is_fraud",
                         numeric=("amount", "hour", "distance_km", "card_age_days",
                                  "tx_last_hour"),
                         categorical=("merchant_category", "country", "channel"))
        events = FraudStream(seed=1).take(args.events)
    model = OnlineModel(spec, device="cpu")
    batches = [model.vectorizer.transform_many(events[lo : lo + args.chunk])[0]
               for lo in range(0, len(events), args.chunk)]
    warm = OnlineModel(spec, device="cpu")
    warm.process_many(batches[0])  # compile / load the kernels
    warm_data = DataDriftMonitor.for_spec(spec)
    for b in batches[:3]:
        warm_data.update(b.numeric, 256, b.hashed)
    warm_data.scores()  # loads the compiled fold

    t0 = time.perf_counter()
    for b in batches:
        model.process_many(b, spec.batch_size)
    step = time.perf_counter() - t0

    data = DataDriftMonitor.for_spec(spec)
    t0 = time.perf_counter()
    for b in batches:
        data.update(b.numeric, spec.batch_size, b.hashed)
    data_s = time.perf_counter() - t0
    # Steady state: past the reference window (no buffering, no freeze).
    t0 = time.perf_counter()
    for b in batches:
        data.update(b.numeric, spec.batch_size, b.hashed)
    steady_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    data.scores()  # a snapshot's read: folds the held window
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in batches:  # a read after every call: every row folded
        data.update(b.numeric, spec.batch_size, b.hashed)
        data.scores()
    eager_s = time.perf_counter() - t0

    losses = np.random.default_rng(0).normal(0.2, 0.02, len(events) // spec.batch_size)
    concept = ConceptDriftMonitor.for_spec(spec)
    concept.update(0.2, 0)  # imports river outside the timing
    t0 = time.perf_counter()
    for i, x in enumerate(losses):
        concept.update(float(x), (i + 1) * spec.batch_size)
    concept_s = time.perf_counter() - t0

    n = len(events)
    per = 1e6 * spec.batch_size / n
    print(f"{n} events, {spec.n_numeric} numeric + {len(spec.categorical)} categorical fields, "
          f"mini-batch {spec.batch_size}")
    print(f"process_many (learning step, monitors included): {n / step:>12,.0f} events/s "
          f"{step * per:8.1f} us/batch")
    print(f"data drift update alone:                         {n / data_s:>12,.0f} events/s "
          f"{data_s * per:8.1f} us/batch  ({data_s / step:.1%} of the step)")
    print(f"  past the reference window:                     {n / steady_s:>12,.0f} events/s "
          f"{steady_s * per:8.1f} us/batch  ({steady_s / step:.1%} of the step)")
    print(f"  one read (folds the held rows):                {read_s * 1e3:12.2f} ms")
    print(f"  read after every call (every row folded):      {n / eager_s:>12,.0f} events/s "
          f"{eager_s * per:8.1f} us/batch  ({eager_s / step:.1%} of the step)")
    print(f"concept detector ({spec.drift_detector}) alone:           "
          f"{n / concept_s:>12,.0f} events/s {concept_s * per:8.1f} us/batch  "
          f"({concept_s / step:.1%} of the step)")


if __name__ == "__main__":
    main()

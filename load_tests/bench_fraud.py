"""What entity aggregates and delayed labels do to fraud detection, on the synthetic stream.

One run, the same events for every variant: the synthetic fraud stream with its
aggregate-only patterns (``FraudStream(entity_fraud=...)``: card-testing bursts and cards
used far from their usual place), sent through the worker's JSON decoder and learned
test-then-train by :class:`streamlearn.evaluate.Evaluator` (``OnlineModel.process_many``,
the worker's step; with a label delay, ``model.pending`` and ``model.learn_joined``, the
worker's path for ``<model>.labels``).  No Kafka.

Variants: the model spec of ``streamlearn.toml`` (``--config``) with its aggregates and
without them (``aggregates=()``), each with labels on the events (immediate) and with
labels arriving ``--delay`` seconds of event time later (``--unlabelled`` of them never).
Metrics are prequential, from each event's score on arrival: over the whole stream and
over its second half (after the model has settled), averaged over ``--seeds``.

    .venv/bin/python load_tests/bench_fraud.py [--events 300000] [--seeds 0,1] \
        [--delay 600] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from streamlearn import prequential
from streamlearn.aggregates import AggregateInputs
from streamlearn.config import ModelSpec
from streamlearn.evaluate import Evaluator
from streamlearn.features import Vectorizer
from streamlearn.models import OnlineModel
from streamlearn.pipeline import JsonDecoder, decode_json
from streamlearn.settings import load_settings
from streamlearn.synthetic import FraudStream

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 4096  # events per decode, as the worker's blocks


def _metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    mask = ~np.isnan(labels)
    y, p = labels[mask], scores[mask]
    return {"pr_auc": prequential.average_precision(y, p), "auc": prequential.roc_auc(y, p),
            "recall_at_1pct_fpr": prequential.recall_at_fpr(y, p, 0.01), "n": int(len(y))}


def run_variant(spec: ModelSpec, values: list[bytes], labels: np.ndarray, times: np.ndarray,
                delay: float | None) -> dict[str, Any]:
    """Replay ``values`` (JSON events) through a fresh model; metrics from arrival scores
    against ``labels`` (every event's true label, labelled or not on the stream)."""
    decoder = JsonDecoder(spec, Vectorizer(spec))
    model = OnlineModel(spec, device="cpu")
    ev = Evaluator(model, delay)
    t0 = time.perf_counter()
    for lo in range(0, len(values), CHUNK):
        batch, rejects = decode_json(decoder, values[lo : lo + CHUNK])
        assert not rejects, rejects[:3]
        if batch.aux is None:  # no aggregates: the delayed path still needs event times
            batch.aux = AggregateInputs(times[lo : lo + CHUNK], np.empty((len(batch), 0)), [])
        ev.feed(batch)
    ev.finish()
    seconds = time.perf_counter() - t0
    scores = ev.scores
    half = len(scores) // 2
    return {"all": _metrics(labels, scores), "second_half": _metrics(labels[half:], scores[half:]),
            "seconds": seconds, "labels": dict(model.pending.counts) if delay is not None else {}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "streamlearn.toml"))
    p.add_argument("--model", default="fraud")
    p.add_argument("--events", type=int, default=300_000, help="events per seed (max 2e6)")
    p.add_argument("--seeds", default="0,1", help="comma-separated stream seeds")
    p.add_argument("--entity-fraud", type=float, default=0.4,
                   help="share of the fraud in the aggregate-only patterns (default 0.4)")
    p.add_argument("--delay", type=float, default=600.0,
                   help="label delay, seconds of event time (100 events/s; default 600)")
    p.add_argument("--unlabelled", type=float, default=0.0,
                   help="fraction of events never labelled (default 0)")
    p.add_argument("--json", default="", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args()
    if not 0 < args.events <= 2_000_000:
        p.error("--events must be in 1..2,000,000")
    specs = [s for s in load_settings(args.config).specs if s.name == args.model]
    if not specs:
        p.error(f"no model {args.model!r} in {args.config}")
    with_agg = specs[0]
    if not with_agg.aggregates:
        p.error(f"model {args.model!r} declares no aggregates")
    # The delayed variants keep their events' rows for the whole delay.
    with_agg = dataclasses.replace(with_agg, max_pending=max(with_agg.max_pending,
                                                             int(args.delay * 100 * 1.2)),
                                   label_ttl_s=max(with_agg.label_ttl_s, 2 * args.delay))
    # This stream does not drift: a detector's false alarm would reset one variant and
    # not another, so drift only alerts here.
    with_agg = dataclasses.replace(with_agg, drift_action="alert")
    plain = dataclasses.replace(with_agg, aggregates=())
    variants = [("no aggregates", plain, None), ("aggregates", with_agg, None),
                ("no aggregates, delayed", plain, args.delay),
                ("aggregates, delayed", with_agg, args.delay)]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
    t_start = time.perf_counter()
    for seed in seeds:
        stream = FraudStream(seed=seed, entity_fraud=args.entity_fraud,
                             label_fraction=1.0 - args.unlabelled)
        events = stream.take(args.events)
        truth = FraudStream(seed=seed, entity_fraud=args.entity_fraud,
                            label_fraction=1.0 - args.unlabelled)  # the same draws: all labels
        cols = truth.batch(args.events)
        labels, times = cols["is_fraud"].astype(np.float32), cols["ts"]
        values = [orjson.dumps(e) for e in events]
        for name, spec, delay in variants:
            r = run_variant(spec, values, labels, times, delay)
            runs[name].append(r)
            print(f"seed {seed} {name:24s} PR AUC {r['second_half']['pr_auc']:.4f} "
                  f"ROC AUC {r['second_half']['auc']:.4f} ({r['seconds']:.1f} s)", flush=True)

    def mean(name: str, part: str, key: str) -> float:
        return float(np.mean([r[part][key] for r in runs[name]]))

    fraud_rate = float(np.mean(labels))
    print(f"\n{args.events:,} events x {len(seeds)} seed(s), {fraud_rate:.2%} fraud, "
          f"{args.entity_fraud:.0%} of it aggregate-only; delay {args.delay:g} s of event time"
          f" ({args.delay * 100:,.0f} events); {time.perf_counter() - t_start:.0f} s\n")
    head = f"{'variant':26s}{'PR AUC':>9s}{'ROC AUC':>9s}{'R@1%FPR':>9s}" \
           f"{'PR AUC':>9s}{'ROC AUC':>9s}"
    print(f"{'':26s}{'second half of the stream':>27s}{'whole stream':>18s}")
    print(head)
    for name, _, _ in variants:
        print(f"{name:26s}{mean(name, 'second_half', 'pr_auc'):9.4f}"
              f"{mean(name, 'second_half', 'auc'):9.4f}"
              f"{mean(name, 'second_half', 'recall_at_1pct_fpr'):9.4f}"
              f"{mean(name, 'all', 'pr_auc'):9.4f}{mean(name, 'all', 'auc'):9.4f}")
    lift = {d: mean(f"aggregates{d}", "second_half", "pr_auc")
            - mean(f"no aggregates{d}", "second_half", "pr_auc") for d in ("", ", delayed")}
    print(f"\nPR AUC lift from aggregates (second half): immediate labels {lift['']:+.4f}, "
          f"delayed labels {lift[', delayed']:+.4f}")
    if args.json:
        Path(args.json).write_bytes(orjson.dumps({
            "events": args.events, "seeds": seeds, "entity_fraud": args.entity_fraud,
            "delay_s": args.delay, "unlabelled": args.unlabelled,
            "aggregates": [a.to_dict() for a in with_agg.aggregates],
            "runs": runs, "lift_pr_auc": lift}, option=orjson.OPT_INDENT_2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

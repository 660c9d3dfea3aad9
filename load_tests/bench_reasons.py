"""Extra cost of reason codes (and decision bands) per ``/predict`` request, in one run.

Builds the demo fraud snapshot (as ``bench_predict.py`` does), then calls the API as an
ASGI function in a loop (no server, no client: the app's own cost), alternating rounds of
the same single-event requests without reasons (the baseline), with ``?reasons=K``, and
with ``?reasons=K`` on a model with decision bands; the median round of each is reported,
with the difference from the baseline.  ``--route`` also times the FastAPI route alone
(``api.fast_predict = false``), which answers everything the fast path declines.

    python load_tests/bench_reasons.py [--requests 2000] [--rounds 7] [--k 3] [--route]
                                       [--worker]

``--worker`` also times the worker's step (``ModelRunner.handle`` on JSON events, with
prediction records) without and with ``reasons_in_records = K``, alternating rounds.

The target (issue 11): at most 50 µs extra per single-event prediction.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import MODEL, build_snapshot  # noqa: E402
from profile_predict import call as asgi_post  # noqa: E402


def make_app(snapshot: Path, fast: bool, bands: bool) -> Any:
    from streamlearn.services.api.main import create_app
    from streamlearn.serving import ModelStore, SnapshotPolicy

    probe = ModelStore()
    if not probe.offer(f"{MODEL}/bench", snapshot.read_bytes()):
        raise SystemExit(f"could not load {snapshot}: {probe.stats.last_error}")
    store = probe
    if bands:  # the configured spec's bands apply (streamlearn.reasons.serving_spec)
        spec = probe.get(MODEL).model.spec  # type: ignore[union-attr]
        banded = dataclasses.replace(spec, decision_block=0.9, decision_review=0.5)
        store = ModelStore(policy=SnapshotPolicy(specs={MODEL: banded}))
        assert store.offer(f"{MODEL}/bench", snapshot.read_bytes())
    settings = SimpleNamespace(kafka=SimpleNamespace(bootstrap=""),
                               api=SimpleNamespace(host="127.0.0.1", port=0, max_instances=1000,
                                                   fast_predict=fast))
    return create_app(settings, store)


async def call(app: Any, query: bytes, body: bytes) -> tuple[int, bytes]:
    return await asgi_post(app, f"/models/{MODEL}/predict", body, query)


async def timed(app: Any, query: bytes, bodies: list[bytes], n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        status, out = await call(app, query, bodies[i % len(bodies)])
        if status != 200:
            raise SystemExit(f"status {status}: {out[:300]!r}")
    return (time.perf_counter() - t0) / n


async def run(cases: dict[str, tuple[Any, bytes]], bodies: list[bytes], n: int,
              rounds: int) -> dict[str, float]:
    per: dict[str, list[float]] = {name: [] for name in cases}
    apps = {id(app): app for app, _ in cases.values()}
    async with _lifespans(list(apps.values())):
        for app, query in cases.values():  # warm-up: numba, caches
            await timed(app, query, bodies, min(n, 300))
        for _ in range(rounds):
            for name, (app, query) in cases.items():
                per[name].append(await timed(app, query, bodies, n))
    return {name: statistics.median(v) for name, v in per.items()}


class _lifespans:
    def __init__(self, apps: list[Any]) -> None:
        self.contexts = [app.router.lifespan_context(app) for app in apps]

    async def __aenter__(self) -> None:
        for c in self.contexts:
            await c.__aenter__()

    async def __aexit__(self, *exc: Any) -> None:
        for c in reversed(self.contexts):
            await c.__aexit__(None, None, None)


def worker_step(k: int, rounds: int, n: int = 20_000) -> None:
    """Per-event cost of the worker step without and with ``reasons_in_records = k``."""
    import dataclasses as dc

    from streamlearn.config import ModelSpec
    from streamlearn.models import OnlineModel
    from streamlearn.pipeline import ModelRunner, Record
    from streamlearn.synthetic import FraudStream

    spec = ModelSpec(
        name=MODEL, topic="transactions", label="is_fraud",
        numeric=("amount", "hour", "distance_km", "card_age_days", "tx_last_hour"),
        categorical=("merchant_category", "country", "channel"), hash_bits=18,
    )
    records = [Record(orjson.dumps(e), "transactions", 0, i)
               for i, e in enumerate(FraudStream(seed=2).take(n))]
    runners = {0: ModelRunner(OnlineModel(spec, device="cpu")),
               k: ModelRunner(OnlineModel(dc.replace(spec, reasons_in_records=k), device="cpu"))}
    per: dict[int, list[float]] = {0: [], k: []}
    for runner in runners.values():
        runner.handle(records[:2000])  # warm-up
    for _ in range(rounds):
        for key, runner in runners.items():
            t0 = time.perf_counter()
            for lo in range(0, n, 2000):
                runner.handle(records[lo:lo + 2000])
            per[key].append((time.perf_counter() - t0) / n)
    base, with_k = statistics.median(per[0]), statistics.median(per[k])
    print(f"worker step, JSON events with prediction records, median of {rounds} rounds of {n}:")
    print(f"  reasons_in_records = 0 (baseline) {base * 1e6:7.2f} µs/event")
    print(f"  reasons_in_records = {k}          {with_k * 1e6:7.2f} µs/event  "
          f"(+{(with_k - base) * 1e6:.2f} µs, x{with_k / base:.2f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--k", type=int, default=3, help="reason codes asked for")
    parser.add_argument("--route", action="store_true", help="also the FastAPI route alone")
    parser.add_argument("--worker", action="store_true",
                        help="also the worker step with reasons_in_records")
    parser.add_argument("--shipped", action="store_true",
                        help="the fraud model of ./streamlearn.toml, entity aggregates and all")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streamlearn-reasons-") as tmp:
        snap = Path(tmp) / "fraud.snap"
        _, queries = build_snapshot(snap, 20_000, 18, shipped=args.shipped)
        fast = make_app(snap, fast=True, bands=False)
        banded = make_app(snap, fast=True, bands=True)
        slow = make_app(snap, fast=False, bands=False) if args.route else None
    bodies = [orjson.dumps({"features": q}) for q in queries]
    reasons = f"reasons={args.k}".encode()
    cases: dict[str, tuple[Any, bytes]] = {
        "fast path, no reasons (baseline)": (fast, b""),
        f"fast path, ?reasons={args.k}": (fast, reasons),
        f"fast path, ?reasons={args.k} + decision bands": (banded, reasons),
    }
    if slow is not None:
        cases["route, no reasons (baseline)"] = (slow, b"")
        cases[f"route, ?reasons={args.k}"] = (slow, reasons)
    med = asyncio.run(run(cases, bodies, args.requests, args.rounds))
    print(f"single-event requests, median of {args.rounds} rounds of {args.requests}, "
          "in the app (no server, no client):")
    base = {"fast": med["fast path, no reasons (baseline)"],
            "route": med.get("route, no reasons (baseline)", 0.0)}
    for name, per in med.items():
        ref = base["route" if name.startswith("route") else "fast"]
        extra = "" if "baseline" in name else f"  (+{(per - ref) * 1e6:.1f} µs, x{per / ref:.2f})"
        print(f"  {name:48s} {per * 1e6:7.1f} µs{extra}")
    if args.worker:
        worker_step(args.k, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

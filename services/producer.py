"""``streamlearn produce``: send the synthetic transaction stream to any Kafka.

``fmt="json"`` sends one JSON object per message, keyed by card; ``fmt="batch"``
sends batch records (``streamlearn.batch_format``) of ``batch_rows`` events each,
round-robin over partitions, with integer event ids.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaProducer

from streamlearn.batch_format import Categorical, encode_columns
from streamlearn.synthetic import CATEGORIES, CHANNELS, COUNTRIES, FraudStream

_CHUNK = 500
FORMATS = ("json", "batch")
MAX_REQUEST_BYTES = 16 * 1024 * 1024


def synthetic_columns(stream: FraudStream, n: int) -> dict[str, Any]:
    """``n`` synthetic events as batch-record columns (the JSON stream's fields).

    Numerics are float64 with NaN where the JSON event omits the field, categoricals
    are dictionary-encoded, the label is float32 with NaN where unlabelled.
    """
    c = stream.batch(n)
    return {
        "event_id": c["event_id"].astype(np.int64),
        "card_id": c["card_id"].astype(np.int64),
        "merchant_id": c["merchant_id"].astype(np.int64),
        "merchant_category": Categorical(c["merchant_category"], CATEGORIES),
        "country": Categorical(c["country"], COUNTRIES),
        "channel": Categorical(c["channel"], CHANNELS),
        "amount": c["amount"].astype(np.float64),
        "hour": c["hour"].astype(np.float64),
        "distance_km": np.where(c["_missing"], np.nan, c["distance_km"]),
        "card_age_days": c["card_age_days"].astype(np.float64),
        "tx_last_hour": c["tx_last_hour"].astype(np.float64),
        "ts": c["ts"].astype(np.float64),
        "is_fraud": np.where(c["_labelled"], c["is_fraud"], np.nan).astype(np.float32),
    }


async def produce(
    bootstrap: str,
    topic: str,
    *,
    count: int | None = None,
    rate: float | None = None,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    stop: asyncio.Event | None = None,
    fmt: str = "json",
    batch_rows: int = 4096,
    client_kwargs: dict[str, Any] | None = None,
    drift_at: int | None = None,
) -> int:
    """Send ``count`` events (forever if None) at about ``rate`` events/s; return how many.

    ``client_kwargs`` are the security settings (``settings.kafka.client_kwargs()``).
    ``drift_at``: after that many events the stream drifts (:meth:`FraudStream.drift`:
    a new fraud pattern, and amounts three times larger).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5,
                                max_batch_size=256 * 1024, acks=1,
                                max_request_size=MAX_REQUEST_BYTES, **(client_kwargs or {}))
    await producer.start()
    stream = FraudStream(seed=seed)
    chunk = _CHUNK if fmt == "json" else max(1, batch_rows)
    partitions: itertools.cycle[int] | None = None
    sent = 0
    t0 = last = time.monotonic()
    try:
        while (count is None or sent < count) and not (stop and stop.is_set()):
            n = chunk if count is None else min(chunk, count - sent)
            if drift_at is not None and not stream.drifted:
                if sent >= drift_at:
                    stream.drift()
                    print(f"\ndrift injected after {sent:,} events", file=sys.stderr)
                else:
                    n = min(n, drift_at - sent)  # the change falls on a chunk boundary
            if fmt == "json":
                for event in stream.take(n):
                    await producer.send(topic, orjson.dumps(event),
                                        key=event["card_id"].encode())
            else:
                if partitions is None:
                    partitions = itertools.cycle(sorted(await producer.partitions_for(topic)))
                payload = encode_columns(synthetic_columns(stream, n))
                await producer.send(topic, payload, partition=next(partitions))
            sent += n
            if rate:
                ahead = sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            now = time.monotonic()
            if progress and now - last >= 1.0:
                progress(sent, sent / (now - t0))
                last = now
        await producer.flush()
    finally:
        await producer.stop()
    return sent


def run(bootstrap: str, topic: str, count: int | None, rate: float | None, seed: int,
        fmt: str = "json", batch_rows: int = 4096,
        client_kwargs: dict[str, Any] | None = None, drift_at: int | None = None) -> int:
    """CLI entry: produce with a progress line on stderr."""
    def show(sent: int, per_s: float) -> None:
        total = f"/{count:,}" if count else ""
        print(f"\rsent {sent:,}{total} events ({per_s:,.0f}/s)", end="", file=sys.stderr,
              flush=True)

    try:
        sent = asyncio.run(produce(bootstrap, topic, count=count, rate=rate, seed=seed,
                                   progress=show, fmt=fmt, batch_rows=batch_rows,
                                   client_kwargs=client_kwargs, drift_at=drift_at))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(f"\nsent {sent:,} events to {topic} on {bootstrap} ({fmt})", file=sys.stderr)
    return 0

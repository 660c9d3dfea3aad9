"""``streamlearn produce``: send the synthetic transaction stream to any Kafka.

``fmt="json"`` sends one JSON object per message, keyed by card; ``fmt="batch"``
sends batch records (``streamlearn.batch_format``) of ``batch_rows`` events each,
round-robin over partitions, with integer event ids.

Delayed labels (``label_delay``, JSON only): each event goes out without its label, and
the label follows on ``<model>.labels`` as ``{id_field: id, label: y}`` ``label_delay``
seconds (wall clock) later, keyed like its event (the card), so that it lands on the same
partition number and reaches the worker replica that holds the event (the labels topic
must have as many partitions as the events' topic).  ``unlabelled_fraction`` of the
events never get a label.  At most ``max_waiting_labels`` labels wait; when that many do,
events pause until the oldest label is due, so memory stays bounded whatever the rate.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
from collections import deque
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
#: Labels waiting for their delay at most (about 150 bytes each).
MAX_WAITING_LABELS = 1_000_000


class DelayedLabels:
    """Labels on their way to ``<model>.labels``: ``(due, key, message)`` in due order."""

    def __init__(self, topic: str, id_field: str, label_field: str, delay: float,
                 unlabelled_fraction: float = 0.0, seed: int = 0,
                 max_waiting: int = MAX_WAITING_LABELS) -> None:
        if not delay >= 0:
            raise ValueError(f"label delay must be >= 0 seconds, got {delay}")
        if not 0.0 <= unlabelled_fraction <= 1.0:
            raise ValueError(f"unlabelled fraction must be in [0, 1], got {unlabelled_fraction}")
        self.topic, self.id_field, self.label_field = topic, id_field, label_field
        self.delay, self.unlabelled_fraction = delay, unlabelled_fraction
        self.max_waiting = max(1, max_waiting)
        self.queue: deque[tuple[float, bytes, bytes]] = deque()
        self.random = random.Random(seed)
        self.sent = self.never = self.dropped = 0

    def take(self, event: dict[str, Any]) -> bytes | None:
        """Remove ``event``'s label; its label message, or None (none, or never sent: the
        unlabelled fraction)."""
        y = event.pop(self.label_field, None)
        if y is None:
            return None
        if self.random.random() < self.unlabelled_fraction:
            self.never += 1
            return None
        return orjson.dumps({self.id_field: event[self.id_field], self.label_field: y})

    def schedule(self, key: bytes, message: bytes, sent_at: float) -> None:
        """Send ``message`` (keyed ``key``) ``delay`` seconds after ``sent_at``."""
        self.queue.append((sent_at + self.delay, key, message))

    async def send_until(self, producer: AIOKafkaProducer, waiting: int,
                         stop: asyncio.Event | None) -> None:
        """Wait for each next label to come due and send it, until at most ``waiting``
        labels wait (or ``stop`` is set)."""
        while len(self.queue) > waiting and not (stop and stop.is_set()):
            await asyncio.sleep(max(0.0, self.queue[0][0] - time.monotonic()))
            await self.send_due(producer, time.monotonic())

    async def send_due(self, producer: AIOKafkaProducer, now: float) -> None:
        """Send every label due by ``now``."""
        queue = self.queue
        while queue and queue[0][0] <= now:
            _, key, message = queue.popleft()
            await producer.send(self.topic, message, key=key)
            self.sent += 1


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
    labels: DelayedLabels | None = None,
    entity_fraud: float = 0.0,
) -> int:
    """Send ``count`` events (forever if None) at about ``rate`` events/s; return how many.

    ``client_kwargs`` are the security settings (``settings.kafka.client_kwargs()``).
    ``drift_at``: after that many events the stream drifts (:meth:`FraudStream.drift`:
    a new fraud pattern, and amounts three times larger).
    ``labels``: send labels later, on their own topic (see the module docstring); with
    ``count``, the call returns once every label is sent, after the delay; stopped
    (``stop``), the labels not yet due are dropped (``labels.dropped``).
    ``entity_fraud``: share of the fraud in the patterns only entity aggregates catch
    (:class:`~streamlearn.synthetic.FraudStream`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if labels is not None and fmt != "json":
        raise ValueError("delayed labels need the json format (events keyed by card)")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5,
                                max_batch_size=256 * 1024, acks=1,
                                max_request_size=MAX_REQUEST_BYTES, **(client_kwargs or {}))
    await producer.start()
    stream = FraudStream(seed=seed, entity_fraud=entity_fraud)
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
                if labels is not None:
                    await labels.send_due(producer, time.monotonic())
                    # bounded memory: events wait while as many labels as allowed do
                    await labels.send_until(producer, labels.max_waiting - 1, stop)
                for event in stream.take(n):
                    key = event["card_id"].encode()
                    label = None if labels is None else labels.take(event)
                    await producer.send(topic, orjson.dumps(event), key=key)
                    if label is not None:
                        labels.schedule(key, label, time.monotonic())  # type: ignore[union-attr]
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
        if labels is not None:
            await labels.send_until(producer, 0, stop)  # the last labels, on time
            labels.dropped += len(labels.queue)
            labels.queue.clear()
        await producer.flush()
    finally:
        await producer.stop()
    return sent


def run(bootstrap: str, topic: str, count: int | None, rate: float | None, seed: int,
        fmt: str = "json", batch_rows: int = 4096,
        client_kwargs: dict[str, Any] | None = None, drift_at: int | None = None,
        labels: DelayedLabels | None = None, entity_fraud: float = 0.0) -> int:
    """CLI entry: produce with a progress line on stderr."""
    def show(sent: int, per_s: float) -> None:
        total = f"/{count:,}" if count else ""
        extra = "" if labels is None else (f", labels sent {labels.sent:,}, waiting "
                                           f"{len(labels.queue):,}")
        print(f"\rsent {sent:,}{total} events ({per_s:,.0f}/s){extra}", end="",
              file=sys.stderr, flush=True)

    try:
        sent = asyncio.run(produce(bootstrap, topic, count=count, rate=rate, seed=seed,
                                   progress=show, fmt=fmt, batch_rows=batch_rows,
                                   client_kwargs=client_kwargs, drift_at=drift_at,
                                   labels=labels, entity_fraud=entity_fraud))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(f"\nsent {sent:,} events to {topic} on {bootstrap} ({fmt})", file=sys.stderr)
    if labels is not None:
        print(f"sent {labels.sent:,} labels to {labels.topic} {labels.delay:g} s after their "
              f"events; {labels.never:,} events never labelled", file=sys.stderr)
    return 0

"""``streamlearn produce``: send the synthetic transaction stream to any Kafka."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

import orjson
from aiokafka import AIOKafkaProducer

from streamlearn.synthetic import FraudStream

_CHUNK = 500


async def produce(
    bootstrap: str,
    topic: str,
    *,
    count: int | None = None,
    rate: float | None = None,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Send ``count`` events (forever if None) at about ``rate`` events/s; return how many."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5,
                                max_batch_size=256 * 1024, acks=1)
    await producer.start()
    stream = FraudStream(seed=seed)
    sent = 0
    t0 = last = time.monotonic()
    try:
        while (count is None or sent < count) and not (stop and stop.is_set()):
            n = _CHUNK if count is None else min(_CHUNK, count - sent)
            for event in stream.take(n):
                await producer.send(topic, orjson.dumps(event), key=event["card_id"].encode())
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


def run(bootstrap: str, topic: str, count: int | None, rate: float | None, seed: int) -> int:
    """CLI entry: produce with a progress line on stderr."""
    def show(sent: int, per_s: float) -> None:
        total = f"/{count:,}" if count else ""
        print(f"\rsent {sent:,}{total} events ({per_s:,.0f}/s)", end="", file=sys.stderr,
              flush=True)

    try:
        sent = asyncio.run(produce(bootstrap, topic, count=count, rate=rate, seed=seed,
                                   progress=show))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(f"\nsent {sent:,} events to {topic} on {bootstrap}", file=sys.stderr)
    return 0

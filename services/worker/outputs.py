"""Output side of the worker: topic declaration and batched sends with aiokafka.

Faust's producer sends one message per call through its sensors; predictions
are one record per event, so they go out in ``send_batch`` batches instead.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

log = logging.getLogger("streamlearn.worker")

MAX_REQUEST_BYTES = 16 * 1024 * 1024


async def declare_topics(
    bootstrap: str, topics: dict[str, dict[str, str]], partitions: int,
    client_kwargs: dict[str, Any] | None = None, copartitioned: dict[str, str] | None = None,
) -> None:
    """Create topics that do not exist yet (``{name: topic_configs}``).

    ``copartitioned`` maps a topic to the one whose partition count it must share (a
    model's labels topic to its event topic: a label keyed like its event then lands on
    the partition number of its event, which one replica holds); a new one is created
    with that count, and an existing one with another count is logged as an error.
    """
    pairs = copartitioned or {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **(client_kwargs or {}))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        have = await _partition_counts(admin, [t for pair in pairs.items() for t in pair
                                               if t in existing])
        new = [NewTopic(name, have.get(pairs.get(name, ""), partitions), 1, topic_configs=cfg)
               for name, cfg in topics.items() if name not in existing]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # a replica beside us won the race
        for a, b in pairs.items():
            if a in have and b in have and have[a] != have[b]:
                log.error("%s has %d partitions and %s %d: labels keyed like their events "
                          "may reach a replica that does not hold their events (counted "
                          "unknown); give both topics the same partition count", a, have[a],
                          b, have[b])
    finally:
        await admin.close()


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    """Partition count per topic (those the broker describes)."""
    if not names:
        return {}
    try:
        described = await admin.describe_topics(sorted(set(names)))
    except KafkaError as exc:
        log.warning("could not describe topics %s: %s", names, exc)
        return {}
    return {d["topic"]: len(d["partitions"]) for d in described
            if not d.get("error_code") and d.get("partitions")}


class Outputs:
    """A started producer plus round-robin batched sends.

    Sends return the broker's delivery futures: the worker awaits them before it acks
    the input events (``Feeder.release``), so a committed offset always has its
    prediction records on the broker.
    """

    producer: AIOKafkaProducer

    def __init__(self, bootstrap: str, client_kwargs: dict[str, Any] | None = None) -> None:
        self.bootstrap = bootstrap
        self.client_kwargs = client_kwargs or {}
        self._rr = itertools.count()

    async def start(self) -> None:
        """Connect (aiokafka objects must be built inside the running loop)."""
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, acks=1,
                                         max_batch_size=512 * 1024,
                                         max_request_size=MAX_REQUEST_BYTES,
                                         **self.client_kwargs)
        await self.producer.start()

    async def stop(self) -> None:
        """Flush and disconnect."""
        await self.producer.stop()

    async def send(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[Any]:
        """Queue one message; the returned future resolves once the broker has it."""
        return await self.producer.send(topic, value, key=key)

    async def send_many(self, topic: str, values: Sequence[bytes]) -> list[asyncio.Future[Any]]:
        """Queue unkeyed messages as few batches to one partition, rotating partitions.

        Returns one delivery future per batch.
        """
        if not values:
            return []
        parts = sorted(await self.producer.partitions_for(topic))
        partition = parts[next(self._rr) % len(parts)]
        futures = []
        batch = self.producer.create_batch()
        for value in values:
            if batch.append(key=None, value=value, timestamp=None) is None:
                futures.append(await self.producer.send_batch(batch, topic, partition=partition))
                batch = self.producer.create_batch()
                batch.append(key=None, value=value, timestamp=None)
        futures.append(await self.producer.send_batch(batch, topic, partition=partition))
        return futures


class Backoff:
    """Exponential back-off with full jitter (AWS's "full jitter"): ``uniform(0, min(cap,
    base * 2**n))``, so replicas that lost the broker together do not retry in step.

    Examples
    --------
    >>> b = Backoff(base_s=0.1, cap_s=1.0, rng=random.Random(0))
    >>> delays = [b.next() for _ in range(8)]
    >>> all(0 <= d <= 1.0 for d in delays), b.failures
    (True, 8)
    >>> b.reset(); b.failures
    0
    """

    def __init__(self, base_s: float = 0.1, cap_s: float = 5.0,
                 rng: random.Random | None = None) -> None:
        self.base_s, self.cap_s = base_s, cap_s
        self.failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The delay before the next try (counts a failure)."""
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.failures, 30))
        self.failures += 1
        return self._rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        """A success: start again from ``base_s``."""
        self.failures = 0

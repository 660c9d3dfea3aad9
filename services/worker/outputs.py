"""Output side of the worker: topic declaration and batched sends with aiokafka.

Faust's producer sends one message per call through its sensors; predictions
are one record per event, so they go out in ``send_batch`` batches instead.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

log = logging.getLogger("streamlearn.worker")

MAX_REQUEST_BYTES = 16 * 1024 * 1024


async def declare_topics(
    bootstrap: str, topics: dict[str, dict[str, str]], partitions: int
) -> None:
    """Create topics that do not exist yet (``{name: topic_configs}``)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(name, partitions, 1, topic_configs=cfg)
               for name, cfg in topics.items() if name not in existing]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # a replica beside us won the race
    finally:
        await admin.close()


class Outputs:
    """A started producer plus round-robin batched sends."""

    producer: AIOKafkaProducer

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._rr = itertools.count()

    async def start(self) -> None:
        """Connect (aiokafka objects must be built inside the running loop)."""
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, acks=1,
                                         max_batch_size=512 * 1024,
                                         max_request_size=MAX_REQUEST_BYTES)
        await self.producer.start()

    async def stop(self) -> None:
        """Flush and disconnect."""
        await self.producer.stop()

    async def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Queue one message (returns once buffered, not when acknowledged)."""
        await self.producer.send(topic, value, key=key)

    async def send_many(self, topic: str, values: Sequence[bytes]) -> None:
        """Queue unkeyed messages as few batches to one partition, rotating partitions."""
        if not values:
            return
        parts = sorted(await self.producer.partitions_for(topic))
        partition = parts[next(self._rr) % len(parts)]
        batch = self.producer.create_batch()
        for value in values:
            if batch.append(key=None, value=value, timestamp=None) is None:
                await self.producer.send_batch(batch, topic, partition=partition)
                batch = self.producer.create_batch()
                batch.append(key=None, value=value, timestamp=None)
        await self.producer.send_batch(batch, topic, partition=partition)

"""Defect 12: the demo bounds the embedded broker's memory by recycling it."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamlearn.broker import EmbeddedBroker
from streamlearn.services.demo import _recycle, input_committed
from streamlearn.settings import load_settings

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


class _FakeProducer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")


async def _fill(bootstrap: str, topic: str, mib: int, partitions: int = 2) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20,
                                max_batch_size=1024 * 1024)
    await producer.start()
    try:
        chunk = bytes(64 * 1024)
        for i in range(mib * 16):
            await producer.send(topic, chunk, partition=i % partitions)
        await producer.flush()
    finally:
        await producer.stop()


async def _commit_all(bootstrap: str, topic: str, group: str) -> None:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        seen = 0
        while seen < 2:
            batches = await consumer.getmany(timeout_ms=1000)
            for tp, msgs in batches.items():
                if msgs and consumer.highwater(tp) == msgs[-1].offset + 1:
                    seen += 1
            await consumer.commit()
    finally:
        await consumer.stop()


def test_recycling_restarts_the_broker_empty_on_the_same_port(tmp_path):
    settings = load_settings(model=[{"name": "m", "topic": "rec.in", "numeric": ["x"]}],
                             worker={"app_id": "rec-group"})
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap
        asyncio.run(_fill(bootstrap, "rec.in", 96))
        full = broker.rss_bytes() or 0
        assert full > 96 * 2**20  # Tansu keeps every record in memory
        assert not asyncio.run(input_committed(bootstrap, "rec.in", "rec-group", timeout_s=1))
        asyncio.run(_commit_all(bootstrap, "rec.in", "rec-group"))
        assert asyncio.run(input_committed(bootstrap, "rec.in", "rec-group", timeout_s=10))
        producer = _FakeProducer()
        note = asyncio.run(_recycle(settings, broker, producer))  # type: ignore[arg-type]
        assert producer.calls == ["pause", "resume"]
        assert broker.bootstrap == bootstrap and "some dropped" not in note
        assert (broker.rss_bytes() or full) < full / 3, note
        asyncio.run(_fill(bootstrap, "rec.in", 1, partitions=1))  # the same address serves

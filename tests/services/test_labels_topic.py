"""A model's labels topic shares its event topic's partition count (real broker)."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamlearn.services.worker.outputs import declare_topics


async def _counts(bootstrap: str, names: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(names)}
    finally:
        await admin.close()


def test_labels_topic_takes_the_event_topics_partition_count(
        broker: str, caplog: pytest.LogCaptureFixture) -> None:
    tag = uuid.uuid4().hex[:8]
    events, labels = f"ev-{tag}", f"m-{tag}.labels"
    odd_events, odd_labels = f"ev2-{tag}", f"m2-{tag}.labels"

    async def run() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker)
        await admin.start()
        try:  # event topics made by someone else, with their own counts
            await admin.create_topics([NewTopic(events, 6, 1), NewTopic(odd_events, 2, 1),
                                       NewTopic(odd_labels, 3, 1)])
        finally:
            await admin.close()
        await declare_topics(broker, {t: {} for t in (events, labels, odd_events, odd_labels)},
                             4, None, {labels: events, odd_labels: odd_events})
        return await _counts(broker, [labels, odd_labels])

    with caplog.at_level(logging.ERROR, logger="streamlearn.worker"):
        counts = asyncio.run(run())
    assert counts == {labels: 6, odd_labels: 3}  # created like its events; the other kept
    assert any(odd_labels in r.getMessage() and "same partition count" in r.getMessage()
               for r in caplog.records)

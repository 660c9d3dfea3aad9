"""Snapshot feed against the embedded Tansu broker (``-m kafka``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from streamlearn import snapshots
from streamlearn.broker import BrokerError, EmbeddedBroker
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.services.api.feed import SnapshotFeed
from streamlearn.services.api.main import create_app
from streamlearn.serving import ModelStore
from streamlearn.synthetic import FraudStream

pytestmark = pytest.mark.kafka

SPEC = ModelSpec(name="fraud", topic="transactions", label="is_fraud",
                 numeric=("amount", "hour"), categorical=("country",), hash_bits=6)


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    try:
        b = EmbeddedBroker().start()
    except BrokerError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"embedded broker unavailable: {exc}")
    try:
        yield b
    finally:
        b.stop()


def versions(n: int) -> list[bytes]:
    """``n`` snapshots of one replica, each one learning step newer."""
    model = OnlineModel(SPEC, device="cpu")
    events = FraudStream(seed=21).take(64 * n)
    out = []
    for i in range(n):
        batch, _ = model.vectorizer.transform_many(events[64 * i : 64 * (i + 1)])
        model.process(batch)
        out.append(snapshots.encode(model.to_state() | {"replica": "r1", "telemetry": {}}))
    return out


async def publish(bootstrap: str, topic: str, values: list[bytes],
                  key: bytes = b"fraud/r1") -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.05)


async def test_feed_skips_stale_snapshots_and_serves_the_newest(broker: EmbeddedBroker) -> None:
    topic = "feed-test-1"
    snaps = versions(5)
    await publish(broker.bootstrap, topic, snaps[:4])  # a backlog, as Tansu never compacts
    store = ModelStore()
    feed = SnapshotFeed(broker.bootstrap, store, topic=topic)
    feed.start()
    try:
        await wait_for(lambda: store.get("fraud") is not None)
        assert store.get("fraud").version == 4  # type: ignore[union-attr]
        assert store.stats.accepted == 1  # the backlog was decoded once, not four times
        assert feed.superseded == 3 and feed.caught_up
        await publish(broker.bootstrap, topic, snaps[4:])
        await wait_for(lambda: store.get("fraud").version == 5)  # type: ignore[union-attr]
        assert store.stats.rejected == 0
    finally:
        await feed.stop()
    assert feed.state == "stopped"


def test_app_serves_snapshots_from_kafka(broker: EmbeddedBroker) -> None:
    topic = "feed-test-2"
    snaps = versions(2)

    class Kafka(BaseModel):
        bootstrap: str
        models_topic: str

    class Api(BaseModel):
        host: str = "127.0.0.1"
        port: int = 0

    class Cfg(BaseModel):
        kafka: Kafka
        api: Api = Api()

    cfg = Cfg(kafka=Kafka(bootstrap=broker.bootstrap, models_topic=topic))
    with TestClient(create_app(cfg, ModelStore(), CollectorRegistry())) as client:
        assert client.get("/readyz").status_code == 503
        asyncio.run(publish(broker.bootstrap, topic, snaps[:1]))
        deadline = time.monotonic() + 15
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.05)
        assert client.get("/models/fraud").json()["version"] == 1
        asyncio.run(publish(broker.bootstrap, topic, snaps[1:]))
        while client.get("/models/fraud").json()["version"] != 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/models/fraud").json()["feed"]["state"] == "running"

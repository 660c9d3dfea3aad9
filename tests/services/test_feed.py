"""Snapshot feed against the embedded Tansu broker (``-m kafka``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import test_feed_records as records  # sibling test module: hostile record builders
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
from streamlearn.serving import ModelStore, SnapshotPolicy
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


# -- hardening on the real broker ---------------------------------------------------


class _Kafka(BaseModel):
    bootstrap: str
    models_topic: str


class _Api(BaseModel):
    host: str = "127.0.0.1"
    port: int = 0


class _Cfg(BaseModel):
    kafka: _Kafka
    api: _Api = _Api()


def _strict_store() -> ModelStore:
    limits = snapshots.Limits(max_payload_bytes=256 * 1024)
    return ModelStore(policy=SnapshotPolicy(key=records.KEY, specs={"fraud": records.SPEC},
                                            limits=limits))


async def publish_raw(bootstrap: str, topic: str, key: bytes | None, value: bytes | None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=8 * 2**20)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def _wait(predicate: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_hostile_records_never_stop_the_feed(broker: EmbeddedBroker) -> None:
    """Forged, truncated, oversized, bomb, unsigned and tombstone records on the broker."""
    topic = "feed-test-hostile"
    old, new = records.trained(256), records.trained(512)
    store = _strict_store()
    app = create_app(_Cfg(kafka=_Kafka(bootstrap=broker.bootstrap, models_topic=topic)), store,
                     CollectorRegistry())
    with TestClient(app) as client:
        asyncio.run(publish_raw(broker.bootstrap, topic, b"fraud/r1",
                                records.sign(old.to_state())))
        _wait(lambda: client.get("/readyz").status_code == 200, "the first snapshot")
        served = store.get("fraud")
        assert served is not None and served.version == old.version
        hostile = records.hostile_records(new)
        for name, msg in hostile.items():
            before = store.stats.rejected
            asyncio.run(publish_raw(broker.bootstrap, topic, msg.key, msg.value))
            _wait(lambda: store.stats.rejected > before, f"{name} to be rejected")  # noqa: B023
            assert store.get("fraud") is served, name
            assert app.state.feed.alive, name
        # The feed still runs: an authentic, newer snapshot is served at once.
        asyncio.run(publish_raw(broker.bootstrap, topic, b"fraud/r1",
                                records.sign(new.to_state())))
        _wait(lambda: store.get("fraud").version == new.version, "the newer snapshot")  # type: ignore[union-attr]
        assert client.get("/models/fraud").json()["version"] == new.version < 10**12
        text = client.get("/metrics").text
        assert 'streamlearn_snapshots_rejected_total{reason="bad_signature"} 3.0' in text
        assert 'streamlearn_snapshots_rejected_total{reason="too_large"} 2.0' in text
        assert 'streamlearn_snapshots_rejected_total{reason="tombstone"} 1.0' in text
        assert "streamlearn_snapshot_feed_up 1.0" in text
        assert "streamlearn_broker_up 1.0" in text
        assert store.stats.rejected == len(hostile)
        assert client.get("/readyz").json()["status"] == "ready"
    # An API restarted over the same topic (every hostile record in its backlog, an
    # authentic but malformed one newest under the real key) serves the newest good one.
    crafted = hostile["58-byte KeyError"]
    asyncio.run(publish_raw(broker.bootstrap, topic, crafted.key, crafted.value))
    restarted = create_app(_Cfg(kafka=_Kafka(bootstrap=broker.bootstrap, models_topic=topic)),
                           _strict_store(), CollectorRegistry())
    with TestClient(restarted) as client:
        _wait(lambda: client.get("/readyz").status_code == 200, "the restarted API")
        assert client.get("/models/fraud").json()["version"] == new.version


def test_broker_outage_is_reported_and_a_restarted_broker_is_read_again(
        caplog: pytest.LogCaptureFixture) -> None:
    """The broker stops: the API keeps serving, reports it (readyz, metrics) without a log
    flood.  It comes back empty (a recreated topic): the new snapshot is served."""
    try:
        own = EmbeddedBroker().start()
    except BrokerError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"embedded broker unavailable: {exc}")
    topic = "feed-test-outage"
    snaps = versions(6)
    app = create_app(_Cfg(kafka=_Kafka(bootstrap=own.bootstrap, models_topic=topic)),
                     ModelStore(), CollectorRegistry())
    restarted: EmbeddedBroker | None = None
    try:
        with TestClient(app) as client:
            for snap in snaps[:3]:  # the old topic ends at offset 3
                asyncio.run(publish_raw(own.bootstrap, topic, b"fraud/r1", snap))
            _wait(lambda: client.get("/models/fraud").status_code == 200
                  and client.get("/models/fraud").json()["version"] == 3, "version 3")
            own.stop()
            caplog.clear()
            t0 = time.monotonic()
            _wait(lambda: client.get("/readyz").json()["status"] == "degraded", "degraded",
                  timeout=20)
            time.sleep(3.0)
            outage_s = time.monotonic() - t0
            lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
            r = client.get("/readyz")
            assert r.status_code == 200 and "unreachable" in r.json()["reason"]
            assert client.get("/models/fraud").json()["version"] == 3  # still serving
            assert "streamlearn_broker_up 0.0" in client.get("/metrics").text
            assert len(lines) / outage_s < 5, [rec.getMessage() for rec in lines]
            # Back, empty: the recreated topic will hold 3 records again (offsets 0..2),
            # no more than the feed's old position, and the last is the newest model.
            restarted = EmbeddedBroker(port=own.port).start()
            for snap in (snaps[3], snaps[4], snaps[5]):
                asyncio.run(publish_raw(own.bootstrap, topic, b"fraud/r1", snap))
            _wait(lambda: client.get("/models/fraud").json()["version"] == 6, "version 6",
                  timeout=30)
            ready = client.get("/readyz").json()
            assert ready["status"] == "ready" and ready["feed"]["resets"] >= 1
            assert "streamlearn_broker_up 1.0" in client.get("/metrics").text
    finally:
        (restarted or own).stop()

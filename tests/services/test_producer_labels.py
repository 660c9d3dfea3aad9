"""``streamlearn produce --label-delay``: labels follow their events, keyed like them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from streamlearn.services import producer as producer_mod
from streamlearn.services.producer import DelayedLabels, produce


class FakeProducer:
    """Records what would be sent, with the monotonic time of each send."""

    sent: list[tuple[str, bytes, bytes | None, float]] = []

    def __init__(self, **_: Any) -> None:
        FakeProducer.sent = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def flush(self) -> None: ...

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   partition: int | None = None) -> None:
        FakeProducer.sent.append((topic, value, key, time.monotonic()))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeProducer]:
    monkeypatch.setattr(producer_mod, "AIOKafkaProducer", FakeProducer)
    return FakeProducer


def test_labels_follow_their_events_after_the_delay(fake: type[FakeProducer]) -> None:
    labels = DelayedLabels("fraud.labels", "event_id", "is_fraud", delay=0.2,
                           unlabelled_fraction=0.25, seed=3)
    n = asyncio.run(produce("x:1", "transactions", count=2000, seed=1, labels=labels,
                            entity_fraud=0.4))
    assert n == 2000
    events = {orjson.loads(v)["event_id"]: (orjson.loads(v), k, t)
              for topic, v, k, t in fake.sent if topic == "transactions"}
    sent_labels = [(orjson.loads(v), k, t) for topic, v, k, t in fake.sent
                   if topic == "fraud.labels"]
    assert len(events) == 2000
    assert all("is_fraud" not in e for e, _, _ in events.values())  # events go unlabelled
    assert labels.sent == len(sent_labels) and labels.never == 2000 - labels.sent
    assert 0.65 < labels.sent / 2000 < 0.85  # about 25% never labelled
    assert labels.dropped == 0 and not labels.queue  # all sent before produce returned
    assert sum(m["is_fraud"] for m, _, _ in sent_labels) > 0
    for message, key, t in sent_labels:
        assert set(message) == {"event_id", "is_fraud"}
        event, event_key, t_event = events[message["event_id"]]
        assert key == event_key == event["card_id"].encode()  # same key: same partition
        assert t - t_event >= 0.2  # not before the delay
    # The labels are the stream's own (the same seed, taken in the producer's chunks).
    stream = producer_mod.FraudStream(seed=1, entity_fraud=0.4)
    truth = {e["event_id"]: e["is_fraud"] for _ in range(2000 // producer_mod._CHUNK)
             for e in stream.take(producer_mod._CHUNK)}
    assert all(truth[m["event_id"]] == m["is_fraud"] for m, _, _ in sent_labels)


def test_waiting_labels_are_bounded(fake: type[FakeProducer]) -> None:
    labels = DelayedLabels("m.labels", "event_id", "is_fraud", delay=0.05, max_waiting=300)
    most = 0
    real_schedule = labels.schedule

    def schedule(key: bytes, message: bytes, sent_at: float) -> None:
        nonlocal most
        real_schedule(key, message, sent_at)
        most = max(most, len(labels.queue))

    labels.schedule = schedule  # type: ignore[method-assign]
    asyncio.run(produce("x:1", "t", count=3000, labels=labels))
    assert labels.sent == 3000 and most <= 300 + 500  # the cap, plus one chunk of events


def test_stop_drops_the_labels_not_yet_due(fake: type[FakeProducer]) -> None:
    labels = DelayedLabels("m.labels", "event_id", "is_fraud", delay=60.0)
    stop = asyncio.Event()

    async def main() -> int:
        task = asyncio.create_task(produce("x:1", "t", rate=5000, stop=stop, labels=labels))
        await asyncio.sleep(0.3)
        stop.set()
        return await task

    sent = asyncio.run(main())
    assert sent > 0 and labels.sent == 0 and labels.dropped == sent


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unlabelled fraction"):
        DelayedLabels("m.labels", "id", "y", delay=1.0, unlabelled_fraction=1.5)
    with pytest.raises(ValueError, match="label delay"):
        DelayedLabels("m.labels", "id", "y", delay=-1.0)
    with pytest.raises(ValueError, match="json format"):
        asyncio.run(produce("x:1", "t", count=1, fmt="batch",
                            labels=DelayedLabels("m.labels", "id", "y", delay=1.0)))

"""End to end on the real embedded broker: produce -> Faust worker learns -> API serves.

Worker and API run as the same processes users run (``python -m streamlearn ...``);
only the Kafka protocol and HTTP connect them.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from e2e import wait_json

from streamlearn.prequential import roc_auc
from streamlearn.synthetic import FraudStream

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

N_EVENTS = 30_000
MALFORMED = b'{"event_id": "broken", "amount": 12.0,'
INVALID = {"event_id": "bad-type", "amount": "twelve", "is_fraud": 0}

CONFIG = """
[kafka]
partitions = 2
[worker]
batch_within_s = 0.1
[[model]]
name = "fraud"
topic = "it.transactions"
label = "is_fraud"
numeric = ["amount", "hour", "distance_km", "card_age_days", "tx_last_hour"]
categorical = ["merchant_category", "country", "channel"]
hash_bits = 14
batch_size = 256
"""


@pytest.fixture(scope="module")
def stack(broker: str, tmp_path_factory: pytest.TempPathFactory,
          services: Callable[..., Any]) -> Iterator[dict[str, str]]:
    with services(tmp_path_factory.mktemp("stack"), CONFIG, broker,
                  {"STREAMLEARN_WORKER__REPLICA_ID": "it-0"}) as stack:
        yield stack


async def _produce(bootstrap: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        events = FraudStream(seed=11).take(N_EVENTS)
        for i, event in enumerate(events):
            await producer.send("it.transactions", orjson.dumps(event))
            if i == N_EVENTS // 2:
                await producer.send("it.transactions", MALFORMED)
                await producer.send("it.transactions", orjson.dumps(INVALID))
        await producer.flush()
    finally:
        await producer.stop()


async def _read(bootstrap: str, topic: str, want: int, timeout: float = 30.0) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    out: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < want and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            out.extend(m.value for msgs in batches.values() for m in msgs)
    finally:
        await consumer.stop()
    return out


def test_stream_is_learned_served_and_bad_messages_dead_lettered(stack):
    asyncio.run(_produce(stack["bootstrap"]))
    with httpx.Client(base_url=stack["base"], timeout=10) as client:
        info = wait_json(client, stack, "/models/fraud",
                         lambda i: i.get("events_seen", 0) >= N_EVENTS, 150, poll=0.5)
        assert info["version"] >= 1
        assert info["events_learned"] == N_EVENTS  # every valid event carries a label
        assert client.get("/readyz").status_code == 200

        holdout = FraudStream(seed=99).take(6000)
        scores: list[float] = []
        for i in range(0, len(holdout), 1000):
            r = client.post("/models/fraud/predict", json={"instances": holdout[i : i + 1000]})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["version"] >= 1 and body["model"] == "fraud"
            scores.extend(body["predictions"])
        y = np.array([e.get("is_fraud", 0) for e in holdout])
        assert roc_auc(y, np.array(scores)) > 0.9

        metrics = client.get("/metrics").text
        assert "streamlearn_" in metrics

    dead = [
        orjson.loads(v) for v in asyncio.run(_read(stack["bootstrap"], "streamlearn.deadletter", 2))
    ]
    by_source = {base64.b64decode(d["value_b64"]): d for d in dead}
    assert set(by_source) == {MALFORMED, orjson.dumps(INVALID)}
    assert "not valid JSON" in by_source[MALFORMED]["reason"]
    assert "field 'amount': expected a number" in by_source[orjson.dumps(INVALID)]["reason"]

    preds = asyncio.run(_read(stack["bootstrap"], "fraud.predictions", N_EVENTS))
    assert len(preds) == N_EVENTS
    first = orjson.loads(preds[0])
    assert set(first) == {"id", "model", "version", "score"} and 0.0 <= first["score"] <= 1.0

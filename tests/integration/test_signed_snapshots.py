"""End to end with a snapshot key: the worker signs, the API serves only what verifies.

Worker and API run as ``python -m streamlearn ...`` on the real embedded broker; forged
records are written to the models topic by an outside producer, as an attacker would.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from streamlearn import snapshots
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.synthetic import FraudStream

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

SECRET = "e2e-snapshot-key-0123456789abcdef"
MODELS = "signed.models"
N_EVENTS = 3000
CONFIG = """
[kafka]
partitions = 1
[worker]
batch_within_s = 0.1
[[model]]
name = "fraud"
topic = "signed.transactions"
label = "is_fraud"
numeric = ["amount", "hour", "distance_km", "card_age_days", "tx_last_hour"]
categorical = ["merchant_category", "country", "channel"]
hash_bits = 10
"""


@pytest.fixture(scope="module")
def stack(broker: str, tmp_path_factory: pytest.TempPathFactory,
          services: Callable[..., Any]) -> Iterator[dict[str, str]]:
    env = {
        "STREAMLEARN_KAFKA__MODELS_TOPIC": MODELS,
        "STREAMLEARN_KAFKA__SNAPSHOT_KEY": SECRET,
        "STREAMLEARN_API__REQUIRE_SIGNED_SNAPSHOTS": "true",
        "STREAMLEARN_WORKER__APP_ID": "signed-worker",
        "STREAMLEARN_WORKER__REPLICA_ID": "signed-0",
    }
    with services(tmp_path_factory.mktemp("signed"), CONFIG, broker, env) as stack:
        yield stack


def _logs(stack: dict[str, str]) -> str:
    return "\n".join(Path(stack["dir"], f"{n}.log").read_text(errors="replace")
                     for n in ("worker", "api"))


async def _send(bootstrap: str, items: list[tuple[str, bytes | None, bytes | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        for topic, key, value in items:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


def _metric(text: str, reason: str) -> float:
    pattern = r'streamlearn_snapshots_rejected_total\{reason="' + reason + r'"\} (\S+)'
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


def _until(predicate, what: str, stack: dict[str, str], timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}\n{_logs(stack)[-4000:]}")


def test_signed_snapshots_are_served_and_forgeries_refused(stack: dict[str, str]) -> None:
    events = FraudStream(seed=3).take(N_EVENTS)
    asyncio.run(_send(stack["bootstrap"], [("signed.transactions", None, orjson.dumps(e))
                                           for e in events]))
    with httpx.Client(base_url=stack["base"], timeout=10) as client:
        _until(lambda: client.get("/models/fraud").status_code == 200
               and client.get("/models/fraud").json()["events_seen"] >= N_EVENTS,
               "the worker's signed snapshot", stack)
        version = client.get("/models/fraud").json()["version"]
        spec = ModelSpec(name="fraud", topic="signed.transactions", label="is_fraud",
                         numeric=("amount", "hour", "distance_km", "card_age_days",
                                  "tx_last_hour"),
                         categorical=("merchant_category", "country", "channel"), hash_bits=10)
        forged = snapshots.encode(OnlineModel(spec, device="cpu").to_state()
                                  | {"version": 10**12, "replica": "evil"})
        asyncio.run(_send(stack["bootstrap"], [
            (MODELS, b"fraud/evil", forged),  # unsigned
            (MODELS, b"fraud/evil", snapshots.sign(forged, "wrong" * 8, context="fraud/evil")),
            (MODELS, b"fraud/signed-0", None),  # tombstone of the real replica
        ]))
        _until(lambda: all(_metric(client.get("/metrics").text, r) >= 1
                           for r in ("unsigned", "bad_signature", "tombstone")),
               "the forgeries to be counted", stack)
        info = client.get("/models/fraud").json()
        assert version <= info["version"] < 10**12 and info["n_replicas"] == 1
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["feed"]["alive"]
    assert SECRET not in _logs(stack)

"""Defect 10: a lost local checkpoint no longer resets the model (restore from the topic)."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from streamlearn import snapshots
from streamlearn.models import OnlineModel
from streamlearn.pipeline import ModelRunner, Record
from streamlearn.services.worker.app import restore_runner, snapshot_path
from streamlearn.services.worker.restore import read_latest
from streamlearn.settings import load_settings
from streamlearn.synthetic import FraudStream

MODEL = {"name": "fraud", "topic": "transactions", "label": "is_fraud",
         "numeric": ["amount", "hour"], "categorical": ["country"], "hash_bits": 8}


def _settings(tmp_path, replica: str = "r0"):
    return load_settings(worker={"snapshot_dir": str(tmp_path), "replica_id": replica},
                         model=[MODEL])


def _trained(settings, n: int, replica: str) -> bytes:
    spec = settings.specs[0]
    runner = ModelRunner(OnlineModel(spec, device="cpu"))
    events = FraudStream(seed=n, label_fraction=1.0).take(n)
    runner.handle([Record(orjson.dumps(e), "transactions", 0, i) for i, e in enumerate(events)])
    return snapshots.encode(runner.snapshot_state(replica))


def test_a_lost_checkpoint_resumes_from_the_topic(tmp_path):
    settings = _settings(tmp_path)
    small, big = _trained(settings, 300, "r0"), _trained(settings, 3000, "r0")
    snapshots.save(snapshot_path(str(tmp_path), "fraud", "r0"), small)
    runner = restore_runner(settings.specs[0], settings, {"fraud/r0": big})
    assert runner.model.n_learned == 3000  # the topic's is newer than the local file
    snapshot_path(str(tmp_path), "fraud", "r0").unlink()
    runner = restore_runner(settings.specs[0], settings, {"fraud/r0": big})
    assert runner.model.n_learned == 3000 and runner.telemetry.learned == 3000
    fresh = restore_runner(settings.specs[0], settings, {})
    assert fresh.model.n_learned == 0


def test_the_replicas_own_snapshot_wins_and_bad_ones_are_skipped(tmp_path):
    settings = _settings(tmp_path)
    other = load_settings(model=[{**MODEL, "hash_bits": 9}])  # another spec
    latest = {"fraud/r0": _trained(settings, 500, "r0"),
              "fraud/r1": _trained(settings, 2000, "r1"),
              "fraud/forged": b"SLSNAP\x01\x00garbage",
              "fraud/respec": _trained(other, 5000, "respec"),
              "other/r0": _trained(settings, 4000, "r0")}
    runner = restore_runner(settings.specs[0], settings, latest)
    assert runner.model.n_learned == 500  # its own shard, not a sibling's
    del latest["fraud/r0"]
    assert restore_runner(settings.specs[0], settings, latest).model.n_learned == 2000


@pytest.mark.kafka
@pytest.mark.timeout(60)
def test_read_latest_reads_the_topic_to_its_end(broker, tmp_path):
    topic = f"models-{uuid.uuid4().hex[:8]}"

    async def scenario() -> dict[str, bytes]:
        producer = AIOKafkaProducer(bootstrap_servers=broker)
        await producer.start()
        try:
            for i in range(30):
                await producer.send(topic, b"v%d" % i, key=b"fraud/r%d" % (i % 3))
            await producer.send(topic, b"x", key=b"other/r0")
            await producer.flush()
        finally:
            await producer.stop()
        return await read_latest(broker, topic, ["fraud"], timeout_s=20)

    assert asyncio.run(scenario()) == {"fraud/r0": b"v27", "fraud/r1": b"v28",
                                       "fraud/r2": b"v29"}
    assert asyncio.run(read_latest(broker, "no-such-topic-x", ["fraud"], timeout_s=5)) == {}


def test_with_a_key_only_signed_snapshots_are_restored(tmp_path):
    settings = load_settings(kafka={"snapshot_key": "k" * 32},
                             worker={"snapshot_dir": str(tmp_path), "replica_id": "r0"},
                             model=[MODEL])
    payload = _trained(settings, 800, "r0")
    forged = {"fraud/r0": payload}  # unsigned: anyone could have written it
    assert restore_runner(settings.specs[0], settings, forged).model.n_learned == 0
    wrong = {"fraud/r0": snapshots.sign(payload, "x" * 32, context="fraud/r0")}
    assert restore_runner(settings.specs[0], settings, wrong).model.n_learned == 0
    replayed = {"fraud/r0": snapshots.sign(payload, "k" * 32, context="fraud/r9")}
    assert restore_runner(settings.specs[0], settings, replayed).model.n_learned == 0
    signed = {"fraud/r0": snapshots.sign(payload, "k" * 32, context="fraud/r0")}
    assert restore_runner(settings.specs[0], settings, signed).model.n_learned == 800

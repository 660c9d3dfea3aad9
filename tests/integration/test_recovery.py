"""A worker killed with SIGKILL mid-stream resumes from its checkpoint and loses no event.

Events are committed to Kafka only once a saved snapshot includes them, so the
restarted replica re-reads whatever its checkpoint does not cover.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamlearn import snapshots
from streamlearn.synthetic import FraudStream

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

N_EVENTS = 60_000
CONFIG = """
[kafka]
partitions = 2
[worker]
batch_within_s = 0.1
snapshot_interval_s = 0.5
[[model]]
name = "crash"
topic = "rec.transactions"
label = "is_fraud"
numeric = ["amount", "hour", "distance_km"]
categorical = ["merchant_category", "country"]
hash_bits = 12
"""


async def _produce(bootstrap: str, rate: float) -> None:
    """Send the stream at a bounded rate, so a kill lands while events still arrive."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        t0 = time.monotonic()
        for i, event in enumerate(FraudStream(seed=21).take(N_EVENTS)):
            await producer.send("rec.transactions", orjson.dumps(event))
            if i % 1000 == 999:
                await asyncio.sleep(max(0.0, (i + 1) / rate - (time.monotonic() - t0)))
        await producer.flush()
    finally:
        await producer.stop()


class _PredictionCounter(threading.Thread):
    """Counts prediction records: the worker emits them after learning, before any ack."""

    def __init__(self, bootstrap: str) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.count, self.stop = bootstrap, 0, threading.Event()

    def run(self) -> None:
        asyncio.run(self._count())

    async def _count(self) -> None:
        consumer = AIOKafkaConsumer("crash.predictions", bootstrap_servers=self.bootstrap,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            while not self.stop.is_set():
                batches = await consumer.getmany(timeout_ms=20)
                self.count += sum(len(msgs) for msgs in batches.values())
        finally:
            await consumer.stop()


def _learned(path: Path) -> int:
    try:
        return int(snapshots.load(path)["n_learned"])
    except (OSError, ValueError):
        return 0


def _wait(path: Path, predicate, timeout: float, log: Path) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = _learned(path)
        if predicate(n):
            return n
        time.sleep(0.1)
    pytest.fail(f"checkpoint stuck at {_learned(path)} events\n{log.read_text()[-3000:]}")


def test_sigkill_mid_stream_loses_no_event(broker: str, tmp_path: Path) -> None:
    (tmp_path / "streamlearn.toml").write_text(CONFIG)
    env = {**os.environ, "STREAMLEARN_CONFIG": str(tmp_path / "streamlearn.toml"),
           "STREAMLEARN_KAFKA__BOOTSTRAP": broker, "STREAMLEARN_KAFKA__FAST_JOIN": "true",
           "STREAMLEARN_WORKER__SNAPSHOT_DIR": str(tmp_path / "snaps"),
           "STREAMLEARN_WORKER__REPLICA_ID": "r0", "STREAMLEARN_WORKER__APP_ID": "recovery-test"}
    checkpoint = tmp_path / "snaps" / "crash--r0.snap"
    log = tmp_path / "worker.log"
    producing = threading.Thread(target=asyncio.run, args=(_produce(broker, rate=6000),))

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "streamlearn", "worker"], env=env,
                                stdout=log.open("ab"), stderr=subprocess.STDOUT)

    predictions = _PredictionCounter(broker)
    first = start()
    producing.start()  # ~10 s of events from here on
    predictions.start()
    try:
        before = _wait(checkpoint, lambda n: n >= 5_000, 120, log)
        # Kill only once the worker has learned well past its newest checkpoint.
        deadline = time.monotonic() + 30
        while predictions.count < _learned(checkpoint) + 1_000 and time.monotonic() < deadline:
            time.sleep(0.005)
        tail = predictions.count - _learned(checkpoint)
    finally:
        first.send_signal(signal.SIGKILL)  # no shutdown hook runs: a real crash
        first.wait(10)
    assert before < N_EVENTS - 10_000, "the kill must land mid-stream"
    assert tail >= 1_000, "the kill must leave learned events outside the checkpoint"

    second = start()
    try:
        producing.join(60)
        _wait(checkpoint, lambda n: n >= N_EVENTS - tail, 120, log)
        time.sleep(3.0)  # let the replica drain whatever Kafka redelivers
        after = _learned(checkpoint)
    finally:
        second.terminate()
        second.wait(20)
        predictions.stop.set()
    # Nothing lost; duplicates only from the uncheckpointed tail before the kill.
    assert N_EVENTS <= after < N_EVENTS + 30_000

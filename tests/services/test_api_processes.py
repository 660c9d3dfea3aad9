"""``api.workers``: several serving processes share one socket; a dead one is replaced."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from streamlearn import snapshots
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.services.api.main import bind_socket, serve_processes
from streamlearn.synthetic import FraudStream

SPEC = ModelSpec(name="fraud", topic="transactions", label="is_fraud",
                 numeric=("amount", "hour"), categorical=("country",), hash_bits=8)


def _children() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("streamlearn-api-")]


def _wait(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False


def test_two_processes_serve_one_port_and_a_dead_one_is_replaced(tmp_path: Path) -> None:
    model = OnlineModel(SPEC, device="cpu")
    batch, _ = model.vectorizer.transform_many(FraudStream(seed=1).take(512))
    model.process(batch)
    snapshots.save(tmp_path / "fraud--r1.snap",
                   snapshots.encode(model.to_state() | {"replica": "r1"}))
    settings = SimpleNamespace(
        kafka=SimpleNamespace(bootstrap=""),
        api=SimpleNamespace(host="127.0.0.1", port=0, max_instances=10, workers=2,
                            snapshot_dir=str(tmp_path)))
    sock = bind_socket("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop = threading.Event()
    runner = threading.Thread(target=serve_processes, args=(settings, 2),
                              kwargs={"sock": sock, "stop": stop}, daemon=True)
    runner.start()
    try:
        _wait(lambda: len(_children()) == 2, 10, "two serving processes")
        first = {p.pid for p in _children()}
        _wait(lambda: _ready(base), 90, "the API to be ready")
        body = {"features": {"amount": 12.0, "hour": 3.0, "country": "FR"}}
        # Fresh connections, so both processes take some: every answer is the same model's.
        scores = {httpx.post(f"{base}/models/fraud/predict", json=body).json()["score"]
                  for _ in range(20)}
        assert len(scores) == 1
        victim = next(iter(first))
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: len({p.pid for p in _children()} - first) == 1
              and len(_children()) == 2, 10, "a replacement process")
        for _ in range(10):  # the survivor serves meanwhile; then both do
            assert httpx.post(f"{base}/models/fraud/predict", json=body,
                              timeout=30).json()["score"] in scores
    finally:
        stop.set()
        runner.join(30)
        sock.close()
    assert not runner.is_alive() and not _children()


@pytest.mark.kafka
def test_every_serving_process_follows_the_snapshot_feed() -> None:
    import asyncio

    from aiokafka import AIOKafkaProducer

    from streamlearn.broker import BrokerError, EmbeddedBroker

    try:
        broker = EmbeddedBroker().start()
    except BrokerError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"embedded broker unavailable: {exc}")
    model = OnlineModel(SPEC, device="cpu")
    events = FraudStream(seed=2).take(1024)

    def next_snapshot(i: int) -> bytes:
        batch, _ = model.vectorizer.transform_many(events[256 * i:256 * (i + 1)])
        model.process(batch)
        return snapshots.encode(model.to_state() | {"replica": "r1", "telemetry": {}})

    async def publish(value: bytes) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait("streamlearn.models", value, key=b"fraud/r1")
        finally:
            await producer.stop()

    settings = SimpleNamespace(
        kafka=SimpleNamespace(bootstrap=broker.bootstrap, models_topic="streamlearn.models"),
        api=SimpleNamespace(host="127.0.0.1", port=0, max_instances=10, workers=2))
    sock = bind_socket("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop = threading.Event()
    runner = threading.Thread(target=serve_processes, args=(settings, 2),
                              kwargs={"sock": sock, "stop": stop}, daemon=True)
    try:
        asyncio.run(publish(next_snapshot(0)))
        first = model.version
        runner.start()
        _wait(lambda: _ready(base), 90, "the API to be ready")
        asyncio.run(publish(next_snapshot(1)))
        newest = model.version
        assert newest > first

        def all_serve_newest() -> bool:
            # Fresh connections land on either process: all must have taken the new one.
            got = {httpx.get(f"{base}/models/fraud", timeout=5).json()["version"]
                   for _ in range(16)}
            return got == {newest}

        _wait(all_serve_newest, 30, f"both processes to serve version {newest}")
        pids_seen = {p.pid for p in _children()}
        assert len(pids_seen) == 2
    finally:
        stop.set()
        if runner.is_alive():
            runner.join(30)
        sock.close()
        broker.stop()

"""Two worker replicas train one model on the real embedded broker (issue 10).

Real processes (``python -m streamlearn worker`` twice, ``... api``) on one 4-partition
stream: the replicas adopt merged models (``adopted_version`` rises), the served merge
is as good as one learner on the whole stream, and a stopped replica leaves the served
merge within the staleness bound while what it learned stays.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from streamlearn.broker import free_port
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.prequential import roc_auc
from streamlearn.synthetic import FraudStream

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(150)]

N_EVENTS = 40_000
TOPIC = "rep.transactions"
STALE_S = 6.0
CONFIG_TEMPLATE = """
[kafka]
partitions = 4
[worker]
batch_within_s = 0.1
snapshot_interval_s = 0.5
merge_interval_s = 1.0
stale_after_s = {stale}
[[model]]
name = "{model}"
topic = "{topic}"
label = "is_fraud"
numeric = ["amount", "hour", "distance_km", "card_age_days", "tx_last_hour"]
categorical = ["merchant_category", "country", "channel"]
hash_bits = 14
batch_size = 256
"""
CONFIG = CONFIG_TEMPLATE.format(stale=STALE_S, model="rep", topic=TOPIC)


@pytest.fixture
def stack(broker: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    (tmp_path / "streamlearn.toml").write_text(CONFIG)
    port = free_port()
    env = {**os.environ, "STREAMLEARN_CONFIG": str(tmp_path / "streamlearn.toml"),
           "STREAMLEARN_KAFKA__BOOTSTRAP": broker, "STREAMLEARN_KAFKA__FAST_JOIN": "true",
           "STREAMLEARN_KAFKA__MODELS_TOPIC": "rep.models",
           "STREAMLEARN_WORKER__APP_ID": "rep-test", "STREAMLEARN_API__PORT": str(port)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name, cmd in (("ra", "worker"), ("rb", "worker"), ("api", "api")):
        # No replica id is configured: each worker makes a persistent one in its dir.
        penv = env | {"STREAMLEARN_WORKER__SNAPSHOT_DIR": str(tmp_path / f"snap-{name}")}
        procs[name] = subprocess.Popen([sys.executable, "-m", "streamlearn", cmd], env=penv,
                                       stdout=(tmp_path / f"{name}.log").open("wb"),
                                       stderr=subprocess.STDOUT)
    try:
        yield {"base": f"http://127.0.0.1:{port}", "bootstrap": broker, "dir": tmp_path,
               "procs": procs}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _tail(stack: dict[str, Any]) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text()[-2500:]
                     for p in sorted(Path(stack["dir"]).glob("*.log")))


def _info(client: httpx.Client, model: str = "rep") -> dict[str, Any]:
    try:
        r = client.get(f"/models/{model}")
        return r.json() if r.status_code == 200 else {}
    except httpx.HTTPError:
        return {}


def _wait(client: httpx.Client, stack: dict[str, Any], predicate, timeout: float,
          seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        info = _info(client, stack.get("model", "rep"))
        if info and seen is not None:
            seen.append(info)
        if info and predicate(info):
            return info
        time.sleep(0.25)
    pytest.fail(f"timed out; last model info {orjson.dumps(info)[:3000]!r}\n{_tail(stack)}")


async def _produce(bootstrap: str, events: list[dict[str, Any]], rate: float,
                   topic: str = TOPIC, key_field: str | None = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        t0 = time.monotonic()
        for i, event in enumerate(events):
            # Keyed: spread over the 4 partitions, whichever replica owns them (by entity
            # when the model aggregates per entity).
            key = str(i if key_field is None else event[key_field]).encode()
            await producer.send(topic, orjson.dumps(event), key=key)
            if i % 1000 == 999:
                await asyncio.sleep(max(0.0, (i + 1) / rate - (time.monotonic() - t0)))
        await producer.flush()
    finally:
        await producer.stop()


def _auc_single(events: list[dict[str, Any]], holdout: list[dict[str, Any]]) -> float:
    """One learner on the whole stream (what a single worker learns), same spec."""
    from streamlearn.settings import load_settings

    spec: ModelSpec = load_settings(model=[{"name": "rep", "topic": TOPIC, "label": "is_fraud",
                                            "numeric": ["amount", "hour", "distance_km",
                                                        "card_age_days", "tx_last_hour"],
                                            "categorical": ["merchant_category", "country",
                                                            "channel"],
                                            "hash_bits": 14, "batch_size": 256}]).specs[0]
    model = OnlineModel(spec)
    for i in range(0, len(events), 2048):
        batch, _ = model.vectorizer.transform_many(events[i:i + 2048])
        model.process_many(batch)
    batch, _ = model.vectorizer.transform_many(holdout)
    return roc_auc(batch.labels, model.predict_many(batch))


def test_two_replicas_train_one_model_and_a_stopped_one_leaves_the_merge(stack) -> None:
    events = FraudStream(seed=31).take(N_EVENTS)
    holdout = FraudStream(seed=32).take(6000)
    with httpx.Client(base_url=stack["base"], timeout=10) as client:
        # Both replicas in the group, with the 4 partitions split between them.
        info = _wait(client, stack, lambda i: len(i.get("replicas", [])) == 2 and sorted(
            p for r in i["replicas"] for p in r["partitions"]) == [0, 1, 2, 3]
            and all(r["partitions"] for r in i["replicas"]), 60)
        ids = sorted(r["replica"] for r in info["replicas"])
        assert all(r.startswith("r-") for r in ids)  # persistent ids, not the hostname
        seen: list[dict[str, Any]] = []
        producing = threading.Thread(target=asyncio.run,
                                     args=(_produce(stack["bootstrap"], events, rate=5000),))
        producing.start()  # ~8 s of events; the model is watched meanwhile
        info = _wait(client, stack, lambda i: i["events_learned"] >= N_EVENTS
                     and i["merged_version"] >= 3, 60, seen)
        producing.join(30)
        # Every event counted once in the merge; rebalance redeliveries are the only extra.
        assert N_EVENTS <= info["events_learned"] <= N_EVENTS + 5_000
        adopted = {r: sorted({rep["adopted_version"] for i in seen for rep in i["replicas"]
                              if rep["replica"] == r}) for r in ids}
        for r, versions in adopted.items():
            assert len(versions) >= 3 and versions[-1] >= 2, (r, versions)

        scores: list[float] = []
        for i in range(0, len(holdout), 1000):
            r = client.post("/models/rep/predict", json={"instances": holdout[i:i + 1000]})
            assert r.status_code == 200, r.text
            assert r.json()["merged_version"] >= 3  # answers name the merged model they use
            scores.extend(r.json()["predictions"])
        y = np.array([e.get("is_fraud", 0) for e in holdout])
        served_auc = roc_auc(y, np.array(scores))
        single_auc = _auc_single(events, holdout)
        assert served_auc >= single_auc - 0.005, (served_auc, single_auc)
        print(f"served AUC {served_auc:.4f}, one learner {single_auc:.4f}, events learned "
              f"{info['events_learned']}, merged v{info['merged_version']}, adopted {adopted}")

        # Stop one replica: within the staleness bound (plus the API's refresh) it is
        # reported stale and out of the merge; the merged model keeps what it learned.
        learned_before = info["events_learned"]
        stack["procs"]["rb"].send_signal(signal.SIGTERM)
        stack["procs"]["rb"].wait(20)
        stopped = time.monotonic()
        mine = next((Path(stack["dir"]) / "snap-rb").glob("replica-id.*")).read_text().strip()
        info = _wait(client, stack, lambda i: i["stale_replicas"] == [mine], STALE_S + 10)
        assert time.monotonic() - stopped <= STALE_S + 10
        gone = next(r for r in info["replicas"] if r["replica"] == mine)
        assert gone["in_merge"] is False and gone["staleness_s"] > STALE_S - 1
        assert info["events_learned"] >= learned_before


class Cluster:
    """The API plus worker replicas started and stopped one by one."""

    def __init__(self, broker: str, tmp: Path, extra: str = "") -> None:
        # A model and topic of its own: tests share the session's broker.
        self.model, self.topic = f"rep{abs(hash(tmp.name)) % 10**8}", f"{tmp.name}.events"
        (tmp / "streamlearn.toml").write_text(CONFIG_TEMPLATE.format(
            stale=STALE_S, model=self.model, topic=self.topic) + extra)
        self.tmp, self.bootstrap, port = tmp, broker, free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "STREAMLEARN_CONFIG": str(tmp / "streamlearn.toml"),
                    "STREAMLEARN_KAFKA__BOOTSTRAP": broker, "STREAMLEARN_KAFKA__FAST_JOIN": "true",
                    "STREAMLEARN_KAFKA__MODELS_TOPIC": f"{tmp.name}.models",
                    "STREAMLEARN_WORKER__APP_ID": f"{tmp.name}-group",
                    "STREAMLEARN_API__PORT": str(port)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.start("api", "api")

    def start(self, name: str, cmd: str = "worker") -> None:
        env = self.env | {"STREAMLEARN_WORKER__SNAPSHOT_DIR": str(self.tmp / f"snap-{name}")}
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "streamlearn", cmd], env=env,
            stdout=(self.tmp / f"{name}.log").open("ab"), stderr=subprocess.STDOUT)

    def replica(self, name: str) -> str:
        return next((self.tmp / f"snap-{name}").glob("replica-id.*")).read_text().strip()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def cluster(broker: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(broker, tmp_path, getattr(request, "param", ""))
    try:
        yield c
    finally:
        c.close()


#: Per-card counts over an hour: the synthetic stream's 30,000 events span 300 s of event
#: time, so each card's count is its number of events in the stream.
CARD_COUNTS = """
[[model.aggregate]]
entity = "card_id"
field = "amount"
windows = ["1h"]
stats = ["count"]
"""


async def _latest_shard(bootstrap: str, topic: str, key: bytes) -> bytes | None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", fetch_max_wait_ms=50)
    await consumer.start()
    latest = None
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            if not batches:
                return latest
            for msgs in batches.values():
                for m in msgs:
                    if m.key == key:
                        latest = m.value
    finally:
        await consumer.stop()


def _card_counts(state: dict[str, Any], spec: ModelSpec, cards: list[str],
                 at: float) -> np.ndarray:
    """Each card's count in a shard's aggregates at time ``at`` (the probe not counted)."""
    from streamlearn.aggregates import AggregateInputs, EntityAggregates

    entities = EntityAggregates(spec)
    entities.load(state["aggregates"])
    probe = AggregateInputs(np.full(len(cards), at), np.full((len(cards), 1), np.nan), [cards])
    return entities.features(probe, update=False)[:, 0]


async def _prediction_ids(bootstrap: str, model: str, want: int,
                          timeout: float = 30.0) -> list[str]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(f"{model}.predictions", bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest")
    await consumer.start()
    ids: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        while len(set(ids)) < want and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=20_000)
            ids.extend(orjson.loads(m.value)["id"] for msgs in batches.values() for m in msgs)
    finally:
        await consumer.stop()
    return ids


def _by_replica(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["replica"]: r for r in info.get("replicas", [])}


@pytest.mark.parametrize("cluster", [CARD_COUNTS], indirect=True)
def test_rebalance_moves_partitions_without_losing_an_event(cluster: Cluster) -> None:
    """A second replica joins mid-stream, then the first stops: every event is learned at
    least once (ledger: the prediction records, one per learned event, and the partitions'
    offsets in the last shards), the served model never falls back, and each card's
    windowed count follows its partition: the last replica holds every card's whole
    history, the part learned by the replica before it included."""
    n = 30_000
    events = FraudStream(seed=41).take(n)
    for i, e in enumerate(events):
        e["event_id"] = f"e{i}"
    cluster.start("ra")
    with httpx.Client(base_url=cluster.base, timeout=10) as client:
        stack = {"dir": cluster.tmp, "model": cluster.model}
        _wait(client, stack, lambda i: len(i.get("replicas", [])) == 1, 60)
        producing = threading.Thread(target=asyncio.run, args=(
            _produce(cluster.bootstrap, events, 3000, cluster.topic, key_field="card_id"),))
        producing.start()  # ~10 s of events
        seen: list[dict[str, Any]] = []
        _wait(client, stack, lambda i: i["events_learned"] >= 3_000, 30, seen)
        cluster.start("rb")
        a, b = cluster.replica("ra"), None
        info = _wait(client, stack, lambda i: len(_by_replica(i)) == 2 and all(
            r["partitions"] for r in i["replicas"]), 40, seen)
        b = next(r for r in _by_replica(info) if r != a)
        cluster.procs["ra"].send_signal(signal.SIGTERM)  # a leaves mid-stream
        assert cluster.procs["ra"].wait(30) == 0
        info = _wait(client, stack, lambda i: i["events_learned"] >= n
                     and _by_replica(i)[b]["partitions"] == [0, 1, 2, 3], 60, seen)
        producing.join(30)
        # Never back to an untrained model: at most a dip of about one merge interval of
        # the stream (~3,000 events) while a new merge waits for the replicas to adopt it.
        learned = [i["events_learned"] for i in seen]
        peaks = [max(learned[:j + 1]) for j in range(len(learned))]
        assert all(x >= p - 3_000 for x, p in zip(learned, peaks, strict=True)), learned
        assert n <= info["events_learned"] <= n + 10_000  # rebalance redeliveries only
        ids = asyncio.run(_prediction_ids(cluster.bootstrap, cluster.model, n))
    assert set(ids) == {f"e{i}" for i in range(n)}  # every event learned at least once
    assert len(ids) - n <= 10_000
    # Entity aggregates followed the partitions: b's last shard counts every card's events
    # (at least once), those ra learned before each move included.
    from streamlearn import snapshots
    from streamlearn.settings import load_settings

    spec = load_settings(cluster.tmp / "streamlearn.toml").specs[0]
    truth: dict[str, int] = {}
    for e in events:
        truth[e["card_id"]] = truth.get(e["card_id"], 0) + 1
    cards = sorted(truth)
    want = np.array([truth[c] for c in cards])
    at = max(e["ts"] for e in events) + 1.0
    deadline, got = time.monotonic() + 20, np.zeros(len(cards))
    while time.monotonic() < deadline:
        raw = asyncio.run(_latest_shard(cluster.bootstrap, f"{cluster.tmp.name}.models",
                                        f"{cluster.model}/{b}".encode()))
        if raw is not None:
            got = _card_counts(snapshots.decode(raw), spec, cards, at)
            if (got >= want).all():
                break
        time.sleep(0.5)
    took = (cluster.tmp / "rb.log").read_text(errors="replace").count("took over")
    assert took >= 1, "the second replica never took a partition's entities over"
    assert (got >= want).all(), (f"{int((got < want).sum())} of {len(cards)} cards lost "
                                 f"events: {int(want.sum() - np.minimum(got, want).sum())}")
    assert got.sum() <= want.sum() + 10_000  # rebalance redeliveries only
    print(f"rebalance: served events_learned {info['events_learned']}, prediction records "
          f"{len(ids)} for {n} events; {len(cards)} cards' counts whole in the last shard, "
          f"{int(got.sum() - want.sum())} events counted twice; {took} take-overs")


def test_sigkill_of_a_replica_loses_nothing_and_versions_keep_rising(cluster: Cluster) -> None:
    n = 30_000
    events = FraudStream(seed=51).take(n)
    cluster.start("ra")
    cluster.start("rb")
    with httpx.Client(base_url=cluster.base, timeout=10) as client:
        stack = {"dir": cluster.tmp, "model": cluster.model}
        _wait(client, stack, lambda i: len(i.get("replicas", [])) == 2 and all(
            r["partitions"] for r in i["replicas"]), 60)
        producing = threading.Thread(
            target=asyncio.run, args=(_produce(cluster.bootstrap, events, 3000, cluster.topic),))
        producing.start()
        info = _wait(client, stack, lambda i: i["events_learned"] >= 8_000
                     and i["merged_version"] >= 2, 40)
        victim = cluster.replica("rb")
        before = _by_replica(info)[victim]
        cluster.procs["rb"].send_signal(signal.SIGKILL)  # mid-stream: no shutdown hook runs
        cluster.procs["rb"].wait(10)
        cluster.start("rb")  # same snapshot dir: same replica id, its checkpoint
        info = _wait(client, stack, lambda i: i["events_learned"] >= n
                     and _by_replica(i).get(victim, {}).get("staleness_s", 99) < 3
                     and _by_replica(i)[victim]["adopted_version"] > before["adopted_version"],
                     90)
        producing.join(30)
    assert cluster.replica("rb") == victim
    after = _by_replica(info)[victim]
    assert after["version"] > before["version"]
    assert n <= info["events_learned"] <= n + 10_000, (  # nothing lost; redeliveries bounded
        [(r["replica"], r["events_learned"], r["adopted_version"], r["in_merge"])
         for r in info["replicas"]], info["merged_version"])
    print(f"kill: served events_learned {info['events_learned']} for {n} events; victim "
          f"version {before['version']} -> {after['version']}, adopted "
          f"{before['adopted_version']} -> {after['adopted_version']}")

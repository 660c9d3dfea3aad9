"""Delayed labels and entity aggregates end to end, on the real embedded broker.

Worker and API run as the processes users run (``python -m streamlearn ...``); Kafka and
HTTP connect them.  Events are keyed by entity (``card_id``), and so are their labels on
``<model>.labels``.  Covered: the label join (on time, late, duplicate, unknown,
malformed), the memory caps, that ``/predict`` serves exactly the aggregate values the
worker would use for the same event next (and how soon a new event shows there), and
that pending labels and aggregates survive a worker restart.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from e2e import wait_json

from streamlearn import snapshots
from streamlearn.models import OnlineModel
from streamlearn.services.demo import input_committed

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

BASE = 1_700_006_400.0  # a UTC midnight: event times are BASE + seconds
PROBE_TS = BASE + 2000.0  # later than every event below; all of them within its windows
AGGREGATE = """
[[model.aggregate]]
entity = "card_id"
field = "amount"
windows = ["1h", "1d"]
stats = ["count", "sum", "mean"]
"""
FEATURES = [f"card_id.amount.{w}.{s}" for w in ("1h", "1d") for s in ("count", "sum", "mean")]
MODEL = """
[[model]]
name = "{name}"
topic = "{name}.tx"
label = "is_fraud"
numeric = ["amount"]
categorical = ["merchant"]
hash_bits = 10
{extra}
""" + AGGREGATE
SERVICES = """
[kafka]
partitions = 2
deadletter_topic = "fe2e.deadletter"  # its own: other tests read streamlearn.deadletter
[worker]
batch_within_s = 0.05
snapshot_interval_s = 0.2
"""
CONFIG = SERVICES + MODEL.format(name="fe2e", extra="label_ttl_s = 600") + MODEL.format(
    name="fe2e_caps", extra="label_ttl_s = 1\nmax_pending = 20\nmax_entities = 5")

N = 400
CARDS = 8
EVENTS = [{"event_id": f"ev-{i}", "card_id": f"c{i % CARDS}", "amount": float(10 + i * 37 % 200),
           "merchant": f"m{i % 3}", "ts": BASE + i} for i in range(N)]
# A reference card with a known history, for reading aggregate values off contributions.
REF = [{"event_id": f"ref-{i}", "card_id": "ref", "amount": a, "merchant": "m0",
        "ts": BASE + 400 + i} for i, a in enumerate((100.0, 200.0, 300.0))]


def _label(event: dict[str, Any]) -> int:
    return int(event["amount"] > 150)


# -- Kafka and HTTP helpers ------------------------------------------------------------------

async def _send(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
    await producer.start()
    try:
        for key, value in messages:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


def send(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    asyncio.run(_send(bootstrap, topic, messages))


def keyed(events: list[dict[str, Any]]) -> list[tuple[bytes | None, bytes]]:
    """Events (or labels) keyed by their card, as the producer keys them."""
    return [(e["card_id"].encode(), orjson.dumps(e)) for e in events]


def labels_for(events: list[dict[str, Any]]) -> list[tuple[bytes | None, bytes]]:
    """Delayed labels for ``events``, keyed like the events (so on their partition)."""
    return [(e["card_id"].encode(), orjson.dumps({"event_id": e["event_id"],
                                                  "is_fraud": _label(e)})) for e in events]


async def _read(bootstrap: str, topic: str, timeout: float) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    out: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout
        idle = 0
        while time.monotonic() < deadline and idle < 4:
            batches = await consumer.getmany(timeout_ms=500)
            got = [m.value for msgs in batches.values() for m in msgs]
            out.extend(got)
            idle = 0 if got or not out else idle + 1
    finally:
        await consumer.stop()
    return out


def wait_info(client: httpx.Client, stack: dict[str, str], name: str,
              predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0) -> dict:
    """``GET /models/{name}`` until ``predicate`` holds."""
    return wait_json(client, stack, f"/models/{name}", predicate, timeout)


def expected(history: list[dict[str, Any]], probe: dict[str, Any]) -> list[float]:
    """The aggregate features of ``probe`` given the card's events (all in its windows),
    in FEATURES order: count, sum, mean per window, the probe itself included."""
    amounts = [e["amount"] for e in history if e["card_id"] == probe["card_id"]]
    count, total = len(amounts) + 1, sum(amounts) + probe["amount"]
    return [count, total, total / count] * 2


def probe(card: str, amount: float = 50.0) -> dict[str, Any]:
    return {"event_id": f"probe-{card}", "card_id": card, "amount": amount, "merchant": "m0",
            "ts": PROBE_TS}


def served_aggregates(client: httpx.Client, name: str, card: str,
                      ref_history: list[dict[str, Any]]) -> tuple[list[float], int]:
    """The aggregate values ``/predict`` used for a probe of ``card``, read off its reason
    codes, and the served version.

    One request scores three probes alike but for their card: one never seen (values
    known: its own event only), the reference card (history known), and ``card``.  Each
    aggregate feature contributes ``w * (x - mean) / std`` to the margin, the same affine
    function of ``x`` for the three rows of one request, so the two known rows give
    ``x`` for the third.
    """
    rows = [probe("never-seen-card"), probe("ref"), probe(card)]
    r = client.post(f"/models/{name}/predict?reasons=50", json={"instances": rows})
    assert r.status_code == 200, r.text
    body = r.json()
    contrib = [{d["feature"]: d["contribution"] for d in row} for row in body["reasons"]]
    known = [expected([], rows[0]), expected(ref_history, rows[1])]
    out = []
    for j, feature in enumerate(FEATURES):
        c0, c1, c = (contrib[i][feature] for i in range(3))
        x0, x1 = known[0][j], known[1][j]
        assert abs(c1 - c0) > 1e-9 * max(1.0, abs(c0)), f"{feature}: no weight to read by"
        out.append(x0 + (c - c0) * (x1 - x0) / (c1 - c0))
    return out, int(body["version"])


def assert_values(got: list[float], want: list[float]) -> None:
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-3,
                               err_msg=f"served {got}, expected {want}")


def metric(text: str, name: str, model: str) -> float:
    """Sum of ``name``'s samples for ``model`` in a Prometheus exposition."""
    pattern = re.compile(rf'^{name}\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$', re.M)
    values = pattern.findall(text)
    assert values, f"{name} for {model} not exported"
    return sum(float(v) for v in values)


# -- the stack -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(broker: str, tmp_path_factory: pytest.TempPathFactory,
          services: Callable[..., Any]) -> Iterator[dict[str, str]]:
    with services(tmp_path_factory.mktemp("fraud"), CONFIG, broker,
                  {"STREAMLEARN_WORKER__REPLICA_ID": "fe-0",
                   "STREAMLEARN_WORKER__APP_ID": "fraud-e2e"}) as stack:
        yield stack


@pytest.fixture(scope="module")
def client(stack: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack["base"], timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def joined(stack: dict[str, str], client: httpx.Client) -> dict[str, Any]:
    """Events without labels, then their labels: the first half on time, ten of them
    twice, five for ids never seen, and four malformed messages."""
    bootstrap = stack["bootstrap"]
    send(bootstrap, "fe2e.tx", keyed(EVENTS + REF))
    seen = wait_info(client, stack, "fe2e", lambda i: i["events_seen"] == N + len(REF)
                     and (i.get("labels") or {}).get("pending") == N + len(REF), timeout=120)
    assert seen["events_learned"] == 0  # nothing was labelled yet
    first = EVENTS[: N // 2]
    unknown = [{"event_id": f"never-{k}", "card_id": "c0", "amount": 1.0} for k in range(5)]
    malformed = [b"{not json", orjson.dumps({"event_id": "ev-300"}),  # no label
                 orjson.dumps({"is_fraud": 1}), orjson.dumps({"event_id": "ev-301",
                                                              "is_fraud": 7})]
    send(bootstrap, "fe2e.labels", labels_for(first) + labels_for(first[:10])
         + labels_for(unknown) + [(b"c0", m) for m in malformed])
    info = wait_info(client, stack, "fe2e", lambda i: i["labels"]["joined"] == len(first)
                     and i["labels"]["unknown"] == 5 and i["labels"]["duplicate"] == 10)
    return {"before": seen, "info": info, "malformed": malformed}


# -- the tests -------------------------------------------------------------------------------

def test_delayed_labels_join_on_the_broker(stack, client, joined):
    info = joined["info"]
    labels = info["labels"]
    assert {k: labels[k] for k in ("joined", "duplicate", "unknown", "late")} == {
        "joined": N // 2, "duplicate": 10, "unknown": 5, "late": 0}
    assert labels["pending"] == N + len(REF) - N // 2
    # Learned once each (the duplicates are not learned again), seen once.
    assert info["events_learned"] == N // 2
    assert info["events_seen"] == N + len(REF)
    assert info["version"] > joined["before"]["version"]
    # The prequential metrics are computed on the joined labels.
    assert info["metrics"]["n"] == N // 2
    assert info["features"]["aggregates"]["features"] == FEATURES
    assert info["features"]["aggregates"]["entities"] == CARDS + 1

    # Malformed label messages went to the dead-letter topic, with their reasons.
    dead = [orjson.loads(v) for v in asyncio.run(
        _read(stack["bootstrap"], "fe2e.deadletter", timeout=20))]
    mine = [d for d in dead if d["source"]["topic"] == "fe2e.labels"]
    assert len(mine) == len(joined["malformed"]), mine
    reasons = " | ".join(d["reason"] for d in mine)
    for part in ("not valid JSON", "label is missing", "'event_id'", "0 or 1"):
        assert part in reasons
    assert all(d["model"] == "fe2e" for d in mine)

    # Prometheus counters, summed over replicas.
    text = client.get("/metrics").text
    assert metric(text, "streamlearn_labels_joined_total", "fe2e") == N // 2
    assert metric(text, "streamlearn_labels_duplicate_total", "fe2e") == 10
    assert metric(text, "streamlearn_labels_unknown_total", "fe2e") == 5
    assert metric(text, "streamlearn_labels_late_total", "fe2e") == 0
    assert metric(text, "streamlearn_aggregate_entities", "fe2e") == CARDS + 1

    # None of it crashed the worker: it still learns what comes next.
    send(stack["bootstrap"], "fe2e.labels", labels_for(EVENTS[N // 2 : N // 2 + 5]))
    wait_info(client, stack, "fe2e", lambda i: i["events_learned"] == N // 2 + 5)
    assert "Traceback" not in Path(stack["dir"], "worker.log").read_text()


def test_late_labels_and_memory_caps(stack, client):
    """``fe2e_caps``: TTL 1 s, at most 20 waiting events and 5 cards."""
    events = [{"event_id": f"cap-{i}", "card_id": f"k{i % 8}", "amount": float(i + 1),
               "merchant": "m1", "ts": BASE + i} for i in range(30)]
    send(stack["bootstrap"], "fe2e_caps.tx", keyed(events))
    info = wait_info(client, stack, "fe2e_caps", lambda i: i["events_seen"] == 30)
    labels, agg = info["labels"], info["features"]["aggregates"]
    # max_pending: the 10 oldest were dropped, counted.
    assert (labels["pending"], labels["evicted"], labels["max_pending"]) == (20, 10, 20)
    # max_entities: 8 cards through 5 slots, none idle (all within a day): evicted.
    assert agg["entities"] <= 5 and agg["max_entities"] == 5
    assert agg["evicted"] >= 3 and agg["expired"] == 0

    time.sleep(1.5)  # past the TTL of the 20 waiting events
    late = events[10:15] + events[:1]  # waited past the TTL; pushed out by the cap
    send(stack["bootstrap"], "fe2e_caps.labels",
         labels_for(late) + labels_for([{"event_id": "never", "card_id": "k0", "amount": 1}]))
    info = wait_info(client, stack, "fe2e_caps",
                     lambda i: i["labels"]["late"] + i["labels"]["unknown"] == 7)
    labels = info["labels"]
    assert {k: labels[k] for k in ("joined", "late", "unknown", "expired", "pending")} == {
        "joined": 0, "late": 6, "unknown": 1, "expired": 20, "pending": 0}
    assert info["events_learned"] == 0
    text = client.get("/metrics").text
    assert metric(text, "streamlearn_labels_late_total", "fe2e_caps") == 6
    assert metric(text, "streamlearn_labels_evicted_total", "fe2e_caps") == 10
    assert metric(text, "streamlearn_aggregate_entities_evicted_total", "fe2e_caps") >= 3


def _settled(client: httpx.Client, stack: dict[str, str], learned: int) -> dict:
    """Wait until the served model is the worker's newest (its checkpoint's version)."""
    path = Path(stack["dir"], "snapshots", "fe2e--fe-0.snap")

    def newest(info: dict[str, Any]) -> bool:
        try:
            return (info["events_learned"] >= learned
                    and snapshots.load(path)["version"] == info["version"])
        except (OSError, ValueError):
            return False

    return wait_info(client, stack, "fe2e", newest)


def test_predict_serves_the_aggregates_the_worker_uses_next(stack, client, joined):
    info = _settled(client, stack, N // 2)
    card = "c3"
    history = EVENTS + REF
    got, version = served_aggregates(client, "fe2e", card, REF)
    assert version == info["version"]
    want = expected(history, probe(card))
    assert want[0] == N // CARDS + 1  # 50 events of c3, and the probe
    assert_values(got, want)
    # The worker's own checkpoint, fed the same event next, computes the same values.
    state = snapshots.load(Path(stack["dir"], "snapshots", "fe2e--fe-0.snap"))
    assert state["version"] == version
    worker = OnlineModel.from_state(state, device="cpu")
    batch, rejects = worker.vectorizer.transform_many([probe(card)])
    assert not rejects
    worker.fill_aggregates(batch, update=True)
    names = ["amount", *FEATURES]
    worker_values = batch.numeric[0, [names.index(f) for f in FEATURES]].tolist()
    assert worker_values == want  # exact: counts and integer sums are exact in float32
    assert_values(got, worker_values)
    # A card never seen: only the probe itself.
    assert_values(served_aggregates(client, "fe2e", "c-unseen", REF)[0],
                  expected([], probe("c-unseen")))


def test_a_new_event_reaches_predict_soon(stack, client, joined, capsys):
    """The issue asks for a new aggregate in /predict within 1 s of its event: measured
    here (produce acknowledged -> first /predict answer that counts it), reported, and
    only required to happen eventually."""
    _settled(client, stack, N // 2)
    card, history = "c5", EVENTS + REF
    before, _ = served_aggregates(client, "fe2e", card, REF)
    assert_values(before, expected(history, probe(card)))
    latencies = []
    added: list[dict[str, Any]] = []
    for k in range(5):
        event = {"event_id": f"fresh-{k}", "card_id": card, "amount": 7.0, "merchant": "m2",
                 "ts": BASE + 1000 + k}
        added.append(event)
        want = expected(history + added, probe(card))
        send(stack["bootstrap"], "fe2e.tx", keyed([event]))
        t0 = time.monotonic()
        deadline = t0 + 30
        while True:
            got, _ = served_aggregates(client, "fe2e", card, REF)
            if abs(got[0] - want[0]) < 0.5:
                latencies.append(time.monotonic() - t0)
                break
            assert time.monotonic() < deadline, f"count {got[0]} never reached {want[0]}"
            time.sleep(0.01)
        assert_values(got, want)
    with capsys.disabled():
        print(f"\n[fraud e2e] event -> /predict aggregate visible: "
              f"median {np.median(latencies):.3f} s, max {max(latencies):.3f} s "
              f"over {len(latencies)} events: {[round(x, 3) for x in latencies]}")


# -- restart survival --------------------------------------------------------------------------

RESTART_CONFIG = SERVICES + MODEL.format(name="frs", extra="label_ttl_s = 600")


def _checkpoint(path: Path) -> dict[str, Any] | None:
    try:
        return snapshots.load(path)
    except (OSError, ValueError):
        return None


def _wait_checkpoint(path: Path, predicate: Callable[[dict[str, Any]], bool], log: Path,
                     timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = _checkpoint(path)
        if state is not None and predicate(state):
            return state
        time.sleep(0.1)
    summary = None if state is None else {k: state.get(k) for k in ("n_seen", "n_learned")}
    pytest.fail(f"checkpoint never matched; last {summary}\n{log.read_text()[-3000:]}")


def _pending_counts(state: dict[str, Any]) -> dict[str, int]:
    return {**state["pending"]["counts"], "waiting": len(state["pending"]["scores"])}


def test_pending_labels_and_aggregates_survive_a_worker_restart(broker, tmp_path):
    (tmp_path / "streamlearn.toml").write_text(RESTART_CONFIG)
    env = {**os.environ, "STREAMLEARN_CONFIG": str(tmp_path / "streamlearn.toml"),
           "STREAMLEARN_KAFKA__BOOTSTRAP": broker, "STREAMLEARN_KAFKA__FAST_JOIN": "true",
           "STREAMLEARN_WORKER__SNAPSHOT_DIR": str(tmp_path / "snaps"),
           "STREAMLEARN_WORKER__REPLICA_ID": "rs-0", "STREAMLEARN_WORKER__APP_ID": "fraud-restart"}
    checkpoint = tmp_path / "snaps" / "frs--rs-0.snap"
    log = tmp_path / "worker.log"

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "streamlearn", "worker"], env=env,
                                stdout=log.open("ab"), stderr=subprocess.STDOUT)

    before = [{"event_id": f"rs-{i}", "card_id": f"k{i % 6}", "amount": float(i + 1),
               "merchant": "m0", "ts": BASE + i} for i in range(60)]
    after = [{"event_id": f"rs-post-{j}", "card_id": "k0", "amount": 5.0, "merchant": "m1",
              "ts": BASE + 100 + j} for j in range(10)]
    worker = start()
    try:
        send(broker, "frs.tx", keyed(before))
        state = _wait_checkpoint(checkpoint, lambda s: s["n_seen"] == 60
                                 and _pending_counts(s)["waiting"] == 60, log)
        # the checkpoint is written before the commit, and a crash between them redelivers
        assert asyncio.run(input_committed(broker, "frs.tx", "fraud-restart", timeout_s=30))
    finally:
        worker.send_signal(signal.SIGKILL)  # a crash: nothing runs on the way out
        worker.wait(15)
    model = OnlineModel.from_state(state, device="cpu", serving=True)
    assert model.aggregates.n_entities == 6
    batch, _ = model.vectorizer.transform_many([probe("k0", amount=0.0)])
    model.fill_aggregates(batch, update=False)
    assert batch.numeric[0, 1] == 11  # k0's 10 events, and the probe

    worker = start()
    try:
        send(broker, "frs.labels", labels_for(before[:30]))
        send(broker, "frs.tx", keyed(after))
        state = _wait_checkpoint(checkpoint, lambda s: s["pending"]["counts"]["joined"] == 30
                                 and s["n_seen"] == 70, log)
        time.sleep(1.0)  # anything redelivered by mistake would show in the next checkpoint
        state = _wait_checkpoint(checkpoint, lambda s: True, log)
    finally:
        worker.terminate()
        worker.wait(20)
    counts = _pending_counts(state)
    # Labels for events seen before the restart joined them (none unknown, none late).
    assert {k: counts[k] for k in ("joined", "unknown", "late", "duplicate", "waiting")} == {
        "joined": 30, "unknown": 0, "late": 0, "duplicate": 0, "waiting": 40}
    assert state["n_learned"] == 30
    assert state["n_seen"] == 70  # nothing read twice
    # k0's count continues from its pre-restart value: 10 before, 10 after, and the probe.
    model = OnlineModel.from_state(state, device="cpu", serving=True)
    batch, _ = model.vectorizer.transform_many([probe("k0", amount=0.0)])
    model.fill_aggregates(batch, update=False)
    want = expected(before + after, probe("k0", amount=0.0))
    assert want[0] == 21
    assert batch.numeric[0, 1:].tolist() == want

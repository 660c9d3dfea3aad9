"""Drift over HTTP and Prometheus, and the admin commands (API side and worker side)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, SecretStr

from streamlearn import snapshots
from streamlearn.config import ModelSpec
from streamlearn.drift.commands import decode_command, new_command
from streamlearn.models import OnlineModel
from streamlearn.services.api.main import create_app
from streamlearn.services.worker.observe import RateMeter, apply_command, observed
from streamlearn.serving import ModelStore
from streamlearn.synthetic import FraudStream

SPEC = ModelSpec(
    name="fraud", topic="transactions", label="is_fraud",
    numeric=("amount", "hour", "distance_km", "card_age_days", "tx_last_hour"),
    categorical=("merchant_category", "country", "channel"),
    hash_bits=10, drift_reference_size=2000, drift_action="alert", drift_cooldown=1000,
)
TOKEN = "s3cret-admin-token-for-tests"


class KafkaCfg(BaseModel):
    bootstrap: str = ""
    commands_topic: str = "streamlearn.commands"


class ApiCfg(BaseModel):
    host: str = "127.0.0.1"
    port: int = 0
    admin_token: SecretStr = SecretStr(TOKEN)


class Cfg(BaseModel):
    kafka: KafkaCfg = KafkaCfg()
    api: ApiCfg = ApiCfg()


def _drifted_model() -> OnlineModel:
    """12,800 fraud events, the last 5,120 with amounts 4x and a new channel mix."""
    model = OnlineModel(SPEC, device="cpu")
    stream = FraudStream(seed=21)
    for i in range(50):
        if i == 30:
            stream.card_spend *= 4.0
        events = stream.take(256)
        if i >= 30:
            for e in events:
                e["channel"] = "atm"
        batch, _ = model.vectorizer.transform_many(events)
        model.process_many(batch)
    return model


@pytest.fixture(scope="module")
def model() -> OnlineModel:
    return _drifted_model()


@pytest.fixture()
def client(model: OnlineModel) -> Any:
    store = ModelStore()
    state = model.to_state() | {"replica": "r1", "telemetry": {"consumed": model.n_seen},
                                "observed": {"lag": {"transactions:0": 7, "transactions:1": 0},
                                             "events_per_s": 1234.5}}
    assert store.offer("fraud/r1", snapshots.encode(state))
    app = create_app(Cfg(), store=store, registry=CollectorRegistry())
    sent: list[tuple[str, bytes, bytes]] = []

    async def publish(topic: str, key: bytes, value: bytes) -> None:
        sent.append((topic, key, value))

    app.state.publish_command = publish
    with TestClient(app) as c:
        c.sent = sent  # type: ignore[attr-defined]
        yield c


def test_drift_route_reports_detector_features_worst_first_and_actions(client):
    body = client.get("/models/fraud/drift").json()
    assert body["concept"]["detector"] == "page_hinkley"
    assert {"state", "recent_drifts_at_event", "recent_drifts_at_time"} <= set(body["concept"])
    assert "x_mean" in body["concept"]["state"]  # Page-Hinkley's state, through the snapshot
    assert body["concept"]["updates"] > 0
    features = body["data"]["features"]
    assert set(features) == set(SPEC.numeric) | set(SPEC.categorical)
    scores = [f["score"] for f in features.values()]
    assert scores == sorted(scores, reverse=True)  # worst first
    assert list(features)[:2] in (["amount", "channel"], ["channel", "amount"])
    assert body["data"]["level"] == "drift"
    assert body["actions"]["policy"] == "alert"
    assert set(body["actions"]["counts"]) >= {"alert", "reset", "rollback"}


def test_metrics_export_drift_lag_and_rate_and_pass_promtool(client):
    text = client.get("/metrics").text
    assert 'streamlearn_drift_score{feature="amount",model="fraud"}' in text
    assert 'streamlearn_drift_unseen_rate{feature="channel",model="fraud"}' in text
    assert 'streamlearn_drift_level{model="fraud"} 2.0' in text
    assert 'streamlearn_drift_actions_total{action="reset",model="fraud"}' in text
    assert ('streamlearn_consumer_lag{model="fraud",partition="0",replica="r1",'
            'topic="transactions"} 7.0') in text
    assert 'streamlearn_events_per_second{model="fraud",replica="r1"} 1234.5' in text
    promtool = shutil.which("promtool") or shutil.which(
        "promtool", path=str(Path(sys.executable).parent))  # make test links it in the venv
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    out = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_admin_endpoints_need_the_bearer_token(client, headers, caplog):
    caplog.set_level(logging.DEBUG)
    for action in ("reset", "rollback"):
        r = client.post(f"/models/fraud/{action}", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.sent == []
    r = client.post("/models/fraud/reset", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 202
    topic, key, value = client.sent[0]
    cmd = decode_command(value)
    assert (topic, key, cmd.model, cmd.action) == ("streamlearn.commands", b"fraud", "fraud",
                                                   "reset")
    assert r.json()["command_id"] == cmd.id
    assert client.post("/models/nope/rollback",
                       headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    assert TOKEN not in caplog.text


def test_without_a_configured_token_admin_answers_401(model):
    app = create_app(Cfg(api=ApiCfg(admin_token=SecretStr(""))), registry=CollectorRegistry())
    with TestClient(app) as c:
        assert c.post("/models/fraud/reset", headers={"Authorization": "Bearer "}).status_code \
            in (401, 403)
        assert c.post("/models/fraud/reset",
                      headers={"Authorization": "Bearer x"}).status_code == 401


def test_worker_applies_a_command_on_the_learner_thread_and_publishes():
    model = _drifted_model()
    model.w[:5] = 1.0
    threads: list[str] = []
    published = []
    executor = ThreadPoolExecutor(1, thread_name_prefix="learn-fraud")

    async def publish_snapshots(force: bool = False) -> int:
        published.append(force)
        return 1

    runtime = SimpleNamespace(
        feeders={"fraud": SimpleNamespace(executor=executor, runner=SimpleNamespace(
            model=model))},
        publish_snapshots=publish_snapshots)
    original = model.drift_actions.apply

    def spy(*args: Any, **kw: Any) -> str:
        threads.append(threading.current_thread().name)
        return original(*args, **kw)

    model.drift_actions.apply = spy  # type: ignore[method-assign]
    done = asyncio.run(apply_command(runtime, new_command("fraud", "reset").encode()))
    assert done == "reset" and published == [True]
    assert threads[0].startswith("learn-fraud")
    assert float(abs(model.w).sum()) == 0.0
    last = model.drift_actions.history[-1]
    assert (last["action"], last["trigger"], last["at_event"]) == ("reset", "manual", 12_800)
    # Not for this worker, malformed, or stale: ignored.
    assert asyncio.run(apply_command(runtime, new_command("other", "reset").encode())) is None
    assert asyncio.run(apply_command(runtime, b"{not json")) is None
    stale = new_command("fraud", "rollback", now=1.0).encode()
    assert asyncio.run(apply_command(runtime, stale)) is None
    executor.shutdown()


def test_observed_reports_lag_per_partition_and_events_per_second():
    from faust.types import TP

    consumer = SimpleNamespace(
        assignment=lambda: {TP("transactions", 0), TP("transactions", 1), TP("other", 0)},
        highwater=lambda t: {0: 500, 1: 40}[t.partition])
    runtime = SimpleNamespace(app=SimpleNamespace(consumer=consumer))
    feeder = SimpleNamespace(spec=SPEC, next_offset={("transactions", 0): 450})
    meter = RateMeter()
    first = observed(runtime, feeder, {"telemetry": {"consumed": 10}}, meter)
    assert first["lag"] == {"transactions:0": 50, "transactions:1": 40}
    assert first["events_per_s"] == 0.0
    assert meter.rate("fraud", 2010, now=meter.last["fraud"][0] + 2.0) == 1000.0

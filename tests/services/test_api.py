"""HTTP API against a real ModelStore fed with real snapshots (no Kafka, no mocks)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from streamlearn import snapshots
from streamlearn.broker import free_port
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.services.api.deps import get_settings
from streamlearn.services.api.feed import SnapshotFeed
from streamlearn.services.api.main import create_app
from streamlearn.serving import ModelStore
from streamlearn.synthetic import FraudStream

SPEC = ModelSpec(
    name="fraud", topic="transactions", label="is_fraud",
    numeric=("amount", "hour", "distance_km", "card_age_days", "tx_last_hour"),
    categorical=("merchant_category", "country", "channel"),
    hash_bits=10, learning_rate=0.05,
)
MAX_INSTANCES = 400


class KafkaCfg(BaseModel):
    bootstrap: str = ""


class ApiCfg(BaseModel):
    host: str = "127.0.0.1"
    port: int = 0
    max_instances: int = MAX_INSTANCES
    snapshot_dir: str = ""
    max_body_bytes: int = 1024 * 1024


class Cfg(BaseModel):
    kafka: KafkaCfg = KafkaCfg()
    api: ApiCfg = ApiCfg()


def learn(model: OnlineModel, events: list[dict[str, Any]]) -> None:
    for start in range(0, len(events), 256):
        batch, _ = model.vectorizer.transform_many(events[start : start + 256])
        model.process(batch)


def snapshot(model: OnlineModel, replica: str = "r1") -> bytes:
    telemetry = {"consumed": model.n_seen, "scored": model.n_seen, "learned": model.n_learned,
                 "deadlettered": 0,
                 "learn_seconds": {"le": [0.001, 0.01], "counts": [3, 5], "sum": 0.02,
                                   "count": 6}}
    return snapshots.encode(model.to_state() | {"replica": replica, "telemetry": telemetry})


@pytest.fixture(scope="module")
def model() -> OnlineModel:
    m = OnlineModel(SPEC, device="cpu")
    learn(m, FraudStream(seed=11).take(4000))
    return m


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    out = FraudStream(seed=12).take(MAX_INSTANCES)
    for e in out:
        e.pop("is_fraud", None)
    return out


@pytest.fixture
def store(model: OnlineModel) -> ModelStore:
    s = ModelStore()
    assert s.offer("fraud/r1", snapshot(model))
    return s


@pytest.fixture
def client(store: ModelStore) -> Iterator[TestClient]:
    with TestClient(create_app(Cfg(), store, CollectorRegistry())) as c:
        yield c


def post_raw(client: TestClient, path: str, body: bytes) -> Any:
    return client.post(path, content=body, headers={"content-type": "application/json"})


# -- health --------------------------------------------------------------------


def test_readyz_503_before_a_snapshot_then_200(model: OnlineModel) -> None:
    store = ModelStore()
    with TestClient(create_app(Cfg(), store, CollectorRegistry())) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["status"] == "not ready"
        assert "no model snapshot loaded" in r.json()["reason"]
        store.offer("fraud/r1", snapshot(model))
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["models"] == ["fraud"]
        assert c.get("/healthz").status_code == 200


def test_readyz_reports_an_unreachable_broker() -> None:
    cfg = Cfg(kafka=KafkaCfg(bootstrap=f"127.0.0.1:{free_port()}"))
    with TestClient(create_app(cfg, ModelStore(), CollectorRegistry())) as c:
        deadline = time.monotonic() + 10
        while "last error" not in (reason := c.get("/readyz").json()["reason"]):
            assert time.monotonic() < deadline, reason
            time.sleep(0.05)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["feed"]["errors"] >= 1
        assert "KafkaConnectionError" in r.json()["reason"]
        assert c.get("/healthz").status_code == 200


def test_snapshot_dir_is_loaded_at_startup(model: OnlineModel, tmp_path: Any) -> None:
    snapshots.save(tmp_path / "fraud-r1.snap", snapshot(model))
    (tmp_path / "junk.snap").write_bytes(b"not a snapshot")
    cfg = Cfg(api=ApiCfg(snapshot_dir=str(tmp_path)))
    with TestClient(create_app(cfg, ModelStore(), CollectorRegistry())) as c:
        assert c.get("/readyz").status_code == 200
        assert c.get("/models/fraud").json()["version"] == model.version


# -- models --------------------------------------------------------------------


def test_list_and_describe_models(client: TestClient, model: OnlineModel) -> None:
    listing = client.get("/models")
    assert listing.status_code == 200
    (item,) = listing.json()
    assert item["name"] == "fraud" and item["task"] == "binary"
    assert item["version"] == model.version
    assert item["events_learned"] == model.n_learned
    assert item["n_replicas"] == 1 and item["snapshot_age_s"] >= 0
    assert item["features"]["numeric"] == list(SPEC.numeric)
    assert 0.5 < item["metrics"]["auc"] <= 1.0
    detail = client.get("/models/fraud").json()
    assert detail["replicas"][0]["replica"] == "r1"
    assert detail["replicas"][0]["version"] == model.version
    assert detail["telemetry"]["learned"] == model.n_learned
    assert detail["feed"] is None


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/models/nope"), ("POST", "/models/nope/predict"), ("POST", "/models/nope/explain"),
])
def test_unknown_model_404(client: TestClient, events: list[dict[str, Any]], method: str,
                           path: str) -> None:
    r = client.request(method, path, json={"features": events[0]})
    assert r.status_code == 404
    assert r.json() == {"detail": "unknown model 'nope'; known: ['fraud']"}


def test_predict_one_event(client: TestClient, model: OnlineModel,
                           events: list[dict[str, Any]]) -> None:
    r = client.post("/models/fraud/predict", json={"features": events[0]})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"model", "version", "merged_version", "snapshot_age_s",
                         "predictions", "score"}
    assert body["model"] == "fraud" and body["version"] == model.version
    assert body["merged_version"] == 0  # one shard, no merged model yet
    expected = float(model.predict_events([events[0]])[0])
    assert body["predictions"] == [pytest.approx(expected, rel=1e-6)]
    assert body["score"] == body["predictions"][0]
    assert r.headers["content-type"] == "application/json"


@pytest.mark.parametrize("n", [1, 7, MAX_INSTANCES])  # MAX_INSTANCES scores in a thread
def test_predict_instances(client: TestClient, model: OnlineModel,
                           events: list[dict[str, Any]], n: int) -> None:
    r = client.post("/models/fraud/predict", json={"instances": events[:n]})
    assert r.status_code == 200
    body = r.json()
    assert "score" not in body
    np.testing.assert_allclose(body["predictions"], model.predict_events(events[:n]), rtol=1e-6)


def test_explain_contributions_sum_to_margin(client: TestClient, model: OnlineModel,
                                             events: list[dict[str, Any]]) -> None:
    r = client.post("/models/fraud/explain", json={"features": events[3]})
    assert r.status_code == 200
    body = r.json()
    assert body["version"] == model.version
    assert set(body["contributions"]) == set(SPEC.numeric) | {
        f"{f}={events[3][f]}" for f in SPEC.categorical}
    total = body["bias"] + sum(body["contributions"].values())
    assert total == pytest.approx(body["margin"], rel=1e-5, abs=1e-6)
    assert body["score"] == pytest.approx(1 / (1 + math.exp(-body["margin"])), rel=1e-6)
    predicted = client.post("/models/fraud/predict", json={"features": events[3]}).json()
    assert body["score"] == pytest.approx(predicted["score"], rel=1e-5)


# -- 422s: every kind of bad input, never a 5xx ---------------------------------

GOOD = {"amount": 10.0, "hour": 3.0, "country": "FR"}


@pytest.mark.parametrize(("body", "loc", "needle"), [
    (b'{"features": {"amount": NaN}}', ["body", "features", "amount"], "NaN"),
    (b'{"features": {"amount": Infinity}}', ["body", "features", "amount"], "Infinity"),
    (b'{"instances": [{"hour": 1}, {"amount": -Infinity}]}', ["body", "instances", 1, "amount"],
     "-Infinity"),
    (b'{"features": {"amount": 1e999}}', ["body", "features", "amount"], "finite"),
    (b'{"features": {"amount": "12"}}', ["body", "features"], "field 'amount': expected a number"),
    (b'{"instances": [{"amount": 1}, {"country": 1.5}]}', ["body", "instances", 1],
     "field 'country'"),
    (b'{"features": {"amount": [1, 2]}}', ["body", "features", "amount"], "got an array"),
    (b'{"features": {"amount": {"x": 1}}}', ["body", "features", "amount"], "got an object"),
    (b'{"features": {"amount": true}}', ["body", "features"], "field 'amount'"),
    (b'{"features": {"is_fraud": 2}}', ["body", "features"], "label must be 0 or 1"),
    (b'{"features": {}, "instances": [{}]}', ["body"], "exactly one"),
    (b"{}", ["body"], "exactly one"),
    (b'{"instances": []}', ["body", "instances"], "at least 1"),
    (b'{"features": [1]}', ["body", "features"], "dictionary"),
    (b'{"feature": {}}', ["body", "feature"], "Extra inputs"),
    (b"[1, 2]", ["body"], ""),
    (b'{"features": {"amount": 1', ["body"], ""),
])
def test_predict_422_names_the_field(client: TestClient, body: bytes, loc: list[Any],
                                     needle: str) -> None:
    r = post_raw(client, "/models/fraud/predict", body)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["loc"][: len(loc)] == loc and needle in e["msg"] + str(e.get("ctx", ""))
               for e in errors), errors


def test_too_many_instances(client: TestClient) -> None:
    r = client.post("/models/fraud/predict", json={"instances": [GOOD] * (MAX_INSTANCES + 1)})
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "instances"] and str(MAX_INSTANCES) in err["msg"]


def test_max_instances_comes_from_settings(client: TestClient) -> None:
    app = client.app
    app.dependency_overrides[get_settings] = lambda: Cfg(api=ApiCfg(max_instances=1))  # type: ignore[attr-defined]
    try:
        assert client.post("/models/fraud/predict", json={"instances": [GOOD]}).status_code == 200
        r = client.post("/models/fraud/predict", json={"instances": [GOOD, GOOD]})
        assert r.status_code == 422 and "at most 1 instances" in r.json()["detail"][0]["msg"]
    finally:
        app.dependency_overrides.clear()  # type: ignore[attr-defined]


@pytest.mark.parametrize("body", [
    b'{"features": {"amount": NaN}}', b'{"features": {"amount": "x"}}',
    b'{"instances": [{"amount": 1}]}', b"[]", b"",
])
def test_explain_422(client: TestClient, body: bytes) -> None:
    r = post_raw(client, "/models/fraud/explain", body)
    assert r.status_code == 422, r.text


def test_works_with_the_real_settings(store: ModelStore, tmp_path: Any) -> None:
    from streamlearn.settings import load_settings

    (tmp_path / "s.toml").write_text('[kafka]\nbootstrap = ""\n[api]\nmax_instances = 2\n')
    settings = load_settings(tmp_path / "s.toml")
    with TestClient(create_app(settings, store, CollectorRegistry())) as c:
        assert c.get("/readyz").status_code == 200
        r = c.post("/models/fraud/predict", json={"instances": [GOOD] * 3})
        assert r.status_code == 422 and "at most 2 instances" in r.json()["detail"][0]["msg"]


# -- hot swap and metrics ------------------------------------------------------


def test_hot_swap_serves_the_newer_snapshot(client: TestClient, store: ModelStore,
                                            model: OnlineModel,
                                            events: list[dict[str, Any]]) -> None:
    first = client.post("/models/fraud/predict", json={"features": events[0]}).json()
    newer = OnlineModel.from_state(model.to_state())
    learn(newer, FraudStream(seed=13).take(512))
    assert store.offer("fraud/r1", snapshot(newer))
    second = client.post("/models/fraud/predict", json={"features": events[0]}).json()
    assert second["version"] == newer.version == first["version"] + 2
    assert second["score"] == pytest.approx(float(newer.predict_events([events[0]])[0]), rel=1e-6)
    assert client.get("/models").json()[0]["version"] == newer.version


def test_metrics_exposition(client: TestClient, events: list[dict[str, Any]]) -> None:
    client.post("/models/fraud/predict", json={"instances": events[:3]})
    client.get("/models/nope")
    post_raw(client, "/models/fraud/predict", b'{"features": {"amount": NaN}}')
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for needle in [
        'streamlearn_predictions_total{model="fraud"} 3.0',
        'streamlearn_prediction_latency_seconds_count{model="fraud"} 1.0',
        'streamlearn_request_errors_total{status="404"} 1.0',
        'streamlearn_request_errors_total{status="422"} 1.0',
        'streamlearn_events_consumed_total{model="fraud",replica="r1"}',
        'streamlearn_events_learned_total{model="fraud",replica="r1"}',
        'streamlearn_events_deadlettered_total{model="fraud",replica="r1"} 0.0',
        'streamlearn_learn_batch_seconds_bucket{le="0.001",model="fraud",replica="r1"} 3.0',
        'streamlearn_learn_batch_seconds_bucket{le="+Inf",model="fraud",replica="r1"} 6.0',
        'streamlearn_model_version{model="fraud",replica="r1"}',
        'streamlearn_model_age_seconds{model="fraud",replica="r1"}',
        'streamlearn_prequential_auc{model="fraud",replica="r1"}',
        'streamlearn_prequential_log_loss{model="fraud",replica="r1"}',
        'streamlearn_served_model_version{model="fraud"}',
        'streamlearn_snapshots_total{outcome="accepted"} 1.0',
    ]:
        assert needle in text, needle


def test_dashboard_and_openapi(client: TestClient) -> None:
    r = client.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "uPlot" in r.text and "/models" in r.text and "src=\"http" not in r.text
    js = client.get("/dashboard/vendor/uPlot.iife.min.js")
    assert js.status_code == 200 and "uPlot" in js.text
    assert client.get("/dashboard/vendor/secrets.txt").status_code == 404
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/models", "/models/{name}", "/models/{name}/predict", "/models/{name}/explain",
            "/healthz", "/readyz", "/metrics", "/dashboard"} <= set(paths)


def test_drift_report_is_served(client: TestClient, model: OnlineModel) -> None:
    r = client.get("/models/fraud/drift")
    assert r.status_code == 200
    body = r.json()
    assert body["version"] == model.version
    assert body["concept"] == model.drift_report()["concept"]
    assert set(body["data"]["features"]) == set(model.spec.numeric) | set(model.spec.categorical)
    assert client.get("/models/nope/drift").status_code == 404


# -- hardening: body limit, readiness, non-finite results, schema, signed snapshots --


def test_bodies_over_the_limit_get_413_before_being_read(store: ModelStore) -> None:
    cfg = Cfg(api=ApiCfg(max_body_bytes=4096))  # type: ignore[call-arg]
    with TestClient(create_app(cfg, store, CollectorRegistry())) as c:
        ok = c.post("/models/fraud/predict", json={"features": GOOD})
        assert ok.status_code == 200
        big = b'{"features": {"amount": 1, "pad": "' + b"x" * 5000 + b'"}}'
        r = post_raw(c, "/models/fraud/predict", big)  # Content-Length says it all
        assert r.status_code == 413 and "4096" in r.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            yield b'{"instances": ['
            for _ in range(100):
                yield b'{"amount": 1, "hour": 2, "country": "FR"},'
            yield b'{"amount": 1}]}'

        r = c.post("/models/fraud/predict", content=chunks(),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
        text = c.get("/metrics").text
        assert 'streamlearn_request_errors_total{status="413"} 2.0' in text


def test_default_body_limit_refuses_a_large_body(client: TestClient) -> None:
    r = post_raw(client, "/models/fraud/explain", b" " * (1024 * 1024 + 1))
    assert r.status_code == 413


class _FakeFeed(SnapshotFeed):
    def __init__(self, store: ModelStore) -> None:
        super().__init__("127.0.0.1:9", store)


def test_readyz_reports_a_dead_feed_and_a_broker_outage(store: ModelStore) -> None:
    app = create_app(Cfg(), store, CollectorRegistry())
    with TestClient(app) as c:
        feed = _FakeFeed(store)
        app.state.feed = feed
        feed.broker_up = True
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ready"
        assert "streamlearn_broker_up 1.0" in c.get("/metrics").text
        # The broker stops answering: still serving, but degraded, with the reason.
        feed._mark_down()
        feed.last_error = "KafkaConnectionError: no broker"
        r = c.get("/readyz")
        body = r.json()
        assert r.status_code == 200 and body["status"] == "degraded" and body["degraded"]
        assert "unreachable" in body["reason"] and body["feed"]["broker_up"] is False
        assert "streamlearn_broker_up 0.0" in c.get("/metrics").text
        # The feed task dies: not ready, whatever is served.
        loop = asyncio.new_event_loop()
        try:
            task = loop.create_future()
            task.set_exception(RuntimeError("boom"))
            feed._task = task  # type: ignore[assignment]
            feed._on_done(task)  # type: ignore[arg-type]
        finally:
            loop.close()
        r = c.get("/readyz")
        assert r.status_code == 503 and "feed stopped" in r.json()["reason"]
        assert "boom" in r.json()["reason"]
        assert "streamlearn_snapshot_feed_up 0.0" in c.get("/metrics").text


def test_rejected_snapshots_are_counted_in_metrics(client: TestClient, store: ModelStore) -> None:
    store.offer("fraud/r1", b"garbage")
    store.offer("fraud/r9", None)  # type: ignore[arg-type]
    text = client.get("/metrics").text
    assert 'streamlearn_snapshots_rejected_total{reason="truncated"} 1.0' in text
    assert 'streamlearn_snapshots_rejected_total{reason="tombstone"} 1.0' in text
    assert client.get("/models/fraud").status_code == 200


@pytest.mark.parametrize("features", [
    {"amount": 1e308}, {"amount": 1.7e308, "hour": -1.7e308}, {"amount": -1e300},
    {"amount": 1e15, "hour": -1e15},
])
def test_extreme_values_never_give_null_numbers(client: TestClient,
                                                features: dict[str, Any]) -> None:
    for path in ("/models/fraud/explain", "/models/fraud/predict"):
        r = client.post(path, json={"features": features})
        assert r.status_code in (200, 422), r.text
        if r.status_code == 422:
            (err,) = r.json()["detail"]
            assert err["loc"][:2] == ["body", "features"] and err["msg"]
        else:
            numbers = [v for v in r.json().values() if not isinstance(v, str | dict | list)]
            assert all(isinstance(v, int | float) and math.isfinite(v) for v in numbers)


def test_a_non_finite_result_is_a_422_not_null(client: TestClient, store: ModelStore,
                                               monkeypatch: Any) -> None:
    # Whatever the model computes, the API never answers null where a number is promised.
    model = store.get("fraud").model  # type: ignore[union-attr]
    monkeypatch.setattr(model, "explain_one", lambda event: {
        "bias": 0.1, "contributions": {"amount": math.inf, "hour": 0.0},
        "margin": math.inf, "score": 1.0})
    # Both paths score through predict_many: the fast path declines a non-finite score and
    # the route answers 422.
    monkeypatch.setattr(model, "predict_many",
                        lambda batch: np.array([0.5, math.nan][: len(batch)]))
    r = client.post("/models/fraud/explain", json={"features": GOOD})
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["type"] == "non_finite_result" and "amount" in err["msg"]
    r = client.post("/models/fraud/predict", json={"instances": [GOOD, GOOD]})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "instances", 1]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=3,
                       max_size=3))
def test_explain_is_finite_or_a_422_for_any_finite_input(client: TestClient,
                                                         values: list[float]) -> None:
    features = dict(zip(("amount", "hour", "distance_km"), values, strict=True))
    r = client.post("/models/fraud/explain", json={"features": features})
    if r.status_code == 422:
        assert r.json()["detail"][0]["msg"]
        return
    assert r.status_code == 200
    body = r.json()
    assert all(math.isfinite(body[k]) for k in ("bias", "margin", "score"))
    assert all(isinstance(v, float) and math.isfinite(v) for v in body["contributions"].values())


def test_openapi_says_exactly_one_of_features_or_instances(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["PredictRequest"]
    assert schema["oneOf"] == [{"required": ["features"]}, {"required": ["instances"]}]
    assert schema["additionalProperties"] is False
    instances = schema["properties"]["instances"]
    assert instances["type"] == "array" and instances["maxItems"] == MAX_INSTANCES
    assert schema["properties"]["features"]["type"] == "object"  # null is not allowed
    for body in (b'{"features": null}', b'{"instances": null}',
                 b'{"features": null, "instances": [{"amount": 1}]}'):
        r = post_raw(client, "/models/fraud/predict", body)
        assert r.status_code == 422 and r.json()["detail"][0]["msg"], body


def test_required_signatures_without_a_key_fail_at_start() -> None:
    from streamlearn.settings import SettingsError, load_settings

    settings_ = load_settings(api={"require_signed_snapshots": True})
    with pytest.raises(SettingsError, match="snapshot_key"):
        create_app(settings_, ModelStore(), CollectorRegistry())


def test_signed_snapshot_settings_reach_the_store(model: OnlineModel, monkeypatch: Any) -> None:
    from streamlearn.settings import load_settings

    secret = "0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("STREAMLEARN_KAFKA__SNAPSHOT_KEY", secret)
    settings_ = load_settings(model=[{"name": "fraud", "topic": "transactions",
                                      "label": "is_fraud", **{
                                          k: list(getattr(SPEC, k)) if isinstance(
                                              getattr(SPEC, k), tuple) else getattr(SPEC, k)
                                          for k in ("numeric", "categorical", "hash_bits",
                                                    "learning_rate")}}])
    assert secret not in repr(settings_) and secret not in str(settings_.model_dump())
    store = ModelStore()
    app = create_app(settings_, store, CollectorRegistry())
    assert store.policy.signatures_required and set(store.policy.specs or {}) == {"fraud"}
    with TestClient(app) as c:
        unsigned = snapshot(model)
        assert not store.offer("fraud/r1", unsigned)
        assert c.get("/readyz").status_code == 503
        good = snapshots.sign(unsigned, secret, context="fraud/r1")
        assert store.offer("fraud/r1", good)
        assert c.get("/readyz").status_code == 200
        assert secret not in c.get("/readyz").text + c.get("/metrics").text

"""``/predict?reasons=K`` and decision bands over HTTP, on the fast path and the route alike."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from streamlearn import snapshots
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.services.api.main import create_app
from streamlearn.serving import ModelStore, SnapshotPolicy
from streamlearn.synthetic import FraudStream

SPEC = ModelSpec(
    name="fraud", topic="transactions", label="is_fraud",
    numeric=("amount", "hour", "distance_km", "card_age_days", "tx_last_hour"),
    categorical=("merchant_category", "country", "channel"), hash_bits=10,
    decision_block=0.5, decision_review=0.05,
)
PATH = "/models/fraud/predict"


class KafkaCfg(BaseModel):
    bootstrap: str = ""


class ApiCfg(BaseModel):
    host: str = "127.0.0.1"
    port: int = 0
    max_instances: int = 50
    max_body_bytes: int = 64 * 1024
    fast_predict: bool = True


class Cfg(BaseModel):
    kafka: KafkaCfg = KafkaCfg()
    api: ApiCfg = ApiCfg()


def trained_state(spec: ModelSpec) -> dict[str, Any]:
    model = OnlineModel(spec, device="cpu")
    events = FraudStream(seed=3).take(3000)
    for start in range(0, len(events), 256):
        batch, _ = model.vectorizer.transform_many(events[start:start + 256])
        model.process(batch)
    return model.to_state() | {"replica": "r1"}


@pytest.fixture(scope="module")
def store() -> ModelStore:
    s = ModelStore()
    assert s.offer("fraud/r1", snapshots.encode(trained_state(SPEC)))
    return s


@pytest.fixture(scope="module")
def clients(store: ModelStore) -> Iterator[tuple[TestClient, TestClient]]:
    fast = TestClient(create_app(Cfg(), store))
    slow = TestClient(create_app(Cfg(api=ApiCfg(fast_predict=False)), store))
    with fast, slow:
        yield fast, slow


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    out = FraudStream(seed=4).take(40)
    for e in out:
        e.pop("is_fraud")
    return out


def both(clients: tuple[TestClient, TestClient], body: Any, query: str = "") -> tuple[int, Any]:
    fast, slow = clients
    raw = orjson.dumps(body)
    headers = {"content-type": "application/json"}
    a = fast.post(PATH + query, content=raw, headers=headers)
    b = slow.post(PATH + query, content=raw, headers=headers)
    assert a.status_code == b.status_code, (a.text[:300], b.text[:300])
    ja, jb = a.json(), b.json()
    if a.status_code == 200:
        ja.pop("snapshot_age_s"), jb.pop("snapshot_age_s")
        assert list(ja) == list(jb)
    assert ja == jb
    return a.status_code, ja


def test_reasons_by_field_on_both_paths(clients: tuple[TestClient, TestClient],
                                        events: list[dict[str, Any]],
                                        store: ModelStore) -> None:
    stats = clients[0].app.state.fast_predict  # type: ignore[attr-defined]
    answered = stats.answered
    status, one = both(clients, {"features": events[0]}, "?reasons=3")
    assert status == 200 and len(one["reasons"]) == 1 and len(one["reasons"][0]) == 3
    fields = set(SPEC.numeric) | set(SPEC.categorical)
    assert {r["feature"] for r in one["reasons"][0]} <= fields
    values = [r["contribution"] for r in one["reasons"][0]]
    assert values == sorted(values, reverse=True)
    # The same numbers as /explain, named by field.
    explained = clients[1].post("/models/fraud/explain", json={"features": events[0]}).json()
    by_field = {k.split("=")[0]: v for k, v in explained["contributions"].items()}
    for r in one["reasons"][0]:
        assert r["contribution"] == pytest.approx(by_field[r["feature"]], rel=1e-4, abs=1e-6)
    status, many = both(clients, {"instances": events[:20]}, "?reasons=100")
    assert status == 200 and len(many["reasons"]) == 20
    assert all(len(r) == len(fields) for r in many["reasons"])
    assert stats.answered == answered + 2  # both answered by the fast path
    status, none = both(clients, {"features": events[0]}, "?reasons=0")
    assert status == 200 and "reasons" not in none


@pytest.mark.parametrize("query", ["?reasons=-1", "?reasons=x", "?reasons=1001",
                                   "?reasons=2&reasons=3", "?other=1", "?reasons=02"])
def test_odd_queries_get_the_routes_answer(clients: tuple[TestClient, TestClient],
                                           events: list[dict[str, Any]], query: str) -> None:
    status, body = both(clients, {"features": events[0]}, query)
    assert status == (422 if query in ("?reasons=-1", "?reasons=x", "?reasons=1001") else 200)


def test_decisions_follow_the_bands(clients: tuple[TestClient, TestClient],
                                    events: list[dict[str, Any]]) -> None:
    status, out = both(clients, {"instances": events})
    assert status == 200 and len(out["decisions"]) == len(events)
    for score, decision in zip(out["predictions"], out["decisions"], strict=True):
        assert decision == ("block" if score >= 0.5 else "review" if score >= 0.05 else "allow")
    status, one = both(clients, {"features": events[0]}, "?reasons=2")
    assert one["decision"] == one["decisions"][0]
    assert list(one)[-4:] == ["score", "decisions", "decision", "reasons"]


def test_no_decisions_without_bands_and_configured_bands_win(
        events: list[dict[str, Any]]) -> None:
    plain = ModelSpec(**{**SPEC.to_dict(), "numeric": SPEC.numeric,
                         "categorical": SPEC.categorical,
                         "decision_block": None, "decision_review": None})
    state = snapshots.encode(trained_state(plain))
    store = ModelStore()
    assert store.offer("fraud/r1", state)
    configured = ModelStore(policy=SnapshotPolicy(specs={"fraud": SPEC}))
    assert configured.offer("fraud/r1", state)
    for fast_predict in (True, False):
        cfg = Cfg(api=ApiCfg(fast_predict=fast_predict))
        with TestClient(create_app(cfg, store)) as c:
            out = c.post(PATH, json={"features": events[0]}).json()
            assert "decision" not in out and "decisions" not in out
        with TestClient(create_app(cfg, configured)) as c:
            out = c.post(PATH, json={"features": events[0]}).json()
            assert out["decision"] in ("block", "review", "allow")


def test_openapi_documents_reasons_and_decisions(clients: tuple[TestClient, TestClient]) -> None:
    schema = clients[1].get("/openapi.json").json()
    params = schema["paths"][PATH.replace("fraud", "{name}")]["post"]["parameters"]
    assert any(p["name"] == "reasons" and p["in"] == "query" for p in params)
    props = schema["components"]["schemas"]["PredictResponse"]["properties"]
    assert {"reasons", "decisions", "decision"} <= set(props)
    assert "Reason" in schema["components"]["schemas"]


def test_fraud_metrics_in_the_model_and_prometheus(clients: tuple[TestClient, TestClient],
                                                   store: ModelStore) -> None:
    detail = clients[1].get("/models/fraud").json()
    metrics = detail["metrics"]
    assert 0.0 < metrics["pr_auc"] <= 1.0
    assert 0.0 <= metrics["recall_at_1pct_fpr"] <= 1.0
    assert 0.0 <= metrics["precision_at_k_per_day"] <= 1.0
    assert metrics["top_k_per_day"] == 100
    text = clients[1].get("/metrics").text
    for key in ("pr_auc", "recall_at_1pct_fpr", "precision_at_k_per_day"):
        line = next(x for x in text.splitlines()
                    if x.startswith(f"streamlearn_prequential_{key}{{"))
        assert 'model="fraud"' in line
        assert float(line.rsplit(" ", 1)[1]) == pytest.approx(metrics[key], abs=1e-6)

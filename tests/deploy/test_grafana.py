"""The provisioned Grafana dashboard queries only metrics the code exports.

The exported names come from a real API's ``/metrics`` (a served model that has drifted,
acted, and whose snapshot carries lag and events/s), not from a list kept by hand; every
``streamlearn_*`` name in every panel query, variable and annotation must be one of them.
The provisioning files must agree with the dashboard (datasource uid) and with
docker-compose.yml (mount paths).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from streamlearn import snapshots
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.services.api.main import create_app
from streamlearn.serving import ModelStore
from streamlearn.synthetic import FraudStream

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "streamlearn.json"
NAME = re.compile(r"\bstreamlearn_[a-z0-9_]+")


class KafkaCfg(BaseModel):
    bootstrap: str = ""


class ApiCfg(BaseModel):
    host: str = "127.0.0.1"
    port: int = 0


class Cfg(BaseModel):
    kafka: KafkaCfg = KafkaCfg()
    api: ApiCfg = ApiCfg()


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Sample names on a live /metrics (``_total``, ``_bucket``... included)."""
    spec = ModelSpec(name="fraud", topic="transactions", label="is_fraud",
                     numeric=("amount", "hour"), categorical=("country", "channel"),
                     hash_bits=8, drift_reference_size=1000, drift_action="reset")
    model = OnlineModel(spec, device="cpu")
    stream = FraudStream(seed=9)
    for _ in range(12):
        batch, _ = model.vectorizer.transform_many(stream.take(256))
        model.process_many(batch)
    model.drift_actions.apply(model, "reset", "manual")
    telemetry = {"consumed": model.n_seen, "learn_seconds": {
        "le": [0.001, 0.01], "counts": [1, 2], "sum": 0.01, "count": 2}}
    state = model.to_state() | {"replica": "r1", "telemetry": telemetry,
                                "observed": {"lag": {"transactions:0": 3}, "events_per_s": 9.0}}
    store = ModelStore()
    assert store.offer("fraud/r1", snapshots.encode(state))
    with TestClient(create_app(Cfg(), store=store, registry=CollectorRegistry())) as client:
        text = client.get("/metrics").text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def _queries(node: Any) -> list[str]:
    """Every PromQL string in the dashboard (targets, variables, annotations)."""
    out: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                out.append(value)
            elif key == "query" and isinstance(value, str | dict):
                out.append(value if isinstance(value, str) else str(value.get("query", "")))
            else:
                out.extend(_queries(value))
    elif isinstance(node, list):
        for item in node:
            out.extend(_queries(item))
    return out


def test_every_metric_the_dashboard_queries_is_exported(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _queries(dashboard)
    assert len(queries) >= 10
    used = {name for q in queries for name in NAME.findall(q)}
    missing = sorted(used - exported)
    assert not missing, f"the dashboard queries metrics the code does not export: {missing}"
    # The series are on the dashboard.
    for name in ("streamlearn_drift_detected_total", "streamlearn_drift_score",
                 "streamlearn_drift_actions_total", "streamlearn_events_per_second",
                 "streamlearn_consumer_lag"):
        assert name in used, name


def test_the_check_catches_a_misspelled_metric(exported):
    broken = {"panels": [{"targets": [{"expr": "rate(streamlearn_drift_detectd_total[5m])"}]}]}
    used = {name for q in _queries(broken) for name in NAME.findall(q)}
    assert used - exported == {"streamlearn_drift_detectd_total"}


def test_dashboard_json_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"]
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])


def test_provisioning_matches_the_dashboard_and_compose():
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    dashboard = json.loads(DASHBOARD.read_text())
    used = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert used <= uids
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    targets = {c["source"]: c["target"] for c in grafana["configs"]}
    assert Path(targets["grafana-dashboard"]).parent == Path(path)
    assert targets["grafana-datasources"].startswith("/etc/grafana/provisioning/datasources/")
    assert targets["grafana-dashboards"].startswith("/etc/grafana/provisioning/dashboards/")
    assert all(str(p).startswith("127.0.0.1:") for p in grafana["ports"])
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for source in targets:
        assert (ROOT / compose["configs"][source]["file"]).is_file()

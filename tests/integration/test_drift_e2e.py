"""Drift end to end on the real embedded broker: ``produce --drift-at`` -> the worker detects
it and resets the model -> the API shows it in ``/models/driftfraud/drift`` and ``/metrics``;
then a rollback requested over HTTP (bearer token) reaches the worker through the commands
topic and comes back in the history.  Worker and API are the processes users run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e import wait_json

from streamlearn.services.producer import produce
from streamlearn.services.worker.outputs import declare_topics

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

TOKEN = "drift-e2e-admin-token"
DRIFT_AT = 30_000
CONFIG = """
[kafka]
partitions = 1   # the worker reads events in the order produced (a backlog of several
                 # partitions is read one after the other: the change point smears)
models_topic = "drift.models"
commands_topic = "drift.commands"
deadletter_topic = "drift.deadletter"
[worker]
batch_within_s = 0.1
[api]
admin_token = "TOKEN"
[[model]]
name = "driftfraud"  # its own <model>.predictions topic on the shared test broker
topic = "drift.transactions"
label = "is_fraud"
numeric = ["amount", "hour", "distance_km", "card_age_days", "tx_last_hour"]
categorical = ["merchant_category", "country", "channel"]
hash_bits = 14
drift_params = { threshold = 0.2, warmup = 5000 }
drift_action = "reset"
drift_cooldown = 20000
""".replace("TOKEN", TOKEN)


@pytest.fixture(scope="module")
def stack(broker: str, tmp_path_factory: pytest.TempPathFactory,
          services: Callable[..., Any]) -> Iterator[dict[str, str]]:
    with services(tmp_path_factory.mktemp("drift"), CONFIG, broker,
                  {"STREAMLEARN_WORKER__REPLICA_ID": "drift-0"}) as stack:
        yield stack


def _logs(stack: dict[str, str]) -> str:
    return "\n".join(Path(stack["dir"], f"{n}.log").read_text(errors="replace")
                     for n in ("worker", "api"))


def _wait_drift(client: httpx.Client, stack: dict[str, str],
                predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
    return wait_json(client, stack, "/models/driftfraud/drift", predicate, timeout, poll=0.5)


def test_injected_drift_is_detected_acted_on_and_exposed(stack):
    with httpx.Client(base_url=stack["base"], timeout=10) as client:
        # One partition, created before anything is produced (an auto-created topic gets
        # the broker's default count), so the worker sees the events in produced order.
        asyncio.run(declare_topics(stack["bootstrap"], {"drift.transactions": {}}, 1, {}))
        sent = asyncio.run(produce(stack["bootstrap"], "drift.transactions", count=70_000,
                                   seed=4, drift_at=DRIFT_AT))
        assert sent == 70_000
        body = _wait_drift(client, stack, lambda b: b["actions"]["counts"]["reset"] >= 1, 150)
        concept = body["concept"]
        assert DRIFT_AT < concept["recent_drifts_at_event"][0] <= DRIFT_AT + 10_000
        assert concept["recent_drift_directions"][0] == "up"
        reset = body["actions"]["history"][0]
        assert reset["action"] == "reset" and reset["trigger"] == "concept_drift"
        assert reset["offsets"]["drift.transactions:0"] > DRIFT_AT  # where it happened
        metrics = client.get("/metrics").text
        assert 'streamlearn_drift_actions_total{action="reset",model="driftfraud"} 1.0' in metrics
        assert 'streamlearn_consumer_lag{model="driftfraud",partition="0"' in metrics

        assert client.post("/models/driftfraud/rollback").status_code == 401
        r = client.post("/models/driftfraud/rollback", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 202, r.text
        body = _wait_drift(client, stack, lambda b: b["actions"]["counts"]["rollback"] >= 1, 60)
        last = body["actions"]["history"][-1]
        assert (last["action"], last["trigger"]) == ("rollback", "manual")
    assert TOKEN not in _logs(stack)

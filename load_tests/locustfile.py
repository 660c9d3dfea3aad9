"""HTTP load on the streamlearn API: single and batch predictions, model listing.

Headless run with the bundled config (API on 127.0.0.1:8000 serving a model)::

    locust --config load_tests/locust.conf

Environment: ``STREAMLEARN_LOAD_MODEL`` (model name, default ``fraud``),
``STREAMLEARN_LOAD_BATCH`` (instances per batch request, default 32).
Debug one user in-process with ``python load_tests/locustfile.py``.
"""

from __future__ import annotations

import os
import random
from typing import Any

from locust import FastHttpUser, between, task

MODEL = os.environ.get("STREAMLEARN_LOAD_MODEL", "fraud")
BATCH = int(os.environ.get("STREAMLEARN_LOAD_BATCH", "32"))
_POOL_SIZE = 4096


def _event_pool(n: int = _POOL_SIZE) -> list[dict[str, Any]]:
    """Realistic unlabelled events (the seeded synthetic fraud stream)."""
    from streamlearn.synthetic import FraudStream

    events = FraudStream(seed=2024).take(n)
    for event in events:
        event.pop("is_fraud", None)
    return events


EVENTS = _event_pool()


class ApiUser(FastHttpUser):
    """A client scoring transactions, now and then in batches, and polling the model list."""

    host = "http://127.0.0.1:8000"
    wait_time = between(0.0, 0.01)

    @task(20)
    def predict_one(self) -> None:
        event = random.choice(EVENTS)
        with self.rest("POST", f"/models/{MODEL}/predict", json={"features": event},
                       name="/models/[name]/predict (1)") as resp:
            js = resp.js
            if js is None:
                return  # rest() already marked the failure (status or invalid JSON)
            score = js.get("score")
            if not isinstance(score, float) or not 0.0 <= score <= 1.0:
                resp.failure(f"score missing or outside [0, 1]: {score!r}")
            elif js.get("model") != MODEL or not isinstance(js.get("version"), int):
                resp.failure(f"bad envelope: {js}")

    @task(3)
    def predict_batch(self) -> None:
        start = random.randrange(0, len(EVENTS) - BATCH)
        with self.rest("POST", f"/models/{MODEL}/predict",
                       json={"instances": EVENTS[start : start + BATCH]},
                       name=f"/models/[name]/predict ({BATCH})") as resp:
            js = resp.js
            if js is not None and len(js.get("predictions", [])) != BATCH:
                resp.failure(f"expected {BATCH} predictions, got {len(js.get('predictions', []))}")

    @task(1)
    def list_models(self) -> None:
        with self.rest("GET", "/models") as resp:
            js = resp.js
            if js is not None and MODEL not in [m.get("name") for m in js]:
                resp.failure(f"model {MODEL!r} is not served")

    @task(1)
    def bad_input_is_422(self) -> None:
        with self.rest("POST", f"/models/{MODEL}/predict", json={"features": {"amount": "x"}},
                       name="/models/[name]/predict (invalid)") as resp:
            if resp.status_code == 422:
                resp.success()
            else:
                resp.failure(f"invalid body answered {resp.status_code}, expected 422")


if __name__ == "__main__":
    from locust import run_single_user

    run_single_user(ApiUser)

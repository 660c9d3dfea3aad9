"""The dashboard in a real headless Chromium, against a running API whose model learns live.

A learner thread plays the worker's part: it learns the fraud stream (which drifts after
``DRIFT_AT`` events, as ``streamlearn produce --drift-at`` does) and hands a snapshot to
the API's store every few tenths of a second, so the page polls a system that moves.
The browser loads the page (uPlot from the package: no internet), and the test reads
back the DOM counters the page keeps (charts built, points drawn, polls) and looks at a
screenshot: the chart series' colour must be on it.

Skipped with the reason when Debian's ``chromium`` is absent (``make test-setup``
installs it); nothing is installed at run time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from streamlearn import snapshots
from streamlearn.broker import free_port
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.services.api.main import create_app
from streamlearn.serving import ModelStore
from streamlearn.synthetic import FraudStream

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="no chromium on PATH (Debian package chromium; "
                                       "make test-setup installs it)")

SPEC = ModelSpec(
    name="fraud", topic="transactions", label="is_fraud",
    numeric=("amount", "hour", "distance_km", "card_age_days", "tx_last_hour"),
    categorical=("merchant_category", "country", "channel"),
    hash_bits=12, drift_reference_size=3000, drift_params={"threshold": 0.1, "warmup": 3000},
    drift_action="reset", drift_cooldown=20_000,
)
DRIFT_AT = 12_800


class KafkaCfg(BaseModel):
    bootstrap: str = ""


class ApiCfg(BaseModel):
    host: str = "127.0.0.1"
    port: int = 0


class Cfg(BaseModel):
    kafka: KafkaCfg = KafkaCfg()
    api: ApiCfg = ApiCfg()


def learner(store: ModelStore, stop: threading.Event, spec: ModelSpec = SPEC,
            per_tick: int = 1024, tick_s: float = 0.25) -> None:
    """Learn the drifting fraud stream and publish a snapshot per tick (the worker's part)."""
    model = OnlineModel(spec, device="cpu")
    stream = FraudStream(seed=3)
    while not stop.is_set():
        if model.n_seen >= DRIFT_AT and not stream.drifted:
            stream.drift()
        batch, _ = model.vectorizer.transform_many(stream.take(per_tick))
        model.process_many(batch)
        state = model.to_state() | {"replica": "r1", "telemetry": {"consumed": model.n_seen}}
        store.offer("fraud/r1", snapshots.encode(state))
        stop.wait(tick_s)


@pytest.fixture()
def live_api() -> Iterator[str]:
    store = ModelStore()
    app = create_app(Cfg(), store=store, registry=CollectorRegistry())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    stop = threading.Event()
    learning = threading.Thread(target=learner, args=(store, stop), daemon=True)
    learning.start()
    deadline = time.monotonic() + 20
    while not (server.started and store.get("fraud")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started and store.get("fraud") is not None
    yield f"http://127.0.0.1:{port}"
    stop.set()
    server.should_exit = True
    learning.join(10)
    serving.join(10)


def browse(url: str, out: Path, *, wait_ms: int, size: str = "1600,1500") -> str:
    """Load ``url`` in headless Chromium for ``wait_ms``; screenshot to ``out``; the DOM."""
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-first-run", "--disable-extensions", "--disable-background-networking",
            f"--user-data-dir={out.parent / 'profile'}", f"--window-size={size}",
            f"--virtual-time-budget={wait_ms}", "--run-all-compositor-stages-before-draw"]
    env = {**os.environ, "HOME": str(out.parent)}
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, timeout=120,
                         env=env, check=True).stdout.decode()
    subprocess.run([*base, f"--screenshot={out}", url], capture_output=True, timeout=120,
                   env=env, check=True)
    return dom


def test_dashboard_loads_draws_live_charts_and_takes_a_screenshot(live_api, tmp_path):
    time.sleep(3.0)  # the model passes its reference window and the drift point
    dom = browse(f"{live_api}/dashboard", tmp_path / "dashboard.png", wait_ms=6000)
    body = re.search(r"<body[^>]*>", dom).group(0)
    counters = {k: int(v) for k, v in re.findall(r'data-(charts|points|polls)="(\d+)"', body)}
    assert counters.get("charts") == 3, body  # events/s, quality, drift per feature
    assert counters["polls"] >= 2 and counters["points"] >= 2, body
    assert "uplot" in dom  # the vendored library built its charts
    assert "Model fraud" in dom and "amount" in dom and "data drift" in dom
    import numpy as np
    from PIL import Image

    shot = np.asarray(Image.open(tmp_path / "dashboard.png").convert("RGB")).astype(int)
    assert shot.shape[1] >= 1200
    # The first series' colour (#2f6fdf) is drawn: the charts have data on them.
    blue = int((np.abs(shot - [0x2F, 0x6F, 0xDF]).max(axis=2) < 12).sum())
    assert blue > 200, blue
    keep = os.environ.get("STREAMLEARN_DASHBOARD_PNG")
    if keep:  # make docs/dashboard.png this way (README)
        shutil.copy(tmp_path / "dashboard.png", keep)


def test_spec_used_by_the_browser_test_drifts_and_acts():
    """The learner's stream does drift and the policy acts (else the page shows nothing)."""
    model = OnlineModel(replace(SPEC), device="cpu")
    stream = FraudStream(seed=3)
    while model.n_seen < DRIFT_AT + 12_000:
        if model.n_seen >= DRIFT_AT and not stream.drifted:
            stream.drift()
        batch, _ = model.vectorizer.transform_many(stream.take(1024))
        model.process_many(batch)
    assert model.concept_drift.n_drifts >= 1
    assert model.drift_actions.counts["reset"] >= 1

"""``streamlearn demo``: broker, worker, API and producer, with a live status line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from streamlearn.broker import EmbeddedBroker
from streamlearn.services.producer import produce
from streamlearn.settings import Settings

NORMAL = {
    "amount": 32.0,
    "hour": 13.5,
    "distance_km": 4.0,
    "card_age_days": 900,
    "tx_last_hour": 0,
    "merchant_category": "grocery",
    "country": "FR",
    "channel": "pos",
}
SUSPICIOUS = {
    "amount": 940.0,
    "hour": 3.2,
    "distance_km": 1900.0,
    "card_age_days": 40,
    "tx_last_hour": 4,
    "merchant_category": "gift_cards",
    "country": "NG",
    "channel": "online",
}


def _spawn(command: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamlearn", command], env=env, stdin=subprocess.DEVNULL
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _status(client: httpx.AsyncClient, model: str) -> dict[str, Any] | None:
    try:
        info = (await client.get(f"/models/{model}")).json()
        preds = await client.post(
            f"/models/{model}/predict", json={"instances": [NORMAL, SUSPICIOUS]}
        )
        info["sample"] = preds.json().get("predictions")
        return info  # type: ignore[no-any-return]
    except (httpx.HTTPError, ValueError):
        return None


async def _drive(
    settings: Settings,
    bootstrap: str,
    rate: float,
    duration: float | None,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    spec = settings.specs[0]
    base = f"http://{settings.api.host}:{settings.api.port}"
    stop = asyncio.Event()
    producer = asyncio.create_task(produce(bootstrap, spec.topic, rate=rate, stop=stop,
                                           client_kwargs=settings.kafka.client_kwargs()))
    tty = sys.stdout.isatty()
    t0 = time.monotonic()
    last_seen, last_t = 0, t0
    async with httpx.AsyncClient(base_url=base, timeout=2.0) as client:
        while duration is None or time.monotonic() - t0 < duration:
            await asyncio.sleep(1.0)
            if producer.done():
                producer.result()  # re-raise a producer failure
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a child process exited (code {dead[0].returncode})")
            info = await _status(client, spec.name)
            now = time.monotonic()
            if info is None or "version" not in info:
                line = f"[{now - t0:5.0f}s] waiting for the first snapshot ..."
            else:
                seen = int(info.get("events_seen", 0))
                per_s = (seen - last_seen) / (now - last_t)
                last_seen, last_t = seen, now
                metrics = info.get("metrics", {})
                auc = metrics.get("auc")
                sample = info.get("sample") or [float("nan"), float("nan")]
                line = (
                    f"[{now - t0:5.0f}s] {per_s:7,.0f} events/s | model v{info['version']} "
                    f"| seen {seen:,} | rolling AUC {auc if auc is None else f'{auc:.3f}'} "
                    f"| p(fraud) normal={sample[0]:.3f} suspicious={sample[1]:.3f}"
                )
            print(("\r" + line.ljust(118)) if tty else line, end="" if tty else "\n", flush=True)
    stop.set()
    await producer


def child_env(config: Path | None, bootstrap: str, embedded: bool) -> dict[str, str]:
    """Environment of every process the demo starts: the same config file (absolute, so a
    ``-c FILE`` given relative to any directory reaches them) and the same broker."""
    env = {**os.environ, "STREAMLEARN_KAFKA__BOOTSTRAP": bootstrap}
    if config is not None:
        env["STREAMLEARN_CONFIG"] = str(Path(config).resolve())
    if embedded:
        env["STREAMLEARN_KAFKA__FAST_JOIN"] = "true"
    return env


def run(settings: Settings, *, rate: float = 3000.0, duration: float | None = None,
        config: Path | None = None) -> int:
    """Start everything, print where to look, stream status until Ctrl-C or ``duration``.

    ``config`` is the file ``settings`` came from; the worker and API read it too.
    """
    if not settings.specs:
        print("the demo needs at least one [[model]] in the config", file=sys.stderr)
        return 2
    broker = None
    bootstrap = settings.kafka.bootstrap
    if not bootstrap:
        broker = EmbeddedBroker(port=settings.kafka.embedded_port).start()
        bootstrap = broker.bootstrap
    env = child_env(config, bootstrap, broker is not None)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(_spawn("worker", env))
        procs.append(_spawn("api", env))
        base = f"http://{settings.api.host}:{settings.api.port}"
        name = settings.specs[0].name
        print(
            f"""streamlearn demo: {rate:,.0f} synthetic card transactions/s, about 1% fraud
  broker     {bootstrap}{" (embedded Tansu, memory only)" if broker else ""}
  dashboard  {base}/dashboard
  API docs   {base}/docs
  metrics    {base}/metrics
  try        curl -s -X POST {base}/models/{name}/predict -H 'content-type: application/json' \\
               -d '{{"features": {{"amount": 940, "hour": 3, "country": "NG"}}}}'
Ctrl-C stops everything.
""",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_drive(settings, bootstrap, rate, duration, procs))
        print()
        return 0
    except RuntimeError as exc:
        print(f"\ndemo stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs):
            _stop(proc)
        if broker is not None:
            broker.stop()
        print("stopped worker, API and broker", flush=True)

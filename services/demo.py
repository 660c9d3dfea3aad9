"""``streamlearn demo``: broker, worker, API and producer, with a live status line.

Memory of the embedded broker
-----------------------------
Tansu 0.6 keeps every record in memory and never compacts or expires anything: at the
demo's default 3,000 events/s it grew by 87.5 MiB/min (input and prediction records;
snapshots are ~37 KiB each).  Deleting records closes the connection (DeleteRecords),
deleting a topic frees its memory, and a restarted Tansu starts empty.  So the demo
*recycles* its embedded broker: once the broker's RSS passes ``recycle_mb`` it pauses
the producer, waits (bounded) until the worker has committed every event it sent,
restarts the broker on the same port, and resumes.  Nothing the demo needs is lost:
the worker keeps its model in its local checkpoint and rejoins the new broker (it
re-declares its topics, whose offsets start again at 0); the API's snapshot feed
notices the reset and takes the worker's next snapshot; the input and prediction
history are what is dropped.  The broker's memory therefore stays under about
``recycle_mb`` plus one second of growth, whatever the demo's length.
"""

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
from streamlearn.services.producer import DelayedLabels, produce
from streamlearn.settings import Settings

#: Embedded broker RSS past which the demo restarts it empty (see the module docstring).
RECYCLE_BROKER_MB = 512.0
#: Labels reach ``<model>.labels`` this many seconds (wall clock) after their events, and
#: this fraction of events is never labelled (``streamlearn demo --label-delay``).
LABEL_DELAY_S = 5.0
UNLABELLED_FRACTION = 0.05
#: Share of the fraud in the patterns only entity aggregates catch (card testing, far from
#: the usual country; :class:`~streamlearn.synthetic.FraudStream`). At 0.4 the linear model
#: reached ROC AUC ~0.91 (aggregates help it most there: load_tests/bench_fraud.py); at
#: 0.15 it stays above 0.95 (0.959-0.963 on events 100k-200k, seeds 0-1), where the demo
#: is meant to show a model that works, with aggregates adding to it.
ENTITY_FRAUD = 0.15

NORMAL = {
    "amount": 32.0,
    "hour": 13.5,
    "distance_km": 4.0,
    "card_age_days": 900,
    "tx_last_hour": 0,
    "merchant_category": "grocery",
    "country": "FR",
    "channel": "pos",
    # The model's aggregates need the event time and the card; an unseen card has no
    # history, so its aggregates are those of this one event.
    "ts": 1_700_000_000.0,
    "card_id": "card-demo-1",
    "card_country": "card-demo-1|FR",
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
    "ts": 1_700_000_000.0,
    "card_id": "card-demo-2",
    "card_country": "card-demo-2|NG",
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


class _Producer:
    """The synthetic producer task; restartable, with a fresh seed each generation."""

    def __init__(self, settings: Settings, bootstrap: str, rate: float,
                 label_delay: float | None = None,
                 unlabelled_fraction: float = UNLABELLED_FRACTION) -> None:
        self.settings, self.bootstrap, self.rate = settings, bootstrap, rate
        self.label_delay, self.unlabelled_fraction = label_delay, unlabelled_fraction
        self.labels: DelayedLabels | None = None
        self.generation = 0
        self.stop = asyncio.Event()
        self.task = self._start()

    def _start(self) -> asyncio.Task[int]:
        self.stop = asyncio.Event()
        spec = self.settings.specs[0]
        if self.label_delay is not None:
            self.labels = DelayedLabels(spec.labels_topic, spec.id_field, spec.label,
                                        self.label_delay, self.unlabelled_fraction,
                                        seed=self.generation)
        return asyncio.create_task(produce(
            self.bootstrap, spec.topic, rate=self.rate, stop=self.stop,
            seed=self.generation, client_kwargs=self.settings.kafka.client_kwargs(),
            labels=self.labels, entity_fraud=ENTITY_FRAUD))

    async def pause(self) -> None:
        self.stop.set()
        await self.task

    def resume(self) -> None:
        self.generation += 1
        self.task = self._start()


async def input_committed(bootstrap: str, topic: str, group: str,
                          client_kwargs: dict[str, Any] | None = None,
                          timeout_s: float = 20.0) -> bool:
    """Wait until ``group`` has committed every record of ``topic``; False on timeout.

    The ends come from a fetch's high watermarks: Tansu 0.6 answers ListOffsets with
    too small an offset (measured).
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    kw = client_kwargs or {}
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **kw)
    group_view = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                  enable_auto_commit=False, **kw)
    await reader.start()
    await group_view.start()
    try:
        await reader.topics()
        tps = [TopicPartition(topic, p) for p in reader.partitions_for_topic(topic) or ()]
        if not tps:
            return True
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await reader.getmany(timeout_ms=200, max_records=1)
            ends = {tp: reader.highwater(tp) for tp in tps}
            if all(end is not None for end in ends.values()):
                done = [(await group_view.committed(tp) or 0) >= (ends[tp] or 0) for tp in tps]
                if all(done):
                    return True
            await asyncio.sleep(0.2)
        return False
    finally:
        await reader.stop()
        await group_view.stop()


async def _recycle(settings: Settings, broker: EmbeddedBroker, producer: _Producer) -> str:
    """Pause, let the worker catch up, restart the embedded broker empty, resume."""
    rss = (broker.rss_bytes() or 0) / 2**20
    await producer.pause()
    caught_up = await input_committed(broker.bootstrap, settings.specs[0].topic,
                                      settings.worker.app_id, settings.kafka.client_kwargs())
    # Not on a thread: the broker dies with the thread that started it (PR_SET_PDEATHSIG
    # fires when that thread exits), and the producer is paused meanwhile anyway.
    broker.restart()
    producer.resume()
    note = "" if caught_up else " (the worker had not committed every event: some dropped)"
    return (f"recycled the embedded broker at {rss:,.0f} MiB -> "
            f"{(broker.rss_bytes() or 0) / 2**20:,.0f} MiB{note}")


async def _drive(
    settings: Settings,
    bootstrap: str,
    rate: float,
    duration: float | None,
    procs: list[subprocess.Popen[bytes]],
    broker: EmbeddedBroker | None = None,
    recycle_mb: float = 0.0,
    label_delay: float | None = None,
    unlabelled_fraction: float = UNLABELLED_FRACTION,
) -> None:
    spec = settings.specs[0]
    base = f"http://{settings.api.host}:{settings.api.port}"
    producer = _Producer(settings, bootstrap, rate, label_delay, unlabelled_fraction)
    tty = sys.stdout.isatty()
    t0 = time.monotonic()
    last_seen, last_t = 0, t0
    async with httpx.AsyncClient(base_url=base, timeout=2.0) as client:
        while duration is None or time.monotonic() - t0 < duration:
            await asyncio.sleep(1.0)
            if producer.task.done():
                producer.task.result()  # re-raise a producer failure
            if (broker is not None and recycle_mb
                    and (broker.rss_bytes() or 0) > recycle_mb * 2**20):
                note = await _recycle(settings, broker, producer)
                print(("\r" if tty else "") + f"[{time.monotonic() - t0:5.0f}s] {note}".ljust(118),
                      flush=True)
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
                auc, pr_auc = metrics.get("auc"), metrics.get("pr_auc")
                sample = info.get("sample") or [float("nan"), float("nan")]
                joined = (info.get("labels") or {}).get("joined")
                line = (
                    f"[{now - t0:5.0f}s] {per_s:7,.0f} events/s | model v{info['version']} "
                    f"| seen {seen:,} | rolling AUC {_num(auc)} PR AUC {_num(pr_auc)} "
                    + (f"| labels joined {joined:,} " if label_delay is not None
                       and isinstance(joined, int) else "")
                    + f"| p(fraud) normal={sample[0]:.3f} suspicious={sample[1]:.3f}"
                )
            if broker is not None:
                line += f" | broker {(broker.rss_bytes() or 0) / 2**20:,.0f} MiB"
            print(("\r" + line.ljust(118)) if tty else line, end="" if tty else "\n", flush=True)
    await producer.pause()


def _num(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.3f}"


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
        config: Path | None = None, recycle_mb: float = RECYCLE_BROKER_MB,
        label_delay: float | None = LABEL_DELAY_S,
        unlabelled_fraction: float = UNLABELLED_FRACTION) -> int:
    """Start everything, print where to look, stream status until Ctrl-C or ``duration``.

    ``config`` is the file ``settings`` came from; the worker and API read it too.
    ``recycle_mb``: restart the embedded broker empty past this RSS (0: never).
    ``label_delay``: labels follow their events on ``<model>.labels`` this many seconds
    later (None or negative: labels on the events); ``unlabelled_fraction`` never do.
    """
    if not settings.specs:
        print("the demo needs at least one [[model]] in the config", file=sys.stderr)
        return 2
    if label_delay is not None and label_delay < 0:
        label_delay = None
    if not 0.0 <= unlabelled_fraction <= 1.0:
        print(f"--unlabelled-fraction must be in [0, 1], got {unlabelled_fraction}",
              file=sys.stderr)
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
        spec = settings.specs[0]
        labels = ("labels on the events" if label_delay is None else
                  f"labels on {spec.labels_topic} {label_delay:g} s later, "
                  f"{unlabelled_fraction:.0%} never")
        aggregates = (f"{len(spec.aggregate_names)} entity aggregates "
                      f"({', '.join(sorted({a.entity for a in spec.aggregates}))})"
                      if spec.aggregates else "no entity aggregates")
        print(
            f"""streamlearn demo: {rate:,.0f} synthetic card transactions/s, about 1% fraud
  model      {name}: {aggregates}; {labels}
  broker     {bootstrap}{" (embedded Tansu, memory only)" if broker else ""}
  dashboard  {base}/dashboard
  API docs   {base}/docs
  metrics    {base}/metrics
  try        curl -s -X POST {base}/models/{name}/predict -H 'content-type: application/json' \\
               -d '{{"features": {{"amount": 940, "hour": 3, "country": "NG", "ts": 1700000000}}}}'
Ctrl-C stops everything.
""",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_drive(settings, bootstrap, rate, duration, procs, broker, recycle_mb,
                               label_delay, unlabelled_fraction))
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

"""The Faust worker: one agent per model spec, plus a snapshot timer.

Everything numerical happens in ``streamlearn.pipeline.ModelRunner``; this
module only moves bytes between Kafka and the runners.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import faust
from streamlearn.services.worker.outputs import Outputs, declare_topics

from streamlearn import snapshots
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.pipeline import ModelRunner, Record, Telemetry
from streamlearn.settings import Settings

log = logging.getLogger("streamlearn.worker")


def faust_settings(settings: Settings, bootstrap: str) -> dict[str, Any]:
    """Faust keyword settings, tuned for the embedded broker unless told otherwise.

    Tansu holds a new group's JoinGroup for about half the session timeout, so
    Faust's default 60 s session makes a worker wait ~30 s to consume. A short
    session trades that for a risk of spurious rebalances during long batches,
    which our sub-second mini-batches do not have; a real Kafka keeps defaults.
    """
    w = settings.worker
    session = w.session_timeout_s or (2.0 if settings.fast_join else None)
    heartbeat = w.heartbeat_interval_s or (0.5 if settings.fast_join else None)
    opts: dict[str, Any] = {
        "broker": f"kafka://{bootstrap}",
        "store": "memory://",
        "web_enabled": False,
        "topic_partitions": settings.kafka.partitions,
        "consumer_auto_offset_reset": "earliest",
        "producer_linger": 0.005,
        "stream_wait_empty": False,
    }
    if session:
        opts["broker_session_timeout"] = session
        opts["broker_rebalance_timeout"] = session * 2
    if heartbeat:
        opts["broker_heartbeat_interval"] = heartbeat
    return opts


def snapshot_path(snapshot_dir: str, model: str, replica: str) -> Path:
    """Local checkpoint file of one model shard (survives a full broker restart)."""
    return Path(snapshot_dir) / f"{model}--{replica}.snap"


def restore_runner(spec: ModelSpec, settings: Settings) -> ModelRunner:
    """Resume from the local checkpoint when one matches the spec, else start fresh."""
    path = snapshot_path(settings.worker.snapshot_dir, spec.name, settings.worker.replica_id)
    emit = settings.worker.emit_predictions
    if path.exists():
        try:
            state = snapshots.load(path)
            model = OnlineModel.from_state(state, device=spec.device)
            if model.spec == spec:
                log.warning("restored %s v%d from %s", spec.name, model.version, path)
                return ModelRunner(model, Telemetry.from_dict(state.get("telemetry", {})), emit)
            log.warning("checkpoint %s has another spec; starting %s fresh", path, spec.name)
        except ValueError as exc:
            log.error("ignoring unreadable checkpoint %s: %s", path, exc)
    return ModelRunner(OnlineModel(spec), emit_predictions=emit)


class WorkerRuntime:
    """Runners, topics and snapshot publishing for one worker process."""

    def __init__(self, app: faust.App, settings: Settings, bootstrap: str) -> None:
        self.app = app
        self.settings = settings
        self.bootstrap = bootstrap
        self.outputs = Outputs(bootstrap)
        self.ready = asyncio.Event()
        self.replica = settings.worker.replica_id
        self.runners: dict[str, ModelRunner] = {}
        self._published: dict[str, int] = {}
        self._snapshot_lock = asyncio.Lock()
        for spec in settings.specs:
            self.runners[spec.name] = restore_runner(spec, settings)
            self._register_agent(spec)

        app.task(self.start_outputs)
        app.on_before_shutdown.connect(self.on_shutdown)

        async def snapshot_tick() -> None:  # Faust passes the app to one-argument timers
            await self.publish_snapshots()

        app.timer(settings.worker.snapshot_interval_s, on_leader=False)(snapshot_tick)

    def topic_configs(self) -> dict[str, dict[str, str]]:
        """Every topic the worker reads or writes, with its configuration."""
        k = self.settings.kafka
        topics: dict[str, dict[str, str]] = {k.models_topic: {"cleanup.policy": "compact"},
                                             k.deadletter_topic: {}}
        for spec in self.settings.specs:
            topics[spec.topic] = {}
            topics[f"{spec.name}.predictions"] = {}
        return topics

    async def start_outputs(self) -> None:
        """Declare topics and start the output producer before agents send anything."""
        await declare_topics(self.bootstrap, self.topic_configs(), self.settings.kafka.partitions)
        await self.outputs.start()
        self.ready.set()

    async def on_shutdown(self, app: faust.App, **_: object) -> None:
        """Last snapshot, then flush outputs."""
        if self.ready.is_set():
            await self.publish_snapshots()
            await self.outputs.stop()

    def _register_agent(self, spec: ModelSpec) -> None:
        app, runner = self.app, self.runners[spec.name]
        topic = app.topic(spec.topic, value_serializer="raw", key_serializer="raw")
        within = self.settings.worker.batch_within_s
        outputs, deadletter = self.outputs, self.settings.kafka.deadletter_topic
        pred_topic = f"{spec.name}.predictions"

        async def learn(stream: faust.StreamT[bytes]) -> None:
            await self.ready.wait()
            async for events in stream.take_events(spec.batch_size, within=within):
                records = [
                    Record(e.value, e.message.topic, e.message.partition, e.message.offset)
                    for e in events
                ]
                out = runner.handle(records)
                await outputs.send_many(pred_topic, out.predictions)
                for dead in out.dead:
                    log.warning("dead-lettered %s offset %d: %s",
                                dead.record.topic, dead.record.offset, dead.reason)
                    await outputs.send(deadletter, spec.name.encode(), dead.encode(spec.name))

        learn.__name__ = f"learn_{spec.name}"
        app.agent(topic, name=f"streamlearn.learn.{spec.name}")(learn)

    async def publish_snapshots(self, *, force: bool = False) -> int:
        """Publish and checkpoint each model that changed since its last snapshot."""
        sent = 0
        async with self._snapshot_lock:
            for name, runner in self.runners.items():
                version = runner.model.version
                if not force and self._published.get(name) == version:
                    continue
                state = runner.snapshot_state(self.replica)  # copies, so learning may go on
                payload = await asyncio.to_thread(snapshots.encode, state)
                key = f"{name}/{self.replica}".encode()
                await self.outputs.send(self.settings.kafka.models_topic, key, payload)
                path = snapshot_path(self.settings.worker.snapshot_dir, name, self.replica)
                await asyncio.to_thread(snapshots.save, path, payload)
                self._published[name] = version
                sent += 1
        return sent


def build_app(settings: Settings, bootstrap: str) -> tuple[faust.App, WorkerRuntime]:
    """A Faust app with one learning agent per model spec."""
    app = faust.App(settings.worker.app_id, **faust_settings(settings, bootstrap))
    runtime = WorkerRuntime(app, settings, bootstrap)
    return app, runtime

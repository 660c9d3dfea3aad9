"""The Faust worker: one agent per model spec, plus snapshot, flush and merge timers.

Everything numerical happens in ``streamlearn.pipeline.ModelRunner``; this module moves
bytes between Kafka and the runners. The pieces live in their own modules:
:mod:`.faust_compat` (everything that depends on Faust 0.15's quirks: bundling, the
commit-per-bundle rule, settings), :mod:`.checkpoint` (the at-least-once protocol, one
``Checkpoint.commit``), :mod:`.merging` (replicas that train as one model) and
:mod:`.restore`. :class:`Feeder` learns jobs in order on one thread per model (model
state is only touched there) and acks them once a checkpoint covers them. Why it is
shaped this way, with the measurements: README, "Performance", worker notes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import gc
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import faust
from aiokafka.errors import KafkaError
from faust.types import EventT

from streamlearn import replicas, snapshots
from streamlearn.config import ModelSpec
from streamlearn.drift.concept import defer_detector_import, load_detectors_in_background
from streamlearn.logs import RateLimitedLog
from streamlearn.services.worker import merging, observe, restore
from streamlearn.services.worker.checkpoint import Checkpoint, snapshot_path
from streamlearn.services.worker.faust_compat import (  # re-exported: worker API and tests
    Bundle,
    PromptTableManager,  # noqa: F401
    bundling_scheduler,  # noqa: F401
    commit_bundles,
    faust_credentials,  # noqa: F401
    faust_settings,
)
from streamlearn.services.worker.outputs import Backoff, Outputs, declare_topics
from streamlearn.settings import Settings

if TYPE_CHECKING:  # the model stack (numba kernels) loads on a thread while Faust starts
    from streamlearn.pipeline import Block, ModelRunner, Outcome

log = logging.getLogger("streamlearn.worker")
#: Repeated conditions (dead letters, an outage, a failing checkpoint): one line per key
#: per interval, with the count of the lines it stood for.
limited = RateLimitedLog(log, interval_s=10.0)

#: A job for the learning thread is flushed at ``batch_size`` messages or this many bytes
#: (a batch record of a few hundred rows is worth a flush on its own).
FLUSH_BYTES = 64 * 1024
#: Jobs queued ahead of the learning thread before the agent stops pulling bundles.
MAX_JOBS_AHEAD = 2
#: Longest a shutdown waits for queued learning before it gives up on it.
SHUTDOWN_DRAIN_S = 10.0
#: Longest the import of river's drift detectors waits for the worker to catch up.
DRIFT_IMPORT_DELAY_S = 30.0
#: Idle time after which the worker counts as caught up (a fetch can stall ~0.5 s at start).
CAUGHT_UP_IDLE_S = 2.0
#: How long a delivery may stay unacknowledged before the worker checks the topics exist.
DELIVERY_CHECK_S = 2.0
#: Shortest interval between two declarations of the worker's topics after start.
REDECLARE_EVERY_S = 5.0
#: Longest a partition new to this replica waits for the models topic feed, to find the
#: previous owner's entities and waiting events.
TAKE_OVER_WAIT_S = 5.0
#: Cyclic-GC thresholds while streaming (CPython's default is 700, 10, 10).
GC_THRESHOLDS = (20_000, 20, 20)


def restore_runner(spec: ModelSpec, settings: Settings,
                   latest: dict[str, bytes] | None = None, *, replica: str | None = None,
                   restored: dict[str, dict[str, Any]] | None = None) -> ModelRunner:
    """Resume from the newest matching snapshot: the local checkpoint, or one on the models
    topic (``latest``, from :func:`restore.read_latest`) when that is newer; else fresh.
    The state resumed from goes to ``restored[spec.name]`` (its merge lineage)."""
    from streamlearn.models import OnlineModel
    from streamlearn.pipeline import ModelRunner, Telemetry

    replica = replica or merging.replica_id(settings)
    path = snapshot_path(settings.worker.snapshot_dir, spec.name, replica)
    emit = settings.worker.emit_predictions
    local = None
    if path.exists():
        try:
            local = restore.Candidate(str(path), replica, snapshots.load(path))
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable checkpoint %s: %s", path, exc)
    remote = restore.topic_candidates(
        spec.name, latest or {}, lambda payload, key: decode_snapshot(settings, spec, payload,
                                                                      key))
    # A sibling that merges shares its learning through <model>/@merged: warm-start from
    # that (or fresh), never from the sibling's shard, whose delta the merge counts already.
    remote = [c for c in remote if c.replica in (replica, replicas.MERGED)
              or not replicas.meta(c.state)]
    tried: set[int] = set()
    while True:
        pool = [c for c in remote if id(c) not in tried]
        use_local = local if local is not None and id(local) not in tried else None
        best = restore.choose(use_local, pool, replica)
        if best is None:
            break
        tried.add(id(best))
        try:
            model = OnlineModel.from_state(best.state, device=spec.device)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("ignoring snapshot from %s: %s", best.source, exc)
            continue
        if model.spec != spec:
            log.warning("snapshot from %s has another spec; not restoring it", best.source)
            continue
        log.warning("restored %s v%d (%d events learned) from %s", spec.name, model.version,
                    model.n_learned, best.source)
        if restored is not None:
            restored[spec.name] = dict(best.state, replica=best.replica)
        return ModelRunner(model, Telemetry.from_dict(best.state.get("telemetry", {})), emit)
    return ModelRunner(OnlineModel(spec), emit_predictions=emit)


def decode_snapshot(settings: Settings, spec: ModelSpec, payload: bytes,
                    kafka_key: str) -> dict[str, Any]:
    """A snapshot of ``spec`` from the models topic: size-bounded by the spec before
    anything is allocated, and signed under ``kafka.snapshot_key`` when one is set (or
    when ``api.require_signed_snapshots`` says so), as the API requires."""
    from streamlearn.serving import SnapshotPolicy, state_limits

    policy = SnapshotPolicy(key=settings.kafka.snapshot_key,
                            require_signature=settings.api.require_signed_snapshots)
    return snapshots.decode(payload, key=policy.key, context=kafka_key,
                            require_signature=policy.signatures_required,
                            limits=state_limits(spec))


def warm_up(runner: ModelRunner) -> None:
    """Load the model's compiled kernels now (~0.3 s from numba's cache), not on event one.

    A tiny twin of the model (same task, optimizer and device; 2 hashed slots) calls the
    same kernel signatures without touching the real model or allocating its weights:
    the learning step, and the data-drift monitor's (a one-row reference, frozen; a
    second row, held and folded by a read). The model's own JSON decoder reads one empty
    event, which builds its compiled scanner (it learns nothing from it). On an empty
    cache (a new image, or a cache in ``/tmp``) these compile here, ~15 s, plus ~10 s for
    the scanner, instead of stalling the stream later.
    """
    from streamlearn.models import OnlineModel

    rows = runner.model.spec.update_rows  # one mini-batch: the smallest the spec allows
    spec = dataclasses.replace(runner.model.spec, hash_bits=1, batch_size=rows,
                               drift_reference_size=1)
    scratch = OnlineModel(spec, device=runner.model.backend.name)
    batch, _ = scratch.vectorizer.transform_many([{spec.label: i % 2} for i in range(rows + 1)])
    scratch.process_many(batch)
    scratch.data_drift.scores()
    runner.json.decode([b"{}"])


def as_block(event: EventT) -> Block:
    """The Faust event's records as a pipeline block (a bundle, or one plain message)."""
    from streamlearn.pipeline import Block

    msg, value = event.message, event.value
    if isinstance(value, Bundle):
        return Block(msg.topic, msg.partition, value.offsets, value.values)
    return Block(msg.topic, msg.partition, [msg.offset], [value])


class Unreleased(NamedTuple):
    """A learned job waiting for its checkpoint and the delivery of its outputs."""

    seq: int
    job: list[tuple[EventT, Block]]
    out: Outcome
    futures: list[asyncio.Future[Any]]
    nbytes: int


def _nbytes(event: EventT) -> int:
    value = event.value
    return value.nbytes if isinstance(value, Bundle) else len(value or b"")


class FeederHost(Protocol):
    """What a :class:`Feeder` needs from the process around it (the runtime, or a test's
    stand-in): settings, its outputs and their health, topic re-declaration, the commit,
    and a way to stop the worker. Model state is the Feeder's own, on its learner thread."""

    settings: Settings

    async def send_outcome(self, spec: ModelSpec, out: Outcome) -> list[asyncio.Future[Any]]:
        ...

    async def ensure_topics(self, *, force: bool = False) -> None:
        ...

    async def take_over(self, feeder: Feeder, partition: int) -> None:
        ...

    def output_failed(self, exc: BaseException) -> None:
        ...

    def output_recovered(self) -> None:
        ...

    async def commit(self, topic: str, bundles: int) -> None:
        ...

    async def crash(self, exc: BaseException) -> None:
        ...


class Feeder:
    """Mini-batches of bundles, learned in order on one thread, acked once checkpointed.

    Two stages joined by small queues, so the learning thread never waits on the
    network: ``run`` hands job N+1 to the thread while ``_finish`` sends job N's
    outputs.  A job's events are acked (so Faust commits them) only once a saved
    snapshot includes the job: after a crash the replica restores that snapshot and
    Kafka redelivers everything after it, so no event is lost and at most one
    snapshot interval is learned twice.
    """

    def __init__(self, runtime: FeederHost, spec: ModelSpec, runner: ModelRunner) -> None:
        self.runtime = runtime
        self.spec = spec
        self.runner = runner
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"learn-{spec.name}")
        self.pending: list[tuple[EventT, Block]] = []
        self.pending_msgs = 0
        self.pending_bytes = 0
        self.pending_since = 0.0
        self.last_add = 0.0
        self.jobs: asyncio.Queue[list[tuple[EventT, Block]]] = asyncio.Queue(MAX_JOBS_AHEAD)
        self.learned: asyncio.Queue[tuple[int, list[tuple[EventT, Block]], Outcome]] = (
            asyncio.Queue(MAX_JOBS_AHEAD))
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.learned_seq = 0  # jobs in the model; written and read on the learner thread
        self.checkpointed_seq = 0  # jobs covered by the newest saved snapshot
        # Learned jobs whose outputs are queued, waiting for a checkpoint to be acked.
        self.unreleased: collections.deque[Unreleased] = collections.deque()
        self._release_lock = asyncio.Lock()
        # Input bytes consumed but not yet acked: bounded, so that a checkpoint that keeps
        # failing (or an outage) stops consumption instead of growing memory.
        self.held_bytes = 0
        self.next_offset: dict[tuple[str, int], int] = {}
        self.max_held_bytes = int(runtime.settings.worker.max_unacked_mb * 1024 * 1024)
        self.capture_s = 0.0  # the last snapshot capture, on the learner thread
        self._released = asyncio.Event()

    async def add(self, event: EventT) -> None:
        """Buffer one Faust event; hand a job to the learner when the batch is full."""
        block = as_block(event)
        value = event.value
        self.last_add = time.monotonic()
        telemetry = self.runner.telemetry
        if not telemetry.first_at:  # consumed now; learned once its mini-batch fills
            telemetry.first_at = time.time()
        nbytes = value.nbytes if isinstance(value, Bundle) else len(value or b"")
        tp = (block.topic, block.partition)
        if block.offsets and block.offsets[0] < self.next_offset.get(tp, 0):
            # Offsets went back: a redelivery after a rebalance, or a broker that lost its
            # data (an embedded broker restarted).  In the second case the output topics
            # are gone, and Tansu acks records sent to a missing topic without keeping
            # them (measured): make sure they exist before this block's outputs go out.
            limited.warning(("rewind", tp), "%s partition %d went back from offset %d to %d; "
                            "checking the worker's topics", block.topic, block.partition,
                            self.next_offset[tp], block.offsets[0])
            await self.runtime.ensure_topics(force=True)
        if block.offsets and block.topic == self.spec.topic and block.offsets[0] > max(
                self.next_offset.get(tp, 0),
                self.runner.model.offsets.get(f"{block.topic}:{block.partition}", 0)):
            # Events this replica's state has not seen were consumed by another replica
            # (a rebalance): the partition's entities and waiting events follow it, before
            # this block is learned.
            await self.runtime.take_over(self, block.partition)
        if block.offsets:
            self.next_offset[tp] = block.offsets[-1] + 1
        while self.held_bytes >= self.max_held_bytes and (self.unreleased or self.in_flight):
            # Back-pressure: Faust stops fetching while this agent waits.
            self._released.clear()
            await self._released.wait()
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append((event, block))
        self.pending_msgs += len(block.values)
        self.pending_bytes += nbytes
        self.held_bytes += nbytes
        if self.pending_msgs >= self.spec.batch_size or self.pending_bytes >= FLUSH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        """Queue whatever is buffered (waits while the learner is ``MAX_JOBS_AHEAD`` behind)."""
        if not self.pending:
            return
        job, self.pending = self.pending, []
        self.pending_msgs = self.pending_bytes = 0
        self.in_flight += 1
        self.idle.clear()
        await self.jobs.put(job)

    def caught_up(self, quiet_s: float) -> bool:
        """Past the first message, nothing queued or learning, and none new for ``quiet_s``."""
        return (self.last_add > 0.0 and self.idle.is_set()
                and time.monotonic() - self.last_add >= quiet_s)

    async def flush_stale(self, within: float) -> None:
        """Timer side of ``take(max_, within=)``: flush a partial batch once it is old."""
        if self.pending and time.monotonic() - self.pending_since >= within:
            await self.flush()

    async def run(self) -> None:
        """Learn jobs in order on the learner thread; their outputs go to ``_finish``."""
        loop = asyncio.get_running_loop()
        finisher = asyncio.ensure_future(self._finish())
        try:
            while True:
                job = await self.jobs.get()
                blocks = [block for _, block in job]
                try:
                    seq, out = await loop.run_in_executor(self.executor, self._learn, blocks)
                except Exception:  # noqa: BLE001 - never ack it; Kafka redelivers
                    log.exception("learning a job of %d messages failed; not acking it",
                                  sum(len(b.values) for b in blocks))
                    await self.runtime.crash(RuntimeError(f"learner of {self.spec.name} "
                                                          "failed"))
                    return
                await self.learned.put((seq, job, out))
        finally:
            finisher.cancel()

    def _learn(self, blocks: list[Block]) -> tuple[int, Outcome]:
        """On the learner thread: learn one job and number it, in model order."""
        out = self.runner.handle_blocks(blocks)
        self.learned_seq += 1
        return self.learned_seq, out

    async def _finish(self) -> None:
        """Send a learned job's outputs; its acks wait for a checkpoint (``release``)."""
        while True:
            seq, job, out = await self.learned.get()
            futures = await self._send(out)
            nbytes = sum(_nbytes(event) for event, _ in job)
            self.unreleased.append(Unreleased(seq, job, out, futures, nbytes))
            await self.release()
            self.in_flight -= 1
            if not self.in_flight and not self.pending:
                self.idle.set()

    async def _send(self, out: Outcome) -> list[asyncio.Future[Any]]:
        """Queue a job's outputs, retrying with jittered back-off while the broker is away."""
        backoff = Backoff()
        while True:
            try:
                futures = await self.runtime.send_outcome(self.spec, out)
            except KafkaError as exc:
                self.runtime.output_failed(exc)
                await asyncio.sleep(backoff.next())
                await self.runtime.ensure_topics()
                continue
            return futures

    async def _delivered(self, entry: Unreleased) -> None:
        """Wait until the broker has acknowledged every output of ``entry``.

        A failed delivery sends the job's outputs again (at least once: some records
        may then appear twice on the output topics, none is missing).
        """
        backoff = Backoff()
        while entry.futures:  # none without predictions (emit_predictions off) and dead letters
            _, pending = await asyncio.wait(entry.futures, timeout=DELIVERY_CHECK_S)
            if pending:  # still retrying inside aiokafka: a broker that restarted empty
                await self.runtime.ensure_topics()  # answers NotLeader until they exist
                continue
            errors = [f.exception() or RuntimeError("delivery cancelled") for f in entry.futures
                      if f.cancelled() or f.exception() is not None]
            if not errors:
                if backoff.failures:
                    self.runtime.output_recovered()
                return
            self.runtime.output_failed(errors[0])
            await asyncio.sleep(backoff.next())
            entry.futures[:] = await self._send(entry.out)

    async def release(self, checkpointed: int | None = None) -> None:
        """Ack and commit, in order, every job that a saved snapshot includes.

        A job is acked only once its prediction records and dead letters are on the
        broker, so a committed input offset never lacks its outputs.
        """
        if checkpointed is not None:
            self.checkpointed_seq = max(self.checkpointed_seq, checkpointed)
        async with self._release_lock:
            while self.unreleased and self.unreleased[0].seq <= self.checkpointed_seq:
                entry = self.unreleased[0]
                await self._delivered(entry)
                self.unreleased.popleft()
                for event, _ in entry.job:
                    event.ack()
                self.held_bytes -= entry.nbytes
                self._released.set()
                for topic, bundles in collections.Counter(b.topic for _, b in entry.job).items():
                    await self.runtime.commit(topic, bundles)

    async def state(self, replica: str, lineage: merging.Lineage | None = None,
                    partitions: list[int] | None = None) -> tuple[dict[str, Any], int]:
        """A snapshot state captured on the learner thread, with the jobs it includes
        (tagged there with its merge lineage: the base it is relative to, its ship number)."""
        loop = asyncio.get_running_loop()

        def capture() -> tuple[dict[str, Any], int]:
            t0 = time.perf_counter()
            state = self.runner.snapshot_state(replica)
            if lineage is not None:
                lineage.tag(state, partitions or [])
            self.capture_s = time.perf_counter() - t0
            return state, self.learned_seq

        return await loop.run_in_executor(self.executor, capture)


class CheckpointFailure(RuntimeError):
    """Local checkpoints failed for longer than ``worker.checkpoint_failure_exit_s``."""


class WorkerRuntime:
    """Runners, topics and snapshot publishing for one worker process."""

    #: Process exit code requested by the runtime (0: none); ``main.run`` returns it.
    exit_code = 0

    def __init__(self, app: faust.App, settings: Settings, bootstrap: str) -> None:
        self.app = app
        self.settings = settings
        self.bootstrap = bootstrap
        self.outputs = Outputs(bootstrap, settings.kafka.client_kwargs())
        self.ready = asyncio.Event()
        self.replica = merging.replica_id(settings)
        self.runners: dict[str, ModelRunner] = {}
        # Data-parallel training (streamlearn.replicas): each model's merge lineage, the
        # models-topic feed of every replica's shard, and the adopt/merge loop.
        self.lineages: dict[str, merging.Lineage] = {}
        self.shard_feed = merging.ShardFeed(self)
        self.merge_loop = merging.MergeLoop(self, self.shard_feed)
        self._published_at: dict[str, float] = {}
        self.snapshot_cost_s: dict[str, float] = {}  # last capture + encode, per model
        self.feeders: dict[str, Feeder] = {}
        self._published: dict[str, tuple[int, int]] = {}
        self._snapshot_lock = asyncio.Lock()
        self._snapshot_task: asyncio.Future[int] | None = None
        self.loop_lag_max = 0.0
        # Health, shipped in each snapshot's ``worker`` entry and logged (rate-limited).
        self.output_failures = 0
        self.outage_since: float | None = None
        self.checkpoint_failures = 0
        self.checkpoint_failing_since: float | None = None
        self._declared_at = 0.0
        self._drift_import_started = False
        self._loading: concurrent.futures.Future[dict[str, ModelRunner]] | None = None
        for spec in settings.specs:
            self._register_agent(spec)

        app.task(self.start)
        app.task(self.watch_loop_lag)
        app.task(self._follow_shards)
        app.task(self.merge_loop.run)
        app.task(lambda: observe.watch_commands(self))  # admin drift actions (issue 12)
        self.rates = observe.RateMeter()
        app.on_before_shutdown.connect(self.on_shutdown)
        within = settings.worker.batch_within_s

        async def flush_tick() -> None:
            for feeder in self.feeders.values():
                await feeder.flush_stale(within)
            if (not self._drift_import_started and self.feeders
                    and all(f.caught_up(CAUGHT_UP_IDLE_S) for f in self.feeders.values())):
                self.load_drift_detectors("caught up")

        async def snapshot_tick() -> None:  # Faust passes the app to one-argument timers
            # In the background: the state is captured between two learning jobs, which
            # may take longer than the timer's interval under a backlog.
            if self._snapshot_task is None or self._snapshot_task.done():
                self._snapshot_task = asyncio.ensure_future(self.publish_snapshots())
                self._snapshot_task.add_done_callback(_log_failure)

        app.timer(min(within / 2, 0.1), on_leader=False)(flush_tick)
        app.timer(settings.worker.snapshot_interval_s, on_leader=False)(snapshot_tick)

    def topic_configs(self) -> dict[str, dict[str, str]]:
        """Every topic the worker reads or writes, with its configuration."""
        k = self.settings.kafka
        topics: dict[str, dict[str, str]] = {k.models_topic: {"cleanup.policy": "compact"},
                                             k.deadletter_topic: {}, k.commands_topic: {}}
        for spec in self.settings.specs:
            topics[spec.topic] = {}
            topics[spec.labels_topic] = {}
            topics[f"{spec.name}.predictions"] = {}
        return topics

    def copartitioned(self) -> dict[str, str]:
        """Each model's labels topic, with the event topic whose partitions it shares."""
        return {spec.labels_topic: spec.topic for spec in self.settings.specs}

    def begin_loading(self) -> None:
        """Load models on a thread now, while Faust starts and joins the group.

        Faust runs ``start`` (an app task) only once the worker is ready, so loading
        there put the restore and the kernel-cache load (~0.8 s measured) after
        Faust's ready; ``streamlearn worker`` calls this right after building the app.
        """
        if self._loading is not None:
            return
        # river.drift (scipy, scikit-learn: ~2 s of CPU, under the GIL) serves only the
        # concept-drift monitors, which queue their losses until it is in.  Import it once
        # the worker has caught up (``flush_tick``), or after a delay, so that it
        # slows neither the first event nor the draining of a backlog.
        defer_detector_import()
        future: concurrent.futures.Future[dict[str, ModelRunner]] = concurrent.futures.Future()

        def load() -> None:
            try:
                future.set_result(self._load_runners())
            except BaseException as exc:  # noqa: BLE001 - re-raised by start()
                future.set_exception(exc)

        threading.Thread(target=load, name="load-models", daemon=True).start()
        self._loading = future

    async def start(self) -> None:
        """Await the models, declare topics and start the producer; then agents may run."""
        started = time.monotonic()
        self.begin_loading()
        assert self._loading is not None
        asyncio.get_running_loop().call_later(DRIFT_IMPORT_DELAY_S, self.load_drift_detectors,
                                              f"{DRIFT_IMPORT_DELAY_S:.0f} s after start")
        runners, _, _ = await asyncio.gather(
            asyncio.wrap_future(self._loading),
            declare_topics(self.bootstrap, self.topic_configs(), self.settings.kafka.partitions,
                           self.settings.kafka.client_kwargs(), self.copartitioned()),
            self.outputs.start(),  # the producer finds the topics' metadata when it sends
        )
        for spec in self.settings.specs:
            self.runners[spec.name] = runners[spec.name]
            self.feeders[spec.name] = Feeder(self, spec, runners[spec.name])
        # Everything imported so far (numba, Faust, the model stack) is permanent; frozen,
        # it leaves the cyclic GC's full collections, which took ~150 ms of stop-the-world
        # every few seconds of streaming here.  Decoded events are acyclic and die by
        # refcount, so young collections are rarer too (+~7%).  river.drift usually ends
        # its background import after this and stays unfrozen (measured: ~73k GC-tracked
        # objects, on top of ~156k for the rest of the stack).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        self.ready.set()
        log.info("models and outputs ready %.2f s after Faust started the worker's tasks",
                 time.monotonic() - started)

    def load_drift_detectors(self, reason: str) -> None:
        """Start the background import of river's drift detectors (once)."""
        if not self._drift_import_started:
            self._drift_import_started = True
            log.info("importing river's drift detectors (%s)", reason)
            load_detectors_in_background()

    def _load_runners(self) -> dict[str, ModelRunner]:
        latest: dict[str, bytes] = {}
        if self.settings.worker.restore_from_topic:
            k = self.settings.kafka
            latest = restore.read_latest_blocking(self.bootstrap, k.models_topic,
                                                  [s.name for s in self.settings.specs],
                                                  k.client_kwargs())
        restored: dict[str, dict[str, Any]] = {}
        runners = {spec.name: restore_runner(spec, self.settings, latest, replica=self.replica,
                                             restored=restored)
                   for spec in self.settings.specs}
        from streamlearn.models import OnlineModel

        for spec in self.settings.specs:
            fresh = OnlineModel(spec, device="cpu").to_state()
            state = restored.get(spec.name)
            self.lineages[spec.name] = (merging.Lineage(base=fresh) if state is None else
                                        merging.Lineage.restored(state, self.replica, fresh))
        for runner in runners.values():
            warm_up(runner)
        return runners

    async def _follow_shards(self) -> None:
        await self.ready.wait()  # the models topic is declared by then
        await self.shard_feed.run()

    def partitions(self, topic: str) -> list[int]:
        """Partitions of ``topic`` assigned to this replica now."""
        try:
            return sorted(tp.partition for tp in self.app.consumer.assignment()
                          if tp.topic == topic)
        except Exception:  # noqa: BLE001 - no consumer yet (start-up, shutdown)
            return []

    async def watch_loop_lag(self) -> None:
        """Record how late the event loop wakes up (a blocked loop stalls consumption)."""
        period = 0.05
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(period)
            self.loop_lag_max = max(self.loop_lag_max, time.monotonic() - t0 - period)

    async def on_shutdown(self, app: faust.App, **_: object) -> None:
        """Let queued jobs finish (bounded), take a last snapshot, then flush outputs."""
        if not self.ready.is_set():
            return

        async def drain() -> None:
            for feeder in self.feeders.values():
                await feeder.flush()
                await feeder.idle.wait()

        try:
            await asyncio.wait_for(drain(), timeout=SHUTDOWN_DRAIN_S)
        except TimeoutError:
            log.warning("shutdown: still learning after %.0f s; the last events stay "
                        "uncommitted and will be read again", SHUTDOWN_DRAIN_S)
        if self._snapshot_task is not None:
            await asyncio.wait([self._snapshot_task], timeout=SHUTDOWN_DRAIN_S)
        try:  # bounded: the broker may be gone
            # forced: the snapshot spacing of a large state must not skip the last one
            await asyncio.wait_for(self.publish_snapshots(force=True), timeout=SHUTDOWN_DRAIN_S)
        except TimeoutError:
            log.warning("shutdown: last snapshot not published within %.0f s", SHUTDOWN_DRAIN_S)
        try:  # hand the last shard over: a merge counts it before this replica leaves
            # (the whole drain bound: on busy cores a merge, a rebase and a re-ship took
            # longer than two merge intervals, and what no merge counts is lost)
            await asyncio.wait_for(self.merge_loop.retire(SHUTDOWN_DRAIN_S),
                                   timeout=SHUTDOWN_DRAIN_S + 1.0)
        except TimeoutError:
            log.warning("shutdown: last shard not merged within %.0f s", SHUTDOWN_DRAIN_S)
        await self.outputs.stop()

    def _register_agent(self, spec: ModelSpec) -> None:
        """One agent on the model's events and one on its delayed labels, feeding one
        :class:`Feeder`: labels join the events in the order they were consumed.  The
        two topics have the same partition count, so Faust's assignor gives partition p
        of both to one replica: labels keyed like their events find them there."""
        app = self.app
        topic = app.topic(spec.topic, value_serializer="raw", key_serializer="raw")
        labels = app.topic(spec.labels_topic, value_serializer="raw", key_serializer="raw")

        async def learn(stream: faust.StreamT[bytes]) -> None:
            await self.ready.wait()
            feeder = self.feeders[spec.name]
            learner = asyncio.ensure_future(feeder.run())
            try:
                async for event in stream.noack().events():
                    await feeder.add(event)
            finally:
                learner.cancel()

        async def join_labels(stream: faust.StreamT[bytes]) -> None:
            await self.ready.wait()
            feeder = self.feeders[spec.name]
            async for event in stream.noack().events():
                await feeder.add(event)

        learn.__name__ = f"learn_{spec.name}"
        join_labels.__name__ = f"labels_{spec.name}"
        app.agent(topic, name=f"streamlearn.learn.{spec.name}")(learn)
        app.agent(labels, name=f"streamlearn.labels.{spec.name}")(join_labels)

    async def commit(self, topic: str, bundles: int) -> None:
        """Commit what was just acked (see :func:`faust_compat.commit_bundles`)."""
        await commit_bundles(self.app, topic, bundles)

    async def crash(self, exc: BaseException) -> None:
        """Stop the worker with ``exc`` (a learner that failed)."""
        await self.app.crash(exc)

    async def send_outcome(self, spec: ModelSpec, out: Outcome) -> list[asyncio.Future[Any]]:
        """Queue predictions, then dead letters, of one learned job; their delivery futures."""
        futures = await self.outputs.send_many(f"{spec.name}.predictions", out.predictions)
        deadletter = self.settings.kafka.deadletter_topic
        for dead in out.dead:
            rec = dead.record
            limited.warning(("deadletter", spec.name, dead.reason[:40]),
                            "dead-lettered %s partition %d offset %d: %s", rec.topic,
                            rec.partition, rec.offset, dead.reason[:200], model=spec.name,
                            topic=rec.topic, partition=rec.partition, offset=rec.offset)
            futures.append(await self.outputs.send(deadletter, spec.name.encode(),
                                                   dead.encode(spec.name)))
        return futures

    async def take_over(self, feeder: Feeder, partition: int) -> None:
        """Adopt the entities and waiting events of ``partition`` (of the model's event
        topic) from the sibling shard that consumed it furthest, when that is ahead of
        this replica's own state: they follow the partition in a rebalance
        (:func:`streamlearn.replicas.partition_section`)."""
        spec, model = feeder.spec, feeder.runner.model
        if not spec.aggregates and not model.pending.enabled:
            return
        key = f"{spec.topic}:{partition}"
        own = model.offsets.get(key, -1)
        waited = time.monotonic()
        while not self.shard_feed.caught_up and time.monotonic() - waited < TAKE_OVER_WAIT_S:
            await asyncio.sleep(0.05)
        best: tuple[int, str, dict[str, Any]] | None = None
        for replica in list(self.shard_feed.records.get(spec.name, {})):
            if replica in (self.replica, replicas.MERGED):
                continue
            state = await self.shard_feed.decoded(spec.name, replica)
            offset = -1 if state is None else int(dict(state.get("offsets", {})).get(key, -1))
            if state is not None and offset > own and (best is None or offset > best[0]):
                best = (offset, replica, state)
        if best is None:
            return
        try:
            section = await asyncio.to_thread(replicas.partition_section, spec, best[2],
                                              spec.topic, partition)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("cannot take over %s partition %d from replica %s: %s", spec.topic,
                      partition, best[1], exc)
            return
        if section is None:
            return
        await asyncio.get_running_loop().run_in_executor(feeder.executor,
                                                         model.take_partition, section)
        log.warning("took over %s partition %d from replica %s (its state at offset %d): "
                    "entity aggregates and events waiting for labels", spec.topic, partition,
                    best[1], best[0])

    async def ensure_topics(self, *, force: bool = False) -> None:
        """Declare missing topics again (at most every ``REDECLARE_EVERY_S``).

        An embedded broker that restarted has lost every topic, and Tansu does not
        create one on produce: the sends retry until the topics exist again.
        """
        now = time.monotonic()
        if not force and now - self._declared_at < REDECLARE_EVERY_S:
            return
        self._declared_at = now
        k = self.settings.kafka
        try:
            await asyncio.wait_for(declare_topics(self.bootstrap, self.topic_configs(),
                                                  k.partitions, k.client_kwargs(),
                                                  self.copartitioned()),
                                   timeout=REDECLARE_EVERY_S)
        except (KafkaError, OSError, TimeoutError) as exc:
            limited.warning("declare", "could not declare topics (%s: %s)",
                            type(exc).__name__, exc)

    def output_failed(self, exc: BaseException) -> None:
        """Count a failed send or delivery; one log line per interval while it lasts."""
        self.output_failures += 1
        if self.outage_since is None:
            self.outage_since = time.monotonic()
        limited.warning("outputs", "broker unavailable for outputs for %.1f s (%s: %s); "
                        "retrying with back-off, input not acked meanwhile",
                        time.monotonic() - self.outage_since, type(exc).__name__, exc,
                        failures=self.output_failures)

    def output_recovered(self) -> None:
        """The broker acknowledged outputs again after failures."""
        if self.outage_since is not None:
            log.warning("outputs recovered after %.1f s", time.monotonic() - self.outage_since)
            self.outage_since = None
            limited.reset("outputs")

    def health(self) -> dict[str, Any]:
        """The ``worker`` entry of a snapshot: loop lag, output and checkpoint failures."""
        now = time.monotonic()
        return {
            "loop_lag_max_ms": round(self.loop_lag_max * 1000, 2),
            "output_failures": self.output_failures,
            "outage_s": 0.0 if self.outage_since is None else round(now - self.outage_since, 1),
            "checkpoint_failures": self.checkpoint_failures,
        }

    def checkpoint_failed(self, name: str, exc: BaseException) -> None:
        """Log a failed local checkpoint; past ``checkpoint_failure_exit_s``, stop the worker.

        Without checkpoints nothing is acked or committed, so running on would learn
        unprotected (and hold every unacked event): exiting lets a supervisor restart
        the worker, or a person fix the snapshot directory.
        """
        now = time.monotonic()
        self.checkpoint_failures += 1
        if self.checkpoint_failing_since is None:
            self.checkpoint_failing_since = now
        failing = now - self.checkpoint_failing_since
        limit = self.settings.worker.checkpoint_failure_exit_s
        limited.error(("checkpoint", name), "checkpoint of %s to %s failing for %.1f s (%s: "
                      "%s); nothing is committed meanwhile; the worker exits after %.0f s",
                      name, self.settings.worker.snapshot_dir, failing, type(exc).__name__,
                      exc, limit, failures=self.checkpoint_failures)
        if failing >= limit and not self.app.should_stop:
            log.critical("checkpoints of %s failed for %.1f s (limit "
                         "worker.checkpoint_failure_exit_s = %.0f s): exiting", name, failing,
                         limit)
            self.exit_code = 3
            asyncio.ensure_future(self.app.crash(CheckpointFailure(
                f"checkpoints of {name} failing for {failing:.0f} s: {exc}")))

    async def publish_snapshots(self, *, force: bool = False) -> int:
        """:meth:`Checkpoint.commit` each model whose weights or counters moved since last
        time (or whose heartbeat is due); the number committed."""
        sent = 0
        async with self._snapshot_lock:
            for name in self.runners:
                checkpoint = Checkpoint(self, name)
                if checkpoint.due(force) and await checkpoint.commit():
                    sent += 1
        return sent


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("snapshot publishing failed", exc_info=task.exception())


def build_app(settings: Settings, bootstrap: str) -> tuple[faust.App, WorkerRuntime]:
    """A Faust app with one learning agent per model spec."""
    app = faust.App(settings.worker.app_id, **faust_settings(settings, bootstrap))
    runtime = WorkerRuntime(app, settings, bootstrap)
    return app, runtime

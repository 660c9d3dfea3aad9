"""Issue 9, worker side: poison pills, delivery before commit, failing checkpoints, config.

Each test replays one defect found by probing the worker; all run without a broker.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka.errors import KafkaTimeoutError

from streamlearn import cli
from streamlearn.batch_format import encode_batch
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.pipeline import DEADLETTER_MAX_VALUE_BYTES, Block, ModelRunner, Record
from streamlearn.services.worker.app import Bundle, Feeder, build_app
from streamlearn.settings import SettingsError, load_settings
from streamlearn.synthetic import FraudStream

PRODUCER_LIMIT = 16 * 1024 * 1024  # the worker's producer max_request_size


@pytest.fixture
def runner(fraud_spec: ModelSpec) -> ModelRunner:
    return ModelRunner(OnlineModel(fraud_spec, device="cpu"))


def _json(events: list[dict]) -> list[bytes]:
    return [orjson.dumps(e) for e in events]


def _nested(depth: int) -> bytes:
    return b'{"event_id": ' + b"[" * depth + b"]" * depth + b', "amount": 3.0, "is_fraud": 1}'


# -- defect 1: poison pills -------------------------------------------------------------------


@pytest.mark.parametrize("depth", [255, 600, 1023])
def test_a_deeply_nested_id_is_dead_lettered_before_it_is_learned(runner, depth):
    good = _json(FraudStream(seed=1).take(20))
    values = good[:10] + [_nested(depth)] + good[10:]
    out = runner.handle([Record(v, "t", 0, i) for i, v in enumerate(values)])
    assert [d.record.offset for d in out.dead] == [10]
    assert "event id must be a string, number or null" in out.dead[0].reason
    assert out.scored == out.learned == 20 and runner.model.n_learned == 20
    ids = [orjson.loads(p)["id"] for p in out.predictions]  # every record can be written
    assert ids == [orjson.loads(v)["event_id"] for v in good]
    assert len(out.dead[0].encode("fraud")) < PRODUCER_LIMIT


def test_ids_are_scalars_of_bounded_size(runner):
    events = FraudStream(seed=4).take(6)
    events[1]["event_id"] = {"a": 1}
    events[2]["event_id"] = "x" * 100_000
    events[3]["event_id"] = True
    events[4]["event_id"] = 2.5
    events[5]["event_id"] = None
    out = runner.handle([Record(v, "t", 3, i) for i, v in enumerate(_json(events))])
    assert sorted(d.record.offset for d in out.dead) == [1, 2, 3]
    assert {orjson.loads(p)["id"] for p in out.predictions} == {events[0]["event_id"], 2.5, None}


def test_a_batch_record_with_unwritable_ids_is_dead_lettered_whole(runner, fraud_spec):
    events = FraudStream(seed=5).take(50)
    ok = encode_batch(events, fraud_spec)
    for e in events:
        e["event_id"] = str(e["event_id"])
    events[7]["event_id"] = [[[1]]]
    bad = encode_batch(events, fraud_spec)
    out = runner.handle_blocks([Block("t", 0, [0, 1], [bad, ok])])
    assert [d.record.offset for d in out.dead] == [0]
    assert "row 7" in out.dead[0].reason and out.learned == 50


def test_an_oversized_message_gives_a_bounded_dead_letter(runner):
    huge = b"\x00not json" + bytes(13 * 1024 * 1024)
    out = runner.handle([Record(huge, "t", 2, 99)])
    record = out.dead[0].encode("fraud")
    assert len(record) < PRODUCER_LIMIT  # was 17.3 MB: MessageSizeTooLargeError, every restart
    d = orjson.loads(record)
    assert d["size"] == len(huge) and d["truncated"] is True
    assert d["sha256"] == hashlib.sha256(huge).hexdigest()
    assert base64.b64decode(d["value_b64"]) == huge[:DEADLETTER_MAX_VALUE_BYTES]
    assert d["source"] == {"topic": "t", "partition": 2, "offset": 99}


def test_tombstone_and_empty_messages_are_told_apart(runner):
    out = runner.handle([Record(None, "t", 0, 0), Record(b"", "t", 0, 1)])
    by_offset = {d.record.offset: orjson.loads(d.encode("m")) for d in out.dead}
    assert "tombstone" in by_offset[0]["reason"] and by_offset[0]["value_b64"] is None
    assert by_offset[1]["reason"] == "empty message" and by_offset[1]["value_b64"] == ""
    assert by_offset[0]["reason"] != by_offset[1]["reason"]


# -- defect 4: outputs acknowledged before the input is acked ----------------------------------


class _Runtime:
    """The slice of WorkerRuntime a Feeder uses, with delivery futures we control."""

    def __init__(self, **worker: Any) -> None:
        self.settings = load_settings(worker=worker)
        self.deliveries: list[asyncio.Future[Any]] = []
        self.commits: list[tuple[str, int]] = []
        self.failures = 0

    async def send_outcome(self, spec: ModelSpec, out: Any) -> list[asyncio.Future[Any]]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.deliveries.append(fut)
        return [fut]

    async def commit(self, topic: str, bundles: int) -> None:
        self.commits.append((topic, bundles))

    def output_failed(self, exc: BaseException) -> None:
        self.failures += 1

    def output_recovered(self) -> None:
        pass

    async def ensure_topics(self, *, force: bool = False) -> None:
        pass


def _event(values: list[bytes], first: int, acked: list[int]) -> SimpleNamespace:
    offsets = list(range(first, first + len(values)))
    ev = SimpleNamespace(message=SimpleNamespace(topic="t", partition=0, offset=offsets[-1]),
                         value=Bundle(offsets, values, sum(map(len, values))))
    ev.ack = lambda: acked.append(ev.message.offset)
    return ev


async def _until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_input_is_acked_only_after_its_predictions_are_delivered(runner, fraud_spec):
    runtime = _Runtime()
    feeder = Feeder(runtime, fraud_spec, runner)  # type: ignore[arg-type]
    acked: list[int] = []
    task = asyncio.create_task(feeder.run())
    try:
        await feeder.add(_event(_json(FraudStream(seed=6).take(300)), 0, acked))  # type: ignore
        await feeder.flush()
        await _until(lambda: len(feeder.unreleased) == 1)
        _, covered = await feeder.state("r0")
        release = asyncio.create_task(feeder.release(covered))  # checkpointed, not delivered
        await asyncio.sleep(0.1)
        assert acked == [] and runtime.commits == []
        runtime.deliveries[0].set_exception(KafkaTimeoutError())  # the broker went away
        await _until(lambda: len(runtime.deliveries) == 2)  # sent again, after a back-off
        assert acked == [] and runtime.failures == 1
        runtime.deliveries[1].set_result(None)
        await asyncio.wait_for(release, 10)
        assert acked == [299] and runtime.commits == [("t", 1)]
    finally:
        task.cancel()


# -- defect 9: a failing checkpoint --------------------------------------------------------------


async def test_consumption_stops_while_nothing_can_be_released(runner, fraud_spec):
    runtime = _Runtime(max_unacked_mb=0.01)  # ~10 KB
    feeder = Feeder(runtime, fraud_spec, runner)  # type: ignore[arg-type]
    acked: list[int] = []
    events = _json(FraudStream(seed=7).take(400))
    task = asyncio.create_task(feeder.run())
    try:
        await feeder.add(_event(events[:200], 0, acked))  # type: ignore[arg-type]
        await feeder.flush()
        await _until(lambda: len(feeder.unreleased) == 1)
        blocked = asyncio.create_task(feeder.add(_event(events[200:], 200, acked)))  # type: ignore
        await asyncio.sleep(0.2)
        assert not blocked.done()  # back-pressure: no snapshot, so nothing more is taken
        runtime.deliveries[0].set_result(None)
        _, covered = await feeder.state("r0")
        await feeder.release(covered)
        await asyncio.wait_for(blocked, 5)
        assert acked == [199]
    finally:
        task.cancel()


async def test_a_checkpoint_that_keeps_failing_stops_the_worker(fraud_spec, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    settings = load_settings(
        worker={"snapshot_dir": str(blocker / "snaps"), "checkpoint_failure_exit_s": 0.2,
                "replica_id": "r0"},
        model=[{"name": "fraud", "topic": "transactions", "numeric": ["amount"],
                "label": "is_fraud"}])
    app, runtime = build_app(settings, "127.0.0.1:1")
    crashes: list[BaseException] = []

    async def crash(exc: BaseException) -> None:
        crashes.append(exc)

    app.crash = crash  # type: ignore[method-assign]
    spec = settings.specs[0]
    runner = ModelRunner(OnlineModel(spec, device="cpu"))
    runtime.runners = {"fraud": runner}
    feeder = runtime.feeders["fraud"] = Feeder(runtime, spec, runner)
    sent: list[bytes] = []

    async def send(topic: str, key: bytes | None, value: bytes) -> None:
        sent.append(value)

    runtime.outputs = SimpleNamespace(send=send)  # type: ignore[assignment]
    runner.handle([Record(b'{"amount": 1, "is_fraud": 1}', "transactions", 0, 0)])
    feeder.checkpointed_seq = -1
    with caplog.at_level(logging.ERROR, logger="streamlearn.worker"):
        await runtime.publish_snapshots()
        assert crashes == [] and runtime.checkpoint_failures == 1
        await asyncio.sleep(0.25)
        await runtime.publish_snapshots()
        await asyncio.sleep(0)
    assert len(crashes) == 1 and "checkpoints of fraud failing" in str(crashes[0])
    assert runtime.exit_code == 3 and runtime.health()["checkpoint_failures"] == 2
    assert sent == [] and feeder.checkpointed_seq == -1  # nothing published nor released
    assert any("worker.checkpoint_failure_exit_s" in r.getMessage() for r in caplog.records)


# -- defect 11: Kafka security settings, secrets never printed ---------------------------------


def test_config_errors_never_print_secrets(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STREAMLEARN_CONFIG", raising=False)
    for key, value in [("STREAMLEARN_KAFKA__SASL_PASSWORD", "hunter2-secret"),
                       ("STREAMLEARN_KAFKA__SASL_PASWORD", "hunter2-typo"),
                       ("STREAMLEARN_KAFKA__SSL_KEY_PASSWORD", "hunter2-key")]:
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("STREAMLEARN_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")  # no username
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "kafka.sasl_pasword" in str(err.value) and "hunter2" not in str(err.value)
    monkeypatch.delenv("STREAMLEARN_KAFKA__SASL_PASWORD")
    with pytest.raises(SettingsError) as err:  # the whole section is echoed, secrets masked
        load_settings()
    assert "needs sasl_username" in str(err.value) and "hunter2" not in str(err.value)
    assert "'sasl_password': '***'" in str(err.value)


def test_security_settings_reach_aiokafka_and_faust():
    from streamlearn.services.worker.app import faust_settings

    settings = load_settings(kafka={"bootstrap": "k:9093", "security_protocol": "SASL_SSL",
                                    "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "svc",
                                    "sasl_password": "s3cret", "ssl_check_hostname": False},
                             model=[{"name": "m", "topic": "t", "numeric": ["x"]}])
    assert "s3cret" not in repr(settings)
    kw = settings.kafka.client_kwargs()
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kw["sasl_plain_password"] == "s3cret" and kw["ssl_context"].check_hostname is False
    creds = faust_settings(settings, "k:9093")["broker_credentials"]
    assert (creds.username, creds.password, creds.mechanism.value) == ("svc", "s3cret",
                                                                        "SCRAM-SHA-512")
    assert creds.protocol.value == "SASL_SSL"
    app, runtime = build_app(settings, "k:9093")
    assert runtime.outputs.client_kwargs["sasl_plain_username"] == "svc"
    assert load_settings().kafka.client_kwargs() == {"security_protocol": "PLAINTEXT"}


def test_faust_keeps_its_data_folder_out_of_the_working_directory(monkeypatch, tmp_path):
    """Faust makes ``<app id>-data`` in the current directory unless told otherwise: a
    worker (or a test) started in a checkout used to leave one there per group."""
    from streamlearn.services.worker.app import faust_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    settings = load_settings(worker={"app_id": "grp/1 x"},
                             model=[{"name": "m", "topic": "t", "numeric": ["x"]}])
    datadir = Path(faust_settings(settings, "k:9092")["datadir"])
    assert datadir.parent.parent == tmp_path / "tmp" and datadir.parent.is_dir()
    assert datadir.name == "grp_1_x"  # one folder level, whatever the group id holds
    assert list(tmp_path.iterdir()) == [tmp_path / "tmp"]


def test_faust_polls_at_most_a_tenth_of_a_second(monkeypatch):
    """Faust polls for 1.0 s with only its unthrottled partitions; held partitions that
    drain meanwhile waited out the second (0.9 s stalls on bench_worker). The worker
    caps each poll, on any broker."""
    from faust.transport.consumer import Consumer

    from streamlearn.services.worker.app import faust_settings
    from streamlearn.services.worker.faust_compat import POLL_TIMEOUT_S

    asked: list[float] = []
    monkeypatch.setattr(Consumer, "getmany", Consumer.getmany)  # restored after the test
    monkeypatch.setattr(Consumer, "_streamlearn_getmany",
                        lambda self, timeout: asked.append(timeout) or "records",
                        raising=False)
    settings = load_settings(kafka={"bootstrap": "k:9092", "fast_join": False},
                             model=[{"name": "m", "topic": "t", "numeric": ["x"]}])
    faust_settings(settings, "k:9092")
    assert Consumer.getmany(object(), timeout=1.0) == "records"
    assert Consumer.getmany(object(), timeout=0.02) == "records"
    assert asked == [POLL_TIMEOUT_S, 0.02] and POLL_TIMEOUT_S <= 0.1


# -- defect 14: zero models, lost config ------------------------------------------------------


def test_a_worker_without_models_exits_naming_its_config(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STREAMLEARN_CONFIG", raising=False)
    assert cli.main(["worker"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "streamlearn.toml") in err and "no such file" in err
    (tmp_path / "empty.toml").write_text("[worker]\nbatch_within_s = 0.1\n")
    assert cli.main(["-c", "empty.toml", "worker"]) == 2
    assert str(tmp_path / "empty.toml") in capsys.readouterr().err


def test_the_demo_hands_its_config_to_every_process(monkeypatch, tmp_path):
    from streamlearn.services import demo

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "my.toml").write_text('[[model]]\nname = "m"\ntopic = "t"\nnumeric = ["x"]\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("STREAMLEARN_CONFIG", raising=False)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(demo, "run", lambda settings, **kw: seen.update(kw) or 0)
    assert cli.main(["-c", "../conf/my.toml", "demo", "--duration", "1"]) == 0
    env = demo.child_env(seen["config"], "127.0.0.1:9", embedded=True)
    assert Path(env["STREAMLEARN_CONFIG"]) == (conf / "my.toml").resolve()
    assert Path(env["STREAMLEARN_CONFIG"]).is_absolute()
    assert env["STREAMLEARN_KAFKA__BOOTSTRAP"] == "127.0.0.1:9"

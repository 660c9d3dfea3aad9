"""Concept-drift monitors while river.drift imports in the background.

The loader's import is a gated stand-in, so "still importing" and "done" are
states the test sets, not thread timings.
"""

import importlib
import threading

import numpy as np
import pytest

from streamlearn.drift import ConceptDriftMonitor, concept


def _losses(seed=0):
    rng = np.random.default_rng(seed)
    return np.r_[rng.normal(0.1, 0.02, 300), rng.normal(0.6, 0.02, 300)]


def _fed(m, values, start=0):
    return [i for i, x in enumerate(values, start) if m.update(float(x), events_seen=i)]


@pytest.fixture
def gate(monkeypatch):
    """A background loader whose import finishes only once the gate is set."""
    gate = threading.Event()

    def load():
        gate.wait()
        return importlib.import_module("river.drift")

    monkeypatch.setattr(concept, "_loader", concept.DetectorLoader(load))
    yield gate
    gate.set()  # never leave the daemon thread parked


@pytest.mark.parametrize(("detector", "params"), [("adwin", {}),
                                                  ("page_hinkley", {"threshold": 5.0})])
def test_updates_queue_while_importing_then_replay_to_the_same_drift_points(
        gate, detector, params):
    losses = _losses()
    sync = ConceptDriftMonitor(detector, **params)  # no loader started: imports in place
    sync_hits = _fed(sync, losses)
    assert sync.detector is not None and sync_hits

    concept.load_detectors_in_background()
    concept.load_detectors_in_background()  # idempotent: one thread
    loader = concept._loader
    assert loader.loading
    m = ConceptDriftMonitor(detector, **params)
    assert _fed(m, losses[:400]) == []  # past every drift point, nothing detected yet
    assert m.detector is None and len(m.pending) == 400
    assert m.last_loss == float(losses[399]) and m.report()["drifts"] == 0

    gate.set()
    assert loader.done.wait(10) and loader.error is None
    assert m.update(float(losses[400]), events_seen=400)  # the replay found the drifts
    assert m.detector is not None and m.pending == []
    assert m.drift_points == [p for p in sync.drift_points if p <= 400]
    _fed(m, losses[401:], start=401)
    assert (m.n_drifts, m.drift_points) == (sync.n_drifts, sync.drift_points)
    untimed = ("last_drift_at_time", "recent_drifts_at_time")  # wall clock: differs
    assert ({k: v for k, v in m.report().items() if k not in untimed}
            == {k: v for k, v in sync.report().items() if k not in untimed})


def test_a_full_queue_waits_for_the_import(gate, monkeypatch):
    monkeypatch.setattr(concept, "MAX_PENDING", 3)
    concept.load_detectors_in_background()
    m = ConceptDriftMonitor("adwin")
    _fed(m, [0.1, 0.1, 0.1])
    blocked = threading.Thread(target=m.update, args=(0.1, 3), daemon=True)
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive() and m.detector is None  # held until the import is done
    gate.set()
    blocked.join(10)
    assert not blocked.is_alive()
    assert m.detector is not None and m.pending == []


def test_a_failed_background_import_surfaces_on_the_next_update(gate, monkeypatch):
    def load():
        gate.wait()
        raise ImportError("no river here")

    monkeypatch.setattr(concept, "_loader", concept.DetectorLoader(load))
    concept.load_detectors_in_background()
    m = ConceptDriftMonitor("adwin")
    assert not m.update(0.1, 1)  # still importing: queued
    gate.set()
    assert concept._loader.done.wait(10)
    with pytest.raises(ImportError, match="no river here"):
        m.update(0.1, 2)
    with pytest.raises(ImportError, match="no river here"):  # every later update too
        m.update(0.1, 3)
    assert m.detector is None


def test_report_and_state_before_the_detector_exists(gate):
    fresh = ConceptDriftMonitor("page_hinkley", threshold=5.0)
    params = {**concept.DEFAULT_PARAMS["page_hinkley"], "threshold": 5.0}
    assert fresh.detector is None and not fresh.drift_detected
    assert fresh.report() == {"detector": "page_hinkley", "params": params,
                              "drifts": 0, "last_drift_at_event": None,
                              "last_drift_at_time": None, "recent_drifts_at_event": [],
                              "recent_drifts_at_time": [], "recent_drift_directions": [],
                              "warmup_events": 0, "last_batch_loss": None, "queued": 0,
                              "updates": 0, "loading": False, "state": {}}
    assert fresh.to_state() == {"detector": "page_hinkley", "params": params,
                                "n_drifts": 0, "drift_points": [], "drift_times": [],
                                "directions": [], "warmup": 0, "batch": 0, "last_loss": None,
                                "updates": 0, "detector_state": {}, "queued": 0}

    concept.load_detectors_in_background()
    m = ConceptDriftMonitor.from_state({**fresh.to_state(), "n_drifts": 2,
                                        "drift_points": [10, 20], "last_loss": 0.3})
    m.update(0.25, 30)  # queued
    assert m.detector is None and not m.drift_detected
    assert m.report()["drifts"] == 2 and m.report()["last_batch_loss"] == 0.25
    r = ConceptDriftMonitor.from_state(m.to_state())
    assert r.detector is None
    assert r.to_state() == {"detector": "page_hinkley", "params": params,
                            "n_drifts": 2, "drift_points": [10, 20], "drift_times": [],
                            "directions": [], "warmup": 0, "batch": 0, "last_loss": 0.25,
                            "updates": 0, "detector_state": {}, "queued": 0}
    assert r.report()["loading"] and r.report()["queued"] == 1  # what the snapshot said


def test_unknown_detector_is_rejected():
    with pytest.raises(ValueError, match=r"choose from \['adwin', 'kswin', 'page_hinkley'\]"):
        ConceptDriftMonitor("ddm")


def test_a_deferred_import_queues_until_started_and_overflow_starts_it(gate, monkeypatch):
    """The worker defers the import until it has caught up; monitors queue meanwhile,
    and a full queue starts the import itself rather than drop values."""
    monkeypatch.setattr(concept, "MAX_PENDING", 5)
    concept.defer_detector_import()
    loader = concept._loader
    assert loader.loading and loader.thread is None
    m = ConceptDriftMonitor("adwin")
    for i in range(5):
        assert m.update(0.1, events_seen=i) is False
    assert loader.thread is None and len(m.pending) == 5  # deferred: nothing imports yet
    gate.set()
    m.update(0.1, events_seen=5)  # the sixth value overflows: start and wait
    assert loader.thread is not None and loader.done.is_set()
    assert m.detector is not None and m.pending == []


def test_a_paused_stream_replays_its_queue_and_acts_once_river_is_in(gate, fraud_spec):
    """The worker's case: the events stop before the import ends. ``catch_up`` feeds the
    queue without a next event and takes the spec's action on the drift it finds."""
    from dataclasses import replace

    from streamlearn.models import OnlineModel

    concept.load_detectors_in_background()
    model = OnlineModel(replace(fraud_spec, drift_action="reset"), device="cpu")
    m = model.concept_drift = ConceptDriftMonitor("page_hinkley", threshold=5.0)
    _fed(m, _losses())
    model.n_seen = 600
    assert m.detector is None and len(m.pending) == 600
    assert not m.replay() and model.drift_actions.catch_up(model) is None  # still importing
    gate.set()
    assert concept._loader.done.wait(10)
    assert model.drift_actions.catch_up(model) == "reset"
    assert m.pending == [] and m.drift_points == [310]
    assert model.drift_actions.history[0]["at_event"] == 600
    assert model.drift_actions.catch_up(model) is None  # nothing left to replay

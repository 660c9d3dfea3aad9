"""Frozen model specifications: the core's only configuration input.

The core never reads the environment; ``streamlearn.settings`` builds these
from TOML and ``STREAMLEARN_`` variables.
"""

from __future__ import annotations

import math
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

#: Default step size per optimizer: their steps have different units (SGD moves by
#: ``lr * gradient``, AdaGrad by about ``lr`` per coordinate, FTRL's ``alpha`` scales a
#: per-coordinate ``1/sqrt(n)`` rate), so one shared number served one of them well and
#: collapsed the others (AUC 0.50-0.52 on a ratings stream with FTRL or SGD at 0.05).
DEFAULT_LEARNING_RATES: dict[str, float] = {"sgd": 0.1, "adagrad": 0.5, "ftrl": 1.0}


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
        (:data:`DEFAULT_LEARNING_RATES`), see :attr:`step_size`.
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
    normalized
        Divide the step size by :attr:`step_norm`, the expected squared norm of a row.
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

    Examples
    --------
    >>> spec = ModelSpec(name="fraud", topic="tx", numeric=("amount",), categorical=("country",))
    >>> spec.n_numeric, spec.n_weights
    (1, 262145)
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
    batch_size: int = 256
    update_rows: int = 1
    label_prior: bool = True
    normalized: bool = True
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
        if not 1 <= self.update_rows <= self.batch_size:
            raise ValueError(f"model {self.name!r}: update_rows must be in 1..batch_size")
        if self.top_k_per_day < 1:
            raise ValueError(f"model {self.name!r}: top_k_per_day must be >= 1")
        if self.fm_init_std < 0:
            raise ValueError(f"model {self.name!r}: fm_init_std must be >= 0")
        if self.drift_detector not in DRIFT_DETECTORS or self.drift_action not in DRIFT_ACTIONS:
            raise ValueError(f"model {self.name!r}: drift_detector must be one of "
                             f"{DRIFT_DETECTORS}, drift_action one of {DRIFT_ACTIONS}")
        if self.drift_cooldown < 0 or self.drift_reference_size < 1 or self.drift_threshold <= 0:
            raise ValueError(f"model {self.name!r}: drift_cooldown must be >= 0, "
                             "drift_reference_size >= 1, drift_threshold > 0")
        bands = (self.decision_block, self.decision_review)
        if any(b is not None and not math.isfinite(b) for b in bands) or (
                None not in bands and bands[0] < bands[1]):  # type: ignore[operator]
            raise ValueError(f"model {self.name!r}: decision_block and decision_review must "
                             "be finite, with decision_block >= decision_review")
        if not 0 <= self.reasons_in_records <= 1000:
            raise ValueError(f"model {self.name!r}: reasons_in_records must be in 0..1000")

    @property
    def step_norm(self) -> float:
        """Expected squared norm of a row, when :attr:`normalized`; else 1.

        Every numeric field is z-scored (unit variance; 0 when missing) and every
        categorical field is one hashed slot of value 1, so a row's squared norm is
        about the number of fields. Dividing the step by it is the normalized (NLMS,
        Vowpal Wabbit ``--normalized``) update: one default step serves 2 fields or 85,
        where a fixed step overshoots on wide rows of correlated features.
        """
        return float(max(1, self.n_numeric + len(self.categorical))) if self.normalized else 1.0

    @property
    def step_size(self) -> float:
        """The learning rate in force: ``learning_rate``, or the optimizer's default."""
        if self.learning_rate is not None:
            return self.learning_rate
        return DEFAULT_LEARNING_RATES[self.optimizer]

    @property
    def n_numeric(self) -> int:
        """Number of numeric (dense) features."""
        return len(self.numeric)

    @property
    def n_hashed(self) -> int:
        """Number of hashed slots, 0 without categorical fields."""
        return (1 << self.hash_bits) if self.categorical else 0

    @property
    def n_weights(self) -> int:
        """Feature weights, excluding the bias."""
        return self.n_numeric + self.n_hashed

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict."""
        d = asdict(self)
        d["numeric"] = list(self.numeric)
        d["categorical"] = list(self.categorical)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Build from a dict; unknown keys are rejected, list fields become tuples."""
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model spec keys: {sorted(unknown)}")
        d = dict(d)
        for key in ("numeric", "categorical"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

"""Frozen model specifications: the core's only configuration input.

The core never reads the environment; ``streamlearn.settings`` builds these
from TOML and ``STREAMLEARN_`` variables.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Task = Literal["binary", "regression", "ranking"]
Optimizer = Literal["sgd", "adagrad", "ftrl"]
Device = Literal["auto", "cpu", "cuda"]

TASKS: tuple[str, ...] = ("binary", "regression", "ranking")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adagrad", "ftrl")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


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
    optimizer: Optimizer = "adagrad"
    learning_rate: float = 0.05
    l1: float = 0.0
    l2: float = 1e-6
    power_t: float = 0.25
    ftrl_beta: float = 1.0
    batch_size: int = 256
    device: Device = "auto"
    fm_factors: int = 8
    rolling_window: int = 10_000
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
        if self.batch_size < 1 or self.learning_rate <= 0 or self.l1 < 0 or self.l2 < 0:
            raise ValueError(
                f"model {self.name!r}: batch_size, learning_rate must be > 0; l1, l2 >= 0"
            )

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

"""The ``[[model]]`` table of the config and the core spec it becomes must not drift apart."""

from __future__ import annotations

import dataclasses

import pytest

from streamlearn.config import ModelSpec
from streamlearn.settings import ModelSettings


def test_every_spec_field_can_be_set_in_the_config_with_the_same_default() -> None:
    # A ModelSpec field the table lacks cannot be set from streamlearn.toml ("extra inputs
    # are not permitted"), and a default that differs changes a model with the file.
    table = set(ModelSettings.model_fields) - {"aggregate"} | {"aggregates"}
    spec_fields = {f.name for f in dataclasses.fields(ModelSpec)} - {"extra"}
    assert table == spec_fields
    from_table = ModelSettings(name="m", topic="t", numeric=["x"]).to_spec()
    assert from_table == ModelSpec(name="m", topic="t", numeric=("x",))


def test_a_horizon_of_one_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="horizon"):
        ModelSettings(name="m", topic="t", numeric=["x"], horizon=1).to_spec()
    assert ModelSettings(name="m", topic="t", numeric=["x"], horizon=0).to_spec().horizon == 0


def test_norm_power_sets_the_step_normalization_and_is_bounded() -> None:
    # 16 fields: the default divides the step by 16 ** 0.75 = 8, 1 by the field count.
    fields = [f"x{i}" for i in range(16)]
    for power, norm in ((0.75, 8.0), (1.0, 16.0), (0.0, 1.0)):
        spec = ModelSettings(name="m", topic="t", numeric=fields, norm_power=power).to_spec()
        assert spec.step_norm == norm
    with pytest.raises(ValueError, match="norm_power"):
        ModelSpec(name="m", topic="t", numeric=("x",), norm_power=1.5)
    with pytest.raises(ValueError, match="norm_power"):
        ModelSettings(name="m", topic="t", numeric=["x"], norm_power=-0.1)


@pytest.mark.parametrize("window", [0, 10**12])
def test_the_rolling_window_is_bounded(window: int) -> None:
    """A model allocates its window up front: a snapshot's spec asking for 10**12 rows
    raised MemoryError in the restore (terabytes) instead of a clear refusal."""
    with pytest.raises(ValueError, match="rolling_window"):
        ModelSpec(name="m", topic="t", numeric=("x",), rolling_window=window)


@pytest.mark.parametrize(("detector", "params", "match"), [
    ("adwin", {"clock": 0}, r"\['clock'\] of drift detector 'adwin'"),
    ("page_hinkley", {"treshold": 0.2}, r"\['treshold'\].*known: \[.*'threshold'"),
    ("kswin", {"stat_size": 80}, "stat_size must be at most half"),
    ("page_hinkley", {"warmup": -1}, "warmup and batch must be >= 0"),
])
def test_drift_params_are_checked_when_the_config_is_read(detector, params, match) -> None:
    """river builds a detector on its first value, inside the learning call: a config's
    misspelt parameter raised TypeError there, and ADWIN's clock 0 panicked in its Rust
    core. The config is refused at start instead, naming the parameter."""
    with pytest.raises(ValueError, match=r"model 'm': drift_params: .*" + match):
        ModelSpec(name="m", topic="t", numeric=("x",), drift_detector=detector,
                  drift_params=params)
    ModelSpec(name="m", topic="t", numeric=("x",), drift_detector=detector,
              drift_params={"warmup": 500})

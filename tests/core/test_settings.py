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

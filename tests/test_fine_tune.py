"""FineTune: one value for the fine-tune settings of every step that trains, validated once."""

import pytest

from edgeslim import FineTune, registry
from edgeslim.errors import ConfigError

# Each step's defaults, as they were when the fields were flat (figures must not move).
DEFAULTS = {
    "prune_magnitude": dict(epochs=0, lr=1e-3, temperature=0.0),
    "prune_channels": dict(epochs=0, lr=1e-3, temperature=0.0),
    "lowrank": dict(epochs=0, lr=1e-4, temperature=4.0),
    "cluster": dict(epochs=1, lr=1e-4, temperature=0.0),
    "distill": dict(epochs=2, lr=1e-4, temperature=4.0),
    "qat_int8": dict(epochs=2, lr=1e-4, temperature=0.0),
}
COMMON = dict(batch_size=64, weight_decay=0.0, alpha=0.9, augment_shift=0, seed=0, progress=True)


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_each_step_keeps_its_defaults_and_fills_unset_fields_from_them(name):
    config_type = registry.get(name).config_type
    assert config_type().fine_tune == FineTune(**DEFAULTS[name], **COMMON)
    changed = config_type(fine_tune=FineTune(batch_size=32))  # the other fields stay the step's
    assert changed.fine_tune == FineTune(**DEFAULTS[name], **{**COMMON, "batch_size": 32})
    assert config_type.from_dict({"fine_tune": {"batch_size": 32}}) == changed
    assert config_type(fine_tune={"batch_size": 32}) == changed
    assert not changed.fine_tune.unset()


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_the_flat_spelling_is_refused_with_the_new_one(name):
    config_type = registry.get(name).config_type
    with pytest.raises(ConfigError) as err:
        config_type.from_dict({"epochs": 3}, where="steps[0]")
    assert str(err.value) == "steps[0].epochs: moved into fine_tune (write fine_tune: {epochs: 3})"
    with pytest.raises(ConfigError, match=r"^steps\[0\]\.progress: moved into fine_tune \(write fine_tune: "
                                          r"\{progress: false\}\)$"):
        config_type.from_dict({"progress": False}, where="steps[0]")


@pytest.mark.parametrize("fields, message", [
    ({"lr": 0.0}, "fine_tune.lr: must be > 0"), ({"epochs": -1}, "fine_tune.epochs: must be in [0"),
    ({"alpha": 1.5}, "fine_tune.alpha: must be in [0, 1]"), ({"augment_shift": 65}, "fine_tune.augment_shift"),
    ({"temperature": -1.0}, "fine_tune.temperature"), ({"weight_decay": -0.1}, "fine_tune.weight_decay"),
    ({"batch_size": 0}, "fine_tune.batch_size"), ({"bogus": 1}, "fine_tune.bogus: unknown field"),
])
def test_the_ranges_are_checked_once_for_every_step(fields, message):
    for name in DEFAULTS:
        with pytest.raises(ConfigError) as err:
            registry.get(name).config_type.from_dict({"fine_tune": fields}, where="steps[0]")
        assert str(err.value).startswith(f"steps[0].{message}"), (name, str(err.value))


def test_step_specific_rules_name_the_nested_field():
    with pytest.raises(ConfigError, match=r"^step\.fine_tune\.temperature: must be > 0"):
        registry.get("distill").config_type.from_dict({"fine_tune": {"temperature": 0}})
    with pytest.raises(ConfigError, match=r"^step\.fine_tune\.epochs: the gradual schedule"):
        registry.get("prune_magnitude").config_type.from_dict({"schedule": "gradual"})


def test_a_standalone_fine_tune_must_be_complete_before_it_trains():
    from torch import nn

    from edgeslim.distill.trainer import fine_tune

    with pytest.raises(ConfigError, match=r"^fine_tune\.lr: not set"):
        fine_tune(nn.Linear(2, 2), None, FineTune(epochs=1), None)
    assert FineTune.defaults(epochs=2).unset() == [] and FineTune(epochs=2).unset()[0] == "lr"

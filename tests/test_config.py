"""Settings described once: the checks, flags and defaults derived from their fields."""

import dataclasses
import os

import pytest
from absl import flags

from tfmm import ctr, pretrain
from tfmm.config import (RunTree, SettingsError, check_settings, define_flags, from_flags,
                         renamed, setting)


@dataclasses.dataclass
class Settings:
    path: str = setting(dataclasses.MISSING, "Where.")
    epochs: int = setting(1, "Epochs.", low=1)
    rate: float = setting(0.5, "Rate.", above=0)
    units: tuple = setting((8, 4), "Layer sizes.", low=1)
    kind: str = setting("a", "Kind.", choices=("a", "b"))
    centre: bool | None = setting(None, "Centre (default: the data's).")
    quiet: bool = setting(False, "Not a flag.", flag=False)


@pytest.mark.parametrize("change, message", [
    ({"epochs": 0}, "--epochs=0 must be >= 1."),
    ({"rate": 0.0}, "--rate=0.0 must be > 0."),
    ({"units": (8, 0)}, "--units=8,0: every value must be >= 1."),
    ({"kind": "c"}, "--kind='c' is not one of ('a', 'b')."),
])
def test_values_outside_a_fields_bounds_or_choices_are_refused_by_flag(change, message):
    config = Settings(path="p")
    assert check_settings(config) is config
    with pytest.raises(SettingsError) as refused:
        check_settings(dataclasses.replace(config, **change))
    assert str(refused.value) == message


def test_flags_come_from_the_fields():
    values = flags.FlagValues()
    define_flags(Settings, flag_values=values)
    assert "quiet" not in values
    values(["prog", "--epochs=3", "--units=16,8,2", "--kind=b", "--centre"])
    kinds = {name: type(values[name]).__name__ for name in ("epochs", "rate", "units", "kind",
                                                            "centre", "path")}
    assert kinds == {"epochs": "Flag", "rate": "Flag", "units": "Flag", "kind": "EnumFlag",
                     "centre": "BooleanFlag", "path": "Flag"}
    assert values["epochs"].help == "Epochs." and values["path"].default is None
    assert values["centre"].default is None  # left to the library
    config = from_flags(Settings, values, list(values), path="p", quiet=True)
    assert config == Settings(path="p", epochs=3, rate=0.5, units=(16, 8, 2), kind="b",
                              centre=True, quiet=True)
    values["units"].value = ["16", "x"]
    with pytest.raises(SettingsError, match=r"^--units=16,x: want integers\.$"):
        from_flags(Settings, values, ["units"], path="p")
    # A flag the tool defined first is its own.
    mine = flags.FlagValues()
    flags.DEFINE_integer("epochs", None, "The tool's.", flag_values=mine)
    define_flags(Settings, flag_values=mine)
    assert mine["epochs"].help == "The tool's."


def test_both_jobs_refuse_bad_settings_with_one_error_type():
    with pytest.raises(SettingsError, match=r"^--epochs=0 must be >= 1\.$"):
        ctr.CTRConfig(data_dir="d", model_dir="m", epochs=0).validate()
    with pytest.raises(SettingsError, match=r"^--epochs=-1 must be >= 0\.$"):
        pretrain.PretrainConfig(data_dir="d", model_dir="m", epochs=-1).validate()
    with pytest.raises(SettingsError, match=r"^--momentum=1.0 must be in \[0, 1\)\.$"):
        pretrain.PretrainConfig(data_dir="d", model_dir="m", momentum=1.0).validate()
    names = {"batch_size": "pretrain_batch_size", "model_dir": "pretrain_model_dir"}
    error = renamed(SettingsError("--queue_size=100 must be a multiple of --batch_size=32."),
                    names)
    assert str(error) == "--queue_size=100 must be a multiple of --pretrain_batch_size=32."
    assert str(renamed(SettingsError("--model_dir=m holds a run ...; use a fresh --model_dir."),
                       names)) == ("--pretrain_model_dir=m holds a run ...; use a fresh "
                                   "--pretrain_model_dir.")
    assert str(renamed(SettingsError("--batch_size_x=1"), names)) == "--batch_size_x=1"


def test_run_tree_puts_every_output_under_one_root():
    tree = RunTree.of("", "data/mine/")
    assert tree.root == os.path.join("runs", "mine")
    mine = RunTree.of("/tmp/out", "data/mine")
    assert (mine.model_dir("ctr"), mine.model_dir("pretrain"), mine.index,
            mine.export("ranker"), mine.export("encoder")) == (
        "/tmp/out/ctr", "/tmp/out/pretrain", "/tmp/out/index/vectors.db",
        "/tmp/out/export/ranker", "/tmp/out/export/encoder")


def test_importing_the_training_entry_point_defines_no_flag():
    import tfmm.train  # noqa: F401  (its flags are defined when it runs as the program)

    assert not {"task", "run_dir", "pretrain_model_dir", "encoder_export_dir",
                "refresh_vectors"} & set(flags.FLAGS)

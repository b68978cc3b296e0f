"""The jobs' settings: each described once, as a dataclass field, and the flags come from it.

A job's settings are a dataclass (`tfmm.ctr.CTRConfig`,
`tfmm.pretrain.PretrainConfig`) whose fields are made with `setting`: the
default (the library's own where the library has one, `default_of`), the help
text, the allowed values and the bounds. `check_settings` refuses a value
outside them with `SettingsError`, and `define_flags` makes an absl flag of
each field, so a setting changes in one place:

```python
@dataclasses.dataclass
class Config:
    epochs: int = setting(1, "Training epochs.", low=1)
    optimizer: str = setting("adam", "Optimizer.", choices=("adam", "sgd"))

check_settings(Config(epochs=0))  # SettingsError: --epochs=0 must be >= 1.
```

`RunTree` is where a run's outputs go under one root (``--run_dir``).
"""

import dataclasses
import inspect
import os
import re
import types
import typing

from absl import flags


class SettingsError(ValueError):
    """Settings, data or an index a job cannot use, named by their flags, with what
    to change or run; the command-line tools print it as one line."""


def default_of(fn, name):
    """The default of argument `name` of `fn` (a function or a class)."""
    return inspect.signature(fn).parameters[name].default


def setting(default, help, choices=None, low=None, above=None, flag=True):
    """A dataclass field of a job's settings, described once.

    Args:
        default: its default (`dataclasses.MISSING`: none, the caller gives it).
        help: what it means: the flag's help text.
        choices: the allowed values (the flag is an enum).
        low: the least value allowed (of every value of a tuple).
        above: values must be greater than this.
        flag: False for a setting the command line sets itself (not a flag).
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": None if choices is None else tuple(choices), "low": low,
        "above": above, "flag": flag})


def _text(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def check_settings(config):
    """`config`, after refusing a field's value outside its choices or bounds with a
    `SettingsError` naming its flag."""
    for field in dataclasses.fields(config):
        meta, value = field.metadata, getattr(config, field.name)
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise SettingsError(f"--{field.name}={value!r} is not one of {meta['choices']}.")
        low, above = meta.get("low"), meta.get("above")
        values = value if isinstance(value, tuple) else (value,)
        if low is not None and any(v < low for v in values):
            raise SettingsError(f"--{field.name}={_text(value)}" + (
                f": every value must be >= {low}." if isinstance(value, tuple)
                else f" must be >= {low}."))
        if above is not None and not all(v > above for v in values):
            raise SettingsError(f"--{field.name}={_text(value)} must be > {above}.")
    return config


def _kind(cls, field):
    """The type of a field's values (of an Optional's, of a tuple's items: tuple)."""
    hint = typing.get_type_hints(cls)[field.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint, = (a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def define_flags(cls, flag_values=flags.FLAGS):
    """An absl flag for every setting of the dataclass `cls` (fields made with `setting`).

    The field's default, help and choices are the flag's; its type picks the
    flag's kind (a tuple becomes a list flag). Fields with ``flag=False`` and
    names already defined (by the tool, or by another config) are left out.
    """
    for field in dataclasses.fields(cls):
        meta, name = field.metadata, field.name
        if not meta.get("flag") or name in flag_values:
            continue
        default, text, kind = field.default, meta["help"], _kind(cls, field)
        if default is dataclasses.MISSING:  # the tool must give it
            default = None
        if meta["choices"] is not None:
            flags.DEFINE_enum(name, default, list(meta["choices"]), text,
                              flag_values=flag_values)
        elif kind is bool:
            flags.DEFINE_bool(name, default, text, flag_values=flag_values)
        elif kind is int:
            flags.DEFINE_integer(name, default, text, flag_values=flag_values)
        elif kind is float:
            flags.DEFINE_float(name, default, text, flag_values=flag_values)
        elif kind is tuple:
            flags.DEFINE_list(name, default and [str(v) for v in default], text,
                              flag_values=flag_values)
        else:
            flags.DEFINE_string(name, default, text, flag_values=flag_values)


def from_flags(cls, flag_values, names, **fixed):
    """An instance of `cls` from the flags of its fields' names (list flags as int
    tuples), then `fixed`. SettingsError names a list flag that is not integers."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name in set(fields) & set(names) - set(fixed):
        value = flag_values[name].value
        if _kind(cls, fields[name]) is tuple:
            try:
                value = tuple(int(v) for v in value)
            except ValueError:
                raise SettingsError(f"--{name}={','.join(value)}: want integers.") from None
        values[name] = value
    return cls(**values, **fixed)


def as_flags(error, names):
    """A library error in flag terms: ``Class: name=value ...`` becomes
    ``--name=value ...`` for each of `names` (the settings that are flags)."""
    message = re.sub(r"^\w+: ", "", str(error))
    pattern = r"(?<![\w-])(%s)=" % "|".join(map(re.escape, names))
    return re.sub(pattern, r"--\1=", message)


def renamed(error, names):
    """`error` (a SettingsError) with ``--setting`` as ``--flag`` for each of `names`
    (setting -> flag): the flags that set another job's settings."""
    if not names:
        return error
    pattern = r"--(%s)(?!\w)" % "|".join(map(re.escape, names))
    return SettingsError(re.sub(pattern, lambda m: f"--{names[m.group(1)]}", str(error)))


@dataclasses.dataclass(frozen=True)
class RunTree:
    """Where a run's outputs go, under one root (``--run_dir``): each job's model
    directory (checkpoints, TensorBoard logs, metrics.json), the index table and
    the SavedModels.

    ```python
    tree = RunTree.of("", "data/mine")  # no --run_dir: runs/<the data directory's name>
    tree.model_dir("ctr"), tree.index, tree.export("ranker")
    # ('runs/mine/ctr', 'runs/mine/index/vectors.db', 'runs/mine/export/ranker')
    ```
    """

    root: str

    @classmethod
    def of(cls, run_dir, data_dir):
        """`run_dir`'s tree, or by default ``runs/<data_dir's name>``: one per dataset."""
        return cls(run_dir or os.path.join("runs", os.path.basename(os.path.normpath(data_dir))))

    def model_dir(self, job):
        """A job's directory: ``ctr`` or ``pretrain``."""
        return os.path.join(self.root, job)

    @property
    def index(self):
        return os.path.join(self.root, "index", "vectors.db")

    def export(self, model):
        """Where the SavedModels of ``ranker`` or ``encoder`` go (``<version>/``)."""
        return os.path.join(self.root, "export", model)

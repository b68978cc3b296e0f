"""The jobs' settings: each default lives in one place, and the flags come from it.

A job's settings are a dataclass (`tfmm.ctr.CTRConfig`,
`tfmm.pretrain.PretrainConfig`); its fields' defaults are the library's own
where the library has one (`default_of`), and `define_flags` makes an absl
flag of each field, so a default changes in one place.
"""

import dataclasses
import inspect
import re

from absl import flags


class SettingsError(ValueError):
    """Settings, data or an index a job cannot use, named by their flags, with what
    to change or run; the jobs print it as one line."""


def default_of(fn, name):
    """The default of argument `name` of `fn` (a function or a class)."""
    return inspect.signature(fn).parameters[name].default


def define_flags(cls, helps, choices=None, flag_values=flags.FLAGS):
    """An absl flag for every field of the dataclass `cls` named in `helps`.

    The field's default is the flag's; its type picks the flag's kind (a tuple
    of ints becomes a list flag); `choices` (name -> allowed values) makes enums.
    A field already defined as a flag (by another config) is left as it is.
    """
    choices = choices or {}
    for field in dataclasses.fields(cls):
        name = field.name
        if name not in helps or name in flag_values:
            continue
        default, text = field.default, helps[name]
        if name in choices:
            flags.DEFINE_enum(name, default, list(choices[name]), text, flag_values=flag_values)
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, text, flag_values=flag_values)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, text, flag_values=flag_values)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, text, flag_values=flag_values)
        elif isinstance(default, tuple):
            flags.DEFINE_list(name, [str(v) for v in default], text, flag_values=flag_values)
        else:
            flags.DEFINE_string(name, default, text, flag_values=flag_values)


def from_flags(cls, flag_values, names, **fixed):
    """An instance of `cls` from the flags of its fields' names (list flags as int
    tuples), then `fixed`. ValueError names a list flag that is not integers."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name in set(fields) & set(names) - set(fixed):
        value = flag_values[name].value
        if isinstance(fields[name].default, tuple):
            try:
                value = tuple(int(v) for v in value)
            except ValueError:
                raise ValueError(f"--{name}={','.join(value)}: want integers.") from None
        values[name] = value
    return cls(**values, **fixed)


def as_flags(error, names):
    """A library error in flag terms: ``Class: name=value ...`` becomes
    ``--name=value ...`` for each of `names` (the settings that are flags)."""
    message = re.sub(r"^\w+: ", "", str(error))
    pattern = r"(?<![\w-])(%s)=" % "|".join(map(re.escape, names))
    return re.sub(pattern, r"--\1=", message)

"""What every command-line tool shares (``python -m tfmm...``, ``pipelines.*``, ``benchmarks.*``).

A tool defines its flags only when it runs as the program, so importing it
(or any tfmm module) defines none; its ``main`` calls library functions with
typed options::

    from absl import flags
    from tfmm import cli

    def define_flags():
        cli.define_data_flags("The catalogue (default data/<world>).")
        flags.DEFINE_integer("top_k", 5, "Candidates printed.")

    def main(argv):
        data_dir = cli.data_dir()  # the --world/--data_dir rule
        ...

    if __name__ == "__main__":
        define_flags()
        cli.run(main)

`run` adds ``--verbose``, refuses stray arguments, hides INFO logs and prints
the library's usage error (`tfmm.config.SettingsError`) as one line.
"""

import importlib
import os
import sys

from absl import app, flags

from tfmm import _startup
from tfmm.config import RunTree, SettingsError

FLAGS = flags.FLAGS

# Optional extras of setup.py a flag may need: extra -> (module, what it is).
EXTRAS = {"beam": ("apache_beam", "Apache Beam")}


def fail(message):
    """Ends the run with one line on stderr (no traceback, no flag help), exit status 1."""
    sys.exit(message)


def run(main, positional=False, errors=()):
    """Runs ``main(argv)`` as the program once absl has parsed the flags.

    Adds ``--verbose`` (`tfmm._startup`); hides INFO logs unless ``--verbose``
    or ``--verbosity``; refuses positional arguments unless `positional`;
    ends the run with one line for a `SettingsError` or any of `errors`
    (e.g. ``(ValueError, OSError)`` where the library names the bad file).
    """
    if "verbose" not in FLAGS:
        flags.DEFINE_bool("verbose", False, "Show TensorFlow's C++ log lines (start-up notices, "
                          "INFO, failed cuInit) and INFO logs, hidden by default.")

    def program(argv):
        if len(argv) > 1 and not positional:
            fail(f"unexpected arguments: {argv[1:]}")
        _startup.quiet_logging()
        try:
            return main(argv)
        except (SettingsError, *errors) as e:
            fail(str(e))

    app.run(program)


def define_data_flags(data_dir_help="tfmm data directory (default data/<world>).",
                      generates=True, flag_values=FLAGS):
    """``--world`` (a preset of `tfmm.data.world.PRESETS`) and ``--data_dir``, read by
    `data_dir`; `generates`: the tool generates a missing world (else ``--world`` only
    names the default directory)."""
    from tfmm.data import world  # TensorFlow (tfmm.data's readers): only where it is a flag

    flags.DEFINE_enum("world", "small", list(world.PRESETS),
                      "Synthetic world generated into data/<world>, or into --data_dir when "
                      "--world is given, when it holds no data." if generates else
                      "Synthetic world of the default --data_dir, data/<world> (as tfmm.train's "
                      "--world).", flag_values=flag_values)
    flags.DEFINE_string("data_dir", None, data_dir_help, flag_values=flag_values)


def data_dir(generate=True, flag_values=FLAGS):
    """The data directory of ``--data_dir`` (default ``data/<world>``).

    One that holds no data (no ``metadata.json``) is generated from ``--world``
    when it is the default or ``--world`` is given (on the command line or in a
    flagfile), and `generate`; another ``--data_dir`` without data is refused,
    so that a mistyped path runs on nothing or on a new world.
    """
    world = flag_values["world"]
    default = os.path.join("data", world.value)
    path = flag_values["data_dir"].value or default
    if os.path.exists(os.path.join(path, "metadata.json")):
        return path
    if not world.present and os.path.normpath(path) != default:
        fail(f"--data_dir={path} " + ("holds no tfmm data (no metadata.json)"
                                       if os.path.isdir(path) else "does not exist")
             + ("; give --world to generate a synthetic world there." if generate else "."))
    if not generate:
        return path  # the tool names what is missing
    from tfmm.data.synthetic import ensure_world

    try:
        return ensure_world(path, world.value)
    except (ValueError, OSError) as e:  # a directory of user files, a full disk
        fail(str(e))


def runs(data_dir, *parts):
    """Default output paths: ``runs/<data directory's name>/...``, one tree per dataset
    (`tfmm.config.RunTree`'s root)."""
    return os.path.join(RunTree.of("", data_dir).root, *parts)


def define_runner_flag(flag_values=FLAGS):
    """``--runner``: the tool as an Apache Beam pipeline (`require_extra`, `pipeline_options`)."""
    flags.DEFINE_string("runner", None, "Run as an Apache Beam pipeline on this runner "
                        "(DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...); its "
                        "pipeline options follow a `--`. Default: in this process, without Beam.",
                        flag_values=flag_values)


def pipeline_options(argv, flag_values=FLAGS):
    """The runner's pipeline options: the arguments after ``--``, refused without ``--runner``.
    For a tool run with ``positional=True``."""
    if len(argv) > 1 and not flag_values["runner"].value:
        fail(f"unexpected arguments: {argv[1:]} (pipeline options need --runner)")
    return tuple(argv[1:])


def require_extra(extra, flag):
    """Imports the module of the optional `extra` (a key of `EXTRAS`); when it is not
    installed, refuses the run with one line naming `flag` (``--runner=X``) and the
    install command."""
    module, name = EXTRAS[extra]
    try:
        importlib.import_module(module)
    except ImportError as e:
        if (e.name or module).partition(".")[0] != module:
            raise  # the extra is there; something it needs is broken
        fail(f"{flag} needs {name}, an extra of tfmm: pip install -e \".[{extra}]\"")

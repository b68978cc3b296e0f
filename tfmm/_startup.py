"""Quiet TensorFlow start-up for tfmm's command-line tools.

``python -m tfmm.<tool>`` (and the repo's ``pipelines.*`` and ``benchmarks.*``)
print no TensorFlow C++ INFO lines, oneDNN notice or failed ``cuInit`` by
default; ``--verbose`` shows them. A ``TF_CPP_MIN_LOG_LEVEL`` the user set is
kept for the lines TensorFlow logs once running, but the start-up notices
(written before any log level applies) show only with ``--verbose``.
Importing tfmm as a library changes nothing.
"""

import os
import sys

# Our command-line tools; tfmm/__init__ runs before any of them imports TensorFlow.
CLI_PACKAGES = ("tfmm.", "pipelines.", "benchmarks.")


def running_cli(argv=None):
    """Whether this process is ``python [options] -m <one of our tools>``."""
    argv = sys.orig_argv if argv is None else argv
    if "-m" not in argv:
        return False
    i = argv.index("-m")
    return i + 1 < len(argv) and argv[i + 1].startswith(CLI_PACKAGES)


def quiet_tensorflow(argv=None):
    """Imports TensorFlow with its start-up lines hidden, unless ``--verbose`` (a flag
    `tfmm.cli.run` defines) asks for them."""
    argv = sys.argv if argv is None else argv
    if "tensorflow" in sys.modules or any(a in ("--verbose", "--verbose=true") for a in argv):
        return
    own_level = "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    if own_level:  # 3, not 2: a machine without a GPU logs cuInit's failure as an ERROR.
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    # The start-up notices are written by absl before its logging is initialised,
    # which no log level reaches, so stderr is parked while TensorFlow loads.
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        if own_level:  # TensorFlow has read it; tools this one starts choose their own
            del os.environ["TF_CPP_MIN_LOG_LEVEL"]


def quiet_logging():
    """INFO lines of absl/Python logging hidden (TensorFlow's, Beam's would bury a tool's
    own output), unless ``--verbosity`` or ``--verbose`` asks for them."""
    from absl import flags, logging

    verbose = "verbose" in flags.FLAGS and flags.FLAGS.verbose  # defined by tfmm.cli.run
    if not flags.FLAGS["verbosity"].present and not verbose:
        logging.set_verbosity(logging.WARNING)

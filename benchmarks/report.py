"""The benchmarks' machine-readable output: ``--json=PATH`` writes a run's figures.

    from benchmarks import report

    def define_flags():
        report.define_json_flag()
        ...

    def main(argv):
        ...
        report.write_json({"p50_ms": 5.6, "p99_ms": 9.0})

The file holds the command's arguments and the figures (numbers, or dicts and
lists of them, keyed as the printed lines name them); `benchmarks/gpu.sh`
gathers one per benchmark into its results.
"""

import json
import os
import sys

from absl import flags

FLAGS = flags.FLAGS


def define_json_flag():
    flags.DEFINE_string("json", None, "Also write the figures to this JSON file (read by "
                        "benchmarks/gpu.sh).")


def write_json(figures):
    """Writes ``{"argv": [...], "figures": figures}`` to ``--json``, if given (whole or not
    at all: a temporary file renamed into place)."""
    if not FLAGS.json:
        return
    tmp = f"{FLAGS.json}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"argv": sys.argv[1:], "figures": figures}, f, indent=1)
    os.replace(tmp, FLAGS.json)

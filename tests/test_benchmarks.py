"""Every benchmark runs end to end on tiny settings and prints its figures.

The figures themselves are for BENCHMARKS.md, on real sizes; these runs keep
the scripts (and their peers: DeepCTR under tf-keras, a private Redis) working,
and quiet: no TensorFlow start-up notice or INFO line. ``ctr_step``,
``predictor_latency``, ``moco_queue``, ``retrieval`` and ``embed`` run in
tests/test_gpu_script.py, as parts of benchmarks/gpu.sh on tiny sizes.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

# TensorFlow's (and absl's) INFO lines, and its start-up notices.
INFO_LINE = re.compile(r"I\d{4} ")
START_UP = ("oneDNN custom operations", "absl::InitializeLog", "cudart_stub")
RUNS = {
    "din_attention": (["--batch_size=16", "--max_history=5", "--candidates=4",
                       "--serving_history=5", "--dim=8", "--calls=2"], ["p50"]),
    "distribute": (["--world=tiny", "--batch_size=32", "--max_history=5", "--steps=2",
                    "--vector_dim=8", "--models=id"], ["2 worker(s)", "steps/s", "64 workers"]),
    "freshness": (["--rate=5", "--seconds=1", "--candidates=5"], ["p99"]),
    "index_lookup": (["--items=200", "--requests=5", "--sizes=10", "--dim=8"], ["p99"]),
    "input_pipeline": (["--world=tiny", "--batch_size=32", "--max_history=5", "--steps=2"],
                       ["examples/s"]),
    "prepare": (["--rows=2000", "--users=50", "--items=40", "--old_ref="],
                ["impressions/s", "bytes/impression above the baseline"]),
    "snapshot_stall": (["--items=2000", "--dim=8", "--seconds=1"],
                       ["during snapshots", "server held ms"]),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_benchmark_smoke_run(name, tmp_path):
    args, expected = RUNS[name]
    if name in ("distribute", "input_pipeline"):
        args = args + [f"--data_dir={tmp_path / 'tiny'}"]
    if name == "prepare":
        args = args + [f"--work_dir={tmp_path}"]
        if importlib.util.find_spec("apache_beam"):  # the beam extra: a DirectRunner column
            args, expected = args + ["--runners=local,DirectRunner"], expected + [
                "bytes/impression above the Beam baseline",
                "DirectRunner vs local: ", "vocabularies and sets of records identical"]
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__))), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stdout, proc.stdout[-3000:]
    noise = [line for line in (proc.stdout + proc.stderr).splitlines()
             if INFO_LINE.match(line) or any(n in line for n in START_UP)]
    assert not noise, noise

"""Every benchmark runs end to end on tiny settings and prints its figures.

The figures themselves are for BENCHMARKS.md, on real sizes; these runs keep
the scripts (and their peers: DeepCTR under tf-keras, a private Redis) working.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

RUNS = {
    "ctr_step": (["--batch_size=32", "--max_history=5", "--steps=2", "--repeats=1", "--rounds=1",
                  "--vector_dim=8", "--num_items=50", "--num_users=20", "--num_categories=5"],
                 ["Adam with Adam", "examples/s"]),
    "din_attention": (["--batch_size=16", "--max_history=5", "--candidates=4",
                       "--serving_history=5", "--dim=8", "--calls=2"], ["p50"]),
    "distribute": (["--world=tiny", "--batch_size=32", "--max_history=5", "--steps=2",
                    "--vector_dim=8", "--models=id"], ["2 worker(s)", "steps/s", "64 workers"]),
    "embed": (["--world=tiny", "--dim=8", "--batch_size=32", "--max_batch=16"],
              ["local, batches of 32: 240 items", "DirectRunner, batches of 32: 240 items",
               "batches of 16 events: 240 items", "local / near-line"]),
    "freshness": (["--rate=5", "--seconds=1", "--candidates=5"], ["p99"]),
    "index_lookup": (["--items=200", "--requests=5", "--sizes=10", "--dim=8"], ["p99"]),
    "input_pipeline": (["--world=tiny", "--batch_size=32", "--max_history=5", "--steps=2"],
                       ["examples/s"]),
    "moco_queue": (["--queue_size=128", "--batch_size=8", "--dim=8", "--steps=2"], ["ms"]),
    "prepare": (["--rows=2000", "--users=50", "--items=40", "--old_ref="],
                ["impressions/s", "bytes/impression above the baseline"]),
    "predictor_latency": (["--num_items=50", "--num_users=20", "--max_history=5",
                           "--candidates=4", "--requests=3", "--threads=2", "--vector_dim=8",
                           "--models=id,simtier", "--attention_units=8,4"],
                          ["like for like", "NOT like for like", "p99"]),
    "retrieval": (["--n=100", "--dim=8", "--chunk_size=32", "--repeats=1"], ["s"]),
    "snapshot_stall": (["--items=2000", "--dim=8", "--seconds=1"],
                       ["during snapshots", "server held ms"]),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_benchmark_smoke_run(name, tmp_path):
    args, expected = RUNS[name]
    if name in ("distribute", "embed", "input_pipeline"):
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

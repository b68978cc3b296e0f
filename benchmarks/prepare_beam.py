"""`tfmm.data.prepare` in this process vs as a Beam pipeline on the
DirectRunner: impressions/s and peak memory per impression, on a synthetic log
like issue 17's (4 columns, string ids, 20k users, 20k items, no images).

    python -m benchmarks.prepare_beam --rows=1000000 [--runners=local,DirectRunner]

Each run is the CLI in a fresh process; its peak RSS is compared with that of
a process that only imports what it needs (TensorFlow and pyarrow, and Beam
for the pipeline). The DirectRunner runs in one process (``in_memory``, one
worker): it shows the pipeline's cost per impression, not a cluster's speed.
"""

import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("rows", 1_000_000, "Impressions in the synthetic log.")
flags.DEFINE_integer("users", 20_000, "Distinct users.")
flags.DEFINE_integer("items", 20_000, "Distinct items.")
flags.DEFINE_list("runners", ["local", "DirectRunner"], "`local` (no --runner) and/or Beam "
                  "runner names.")
flags.DEFINE_integer("seed", 0, "Seed of the log.")
FLAGS = flags.FLAGS

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.csv as pa_csv  # noqa: E402


def write_log(root, rows, users, items, seed):
    """impressions.csv and items.csv under `root`; returns their paths."""
    rng = np.random.default_rng(seed)
    ids = np.char.add
    log = pa.table({
        "user_id": ids("u", rng.integers(0, users, rows).astype(str)),
        "item_id": ids("i", rng.integers(0, items, rows).astype(str)),
        "label": (rng.random(rows) < 0.1).astype(np.int64),
        "timestamp": np.sort(rng.integers(1_700_000_000, 1_700_000_000 + 30 * 86_400, rows)),
    })
    catalogue = pa.table({"item_id": ids("i", np.arange(items).astype(str)),
                          "category_id": ids("c", (np.arange(items) % 200).astype(str))})
    paths = os.path.join(root, "impressions.csv"), os.path.join(root, "items.csv")
    for table, path in zip((log, catalogue), paths):
        pa_csv.write_csv(table, path, pa_csv.WriteOptions(quoting_style="none"))
    return paths


def run(args):
    """(seconds, peak RSS in bytes) of `python args...` in a fresh process."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    _, err = child.communicate()
    if status:
        sys.exit(f"{' '.join(args)} failed:\n{err.decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as root:
        log, items = write_log(root, FLAGS.rows, FLAGS.users, FLAGS.items, FLAGS.seed)
        print(f"{FLAGS.rows} impressions ({os.path.getsize(log) / 1e6:.0f} MB CSV), "
              f"{FLAGS.users} users, {FLAGS.items} items")
        print(f"{'runner':14s} {'seconds':>8s} {'impressions/s':>14s} {'peak RSS MB':>12s} "
              f"{'imports MB':>11s} {'bytes/impression above':>23s}")
        for runner in FLAGS.runners:
            beam = runner != "local"
            module = "tfmm.data.prepare_beam" if beam else "tfmm.data.prepare"
            _, baseline = run(["-c", f"import {module}"])
            seconds, peak = run(["-m", "tfmm.data.prepare", f"--impressions={log}",
                                 f"--items={items}", f"--out_dir={root}/out-{runner}",
                                 *([f"--runner={runner}", "--", "--direct_num_workers=1",
                                    "--direct_running_mode=in_memory"] if beam else [])])
            print(f"{runner:14s} {seconds:8.1f} {FLAGS.rows / seconds:14.0f} {peak / 1e6:12.0f} "
                  f"{baseline / 1e6:11.0f} {(peak - baseline) / FLAGS.rows:23.0f}", flush=True)


if __name__ == "__main__":
    app.run(main)

"""Data preparation: impressions/s and peak memory per impression of
`python -m tfmm.data.prepare` on a synthetic log, next to an older version of
the code (default: the row-by-row one before vectorisation) in the same run,
and, with --runners, as a Beam pipeline (`--runner=NAME`).

    python -m benchmarks.prepare --rows=1000000
    python -m benchmarks.prepare --rows=10000000 --old_ref=
    python -m benchmarks.prepare --rows=1000000 --old_ref= --runners=local,DirectRunner

The log has the columns user_id, item_id, label, timestamp (string ids "u123",
"i456"; --click_rate of labels 1; timestamps uniform over 30 days, not in
order); the items file item_id, category_id, title, no images. Each prepare
runs in its own process; its peak RSS is compared with that of a process that
only imports TensorFlow and the pyarrow modules prepare uses (the baseline),
and its time includes that import. With --old_ref, the code at that git ref
(`git archive`) runs on the same files and the outputs are compared byte for
byte. A Beam runner gets --beam_options (by default the DirectRunner in this
one process, one worker: the pipeline's cost per impression, not a cluster's
speed); its baseline also imports apache_beam, and its output is compared
with the local one's: the same vocabularies byte for byte and the same set of
records in each table (their order differs).
"""

import collections
import filecmp
import os
import subprocess
import sys
import tempfile
import time

from absl import flags
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import tensorflow as tf

from tfmm import cli
from tfmm.data import schema

FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYARROW = ("pyarrow", "pyarrow.csv", "pyarrow.compute", "pyarrow.parquet")  # prepare's
TABLES = ("impressions-train.tfrecord", "impressions-test.tfrecord", "items.tfrecord",
          "vocab/users.txt", "vocab/items.txt", "vocab/categories.txt")


def write_log(work_dir, rows, users, items, click_rate, seed=0):
    """The synthetic impressions and items CSVs; returns their paths."""
    rng = np.random.default_rng(seed)
    log, catalogue = os.path.join(work_dir, "impressions.csv"), os.path.join(work_dir, "items.csv")
    options = pa_csv.WriteOptions(quoting_style="none")
    with pa_csv.CSVWriter(log, pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                                          ("label", pa.int64()), ("timestamp", pa.int64())]),
                          write_options=options) as w:
        for start in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - start)
            w.write_table(pa.table({
                "user_id": _ids("u", rng.integers(0, users, n)),
                "item_id": _ids("i", rng.integers(0, items, n)),
                "label": (rng.random(n) < click_rate).astype(np.int64),
                "timestamp": 1_700_000_000 + rng.integers(0, 30 * 86_400, n)}))
    k = np.arange(items)
    pa_csv.write_csv(pa.table({"item_id": _ids("i", k), "category_id": _ids("c", k % 100),
                               "title": _ids("item ", k)}), catalogue, write_options=options)
    return log, catalogue


def _ids(prefix, numbers):
    return pc.binary_join_element_wise(prefix, pa.array(numbers).cast(pa.string()), "")


def measure(args, pythonpath):
    """(wall s, CPU s, peak RSS bytes) of `python *args` in its own process."""
    env = dict(os.environ, PYTHONPATH=pythonpath, TF_CPP_MIN_LOG_LEVEL="3")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], env=env, cwd=pythonpath,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status:
        raise SystemExit(f"{args} failed:\n{stderr.decode()[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def same_output(local_out, beam_out):
    """Whether a Beam run wrote the local run's vocabularies and, per table, the
    same multiset of records."""
    vocab = sorted(os.listdir(os.path.join(local_out, "vocab")))
    if sorted(os.listdir(os.path.join(beam_out, "vocab"))) != vocab or not all(
            filecmp.cmp(os.path.join(local_out, "vocab", v), os.path.join(beam_out, "vocab", v),
                        shallow=False) for v in vocab):
        return False
    metas = schema.read_metadata(local_out), schema.read_metadata(beam_out)
    if set(metas[0]["files"]) != set(metas[1]["files"]):
        return False
    return all(collections.Counter(tf.data.TFRecordDataset(
        schema.files(local_out, metas[0], table)).as_numpy_iterator()) == collections.Counter(
            tf.data.TFRecordDataset(schema.files(beam_out, metas[1], table))
            .as_numpy_iterator()) for table in metas[0]["files"])


def define_flags():
    flags.DEFINE_integer("rows", 1_000_000, "Impressions in the synthetic log.")
    flags.DEFINE_integer("users", 20_000, "Distinct users.")
    flags.DEFINE_integer("items", 20_000, "Distinct items (all in the items file).")
    flags.DEFINE_float("click_rate", 0.2, "Fraction of impressions that are clicks.")
    flags.DEFINE_string("old_ref", "1510c7a", "Git ref of the code to compare with ('' for none).")
    flags.DEFINE_list("runners", ["local"], "How to run this checkout's prepare: 'local', or a "
                      "Beam runner name, passed as --runner.")
    flags.DEFINE_list("beam_options", ["--direct_num_workers=1", "--direct_running_mode=in_memory"],
                      "Pipeline options of the Beam runners (after prepare's `--`).")
    flags.DEFINE_string("work_dir", None, "Where the log and outputs go (default: a temp dir).")


def main(argv):
    del argv
    work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="bench-prepare-")
    os.makedirs(work_dir, exist_ok=True)
    start = time.perf_counter()
    log, items = write_log(work_dir, FLAGS.rows, FLAGS.users, FLAGS.items, FLAGS.click_rate)
    print(f"{FLAGS.rows:,} impressions ({os.path.getsize(log) / 1e6:.0f} MB CSV), "
          f"{FLAGS.users:,} users, {FLAGS.items:,} items, written in "
          f"{time.perf_counter() - start:.1f} s; {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.2f}")
    _, _, bare = measure(["-c", "import tensorflow, pyarrow"], ROOT)
    _, _, baseline = measure(["-c", f"import tensorflow, {', '.join(PYARROW)}"], ROOT)
    print(f"baseline (import tensorflow, {', '.join(PYARROW)}): peak RSS "
          f"{baseline / 2**20:,.0f} MiB; {(baseline - bare) / 2**20:,.0f} MiB of it the modules "
          "beyond pyarrow's core")
    beam_baseline = None
    if set(FLAGS.runners) - {"local"}:
        _, _, beam_baseline = measure(
            ["-c", f"import tensorflow, {', '.join(PYARROW)}, apache_beam"], ROOT)
        print(f"Beam baseline (the same and apache_beam): peak RSS "
              f"{beam_baseline / 2**20:,.0f} MiB")
    runs = [(name, ROOT, [] if name == "local" else [f"--runner={name}", "--",
                                                      *FLAGS.beam_options])
            for name in FLAGS.runners]
    if FLAGS.old_ref:
        old = os.path.join(work_dir, "old-code")
        os.makedirs(old, exist_ok=True)
        archive = subprocess.run(["git", "-C", ROOT, "archive", FLAGS.old_ref, "tfmm"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        runs.append((f"old ({FLAGS.old_ref})", old, []))
    results = {}
    for name, code_dir, extra in runs:
        out = os.path.join(work_dir, "out-" + name.split()[0])
        wall, cpu, peak = measure(["-m", "tfmm.data.prepare", f"--impressions={log}",
                                   f"--items={items}", f"--out_dir={out}", *extra], code_dir)
        results[name] = wall, cpu, out
        beam = name in FLAGS.runners and name != "local"
        print(f"{name:16s} {FLAGS.rows / wall:12,.0f} impressions/s ({wall:.1f} s wall, "
              f"{cpu:.1f} s CPU), peak RSS {peak / 2**20:,.0f} MiB: "
              f"{(peak - (beam_baseline if beam else baseline)) / FLAGS.rows:,.0f} "
              f"bytes/impression above the {'Beam ' if beam else ''}baseline", flush=True)
    if FLAGS.old_ref and "local" in results:
        (new_wall, new_cpu, new_out), (old_wall, old_cpu, old_out) = (
            results["local"], results[runs[-1][0]])
        same = all(filecmp.cmp(os.path.join(new_out, t), os.path.join(old_out, t),
                               shallow=False) for t in TABLES)
        print(f"local vs old: {old_wall / new_wall:.1f}x faster in wall time, "
              f"{old_cpu / new_cpu:.1f}x in CPU time; outputs "
              f"{'identical' if same else 'DIFFER'} ({', '.join(TABLES)})")
    for name in FLAGS.runners:
        if name != "local" and "local" in results:
            (local_wall, local_cpu, local_out), (wall, cpu, out) = results["local"], results[name]
            print(f"{name} vs local: {wall / local_wall:.1f}x the wall time, "
                  f"{cpu / local_cpu:.1f}x the CPU time; vocabularies and sets of records "
                  f"{'identical' if same_output(local_out, out) else 'DIFFER'}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)

"""The GPU run: the training, serving and retrieval benchmarks in one go, one JSON of results.

    bash benchmarks/gpu.sh                   # on the GPU machine: under 8 minutes
    bash benchmarks/gpu.sh --tiny --out=x.json   # every part on tiny sizes (CPU is fine)

Runs, each in its own process with ``--json``, in this order: `ctr_step`
(tfmm vs DeepCTR's DIN) with XLA and mixed precision off and on (four runs,
full histories), `predictor_latency`, `moco_queue` (the paper's K), `retrieval`
(Acc@N over 100k x 100k) and `embed` (a catalogue of 4,000 items, generated
first). Installs nothing: what ``make setup`` installed is what runs.

The results (``--out``; default ``$OUT/gpu-benchmarks.json`` where ``OUT`` is
set, else ``runs/gpu-benchmarks.json``) hold the device (``nvidia-smi`` and
TensorFlow's GPUs), the versions, and for each part its exact commands, its
status, seconds, figures (the benchmark's ``--json``), printed output and the
number of TensorFlow INFO lines it printed (expected 0). The file is rewritten
after every part, so a run cut short keeps what it measured.

Time: each part has a share of --budget seconds; a part may use what the
parts before it left unused, and is stopped (``timed out``, with what it had
printed) when its deadline passes, so the whole run stays within the budget.
The full run refuses to start when TensorFlow sees no GPU (unless
--allow_cpu): it would spend the machine's time measuring its CPU.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import flags

from tfmm import cli

FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A TensorFlow/absl log line: severity, MMDD and a space ("I0000 00:00:...", "I1207 17:16:...").
INFO_LINE = re.compile(r"^I\d{4} ", re.M)
FULL_BUDGET_S = 460  # 7m40s: under the 8 minutes a GPU session gives this run
DEVICE = """
import json, os, platform, shutil, subprocess
import tensorflow as tf, keras
gpus = tf.config.list_physical_devices("GPU")
smi = None
if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout
    smi = [line.strip() for line in smi.splitlines() if line.strip()]
cpu = platform.processor()
if os.path.exists("/proc/cpuinfo"):
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
             if line.startswith("model name")]
    cpu = names[0] if names else cpu
details = [tf.config.experimental.get_device_details(g) for g in gpus]
print(json.dumps({"tf_version": tf.__version__, "keras_version": keras.__version__,
                  "python": platform.python_version(), "platform": platform.platform(),
                  "cpu": cpu, "cpus": os.cpu_count(), "nvidia_smi": smi,
                  "tf_gpus": [dict(name=g.name, **d) for g, d in zip(gpus, details)]}))
"""


def parts(tiny, work, history_fill="full"):
    """[(name, share of the full budget in s, [argv of each command])]: the last command of
    a part is the benchmark, run with --json; `work` holds the generated catalogue."""
    def bench(module, *args):
        return [sys.executable, "-m", f"benchmarks.{module}", *args]

    if tiny:
        ctr = ["--batch_size=32", "--max_history=5", "--steps=2", "--repeats=1",
               "--vector_dim=8", "--num_items=50", "--num_users=20", "--num_categories=5"]
        predictor = ["--num_items=50", "--num_users=20", "--max_history=5", "--candidates=4",
                     "--requests=3", "--threads=2", "--vector_dim=8", "--attention_units=8,4"]
        moco = ["--queue_size=128", "--batch_size=8", "--dim=8", "--steps=2"]
        retrieval = ["--n=100", "--dim=8", "--chunk_size=32", "--repeats=1"]
        world = ["--world=tiny"]
        embed = ["--dim=8", "--batch_size=32", "--max_batch=16"]
    else:
        ctr = ["--steps=100", "--repeats=3"]
        predictor = ["--requests=200"]
        moco, retrieval, embed = [], [], []
        # The small world's 4,000 items; few impressions and triplets (embed reads the items).
        world = ["--world=small", "--num_impressions=20000", "--pretrain_train=64",
                 "--pretrain_test=64"]
    ctr += ["--rounds=1", f"--history_fill={history_fill}"]
    # Redis where a redis-server is installed (make system-packages); SQLite always.
    indexes = "SQLite,Redis" if shutil.which("redis-server") else "SQLite"
    data = os.path.join(work, "catalogue")
    grid = []
    for xla, mixed, share in ((False, False, 75), (True, False, 65), (False, True, 60),
                              (True, True, 65)):
        # Every model in the first run; the others leave out the Keras-3-Adam ID ranker
        # (the goals compare DenseGradientAdam, Adam with Adam, with DeepCTR).
        models = "deepctr,id,id_dense_adam,simtier_make" if not (xla or mixed) else \
            "deepctr,id_dense_adam,simtier_make"
        name = "ctr_step" + ("_xla" if xla else "") + ("_mixed" if mixed else "")
        grid.append((name, share, [bench("ctr_step", *ctr, f"--jit_compile={xla}",
                                         f"--mixed_precision={mixed}", f"--models={models}")]))
    return grid + [
        ("predictor_latency", 75, [bench("predictor_latency", *predictor,
                                         "--models=id,simtier,simtier_make",
                                         f"--indexes={indexes}")]),
        ("moco_queue", 40, [bench("moco_queue", *moco)]),
        ("retrieval", 30, [bench("retrieval", *retrieval)]),
        ("embed", 50, [[sys.executable, "-m", "tfmm.data.generate", *world, f"--out_dir={data}"],
                       bench("embed", *embed, f"--data_dir={data}")]),
    ]


def execute(argv, timeout):
    """(return code or None when stopped at `timeout`, stdout, stderr) of `argv` in the repo;
    on timeout the whole process group goes (ctr_step's models run in children)."""
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def run_part(commands, deadline, json_path):
    """Runs a part's commands in turn until one fails or `deadline` passes."""
    result = {"commands": [shlex.join(c) for c in commands], "status": "ok", "output": "",
              "info_lines": 0}
    start = time.monotonic()
    for i, argv in enumerate(commands):
        last = i == len(commands) - 1
        argv = argv + [f"--json={json_path}"] if last else argv
        code, out, err = execute(argv, deadline - time.monotonic())
        result["output"] += out
        result["info_lines"] += len(INFO_LINE.findall(out + err))
        if err.strip():
            result["stderr"] = err[-4000:]
        if code is None or code:
            result["status"] = ("timed out" if code is None else f"failed (exit status {code})")
            break
        if last:
            with open(json_path) as f:
                result["figures"] = json.load(f)["figures"]
    result["commands"][-1] += f" --json={shlex.quote(json_path)}"
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def write(results, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def device_name(device):
    """The card's name (nvidia-smi's, else TensorFlow's), or the CPU's."""
    if device.get("nvidia_smi"):
        return device["nvidia_smi"][0].split(",")[0].strip()
    if device.get("tf_gpus"):
        return device["tf_gpus"][0].get("device_name", device["tf_gpus"][0]["name"])
    return f"CPU only: {device.get('cpu')}"


def define_flags():
    flags.DEFINE_bool("tiny", False, "Every part on tiny sizes: a smoke run (any machine).")
    flags.DEFINE_string("out", None, "The results' JSON (default $OUT/gpu-benchmarks.json where "
                        "OUT is set, else runs/gpu-benchmarks.json).")
    flags.DEFINE_integer("budget", None, f"Seconds for all the parts (default {FULL_BUDGET_S}; "
                         "--tiny: 3600).", lower_bound=10)
    flags.DEFINE_bool("allow_cpu", False, "Run the full sizes even where TensorFlow sees no GPU.")
    flags.DEFINE_enum("history_fill", "full", ["random", "full"], "ctr_step's --history_fill.")


def main(argv):
    del argv
    out = FLAGS.out or (os.path.join(os.environ["OUT"], "gpu-benchmarks.json")
                        if os.environ.get("OUT") else os.path.join(REPO, "runs",
                                                                   "gpu-benchmarks.json"))
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    budget = FLAGS.budget or (3600 if FLAGS.tiny else FULL_BUDGET_S)
    began = time.monotonic()
    code, stdout, stderr = execute([sys.executable, "-c", DEVICE], 120)
    if code != 0:
        cli.fail(f"benchmarks.gpu: TensorFlow did not start:\n{stderr[-2000:]}")
    device = json.loads(stdout.strip().splitlines()[-1])
    results = {"device": device_name(device), "tiny": FLAGS.tiny, "budget_s": budget,
               "invocation": shlex.join([sys.executable, "-m", "benchmarks.gpu", *sys.argv[1:]]),
               "environment": device, "parts": {}}
    write(results, out)
    print(f"device: {results['device']}; TensorFlow {device['tf_version']} sees "
          f"{len(device['tf_gpus'])} GPU(s); results: {out}", flush=True)
    if not device["tf_gpus"] and not (FLAGS.tiny or FLAGS.allow_cpu):
        cli.fail(f"TensorFlow {device['tf_version']} sees no GPU (nvidia-smi: "
                 f"{device['nvidia_smi'] or 'none'}): refusing to time the CPU on the full "
                 "sizes; pass --allow_cpu to do it anyway, --tiny for a smoke run.")
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as work:
        todo = parts(FLAGS.tiny, work, FLAGS.history_fill)
        scale = budget / sum(share for _, share, _ in todo)
        deadline = time.monotonic()
        for name, share, commands in todo:
            deadline += share * scale  # unused time of the parts before carries over
            result = run_part(commands, deadline, os.path.join(work, f"{name}.json"))
            results["parts"][name] = result
            results["wall_s"] = round(time.monotonic() - began, 1)
            write(results, out)
            print(f"{name}: {result['status']} in {result['seconds']} s", flush=True)
    failed = [n for n, r in results["parts"].items() if r["status"] != "ok"]
    print(f"{len(todo) - len(failed)} of {len(todo)} parts ok in {results['wall_s']} s; "
          f"results in {out}")
    if failed:
        cli.fail(f"not ok: {', '.join(failed)} (their output is in {out})")


if __name__ == "__main__":
    define_flags()
    cli.run(main)

"""CTR training throughput: tfmm's ID-DIN and SimTier+MAKE rankers next to DeepCTR's DIN.

    pip install -e ".[bench]"        # DeepCTR 0.9.4 (its DIN runs under tf-keras)
    python -m benchmarks.ctr_step --batch_size=1024 --max_history=50

Every model trains on the same in-memory batches of random ids (the input
pipeline is measured by benchmarks.input_pipeline), with the same shapes:
embedding 16 for user, item and category, history of L items and their
categories, attention MLP 80-40 with sigmoid, MLP 200-80 with ReLU, and the
same compile settings (``jit_compile`` pinned by --jit_compile on both
sides: Keras 3's default "auto" and tf-keras' None differ) and the same dtype
policy (--mixed_precision: ``mixed_float16`` in Keras 3 and in tf-keras, whose
``compile`` then scales the loss). Like for like:

- Adam with Adam: DeepCTR trains with tf-keras' Adam, which sums an
  embedding row's gradients before squaring them; so does
  `tfmm.optimizers.DenseGradientAdam` (the CTR job's
  ``--optimizer=dense_adam``), not Keras 3's Adam, whose rate is printed too.
- History fill (--history_fill): tfmm's DIN attention computes only the real
  history positions, DeepCTR every position, so the ratio depends on how
  full histories are: ``random`` (lengths uniform in 1..L, half full on
  average) or ``full`` (every history L long, where that advantage is nil).

Each model runs in its own subprocess (DeepCTR with TF_USE_LEGACY_KERAS=1,
since it needs Keras 2), in --rounds rounds that alternate the models, so
that this VM's drifting speed (up to 2x between runs) hits them alike.
Prints every run, the median of each model over the rounds and the ratios
the training goals are stated in (--models: a subset); --json writes them.
"""

import json
import os
import subprocess
import sys
import time

from absl import flags
import numpy as np

from benchmarks import report
from tfmm import cli

FLAGS = flags.FLAGS


def random_batch(vector_dim=0):
    """One batch of reader-like features: ids from 2, histories padded with 0 at the end."""
    rng = np.random.default_rng(0)
    b, L = FLAGS.batch_size, FLAGS.max_history
    lengths = rng.integers(1, L + 1, b) if FLAGS.history_fill == "random" else np.full(b, L)
    mask = np.arange(L)[None, :] < lengths[:, None]
    f = {"user_id": rng.integers(2, FLAGS.num_users, b),
         "item_id": rng.integers(2, FLAGS.num_items, b),
         "category_id": rng.integers(2, FLAGS.num_categories, b),
         "history_item_ids": rng.integers(2, FLAGS.num_items, (b, L)) * mask,
         "history_category_ids": rng.integers(2, FLAGS.num_categories, (b, L)) * mask,
         "history_mask": mask, "history_length": lengths}
    if vector_dim:
        v = rng.normal(size=(b, L + 1, vector_dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=-1, keepdims=True)
        f["item_vector"], f["history_vectors"] = v[:, 0], v[:, 1:] * mask[..., None]
    return f, rng.integers(0, 2, (b, 1)).astype(np.float32)


def set_precision(keras):
    """--mixed_precision: float16 compute, float32 variables, for the models built next."""
    if FLAGS.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")


def rate(model, features, label, optimizer):
    """Examples/s of model.fit over one repeated in-memory batch: the best of
    --repeats timed runs after a warm-up (the first model in a process pays
    for thread pools and kernel selection)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensors((features, label)).repeat()
    model.compile(optimizer, "binary_crossentropy", jit_compile=FLAGS.jit_compile)
    model.fit(ds, steps_per_epoch=10, shuffle=False, verbose=0)  # trace and warm up
    best = 0.0
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        model.fit(ds, steps_per_epoch=FLAGS.steps, shuffle=False, verbose=0)
        best = max(best, FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - start))
    return best


def deepctr_rate():
    import tensorflow as tf

    from benchmarks.deepctr_din import deepctr_din

    set_precision(tf.keras)  # tf-keras: this process runs with TF_USE_LEGACY_KERAS=1
    model = deepctr_din(FLAGS.max_history, FLAGS.num_users, FLAGS.num_items,
                        FLAGS.num_categories)
    f, y = random_batch()
    features = {"user": f["user_id"], "item_id": f["item_id"], "cate_id": f["category_id"],
                "hist_item_id": f["history_item_ids"], "hist_cate_id": f["history_category_ids"],
                "seq_length": f["history_length"]}
    return rate(model, features, y, tf.keras.optimizers.Adam(1e-3)), tf.__version__


def tfmm_rate(name):
    from tfmm.keras_compat import keras
    from tfmm.layers import MAKEBlock
    from tfmm.optimizers import DenseGradientAdam
    from tfmm.ranker import DINRanker

    set_precision(keras)
    vocab = {"num_items": FLAGS.num_items, "num_users": FLAGS.num_users,
             "num_categories": FLAGS.num_categories}
    method = "id" if name.startswith("id") else name
    d = 0 if method == "id" else FLAGS.vector_dim
    make = MAKEBlock(mlp_units=(64, 32, 16, 1), return_knowledge=True, target_in_mlp=True,
                     name="make")
    make.trainable = False  # pre-trained and frozen, as in configs/ctr.flags
    model = DINRanker(vocab, FLAGS.max_history, method=method, vector_dim=d or None,
                         make=make if d else None, simtier_output="fraction")
    f, y = random_batch(d)
    import tensorflow as tf

    optimizer = DenseGradientAdam if name == "id_dense_adam" else keras.optimizers.Adam
    return rate(model, {k: f[k] for k in model.input}, y, optimizer(1e-3)), tf.__version__


def run(model):
    """Examples/s of `model` (and the TF version) from a fresh subprocess."""
    args = [f"--{k}={FLAGS[k].value}" for k in ("batch_size", "max_history", "steps", "repeats",
                                                "num_items", "num_users", "num_categories",
                                                "vector_dim", "history_fill", "jit_compile",
                                                "mixed_precision")]
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1") if model == "deepctr" else os.environ
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ctr_step", f"--only={model}", *args],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        hint = " (pip install -e '.[bench]'?)" if model == "deepctr" else ""
        sys.exit(f"{model} run failed{hint}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


NAMES = {"deepctr": "DeepCTR 0.9.4 DIN (tf-keras Adam)",
         "id": "tfmm ID-DIN (Keras 3 Adam)",
         "id_dense_adam": "tfmm ID-DIN (DenseGradientAdam)",
         "simtier_make": "tfmm SimTier+MAKE (d={d}, MAKE frozen)"}
# (model, peer): the printed line of their ratio, the goals' terms.
RATIOS = {("id_dense_adam", "deepctr"): "tfmm ID-DIN / DeepCTR, Adam with Adam "
          "(DenseGradientAdam): {:5.2f}x (goal >= 3x)",
          ("id", "deepctr"): "  with Keras 3's Adam instead:  {:5.2f}x",
          ("simtier_make", "id"): "tfmm SimTier+MAKE / ID-DIN:   {:5.2f}x (goal >= 0.75x)"}


def define_flags():
    flags.DEFINE_integer("batch_size", 1024, "Batch size.")
    flags.DEFINE_integer("max_history", 50, "History length L.")
    flags.DEFINE_integer("steps", 40, "Training steps per timed run.")
    flags.DEFINE_integer("repeats", 3, "Timed runs per model (the best counts).")
    flags.DEFINE_integer("num_items", 4002, "Item vocabulary (the small world's).")
    flags.DEFINE_integer("num_users", 3002, "User vocabulary.")
    flags.DEFINE_integer("num_categories", 10, "Category vocabulary.")
    flags.DEFINE_integer("vector_dim", 128, "Multimodal vector width of SimTier+MAKE.")
    flags.DEFINE_integer("rounds", 3, "Rounds of the models, each in a fresh process.")
    flags.DEFINE_enum("history_fill", "random", ["random", "full"], "History lengths: uniform in "
                      "1..L, or all L.")
    flags.DEFINE_bool("jit_compile", False, "XLA for every model (compile's jit_compile).")
    flags.DEFINE_bool("mixed_precision", False, "Keras' mixed_float16 dtype policy for every "
                      "model (float16 compute, float32 variables, loss scaling).")
    flags.DEFINE_list("models", list(NAMES), "Models to run (the ratios of those present).")
    report.define_json_flag()
    flags.DEFINE_string("only", "", "Internal: run one model (deepctr, id, id_dense_adam or "
                        "simtier_make) and print its rate.")


def main(argv):
    del argv
    if FLAGS.only:
        print(json.dumps(deepctr_rate() if FLAGS.only == "deepctr" else tfmm_rate(FLAGS.only)))
        return
    unknown = set(FLAGS.models) - set(NAMES)
    if unknown or not FLAGS.models:
        cli.fail(f"--models: unknown {sorted(unknown)}; choose from {', '.join(NAMES)}."
                 if unknown else "--models: name at least one model.")
    names = {m: label.format(d=FLAGS.vector_dim) for m, label in NAMES.items()
             if m in FLAGS.models}
    rates = {m: [] for m in names}
    print(f"batch {FLAGS.batch_size}, L={FLAGS.max_history}, history fill "
          f"{FLAGS.history_fill}, jit_compile={FLAGS.jit_compile}, mixed_precision="
          f"{FLAGS.mixed_precision}, best of {FLAGS.repeats} x {FLAGS.steps} steps per run, "
          f"{FLAGS.rounds} rounds, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at the start", flush=True)
    for r in range(FLAGS.rounds):
        for m in names if r % 2 == 0 else reversed(names):
            rate, tf_version = run(m)
            rates[m].append(rate)
            print(f"  round {r + 1}: {names[m]:<42} {rate:10,.0f} examples/s", flush=True)
    med = {m: float(np.median(v)) for m, v in rates.items()}
    print(f"TF {tf_version}; medians over the rounds:")
    for m, label in names.items():
        print(f"{label:<44} {med[m]:10,.0f} examples/s")
    ratios = {}
    for (ours, peer), line in RATIOS.items():
        if ours in med and peer in med:
            ratios[f"{ours}/{peer}"] = med[ours] / med[peer]
            print(line.format(ratios[f"{ours}/{peer}"]))
    report.write_json({"examples_per_s": med, "rounds": rates, "ratios": ratios,
                       "tf_version": tf_version})


if __name__ == "__main__":
    define_flags()
    cli.run(main)

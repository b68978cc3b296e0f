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

Rooflines: the FLOPs per example are counted from the shapes of the
model's matmuls (`flops_per_example`: 2 m k n per product; a trained product
3 times that, forward, input gradient and weight gradient; elementwise ops,
gathers and the optimizer not counted), with the attention arranged as
tfmm's (its first layer two [d, h] products per real history position and
one per example for the query, the fewest of the two arrangements). The
machine's GEMM rate is a bare matmul of the attention's first-layer size
(its two halves as one product, [B x real positions, 4e] @ [4e, h]: the
fastest of the model's shapes on this VM; float32, also under
--mixed_precision), timed in the same rounds;
rate / FLOPs is the roofline in examples/s, and each side's rate is printed
as a fraction of it (DeepCTR's too, against the same count: its own
arrangement does more).

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


def din_flops(d, units, positions):
    """Forward FLOPs of DIN attention for one query: the first layer's two [d, h]
    products per position and one for the query, the MLP on each position,
    and the pooling (a [L] @ [L, d] product)."""
    widths = (*units, 1)
    per_position = 2 * 2 * d * widths[0] + sum(2 * a * b for a, b in zip(widths, widths[1:]))
    return positions * per_position + 2 * d * widths[0] + 2 * positions * d


def mlp_flops(widths):
    """Forward FLOPs of dense layers of these widths (input first)."""
    return sum(2 * a * b for a, b in zip(widths, widths[1:]))


MAKE_MLP_UNITS = (64, 32, 16, 1)


def shapes():
    """The benchmarked models' widths: DINRanker's and DINAttention's defaults (MAKE's
    attention is a default DINAttention), and MAKE's MLP as `tfmm_rate` builds it."""
    from tfmm.config import default_of
    from tfmm.layers import DINAttention
    from tfmm.ranker import DINRanker

    return {"embedding_dim": default_of(DINRanker, "embedding_dim"),
            "attention_units": tuple(default_of(DINRanker, "attention_units")),
            "mlp_units": tuple(default_of(DINRanker, "mlp_units")),
            "num_tiers": default_of(DINRanker, "num_tiers"),
            "make_attention_units": tuple(default_of(DINAttention, "hidden_units")),
            "make_mlp_units": MAKE_MLP_UNITS}


def flops_per_example(positions, embedding_dim, attention_units, mlp_units, num_tiers,
                      make_attention_units, make_mlp_units, vector_dim=0):
    """Matmul FLOPs of one training example of the DIN ranker over `positions`
    real history positions (the counting rule: module docstring).

    With `vector_dim`, SimTier+MAKE as this benchmark builds it: SimTier's
    similarities (a [L, d] @ [d] product) and the frozen MAKE's attention and
    MLP (forward only: nothing trainable feeds them), and its residual head (trained).
    """
    e = embedding_dim
    forward = din_flops(2 * e, attention_units, positions)
    forward += mlp_flops((e + 4 * e + (num_tiers if vector_dim else 0), *mlp_units, 1))
    total = 3 * forward
    if vector_dim:
        make = din_flops(vector_dim, make_attention_units, positions)
        make += mlp_flops((2 * vector_dim, *make_mlp_units))
        total += make + 2 * positions * vector_dim
        total += 3 * mlp_flops((vector_dim + sum(make_mlp_units), 1))  # the head
    return total


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


def gemm_rate():
    """GFLOP/s of a bare matmul the size of the attention's first layer (module docstring),
    timed like a model: the best of --repeats runs of --steps products after a warm-up."""
    import tensorflow as tf

    features, _ = random_batch()
    e, h = shapes()["embedding_dim"], shapes()["attention_units"][0]
    m = int(features["history_mask"].sum())
    a, b = tf.random.normal([m, 4 * e]), tf.random.normal([4 * e, h])
    product = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
    for _ in range(10):
        product(a, b).numpy()
    best = 0.0
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        for _ in range(FLAGS.steps):
            product(a, b).numpy()
        best = max(best, FLAGS.steps * 2 * m * 4 * e * h / (time.perf_counter() - start) / 1e9)
    return best, tf.__version__


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
    make = MAKEBlock(mlp_units=MAKE_MLP_UNITS, return_knowledge=True, target_in_mlp=True,
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
        only = {"deepctr": deepctr_rate, "gemm": gemm_rate}.get(FLAGS.only)
        print(json.dumps(only() if only else tfmm_rate(FLAGS.only)))
        return
    unknown = set(FLAGS.models) - set(NAMES)
    if unknown or not FLAGS.models:
        cli.fail(f"--models: unknown {sorted(unknown)}; choose from {', '.join(NAMES)}."
                 if unknown else "--models: name at least one model.")
    names = {m: label.format(d=FLAGS.vector_dim) for m, label in NAMES.items()
             if m in FLAGS.models}
    rates, gemm = {m: [] for m in names}, []
    print(f"batch {FLAGS.batch_size}, L={FLAGS.max_history}, history fill "
          f"{FLAGS.history_fill}, jit_compile={FLAGS.jit_compile}, mixed_precision="
          f"{FLAGS.mixed_precision}, best of {FLAGS.repeats} x {FLAGS.steps} steps per run, "
          f"{FLAGS.rounds} rounds, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at the start", flush=True)
    for r in range(FLAGS.rounds):
        gemm.append(run("gemm")[0])
        print(f"  round {r + 1}: {'bare GEMM (roofline)':<42} {gemm[-1]:10,.1f} GFLOP/s",
              flush=True)
        for m in names if r % 2 == 0 else reversed(names):
            rate, tf_version = run(m)
            rates[m].append(rate)
            print(f"  round {r + 1}: {names[m]:<42} {rate:10,.0f} examples/s", flush=True)
    med = {m: float(np.median(v)) for m, v in rates.items()}
    print(f"TF {tf_version}; medians over the rounds:")
    for m, label in names.items():
        print(f"{label:<44} {med[m]:10,.0f} examples/s")
    roofline = rooflines(float(np.median(gemm)), med)
    ratios = {}
    for (ours, peer), line in RATIOS.items():
        if ours in med and peer in med:
            ratios[f"{ours}/{peer}"] = med[ours] / med[peer]
            print(line.format(ratios[f"{ours}/{peer}"]))
    report.write_json({"examples_per_s": med, "rounds": rates, "ratios": ratios,
                       "tf_version": tf_version, "gemm_gflops_rounds": gemm, **roofline})


def rooflines(gflops, med):
    """Prints and returns the FLOPs per example, the GEMM rate, each model's roofline
    (examples/s) and each model's fraction of it (DeepCTR's against ID-DIN's)."""
    positions = float(random_batch()[0]["history_mask"].sum(1).mean())
    flops = {"id": flops_per_example(positions, **shapes()),
             "simtier_make": flops_per_example(positions, **shapes(),
                                               vector_dim=FLAGS.vector_dim)}
    line = {m: gflops * 1e9 / f for m, f in flops.items()}
    print(f"Roofline: matmul FLOPs per example (2mkn a product, x3 trained; {positions:.1f} "
          f"real history positions): ID-DIN {flops['id'] / 1e6:.3f} M, SimTier+MAKE "
          f"{flops['simtier_make'] / 1e6:.3f} M; bare GEMM {gflops:.1f} GFLOP/s (median); "
          f"roofline ID-DIN {line['id']:,.0f}, SimTier+MAKE {line['simtier_make']:,.0f} "
          "examples/s")
    fraction = {m: rate / line["simtier_make" if m == "simtier_make" else "id"]
                for m, rate in med.items()}
    for m, f in fraction.items():
        print(f"  {m:<14} {f:6.1%} of its roofline")
    return {"flops_per_example": flops, "history_positions": positions,
            "gemm_gflops": gflops, "roofline_examples_per_s": line,
            "roofline_fraction": fraction}


if __name__ == "__main__":
    define_flags()
    cli.run(main)

"""The README's first command: runs what tfmm has so far, end to end, and says what it did.

Today: it generates the synthetic Taobao-like world (`small` by default,
cached under --data_dir), trains the ID-only DIN ranker and the same ranker
with SimTier and a pre-trained, frozen MAKE block, one epoch each, reports
their test AUC (overall and on cold-start items), and round-trips the
multimodal ranker through a ``.keras`` file. Until SCL pre-training exists the
multimodal vectors are the world's *oracle* vectors (its hidden attributes),
so the multimodal row is an upper bound, not a result.
"""

import os
import pathlib
import time

from absl import app, flags

flags.DEFINE_enum("world", "small", ["tiny", "small", "large"], "World to generate if missing.")
flags.DEFINE_string("data_dir", None, "Data directory (default data/<world>; made if missing).")
flags.DEFINE_string("out_dir", "runs/demo", "Where the demo writes its model.")
flags.DEFINE_integer("epochs", 1, "Ranker epochs (ID models train one, paper Fig. 3).")
flags.DEFINE_integer("make_epochs", 3, "MAKE pre-training epochs.")
flags.DEFINE_integer("batch_size", 512, "Batch size.")
flags.DEFINE_integer("seed", 0, "Seed of the models.")
FLAGS = flags.FLAGS

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from tfmm import data  # noqa: E402
from tfmm.data import schema, world as world_lib  # noqa: E402
from tfmm.data.synthetic import write_world  # noqa: E402
from tfmm.keras_compat import keras  # noqa: E402
from tfmm.layers import MAKEBlock  # noqa: E402
from tfmm.metrics import auc  # noqa: E402
from tfmm.ranker import build_make_pretrainer, build_ranker  # noqa: E402


def oracle_snapshot(data_dir, meta):
    truth = np.load(os.path.join(data_dir, "truth.npz"))
    cfg = world_lib.WorldConfig(**meta["world"])
    vectors = world_lib.oracle_vectors(truth["category"], truth["colour"], truth["pattern"], cfg)
    ids = np.arange(len(vectors)) + schema.FIRST_ID
    return data.Vectors.from_items(ids, vectors, meta["vocab"]["num_items"])


def batches(data_dir, split, names, vectors, extra=(), **kw):
    return data.impressions(data_dir, split, batch_size=FLAGS.batch_size, vectors=vectors,
                            features=list(names) + list(extra), **kw)


def evaluate(model, data_dir, vectors):
    names = list(model.input)
    test = batches(data_dir, "test", names, vectors, extra=["is_new_item"], validate=False)
    ys, ps, new = [], [], []
    for f, y in test:
        ps.append(model({k: f[k] for k in names}, training=False).numpy()[:, 0])
        ys.append(y.numpy())
        new.append(f["is_new_item"].numpy() == 1)
    y, p, new = map(np.concatenate, (ys, ps, new))
    return auc(y, p), auc(y[new], p[new]), int(new.sum())


def fit(model, data_dir, vectors, epochs, lr=1e-3):
    model.compile(keras.optimizers.Adam(lr), "binary_crossentropy")
    train = batches(data_dir, "train", list(model.input), vectors)
    model.fit(train, epochs=epochs, shuffle=False, verbose=2)


def main(argv):
    del argv
    start = time.time()
    keras.utils.set_random_seed(FLAGS.seed)
    data_dir = FLAGS.data_dir or f"data/{FLAGS.world}"
    if not os.path.exists(os.path.join(data_dir, "metadata.json")):
        print(f"generating the {FLAGS.world} world into {data_dir} ...")
        write_world(world_lib.generate(world_lib.PRESETS[FLAGS.world]), data_dir)
    meta = schema.read_metadata(data_dir)
    print(f"data {data_dir}: {meta['counts']}")
    L = meta["max_history"]
    vectors = oracle_snapshot(data_dir, meta)
    d = vectors.table.shape[1]

    print("training the ID-only DIN ranker ...")
    id_model = build_ranker(meta["vocab"], L)
    fit(id_model, data_dir, None, FLAGS.epochs)
    results = {"id": evaluate(id_model, data_dir, None)}

    print(f"pre-training MAKE for {FLAGS.make_epochs} epochs on oracle vectors ...")
    make = MAKEBlock(mlp_units=(64, 32, 16, 1), return_knowledge=True, name="make")
    fit(build_make_pretrainer(make, L, d), data_dir, vectors, FLAGS.make_epochs)
    make.trainable = False
    print("training DIN + SimTier + frozen MAKE ...")
    mm_model = build_ranker(meta["vocab"], L, method="simtier_make", vector_dim=d, make=make)
    fit(mm_model, data_dir, vectors, FLAGS.epochs)
    results["simtier_make (oracle vectors)"] = evaluate(mm_model, data_dir, vectors)

    out = pathlib.Path(FLAGS.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "simtier_make_ranker.keras"
    mm_model.save(path)
    reloaded = keras.models.load_model(path, compile=False)
    probe = next(iter(batches(data_dir, "test", list(mm_model.input), vectors, validate=False)))[0]
    same = np.array_equal(reloaded(probe).numpy(), mm_model(probe).numpy())

    print(f"\n{'model':32s} {'test AUC':>9s} {'new-item AUC':>13s}")
    for name, (overall, cold, n_new) in results.items():
        print(f"{name:32s} {overall:9.4f} {cold:13.4f}   ({n_new} new-item impressions)")
    print(f"\nsaved {path}; reloaded predictions identical: {same}")
    print(f"done in {time.time() - start:.0f}s. Not yet built: SCL pre-training (real vectors), "
          "`python -m tfmm.train`, GAUC, SavedModel export and serving (see the open issues).")
    if not same:
        raise SystemExit("round trip changed the predictions")


if __name__ == "__main__":
    app.run(main)

"""The README's first command: runs what tfmm has so far, end to end, and says what it did.

Today: it generates the synthetic Taobao-like world (`small` by default,
cached under --data_dir); pre-trains the image encoder with SCL
(configs/pretrain.flags), exports it and writes every item's vector to the
index table; trains the ID-only DIN ranker and the same ranker with SimTier
and a pre-trained, frozen MAKE block on the index's vectors, one epoch each;
reports their test AUC (overall and on cold-start items); and round-trips the
multimodal ranker through a ``.keras`` file.
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
flags.DEFINE_integer("pretrain_epochs", 2, "SCL pre-training epochs.")
flags.DEFINE_integer("batch_size", 512, "Batch size.")
flags.DEFINE_integer("seed", 0, "Seed of the models.")
FLAGS = flags.FLAGS

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from tfmm import data  # noqa: E402
from tfmm.data import schema  # noqa: E402
from tfmm.data.synthetic import ensure_world  # noqa: E402
from tfmm.index import SQLiteIndex  # noqa: E402
from tfmm.keras_compat import keras  # noqa: E402
from tfmm.layers import MAKEBlock  # noqa: E402
from tfmm.metrics import auc  # noqa: E402
from tfmm.pretrain import PretrainConfig, run as pretrain  # noqa: E402
from tfmm.ranker import build_make_pretrainer, build_ranker  # noqa: E402


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
    data_dir = ensure_world(FLAGS.data_dir or f"data/{FLAGS.world}", FLAGS.world)
    meta = schema.read_metadata(data_dir)
    print(f"data {data_dir}: {meta['counts']}")
    L = meta["max_history"]

    print(f"SCL pre-training of the image encoder, {FLAGS.pretrain_epochs} epochs ...")
    out = pathlib.Path(FLAGS.out_dir)
    index_path = out / "index" / "vectors.db"
    scl = pretrain(PretrainConfig(
        data_dir=data_dir, model_dir=str(out / "pretrain"), export_dir=str(out / "export"),
        index=str(index_path), queue_size=4096, momentum=0.99, epochs=FLAGS.pretrain_epochs,
        seed=FLAGS.seed))
    print(f"encoder Acc@1 {scl['acc@1']:.4f}, Acc@5 {scl['acc@5']:.4f}; exported to "
          f"{scl['export_path']}; {scl['index_items']} vectors in {index_path}")
    vectors = SQLiteIndex(index_path).snapshot(meta["vocab"]["num_items"])
    d = vectors.table.shape[1]

    print("training the ID-only DIN ranker ...")
    id_model = build_ranker(meta["vocab"], L)
    fit(id_model, data_dir, None, FLAGS.epochs)
    results = {"id": evaluate(id_model, data_dir, None)}

    print(f"pre-training MAKE for {FLAGS.make_epochs} epochs on the SCL vectors ...")
    make = MAKEBlock(mlp_units=(64, 32, 16, 1), return_knowledge=True, name="make")
    fit(build_make_pretrainer(make, L, d), data_dir, vectors, FLAGS.make_epochs)
    make.trainable = False
    print("training DIN + SimTier + frozen MAKE ...")
    mm_model = build_ranker(meta["vocab"], L, method="simtier_make", vector_dim=d, make=make)
    fit(mm_model, data_dir, vectors, FLAGS.epochs)
    results["simtier_make (SCL vectors)"] = evaluate(mm_model, data_dir, vectors)

    path = out / "simtier_make_ranker.keras"
    mm_model.save(path)
    reloaded = keras.models.load_model(path, compile=False)
    probe = next(iter(batches(data_dir, "test", list(mm_model.input), vectors, validate=False)))[0]
    same = np.array_equal(reloaded(probe).numpy(), mm_model(probe).numpy())

    print(f"\n{'model':32s} {'test AUC':>9s} {'new-item AUC':>13s}")
    for name, (overall, cold, n_new) in results.items():
        print(f"{name:32s} {overall:9.4f} {cold:13.4f}   ({n_new} new-item impressions)")
    print(f"\nsaved {path}; reloaded predictions identical: {same}")
    print(f"done in {time.time() - start:.0f}s. Not yet built: `python -m tfmm.train --task=ctr`, "
          "GAUC and the paper's report, ranker SavedModels and serving (see the open issues).")
    if not same:
        raise SystemExit("round trip changed the predictions")


if __name__ == "__main__":
    app.run(main)

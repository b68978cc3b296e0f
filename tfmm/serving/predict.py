"""Ranks candidates for one user with a trained ranker: the online path, end to end.

    python -m tfmm.serving.predict                     # test impression 0's user, 200 items
    python -m tfmm.serving.predict --user_id=7 --history=12,40,33 --candidates=5,81,102
    python -m tfmm.serving.predict --server=grpc://localhost:8500/ranker --index=redis://...

The ranker is the highest version under ``--export_dir``, called in-process,
or TF Serving with ``--server``; item vectors come from ``--index`` and
categories from ``--data_dir``'s catalogue. Prints the top ``--top_k``
candidates with P(click) and how many items had no vector in the index
(they are scored with zeros, as in training). Defaults follow `tfmm.train`'s.
"""

import os
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_enum("world", "small", ["tiny", "small", "large"],
                  "Synthetic world of the defaults (as tfmm.train's --world).")
flags.DEFINE_string("data_dir", None, "tfmm data directory: the catalogue's categories and "
                    "the test impressions (default data/<world>).")
flags.DEFINE_string("export_dir", None, "Ranker SavedModels <export_dir>/<version>/; the "
                    "highest is used (default runs/<dataset>/export/ranker).")
flags.DEFINE_string("index", None, "Index table: a file or redis:// URL (default "
                    "runs/<dataset>/index/vectors.db).")
flags.DEFINE_string("server", None, "TF Serving instead of in-process: rest://host:port/NAME "
                    "or grpc://host:port/NAME (optionally .../versions/N).")
flags.DEFINE_integer("user_id", None, "The user (with --history); default: a test impression's.")
flags.DEFINE_list("history", [], "The user's behaviour, item ids oldest first.")
flags.DEFINE_integer("from_test_impression", None, "Take user and history from this test "
                     "impression (default 0 without --user_id); its item joins the drawn "
                     "candidates.")
flags.DEFINE_list("candidates", [], "Item ids to rank (default --num_candidates catalogue items).")
flags.DEFINE_integer("num_candidates", 200, "Catalogue items drawn when --candidates is empty.")
flags.DEFINE_integer("top_k", 5, "Candidates printed.")
flags.DEFINE_integer("seed", 0, "Seed of the drawn candidates.")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfmm.data import schema  # noqa: E402
from tfmm.index import IndexUnavailable, is_empty, open_index, redact  # noqa: E402
from tfmm.serving.predictor import (Predictor, Request, ServingError, item_categories,  # noqa: E402
                                    open_model)


def _ints(values, flag):
    try:
        return [int(v) for v in values]
    except ValueError:
        sys.exit(f"--{flag}={','.join(values)}: want integer ids.")


def read_test_impression(data_dir, n):
    """(user_id, history item ids, item_id, label) of the `n`-th test impression."""
    meta = schema.read_metadata(data_dir)
    paths = schema.files(data_dir, meta, "impressions/test")
    count = meta["counts"]["impressions/test"]
    if not 0 <= n < count:
        sys.exit(f"--from_test_impression={n}: {data_dir} has {count} test "
                             "impressions.")
    record = next(iter(tf.data.TFRecordDataset(paths).skip(n).take(1)))
    raw = tf.io.parse_single_example(record, schema.impression_spec(meta.get("side_features", ())))
    return (int(raw["user_id"]), raw["history_item_ids"].values.numpy(), int(raw["item_id"]),
            int(raw["label"]))


def main(argv):
    if len(argv) > 1:
        sys.exit(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if FLAGS.user_id is not None and FLAGS.from_test_impression is not None:
        sys.exit("--user_id and --from_test_impression both name the user; "
                             "give one.")
    if FLAGS.history and FLAGS.user_id is None:
        sys.exit("--history needs --user_id.")
    if FLAGS.num_candidates < 1 and not FLAGS.candidates:
        sys.exit(f"--num_candidates={FLAGS.num_candidates}: want at least 1.")
    data_dir = FLAGS.data_dir or os.path.join("data", FLAGS.world)
    runs = os.path.join("runs", os.path.basename(os.path.normpath(data_dir)))
    index_spec = FLAGS.index or os.path.join(runs, "index", "vectors.db")
    try:
        categories = item_categories(data_dir)
        model = open_model(FLAGS.server or FLAGS.export_dir or os.path.join(runs, "export",
                                                                            "ranker"))
    except FileNotFoundError as e:
        sys.exit(f"{e} Train first: python -m tfmm.train "
                             "--flagfile=configs/ctr.flags")
    except (ValueError, ServingError) as e:
        sys.exit(str(e))
    index = None
    if any(k in model.inputs for k in ("item_vector", "history_vectors")):
        try:
            if is_empty(index_spec):
                sys.exit(f"--index={redact(index_spec)} holds no vectors; {model} "
                                     "needs them.")
            index = open_index(index_spec)
        except (ValueError, IndexUnavailable) as e:  # a corrupt file, a server down
            sys.exit(f"--index: {e}")
    try:
        predictor = Predictor(model, index, item_categories=categories,
                              catalogue=schema.catalogue_fingerprint(data_dir))
    except ValueError as e:
        sys.exit(str(e))

    where, shown = "", None
    if FLAGS.user_id is None:
        n = FLAGS.from_test_impression or 0
        user, history, item, label = read_test_impression(data_dir, n)
        where, shown = f" (test impression {n})", (item, label)
    else:
        user, history = FLAGS.user_id, _ints(FLAGS.history, "history")
    candidates = np.array(_ints(FLAGS.candidates, "candidates"), np.int64)
    if not len(candidates):
        catalogue = np.flatnonzero(categories)
        if shown is not None:  # the impression's own item among the drawn ones
            catalogue = catalogue[catalogue != shown[0]]
        candidates = np.random.default_rng(FLAGS.seed).choice(
            catalogue, min(FLAGS.num_candidates, len(catalogue)) - (shown is not None),
            replace=False)
        if shown is not None:
            candidates = np.concatenate([[shown[0]], candidates])
    request = Request(user, history, candidates)
    p = predictor.predict(request)  # the first call also sets up the graph's kernels
    missing = predictor.stats["missing_vectors"]
    start = time.perf_counter()
    predictor.predict(request)
    took = 1000 * (time.perf_counter() - start)

    print(f"ranker {model}; index {'(none: an ID ranker)' if index is None else index}")
    print(f"user {user}{where}: {len(history)} history items "
          f"(the ranker takes the last {predictor.max_history}), {len(candidates)} candidates")
    print(f"{took:.1f} ms a request; items without a vector: {missing} (scored with zeros)")
    print("predictor totals: " + ", ".join(f"{k} {v}" for k, v in predictor.stats.items()))
    order = np.argsort(-p, kind="stable")
    print(f"{'rank':>4} {'item':>7} {'category':>8} {'P(click)':>9}")
    for rank, i in enumerate(order[:FLAGS.top_k], 1):
        item = candidates[i]
        category = categories[item] if 0 <= item < len(categories) else 0
        print(f"{rank:>4} {item:>7} {category:>8} {p[i]:>9.4f}")
    if shown is not None and shown[0] in candidates:
        i = int(np.flatnonzero(candidates == shown[0])[0])
        rank = int(np.flatnonzero(order == i)[0]) + 1
        clicked = "clicked" if shown[1] else "not clicked"
        print(f"the impression's item {shown[0]} ({clicked}): rank {rank} of "
              f"{len(candidates)}, P(click) {p[i]:.4f}")

if __name__ == "__main__":
    app.run(main)

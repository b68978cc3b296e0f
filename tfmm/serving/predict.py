"""Ranks candidates for one user with a trained ranker: the online path, end to end.

    python -m tfmm.serving.predict                     # test impression 0's user, 200 items
    python -m tfmm.serving.predict --user_id=7 --history=12,40,33 --candidates=5,81,102
    python -m tfmm.serving.predict --data_dir=data/mine --user_id=u-17 \\
        --history=sku-00012,sku-00040 --candidates=sku-00005,sku-00081
    python -m tfmm.serving.predict --server=grpc://localhost:8500/ranker --index=redis://...

The ranker is the highest version under ``--export_dir``, called in-process,
or TF Serving with ``--server``; item vectors come from ``--index`` and
categories from ``--data_dir``'s catalogue. Prints the top ``--top_k``
candidates with P(click) and how many items had no vector in the index
(they are scored with zeros, as in training). Defaults follow `tfmm.train`'s.

Ids are raw ids where ``--data_dir`` has a vocabulary (``vocab/*.txt``, written
by `tfmm.data.prepare`): ``--user_id``, ``--history`` and ``--candidates`` take
them, and the output names users, items and categories by them. An item the
vocabulary lacks is refused; a user it lacks is out of vocabulary (dense id 1),
as a user without training impressions is in training. A generated world has
no vocabulary: its ids are the dense ids. The library's `Predictor` takes dense
ids; `tfmm.data.schema.dense_ids` and `raw_ids` convert.
"""

import time

import numpy as np
import tensorflow as tf
from absl import flags

from tfmm import cli
from tfmm.data import schema
from tfmm.index import IndexUnavailable, is_empty, open_index, redact
from tfmm.serving.predictor import Predictor, Request, ServingError, item_categories, open_model

FLAGS = flags.FLAGS
OOV = "(out of vocabulary)"


def define_flags():
    cli.define_data_flags("tfmm data directory: the catalogue's categories, the test "
                          "impressions and the vocabularies of raw ids (default data/<world>).",
                          generates=False)
    flags.DEFINE_string("export_dir", None, "Ranker SavedModels <export_dir>/<version>/; the "
                        "highest is used (default runs/<dataset>/export/ranker).")
    flags.DEFINE_string("index", None, "Index table: a file or redis:// URL (default "
                        "runs/<dataset>/index/vectors.db).")
    flags.DEFINE_string("server", None, "TF Serving instead of in-process: rest://host:port/NAME "
                        "or grpc://host:port/NAME (optionally .../versions/N).")
    flags.DEFINE_string("user_id", None, "The user (with --history): a raw id where the data "
                        "dir has a vocabulary, else a dense id; default: a test impression's.")
    flags.DEFINE_list("history", [], "The user's behaviour, item ids oldest first.")
    flags.DEFINE_integer("from_test_impression", None, "Take user and history from this test "
                         "impression (default 0 without --user_id); its item joins the drawn "
                         "candidates.")
    flags.DEFINE_list("candidates", [], "Item ids to rank (default --num_candidates catalogue "
                      "items).")
    flags.DEFINE_integer("num_candidates", 200, "Catalogue items drawn when --candidates is "
                         "empty.")
    flags.DEFINE_integer("top_k", 5, "Candidates printed.")
    flags.DEFINE_integer("seed", 0, "Seed of the drawn candidates.")


class Ids:
    """A data directory's ids as the command line takes and prints them: raw ids where it
    has a vocabulary, else the dense ids as text."""

    def __init__(self, data_dir):
        self.data_dir, self.raw = data_dir, schema.has_vocabulary(data_dir)
        if self.raw:
            self.names = {name: schema.raw_ids(data_dir, name)
                          for name in ("users", "items", "categories")}

    def user(self, value):
        """The dense id of a --user_id (out of vocabulary when the vocabulary lacks it)."""
        if not self.raw:
            return _ints([value], "user_id")[0]
        return schema.dense_ids(self.data_dir, "users").get(value, schema.OOV_ID)

    def items(self, values, flag):
        """Dense ids of the item ids of `flag`, an int64 array."""
        if not self.raw:
            return np.array(_ints(values, flag), np.int64)
        dense = schema.dense_ids(self.data_dir, "items")
        unknown = [v for v in values if v not in dense]
        if unknown:
            cli.fail(f"--{flag}: {unknown[0]!r} is not an item of {self.data_dir} (its "
                     f"vocab/items.txt; {len(unknown)} such ids).")
        return np.array([dense[v] for v in values], np.int64)

    def name(self, vocabulary, dense, unknown="-"):
        """How a dense id of `vocabulary` is printed."""
        if not self.raw:
            return str(dense)
        names = self.names[vocabulary]
        return names[dense - schema.FIRST_ID] if 0 <= dense - schema.FIRST_ID < len(names) \
            else unknown


def _ints(values, flag):
    try:
        return [int(v) for v in values]
    except ValueError:
        cli.fail(f"--{flag}={','.join(values)}: want integer ids.")


def read_test_impression(data_dir, n):
    """(user_id, history item ids, item_id, label) of the `n`-th test impression."""
    meta = schema.read_metadata(data_dir)
    paths = schema.files(data_dir, meta, "impressions/test")
    count = meta["counts"]["impressions/test"]
    if not 0 <= n < count:
        cli.fail(f"--from_test_impression={n}: {data_dir} has {count} test impressions.")
    record = next(iter(tf.data.TFRecordDataset(paths).skip(n).take(1)))
    raw = tf.io.parse_single_example(record, schema.impression_spec(meta.get("side_features", ())))
    return (int(raw["user_id"]), raw["history_item_ids"].values.numpy(), int(raw["item_id"]),
            int(raw["label"]))


def open_predictor(data_dir):
    """(predictor, the dense ids' categories) of the flags' ranker, index and catalogue."""
    index_spec = FLAGS.index or cli.runs(data_dir, "index", "vectors.db")
    try:
        categories = item_categories(data_dir)
        # One request: compiling it with XLA would cost more than it saves.
        model = open_model(FLAGS.server or FLAGS.export_dir
                           or cli.runs(data_dir, "export", "ranker"), jit_compile=False)
    except FileNotFoundError as e:
        cli.fail(f"{e} Train first: python -m tfmm.train --flagfile=configs/ctr.flags")
    except (ValueError, ServingError) as e:
        cli.fail(str(e))
    index = None
    if any(k in model.inputs for k in ("item_vector", "history_vectors")):
        try:
            if is_empty(index_spec):
                cli.fail(f"--index={redact(index_spec)} holds no vectors; {model} needs them.")
            index = open_index(index_spec)
        except (ValueError, IndexUnavailable) as e:  # a corrupt file, a server down
            cli.fail(f"--index: {e}")
    try:
        predictor = Predictor(model, index, item_categories=categories,
                              catalogue=schema.catalogue_fingerprint(data_dir))
    except ValueError as e:
        cli.fail(str(e))
    return predictor, categories


def request(data_dir, ids, categories):
    """The flags' request in dense ids; (request, where it came from, the test impression's
    (item, label) or None)."""
    where, shown = "", None
    if FLAGS.user_id is None:
        n = FLAGS.from_test_impression or 0
        user, history, item, label = read_test_impression(data_dir, n)
        where, shown = f" (test impression {n})", (item, label)
    else:
        user, history = ids.user(FLAGS.user_id), ids.items(FLAGS.history, "history")
    candidates = ids.items(FLAGS.candidates, "candidates")
    if not len(candidates):
        catalogue = np.flatnonzero(categories)
        if shown is not None:  # the impression's own item among the drawn ones
            catalogue = catalogue[catalogue != shown[0]]
        candidates = np.random.default_rng(FLAGS.seed).choice(
            catalogue, min(FLAGS.num_candidates, len(catalogue)) - (shown is not None),
            replace=False)
        if shown is not None:
            candidates = np.concatenate([[shown[0]], candidates])
    return Request(user, history, candidates), where, shown


def main(argv):
    del argv
    if FLAGS.user_id is not None and FLAGS.from_test_impression is not None:
        cli.fail("--user_id and --from_test_impression both name the user; give one.")
    if FLAGS.history and FLAGS.user_id is None:
        cli.fail("--history needs --user_id.")
    if FLAGS.num_candidates < 1 and not FLAGS.candidates:
        cli.fail(f"--num_candidates={FLAGS.num_candidates}: want at least 1.")
    data_dir = cli.data_dir(generate=False)
    predictor, categories = open_predictor(data_dir)
    ids = Ids(data_dir)
    req, where, shown = request(data_dir, ids, categories)
    p = predictor.predict(req)  # the first call also sets up the graph's kernels
    missing = predictor.stats["missing_vectors"]
    start = time.perf_counter()
    predictor.predict(req)
    took = 1000 * (time.perf_counter() - start)

    candidates, index = req.candidate_item_ids, predictor.index
    print(f"ranker {predictor.model}; index {'(none: an ID ranker)' if index is None else index}")
    user = ids.name("users", req.user_id, OOV)
    if user == OOV and FLAGS.user_id is not None:
        user = f"{FLAGS.user_id} {OOV}"
    print(f"user {user}{where}: {len(req.history_item_ids)} "
          f"history items (the ranker takes the last {predictor.max_history}), "
          f"{len(candidates)} candidates")
    print(f"{took:.1f} ms a request; items without a vector: {missing} (scored with zeros)")
    print("predictor totals: " + ", ".join(f"{k} {v}" for k, v in predictor.stats.items()))
    order = np.argsort(-p, kind="stable")
    rows = [(rank, ids.name("items", candidates[i]),
             ids.name("categories", categories[candidates[i]]
                      if 0 <= candidates[i] < len(categories) else 0), p[i])
            for rank, i in enumerate(order[:FLAGS.top_k], 1)]
    item_width = max([7] + [len(row[1]) for row in rows])
    category_width = max([8] + [len(row[2]) for row in rows])
    print(f"{'rank':>4} {'item':>{item_width}} {'category':>{category_width}} {'P(click)':>9}")
    for rank, item, category, score in rows:
        print(f"{rank:>4} {item:>{item_width}} {category:>{category_width}} {score:>9.4f}")
    if shown is not None and shown[0] in candidates:
        i = int(np.flatnonzero(candidates == shown[0])[0])
        rank = int(np.flatnonzero(order == i)[0]) + 1
        clicked = "clicked" if shown[1] else "not clicked"
        print(f"the impression's item {ids.name('items', shown[0])} ({clicked}): rank {rank} of "
              f"{len(candidates)}, P(click) {p[i]:.4f}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)

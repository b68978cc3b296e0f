"""Online predictor latency: one user x 200 candidates, history 100, in-process SavedModel.

    python -m benchmarks.predictor_latency --models=id,simtier,simtier_make
    python -m benchmarks.predictor_latency --export_dir=runs/small/export/ranker

Exports untrained rankers of the small world's shapes (latency does not
depend on the weights) or takes an existing export, fills a SQLite and a
Redis index (a private redis-server unless --redis_url) with every item's
vector, and times `Predictor.predict` alone and from --threads client
threads at once (DESIGN.md: p99 <= 10 ms in-process on CPU; index look-up
p99 <= 3 ms on Redis), through each of --signatures: ``rank`` (one row per
user: the history once, the 200 candidates on a second axis) and
``serving_default`` (one row per candidate, each repeating the history).
Then the split of a request: the index `get`, the whole input assembly
(which includes it) and the model call. The in-process models run through
XLA (`SavedModel`'s default). A last section times every model's `predict`
on each index with XLA and on the first without, all alternating request
by request so that the machine's drift hits them alike: the rows to
compare models by.

With --deepctr (default), the peer the serving goal names: DeepCTR 0.9.4's
DIN of the same shapes (embedding 16, attention --attention_units with
sigmoid, MLP 200-80), saved as a SavedModel under tf-keras in a subprocess
(it needs Keras 2), loaded here and called with the same requests, one row
per candidate (it has no candidate axis), alternating request by request
with tfmm's ID ranker's model call; the ratio of the two (goal: at most
0.5). Against ``serving_default`` (one row per candidate too) the ratio is
like for like; against ``rank`` it is not (the history is computed once per
request there, 200 times in DeepCTR), and the output says so. --json writes
every printed row's figures and the ratios.
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import flags
import numpy as np

from benchmarks import report
from benchmarks.timing import latencies, paired
from tfmm import cli
from tfmm.export import export_saved_model
from tfmm.index import RedisIndex, SQLiteIndex
from tfmm.ranker import DINRanker
from tfmm.serving.predictor import Predictor, Request, SavedModel

FLAGS = flags.FLAGS


def make_requests(length, distinct=20, seed=0):
    """--requests requests cycling through `distinct` ones (their inputs are ~10 MB each)."""
    rng = np.random.default_rng(seed)
    items = np.arange(2, FLAGS.num_items)
    requests = [Request(int(rng.integers(2, FLAGS.num_users)), rng.choice(items, length),
                        rng.choice(items, FLAGS.candidates, replace=False))
                for _ in range(distinct)]
    return [requests[i % distinct] for i in range(FLAGS.requests)]


def export_deepctr(path):
    """Saves DeepCTR 0.9.4's DIN of the same shapes as a SavedModel (needs tf-keras)."""
    import tensorflow as tf

    from benchmarks.deepctr_din import deepctr_din

    model = deepctr_din(FLAGS.max_history, FLAGS.num_users, FLAGS.num_items,
                        FLAGS.num_categories,
                        attention_units=[int(u) for u in FLAGS.attention_units])
    tf.saved_model.save(model, path)
    return tf.__version__


class DeepCTRModel:
    """DeepCTR DIN's SavedModel (loaded here: no Keras needed) called on a `Request`,
    one row per candidate with the history repeated (it has no candidate axis)."""

    def __init__(self, path):
        import tensorflow as tf

        self._tf = tf
        self._loaded = tf.saved_model.load(path)
        self._fn = self._loaded.signatures["serving_default"]
        self._specs = self._fn.structured_input_signature[1]
        self._categories = np.random.default_rng(1).integers(2, FLAGS.num_categories,
                                                             FLAGS.num_items)
        self._rows = {}

    def rows(self, request):
        L, categories = FLAGS.max_history, self._categories
        n, history = len(request.candidate_item_ids), np.asarray(request.history_item_ids)[-L:]
        padded = np.pad(history, (0, L - len(history)))
        return {"user": np.full((n, 1), request.user_id),
                "item_id": np.asarray(request.candidate_item_ids)[:, None],
                "cate_id": categories[request.candidate_item_ids][:, None],
                "hist_item_id": np.broadcast_to(padded, (n, L)),
                "hist_cate_id": np.broadcast_to(categories[padded] * (padded > 0), (n, L)),
                "seq_length": np.full((n, 1), len(history))}

    def __call__(self, request):
        if id(request) not in self._rows:
            self._rows[id(request)] = self.rows(request)
        tf = self._tf
        return self._fn(**{k: tf.constant(v, self._specs[k].dtype)
                           for k, v in self._rows[id(request)].items()})


def run_deepctr(workdir):
    """DeepCTR's SavedModel, exported in a tf-keras subprocess; (model, TF version)."""
    path = os.path.join(workdir, "deepctr")
    args = [f"--{k}={FLAGS[k].value}" for k in ("max_history", "num_items", "num_users",
                                                "num_categories")]
    args.append(f"--attention_units={','.join(FLAGS.attention_units)}")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.predictor_latency",
                           f"--only=deepctr:{path}", *args], capture_output=True, text=True,
                          env=dict(os.environ, TF_USE_LEGACY_KERAS="1"))
    if proc.returncode:
        sys.exit(f"DeepCTR export failed (pip install -e '.[bench]'?):\n{proc.stderr[-2000:]}")
    return DeepCTRModel(path), json.loads(proc.stdout.strip().splitlines()[-1])


def row(label, ms, rate=None, figures=None):
    """Prints a row of latencies (and requests/s); records them in `figures` under `label`."""
    p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
    print(f"{label:<64} {p50:7.2f} {p99:7.2f} {'' if rate is None else f'{rate:8.0f}'}",
          flush=True)
    if figures is not None:
        figures[label.strip()] = {"p50_ms": p50, "p99_ms": p99,
                                  **({} if rate is None else {"requests_per_s": rate})}


def define_flags():
    flags.DEFINE_list("models", ["id", "simtier", "simtier_make"],
                      "Rankers to export and time (tfmm.ranker.METHODS).")
    flags.DEFINE_list("signatures", ["rank", "serving_default"], "Signatures to time.")
    flags.DEFINE_list("indexes", ["SQLite", "Redis"], "Index backends to time (vector rankers).")
    flags.DEFINE_string("export_dir", "", "Time this ranker export instead of --models.")
    flags.DEFINE_integer("num_items", 4002, "Item vocabulary (the small world's).")
    flags.DEFINE_integer("num_users", 3002, "User vocabulary.")
    flags.DEFINE_integer("num_categories", 10, "Category vocabulary.")
    flags.DEFINE_integer("vector_dim", 128, "Multimodal vector width d.")
    flags.DEFINE_integer("max_history", 100, "History length L of the exported rankers.")
    flags.DEFINE_list("attention_units", ["80", "40"], "DIN attention MLP of the exported rankers "
                      "and of DeepCTR's peer.")
    flags.DEFINE_integer("candidates", 200, "Candidates per request.")
    flags.DEFINE_integer("requests", 300, "Timed requests per row.")
    flags.DEFINE_integer("threads", 8, "Concurrent client threads of the loaded rows.")
    flags.DEFINE_bool("deepctr", True, "Also time DeepCTR 0.9.4's DIN SavedModel (tf-keras).")
    flags.DEFINE_string("only", "", "Internal: 'deepctr:PATH' saves DeepCTR's DIN there "
                        "(tf-keras).")
    report.define_json_flag()
    flags.DEFINE_string("redis_url", "", "An existing Redis (keys under tfmm-bench-predictor: are "
                        "overwritten); default: a private redis-server.")


def main(argv):
    del argv
    if FLAGS.only.startswith("deepctr:"):
        print(json.dumps(export_deepctr(FLAGS.only.split(":", 1)[1])))
        return
    workdir = tempfile.mkdtemp(prefix="predictor_latency-")
    deepctr, deepctr_tf = run_deepctr(workdir) if FLAGS.deepctr else (None, None)
    vocab = {"num_items": FLAGS.num_items, "num_users": FLAGS.num_users,
             "num_categories": FLAGS.num_categories}
    if FLAGS.export_dir:
        paths = {FLAGS.export_dir: FLAGS.export_dir}
    else:
        paths = {}
        for method in FLAGS.models:
            model = DINRanker(vocab, FLAGS.max_history, method,
                                 None if method == "id" else FLAGS.vector_dim,
                                 attention_units=[int(u) for u in FLAGS.attention_units])
            paths[method] = export_saved_model(model, os.path.join(workdir, method),
                                               "probability")
    models = {f"{name} [{signature}]": SavedModel(path, signature=signature)
              for name, path in paths.items() for signature in FLAGS.signatures}
    uncompiled = {f"{name} [{signature}]": SavedModel(path, signature=signature,
                                                      jit_compile=False)
                  for name, path in paths.items() for signature in FLAGS.signatures}
    dims = {m.inputs["item_vector"].shape[-1] for m in models.values() if "item_vector" in m.inputs}
    server = None
    indexes = {}
    if dims:
        dim = dims.pop()
        rng = np.random.default_rng(0)
        vectors = rng.normal(size=(FLAGS.num_items - 2, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        url = FLAGS.redis_url
        if not url and "Redis" in FLAGS.indexes:
            from tests.redis_server import RedisServer  # the tests' private server

            server = RedisServer(workdir)
            url = server.url
        indexes = {"SQLite": lambda: SQLiteIndex(os.path.join(workdir, "vectors.db"), dim=dim),
                   "Redis": lambda: RedisIndex(url, dim=dim, prefix="tfmm-bench-predictor")}
        indexes = {k: indexes[k]() for k in FLAGS.indexes}
        for index in indexes.values():
            index.put(np.arange(2, FLAGS.num_items), vectors)
    try:
        print(f"{FLAGS.requests} requests per row: 1 user x {FLAGS.candidates} candidates, "
              f"history {FLAGS.max_history}, {os.cpu_count()} CPUs, load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the start")
        print(f"{'':<64} {'p50 ms':>7} {'p99 ms':>7} {'req/s':>8}")
        calls, peers, rows, versus = {}, [], {}, {}
        for name, model in models.items():
            length = model.inputs["history_item_ids"].shape[1]
            requests = make_requests(length)
            takes_vectors = "item_vector" in model.inputs
            for index_name, index in (indexes.items() if takes_vectors else [("-", None)]):
                predictor = Predictor(model, index)
                label = f"{name}, index {index_name}"
                row(f"{label}: predict, 1 thread", *latencies(predictor.predict, requests),
                    figures=rows)
                row(f"{label}: predict, {FLAGS.threads} threads",
                    *latencies(predictor.predict, requests, FLAGS.threads), figures=rows)
                assembled = {id(r): predictor.assemble(r)[0] for r in requests}
                features = [assembled[id(r)] for r in requests]
                if index is not None:
                    keys = [np.unique(np.concatenate([r.history_item_ids, r.candidate_item_ids]))
                            for r in requests]
                    row(f"{label}:   index get ({len(keys[0])} ids)",
                        latencies(index.get, keys)[0], figures=rows)
                row(f"{label}:   assemble inputs", latencies(predictor.assemble, requests)[0],
                    figures=rows)
                calls[name] = latencies(model, features)[0]
                row(f"{label}:   model call", calls[name], figures=rows)
                calls[f"{name}, {FLAGS.threads} threads"] = latencies(model, features,
                                                                      FLAGS.threads)[0]
                row(f"{label}:   model call, {FLAGS.threads} threads",
                    calls[f"{name}, {FLAGS.threads} threads"], figures=rows)
                if deepctr is not None and "item_vector" not in model.inputs:
                    # The same requests, alternating with DeepCTR's DIN (ID features only).
                    by_request = {id(r): f for r, f in zip(requests, features)}
                    for threads in (1, FLAGS.threads):
                        ours, peer = paired([lambda r: model(by_request[id(r)]), deepctr],
                                            requests, threads)
                        kind = ("like for like: one row per candidate on both sides"
                                if model.signature != "rank" else "NOT like for like: "
                                "rank computes the history once, DeepCTR 200 times")
                        peers.append((f"{name} vs DeepCTR 0.9.4 DIN SavedModel (tf-keras, TF "
                                      f"{deepctr_tf}), {threads} thread(s), {kind}", ours, peer))
        # Every model with and without XLA, alternating on each request (one length:
        # the first model's history; all exported rankers share it).
        alternating = {}
        for name, model in models.items():
            pairs = indexes.items() if "item_vector" in model.inputs else [("", None)]
            for k, (index_name, index) in enumerate(pairs):
                where = f", index {index_name}" if index_name else ""
                alternating[f"{name}{where}: predict, XLA"] = Predictor(model, index).predict
                if k == 0:
                    alternating[f"{name}{where}: predict, no XLA"] = Predictor(
                        uncompiled[name], index).predict
        requests = make_requests(next(iter(models.values())).inputs["history_item_ids"].shape[1])
        print("predict, 1 thread, all of these alternating on each request:")
        together = {}
        for label, ms in zip(alternating, paired(list(alternating.values()), requests)):
            row(f"  {label}", ms, figures=together)
        for label, ours, peer in peers:
            print(f"{label}, model calls alternating on each request:")
            versus[label] = {}
            row("  tfmm", ours, figures=versus[label])
            row("  DeepCTR (200 rows a request)", peer, figures=versus[label])
            ratio = [np.percentile(ours, q) / np.percentile(peer, q) for q in (50, 99)]
            print(f"  ratio tfmm / DeepCTR: p50 {ratio[0]:.2f}x, p99 {ratio[1]:.2f}x "
                  "(goal <= 0.5x)")
            versus[label].update(ratio_p50=ratio[0], ratio_p99=ratio[1])
        report.write_json({"rows": rows, "alternating": together, "versus_deepctr": versus})
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    define_flags()
    cli.run(main)

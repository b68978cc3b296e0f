"""CTR training and evaluation (paper §2, §4, §6.3): the ranker job behind ``--task=ctr``.

`run(config)` trains one ranker of `tfmm.ranker.METHODS` on a data
directory's training days in time order, evaluates it on the test days after
every epoch, exports it and writes ``<model_dir>/metrics.json``:

- ``auc``, ``logloss``: over all test impressions.
- ``gauc``: per-user AUC averaged with weights = the user's test impressions,
  over users with both a click and a non-click; ``gauc_unweighted`` is the
  plain mean and ``gauc_users`` how many users it averages.
- ``new_items``: the same on impressions of items never seen in training
  (cold start), with their count.
- ``frequency_groups``: 8 groups of the items seen in training, equal in item
  count, 1 = rarest (paper §6.3.3): items, test impressions, ``auc``,
  ``logloss``.
- ``epochs``: ``auc``, ``gauc``, ``gauc_unweighted``, ``gauc_groups``, ``logloss`` after each
  ranker epoch; ``make.epochs`` the same for MAKE alone after each of its
  pre-training epochs (the multimodal-only model of paper Fig. 3).
- ``missing_item_vectors``: test impressions whose target item had no vector
  in the index (its vector is zeros: the defined fallback).
- ``vector_refreshes``: with ``refresh_vectors``, the items with a vector at
  the start of each epoch (near-line training, paper §5).
- ``export_path``, ``train_seconds``, ``config``.

Multimodal methods read item vectors from the index table; `tfmm.train.ranker`
(``--task=ctr``) first fills an empty or missing table by pre-training the
encoder on the best source the data has (`tfmm.pretrain.run`'s ``fallback``:
SCL on triplets where the data has them, else image <-> title pairs, click
pairs mined from the impressions or the generic objective), named in
``pretrain_source``. MAKE is pre-trained alone for ``make_epochs`` (0: trained
jointly with the ranker, from scratch), then frozen or, with
``make_trainable``, fine-tuned. A killed run resumes: MAKE's pre-trained
weights are kept, and the ranker restarts from its last finished epoch; the
per-epoch metrics list every epoch once (`tfmm.callbacks.EpochRecord`). A run
that is refused (settings, data, index) writes nothing. `run` is the job
(`CTRJob`) in the steps every job takes (`tfmm.jobs.run`).

The job trains with the ``strategy`` setting's `tfmm.distribute.Distribution`.
With ``mirrored`` or ``multi_worker`` each step is the one-process step on
the global batch ``batch_size``; the chief alone evaluates (the whole test
split, as one process does) and writes. With ``parameter_server`` the chief
(the coordinator) runs the job alone: each ID table is split in rows over the
``ps`` tasks (`DINRanker`'s ``embedding_shards``), every epoch is
``ceil(train impressions / batch_size)`` asynchronous steps on the workers
(`tfmm.parameter_server`), each worker reading its share of the batches; the
export joins the shards into a one-machine ranker, and ``embedding_shards``
in metrics.json says where each table's rows were.

The vectors are a snapshot of the index taken at the start; with
``refresh_vectors`` the snapshot is taken again at every epoch (of MAKE's
pre-training and of the ranker), so vectors the encoder service wrote
meanwhile, e.g. of new items, join training and evaluation without a restart.
"""

import json
import os
from dataclasses import MISSING, dataclass

import keras
import numpy as np
import tensorflow as tf

from tfmm import data, distribute, encoder_checks, jobs, metrics
from tfmm.config import SettingsError, check_settings, default_of, setting
from tfmm.data import schema
from tfmm.export import export_saved_model
from tfmm.index import IndexUnavailable, is_empty, open_index, redact
from tfmm.layers import MAKEBlock
from tfmm.layers.simtier import OUTPUTS as SIMTIER_OUTPUTS
from tfmm.optimizers import DenseGradientAdam, PerIdAdam, PerIdSGD
from tfmm.ranker import MAKE_INTEGRATIONS, METHODS, DINRanker, build_make_pretrainer
from tfmm.callbacks import EpochRecord, RefreshVectors

# "adam" is Keras 3's, whose update for an embedding table's sparse gradient is
# not Adam's (see DenseGradientAdam); "dense_adam" and "sparse_adam" are Adam's,
# the first on dense gradients (faster in one process), the second on each
# table's rows summed by id (under a mirrored strategy each replica exchanges the
# ids it touched once: PerIdSums). The results in README.md were trained with "adam".
OPTIMIZERS = {"adam": keras.optimizers.Adam, "dense_adam": DenseGradientAdam,
              "sparse_adam": PerIdAdam, "adagrad": keras.optimizers.Adagrad, "sgd": PerIdSGD}
NUM_FREQUENCY_GROUPS = 8


@dataclass
class CTRConfig:
    data_dir: str = setting(MISSING, "tfmm data directory.")
    model_dir: str = setting(MISSING, "Checkpoints, TensorBoard logs, metrics.json.")
    export_dir: str = setting("", "SavedModels go to <export_dir>/<version>/ ('': none).")
    index: str = setting("", "Index table of the item vectors: a SQLite file or a Redis URL "
                             "(tfmm.index.open_index).")
    model: str = setting("simtier_make", "Ranker: the ID baseline or a multimodal method "
                                         "(paper §6.1.3).", choices=METHODS)
    epochs: int = setting(1, "Training epochs (ID rankers overfit from the second, paper "
                             "Fig. 3).", low=1)
    make_epochs: int = setting(3, "Epochs MAKE is pre-trained alone (0: trained jointly).",
                               low=0)
    make_trainable: bool = setting(False, "Fine-tune the pre-trained MAKE in the ranker "
                                          "(default: frozen).")
    make_dir: str = setting("", "MAKE's pre-training directory (default <model_dir>/make); "
                                "rankers that share one pre-train MAKE once.")
    max_history: int = setting(0, "History length L (0: the dataset's).", low=0)
    embedding_dim: int = setting(default_of(DINRanker, "embedding_dim"), "ID embedding width.",
                                 low=1)
    attention_units: tuple = setting(default_of(DINRanker, "attention_units"),
                                     "DIN attention MLP.", low=1)
    mlp_units: tuple = setting(default_of(DINRanker, "mlp_units"), "Ranker MLP.", low=1)
    # The job's own; MAKEBlock's default is 256-128-64-1, and it checks them (validate).
    make_units: tuple = setting((64, 32, 16, 1), "MAKE's four MLP layers.")
    # MAKE's MLP reads concat(v_MAKE, target), not eq. 4's v_MAKE alone, which cannot
    # tell which target it scores; it trained much better (DECISIONS.md, "MAKE's MLP
    # reads the target").
    make_target_in_mlp: bool = setting(
        True, "MAKE's MLP reads concat(v_MAKE, target vector), as DIN's own head does; "
              "false: v_MAKE alone (paper eq. 4), which cannot tell which target it scores "
              "except through the attention weights.")
    num_tiers: int = setting(default_of(DINRanker, "num_tiers"), "SimTier tiers.", low=1)
    simtier_output: str = setting(
        default_of(DINRanker, "simtier_output"),
        "SimTier's histogram in the ranker: fractions of the history, log(1 + count) or raw "
        "counts (the paper's; they trained worse here).", choices=SIMTIER_OUTPUTS)
    batch_norm: bool = setting(default_of(DINRanker, "batch_norm"),
                               "Batch-normalise the ranker's MLP input (as the DIN reference "
                               "code does).")
    start_as_id: bool = setting(
        default_of(DINRanker, "start_as_id"),
        "Multimodal features enter the ranker's MLP with zero weights, so it starts as the ID "
        "ranker of the same seed; false: Glorot weights for them too (a plain concatenation, "
        "as the paper).")
    make_integration: str = setting(
        default_of(DINRanker, "make_integration"),
        "How MAKE's knowledge joins the ranker: residual (the ranker without MAKE trains on "
        "its own loss; a head over MAKE's knowledge adds to its logit, so MAKE cannot make it "
        "worse) or concat (concatenated before the MLP, as the paper).",
        choices=MAKE_INTEGRATIONS)
    refresh_vectors: bool = setting(False, "Re-read the index table at every epoch, so "
                                           "vectors the encoder service writes meanwhile "
                                           "join training (near-line).")
    optimizer: str = setting(
        "adam", "Ranker optimizer: adam is Keras 3's, whose second moment of an embedding "
                "row looked up n times in a batch sums n squares instead of squaring the "
                "sum; dense_adam is Adam's (as tf-keras'), and faster; sparse_adam is Adam's "
                "on each table's rows summed by id, which --strategy=mirrored/multi_worker "
                "exchange once per touched id instead of once per lookup.", choices=OPTIMIZERS)
    learning_rate: float = setting(1e-3, "Learning rate.", above=0)
    batch_size: int = setting(512, "Batch size.", low=1)
    seed: int = setting(0, "Random seed.")
    strategy: str = setting(
        "none", "tf.distribute strategy: none (one process, Keras fit), mirrored (this "
                "machine's devices) or multi_worker (the cluster in $TF_CONFIG, the same "
                "command on every worker; worker 0 writes metrics, logs and exports) or "
                "parameter_server (--task=ctr: ID tables split over the cluster's ps tasks, "
                "asynchronous steps on its workers; on a worker or ps task the command runs "
                "its server, on the chief the job).", choices=distribute.STRATEGIES)
    cluster_timeout: float = setting(
        default_of(distribute.strategy, "cluster_timeout"),
        "--strategy=parameter_server: seconds the chief waits for the cluster's worker and ps "
        "servers to start, saying which, before it gives up (0: no limit).", low=0)
    verbose: int = setting(2, "Keras' progress output: 0 none, 1 a bar, 2 a line an epoch.",
                           flag=False)

    def validate(self):
        check_settings(self)
        try:
            MAKEBlock(mlp_units=self.make_units)
        except ValueError as e:
            raise SettingsError(f"--make_units={','.join(map(str, self.make_units))}: "
                                f"{e}") from None
        if self.model != "id" and not self.index:
            raise SettingsError(f"--model={self.model} needs item vectors: set --index.")
        if self.strategy == "parameter_server":  # what the asynchronous workers cannot run
            if self.refresh_vectors:
                raise SettingsError("--refresh_vectors cannot run with "
                                    "--strategy=parameter_server: the workers read the vectors "
                                    "the chief had at the start.")
            if self.optimizer == "dense_adam":
                raise SettingsError("--optimizer=dense_adam cannot run with "
                                    "--strategy=parameter_server: it makes every table's whole "
                                    "gradient on a worker; use adam, adagrad or sgd.")
        jobs.check_export_dir(self)
        if self.refresh_vectors and self.model == "id":
            raise SettingsError("--refresh_vectors needs a multimodal --model; id reads no "
                                "vectors.")
        return self

    @property
    def uses_make(self):
        return self.model in ("make", "simtier_make")


class TestSet:
    """The test days: reader batches for a model plus the columns the metrics need."""

    def __init__(self, config, meta, vectors, dist):
        self.config, self.vectors, self.dist = config, vectors, dist
        self.length = config.max_history or meta["max_history"]
        columns = {k: [] for k in ("user_id", "item_id", "is_new_item", "label")}
        for f, y in self._batches(["user_id", "item_id", "is_new_item"]):
            for k in ("user_id", "item_id", "is_new_item"):
                columns[k].append(f[k].numpy())
            columns["label"].append(y.numpy())
        self.columns = {k: np.concatenate(v) for k, v in columns.items()}

    def _batches(self, features):  # check_data has read every record
        return data.impressions(self.config.data_dir, "test", batch_size=4096,
                                max_history=self.length, vectors=self.vectors,
                                features=features, validate=False)

    def predict(self, model, fn=None):
        """P(click) of every test impression by `model`, or by `fn(features)` (on this
        process alone)."""
        batches = self._batches(list(model.input))
        if fn is not None:
            return np.concatenate([fn(x).numpy()[:, 0] for x, _ in batches])
        return self.dist.predict(model, batches)[:, 0]

    def summary(self, p):
        """The per-epoch metrics of predictions `p`."""
        return _ranking_metrics(self.columns["label"], p, self.columns["user_id"])

    def report(self, p, groups):
        """Everything metrics.json holds about predictions `p`."""
        y, c = self.columns["label"], self.columns
        new = c["is_new_item"] == 1
        out = {**self.summary(p), "impressions": len(y),
               "new_items": {"impressions": int(new.sum()),
                             **_ranking_metrics(y[new], p[new], c["user_id"][new])}}
        item_group = groups[c["item_id"]]
        out["frequency_groups"] = []
        for k in range(1, NUM_FREQUENCY_GROUPS + 1):
            rows = item_group == k
            out["frequency_groups"].append({
                "group": k, "items": int((groups == k).sum()), "impressions": int(rows.sum()),
                "auc": metrics.auc(y[rows], p[rows]),
                "logloss": metrics.logloss(y[rows], p[rows]) if rows.any() else None})
        if self.vectors is not None:
            present = np.asarray(self.vectors.present)  # a live table is a tf.Variable
            out["missing_item_vectors"] = int((~present[c["item_id"]]).sum())
        return out


def _ranking_metrics(y, p, users):
    return {"auc": metrics.auc(y, p), **metrics.gauc(y, p, users),
            "logloss": metrics.logloss(y, p) if len(y) else None}


class EpochEvaluation(EpochRecord):
    """Evaluates on the test days after each epoch, into a JSON list (`EpochRecord`)."""

    def __init__(self, test, path, backup, weights=None):
        super().__init__(path, backup, weights)
        self.test = test

    def epoch_values(self, epoch, logs):
        values = self.test.summary(self.test.predict(self.model))
        print(f"epoch {epoch + 1} test: " + ", ".join(
            f"{k} {v:.4f}" for k, v in values.items() if k != "gauc_groups"), flush=True)
        return values


def check_data(config):
    """The data directory's metadata, after reading every impression record once.

    A missing, truncated or corrupt file fails here, naming the file and record
    (TensorFlow's DataLossError names neither), before the run writes anything;
    later reads skip the check.
    """
    try:
        for split in ("train", "test"):
            data.impressions(config.data_dir, split, validate=True)
        return schema.read_metadata(config.data_dir)
    except (OSError, ValueError, tf.errors.NotFoundError) as e:
        raise SettingsError(f"--data_dir: {e}") from None


def train_counts(config, num_items):
    """Training impressions per item id."""
    counts = np.zeros(num_items, np.int64)
    for f, _ in data.impressions(config.data_dir, "train", batch_size=8192,
                                 features=["item_id"], validate=False):
        counts += np.bincount(f["item_id"].numpy(), minlength=num_items)
    return counts


def index_empty(config, dist):
    """Whether `config`'s index holds no vectors, as the chief finds it (every worker
    calls it)."""
    try:
        return bool(dist.chief_value(int(is_empty(config.index))))
    except (ValueError, OSError, IndexUnavailable) as e:  # a corrupt file, a server down
        raise SettingsError(f"--index: {e}") from None


def load_vectors(config, num_items, dist):
    """The index table's vectors, on every worker the ones the chief found."""
    if index_empty(config, dist):
        raise SettingsError(f"--index={redact(config.index)} holds no vectors; run "
                            "--task=pretrain first (--task=ctr does, tfmm.train.ranker).")
    index = open_index(config.index)
    try:
        if dist.is_chief:
            index.claim(schema.catalogue_fingerprint(config.data_dir))
    except ValueError as e:
        raise SettingsError(f"--index: {e}") from None
    dist.barrier()  # the chief's claim is in
    try:
        return index.snapshot(num_items)
    except ValueError as e:  # ids no writer accepts now: written by hand or an old encoder
        raise SettingsError(f"--index: {e} Rebuild it: --task=pretrain with a fresh "
                            "--index.") from None


def _fit(model, config, batches, epochs, test, out, dist, callbacks=(), weights=None):
    """Fits `model` with `dist` (`tfmm.distribute.Distribution.fit`: checkpoints to
    resume, TensorBoard logs) and per-epoch test metrics (and weights, with `weights`:
    see `EpochRecord`), which only the chief evaluates and writes; returns them."""
    evaluation = EpochEvaluation(test, os.path.join(out, "epochs.json"),
                                 distribute.backup_dir(out), weights)
    with dist.scope():
        model.compile(OPTIMIZERS[config.optimizer](config.learning_rate), "binary_crossentropy")
    dist.fit(model, batches, epochs, out, evaluation, callbacks=callbacks, verbose=config.verbose)
    return evaluation.values


MAKE_SETTINGS = ("data_dir", "index", "make_units", "make_target_in_mlp", "max_history",
                 "optimizer", "learning_rate", "batch_size", "seed")


def make_dir(config):
    return config.make_dir or os.path.join(config.model_dir, "make")


def pretrain_make(config, vectors, test, length, dist, refresh=()):
    """MAKE trained alone on the CTR task (paper eq. 5); frozen unless make_trainable.

    Every epoch's weights stay in the MAKE directory, so rankers sharing it
    (``make_dir``) pre-train MAKE once, for the most epochs any of them needs.
    Its epochs.json lists the epochs whose weights are there, all of one run
    (`EpochRecord`): a ranker uses them only when it lists epochs 1..make_epochs.
    """
    with dist.scope():
        make = MAKEBlock(mlp_units=config.make_units, target_in_mlp=config.make_target_in_mlp,
                         return_knowledge=True, name="make")
        if not config.make_epochs:
            return make, []
        model = build_make_pretrainer(make, length, vectors.table.shape[1])
    out = make_dir(config)
    record = os.path.join(out, "epochs.json")
    values = []
    if os.path.exists(record):
        with open(record) as f:
            values = json.load(f)[:config.make_epochs]
    done = [v["epoch"] for v in values] == list(range(1, config.make_epochs + 1))
    if not dist.chief_value(int(done)):
        print(f"pre-training MAKE for {config.make_epochs} epochs ...", flush=True)
        values = _fit(model, config, _train_data(config, length, vectors, model),
                      config.make_epochs, test, out, dist, refresh,
                      weights=os.path.join(out, "epoch{epoch}.weights.h5"))
    else:
        model.load_weights(os.path.join(out, f"epoch{config.make_epochs}.weights.h5"))
    make.trainable = config.make_trainable
    return make, values


def _train_data(config, length, vectors, model):
    """The training batches for `model` in time order, as `Distribution.fit` takes them."""
    return lambda slices=None, shard=None: data.impressions(
        config.data_dir, "train", batch_size=config.batch_size, max_history=length,
        vectors=vectors, features=list(model.input), validate=False, slices=slices,
        shard=shard, repeat=shard is not None)


class CTRJob(jobs.Job):
    """The CTR job as `tfmm.jobs.run` takes it through its steps.

    Args:
        config: a `CTRConfig`.
        vectors: a `tfmm.data.Vectors` snapshot to use instead of the index.
    """

    def __init__(self, config, vectors=None):
        super().__init__(config)
        self.vectors = vectors

    @property
    def reads_index(self):
        """Whether the run reads its vectors from the index."""
        return self.config.model != "id" and self.vectors is None

    def directories(self):
        config = self.config
        dirs = [(config.model_dir, jobs.settings(config), "model_dir")]
        if config.uses_make and config.make_epochs:
            dirs.append((make_dir(config), jobs.settings(config, MAKE_SETTINGS), "make_dir"))
        return dirs

    def check(self, dist):
        self.meta = check_data(self.config)

    def load(self, dist):
        reads_index = self.reads_index
        if reads_index:
            self.vectors = load_vectors(self.config, self.meta["vocab"]["num_items"], dist)
        elif self.config.model == "id":
            self.vectors = None
        self.encoder = None
        if self.vectors is not None and dist.is_chief:  # what the vectors are worth, said first
            recorded = open_index(self.config.index).description() if reads_index else None
            self.encoder = encoder_checks.checks(recorded, self.vectors, data.item_categories(
                self.config.data_dir, self.meta["vocab"]["num_items"]))
            for line in encoder_checks.lines(self.encoder):
                print(line, flush=True)

    def train(self, dist):
        try:
            return self._train(dist)
        except tf.errors.DataLossError:  # a file went bad after check_data: name it
            check_data(self.config)
            raise

    def _train(self, dist):
        config, vectors, meta = self.config, self.vectors, self.meta
        vocab, length = meta["vocab"], config.max_history or meta["max_history"]
        refresh = []
        if config.refresh_vectors and vectors is not None:
            vectors = vectors.live()
            refresh = [RefreshVectors(open_index(config.index), vectors)]
        keras.utils.set_random_seed(config.seed)
        test = TestSet(config, meta, vectors, dist) if dist.is_chief else None
        make, make_epochs = (pretrain_make(config, vectors, test, length, dist, refresh)
                             if config.uses_make else (None, []))
        # The ranker's weights are the seed's alone, whatever MAKE drew: a multimodal ranker
        # starts as the ID ranker of its seed (start_as_id).
        keras.utils.set_random_seed(config.seed)
        with dist.scope():
            model = DINRanker(vocab, length, method=config.model,
                              vector_dim=None if vectors is None else vectors.table.shape[1],
                              make=make, embedding_dim=config.embedding_dim,
                              attention_units=config.attention_units,
                              mlp_units=config.mlp_units, num_tiers=config.num_tiers,
                              simtier_output=config.simtier_output,
                              batch_norm=config.batch_norm,
                              embedding_shards=dist.embedding_shards,
                              start_as_id=config.start_as_id,
                              make_integration=config.make_integration)
        print(f"training the {config.model} ranker for {config.epochs} epoch(s) ...", flush=True)
        epochs = _fit(model, config, _train_data(config, length, vectors, model), config.epochs,
                      test, config.model_dir, dist, refresh)
        distributed = dist.describe(model)
        if not dist.is_chief:
            return None
        groups = metrics.frequency_groups(train_counts(config, vocab["num_items"]),
                                          NUM_FREQUENCY_GROUPS)
        result = {"model": config.model, **test.report(test.predict(model), groups),
                  "epochs": epochs, **distributed}
        if self.encoder is not None:
            result["encoder"] = self.encoder
        if config.uses_make:
            result["make"] = {"pretrain_epochs": config.make_epochs,
                              "trainable": config.make_trainable, "epochs": make_epochs}
            if model.make_head is not None:  # the same run without MAKE's head: what MAKE adds
                result["make"]["without_make"] = test.summary(
                    test.predict(model, tf.function(model.without_make)))
        if refresh:
            result["vector_refreshes"] = refresh[0].values
        if config.export_dir:
            result["export_path"] = export_saved_model(dist.exportable(model), config.export_dir,
                                                       "probability")
        return result


def run(config, vectors=None):
    """Trains, evaluates and exports one ranker (`tfmm.jobs.run`); returns the metrics
    dict (None on a worker that is not the chief: it writes nothing).

    Raises `SettingsError` before writing anything when the settings, the
    data directory or the index cannot be used; an empty index too
    (`tfmm.train.ranker` pre-trains the encoder into it first).

    Args:
        vectors: a `tfmm.data.Vectors` snapshot to use instead of the index.
    """
    return jobs.run(CTRJob(config, vectors))


def summary_table(result):
    """A few lines for a terminal: the headline metrics of a `run` result."""
    rows = [("all test impressions", result, result["impressions"]),
            ("new (cold-start) items", result["new_items"], result["new_items"]["impressions"])]
    lines = [f"{result['model']} ranker   {'AUC':>7s} {'GAUC':>7s} {'LogLoss':>8s} {'impr.':>8s}"]
    for name, m, n in rows:
        g = m.get("gauc", float("nan"))
        lines.append(f"{name:24s} {m['auc']:7.4f} {g:7.4f} {m['logloss'] or float('nan'):8.4f} "
                     f"{n:8d}")
    return "\n".join(lines)

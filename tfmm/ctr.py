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

Multimodal methods read item vectors from the index table; an empty or
missing table is first filled by running the pre-training given as
``pretrain_config``, on the best source the data has (`tfmm.pretrain.run`'s
``fallback``: SCL on triplets where the data has them, else image <-> title
pairs, click pairs mined from the impressions or the generic objective),
named in ``pretrain_source``. MAKE is pre-trained alone for ``make_epochs`` (0: trained
jointly with the ranker, from scratch), then frozen or, with
``make_trainable``, fine-tuned. A killed run resumes: MAKE's pre-trained
weights are kept, and the ranker restarts from its last finished epoch; the
per-epoch metrics list every epoch once (`tfmm.callbacks.EpochRecord`). A run
that is refused (settings, data, index) writes nothing.

With ``strategy`` ``mirrored`` or ``multi_worker`` the rankers train under
`tf.distribute` (`tfmm.distribute.fit`): each step is the one-process step
on the global batch ``batch_size``; the chief alone evaluates (the whole
test split, as one process does) and writes. With ``parameter_server`` the
chief (the coordinator) runs the job alone: each ID table is split in rows
over the ``ps`` tasks (`DINRanker`'s ``embedding_shards``), every epoch is
``ceil(train impressions / batch_size)`` asynchronous steps on the workers
(`tfmm.parameter_server`), each worker reading its share of the batches;
the export joins the shards into a one-machine ranker, and
``embedding_shards`` in metrics.json says where each table's rows were.

The vectors are a snapshot of the index taken at the start; with
``refresh_vectors`` the snapshot is taken again at every epoch (of MAKE's
pre-training and of the ranker), so vectors the encoder service wrote
meanwhile, e.g. of new items, join training and evaluation without a restart.
"""

import dataclasses
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tfmm import data, distribute, metrics, parameter_server
from tfmm.config import SettingsError, default_of
from tfmm.data import schema
from tfmm.export import check_export_dir, export_saved_model
from tfmm.index import IndexUnavailable, is_empty, local_index, open_index, redact
from tfmm.layers import MAKEBlock
from tfmm.layers.simtier import OUTPUTS as SIMTIER_OUTPUTS
from tfmm.optimizers import DenseGradientAdam
from tfmm.ranker import MAKE_INTEGRATIONS, METHODS, DINRanker, build_make_pretrainer
from tfmm.callbacks import BackupAndRestore, EpochRecord, RefreshVectors, write_json

# "adam" is Keras 3's, whose update for an embedding table's sparse gradient is
# not Adam's (see DenseGradientAdam); "dense_adam" is Adam's, and faster. The
# results in README.md were trained with "adam".
OPTIMIZERS = {"adam": keras.optimizers.Adam, "dense_adam": DenseGradientAdam,
              "adagrad": keras.optimizers.Adagrad, "sgd": keras.optimizers.SGD}
NUM_FREQUENCY_GROUPS = 8


@dataclasses.dataclass
class CTRConfig:
    data_dir: str
    model_dir: str
    export_dir: str = ""
    index: str = ""
    model: str = "simtier_make"
    epochs: int = 1
    make_epochs: int = 3
    make_trainable: bool = False
    make_dir: str = ""  # default <model_dir>/make; rankers may share one
    max_history: int = 0  # 0: the dataset's own
    embedding_dim: int = default_of(DINRanker, "embedding_dim")
    attention_units: tuple = default_of(DINRanker, "attention_units")
    mlp_units: tuple = default_of(DINRanker, "mlp_units")
    make_units: tuple = (64, 32, 16, 1)  # the job's own; MAKEBlock's default is 256-128-64-1
    # MAKE's MLP reads concat(v_MAKE, target), not eq. 4's v_MAKE alone, which cannot
    # tell which target it scores; it trained much better (BUILD.md, "Layer conventions").
    make_target_in_mlp: bool = True
    num_tiers: int = default_of(DINRanker, "num_tiers")
    simtier_output: str = default_of(DINRanker, "simtier_output")
    batch_norm: bool = default_of(DINRanker, "batch_norm")
    start_as_id: bool = default_of(DINRanker, "start_as_id")
    make_integration: str = default_of(DINRanker, "make_integration")
    refresh_vectors: bool = False  # re-read the index at every epoch (near-line)
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    batch_size: int = 512
    seed: int = 0
    strategy: str = "none"  # tfmm.distribute.STRATEGIES
    verbose: int = 2

    def validate(self):
        if self.model not in METHODS:
            raise SettingsError(f"--model={self.model!r} is not one of {METHODS}.")
        if self.strategy not in distribute.STRATEGIES:
            raise SettingsError(f"--strategy={self.strategy!r} is not one of "
                                f"{distribute.STRATEGIES}.")
        if self.optimizer not in OPTIMIZERS:
            raise SettingsError(f"--optimizer={self.optimizer!r} is not one of {tuple(OPTIMIZERS)}.")
        for name, low in (("epochs", 1), ("make_epochs", 0), ("batch_size", 1),
                          ("max_history", 0), ("embedding_dim", 1), ("num_tiers", 1)):
            if getattr(self, name) < low:
                raise SettingsError(f"--{name}={getattr(self, name)} must be >= {low}.")
        if self.make_integration not in MAKE_INTEGRATIONS:
            raise SettingsError(f"--make_integration={self.make_integration!r} is not one of "
                                f"{MAKE_INTEGRATIONS}.")
        if self.simtier_output not in SIMTIER_OUTPUTS:
            raise SettingsError(f"--simtier_output={self.simtier_output!r} is not one of "
                                f"{SIMTIER_OUTPUTS}.")
        if not self.learning_rate > 0:
            raise SettingsError(f"--learning_rate={self.learning_rate} must be > 0.")
        for name in ("attention_units", "mlp_units"):
            if min(getattr(self, name), default=1) < 1:
                raise SettingsError(f"--{name}={','.join(map(str, getattr(self, name)))}: "
                                    "layer sizes must be >= 1.")
        try:
            MAKEBlock(mlp_units=self.make_units)
        except ValueError as e:
            raise SettingsError(f"--make_units={','.join(map(str, self.make_units))}: "
                                f"{e}") from None
        if self.model != "id" and not self.index:
            raise SettingsError(f"--model={self.model} needs item vectors: set --index.")
        if self.strategy == "parameter_server":
            if self.refresh_vectors:
                raise SettingsError("--refresh_vectors cannot run with "
                                    "--strategy=parameter_server: the workers read the vectors "
                                    "the chief had at the start.")
            if self.optimizer == "dense_adam":
                raise SettingsError("--optimizer=dense_adam cannot run with "
                                    "--strategy=parameter_server: it makes every table's whole "
                                    "gradient on a worker; use adam, adagrad or sgd.")
        if self.export_dir:  # before anything runs: a base of user files is refused
            try:
                check_export_dir(self.export_dir, (self.data_dir, local_index(self.index)))
            except ValueError as e:
                raise SettingsError(str(e)) from None
        if self.refresh_vectors and self.model == "id":
            raise SettingsError("--refresh_vectors needs a multimodal --model; id reads no "
                                "vectors.")
        return self

    @property
    def uses_make(self):
        return self.model in ("make", "simtier_make")


class TestSet:
    """The test days: reader batches for a model plus the columns the metrics need."""

    def __init__(self, config, meta, vectors, strategy=None):
        self.config, self.vectors, self.strategy = config, vectors, strategy
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
        """P(click) of every test impression by `model`, or by `fn(features)`."""
        batches = self._batches(list(model.input))
        if fn is not None:
            return np.concatenate([fn(x).numpy()[:, 0] for x, _ in batches])
        if self.strategy is None:
            return model.predict(batches, verbose=0)[:, 0]
        # Under a strategy the chief predicts alone (tfmm.distribute.predictor).
        predict = distribute.predictor(model)
        return np.concatenate([predict(x).numpy()[:, 0] for x, _ in batches])

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


def load_vectors(config, num_items, pretrain_config=None, strategy=None):
    """The index table's vectors, pre-training the encoder first when it is empty, on the
    best source the data has; returns (vectors, that source or None).

    Under a `strategy` every worker reads the index the chief found and wrote.
    """
    try:
        empty = distribute.chief_value(strategy, int(is_empty(config.index)))
    except (ValueError, OSError, IndexUnavailable) as e:  # a corrupt file, a server down
        raise SettingsError(f"--index: {e}") from None
    if empty:
        if pretrain_config is None:
            raise SettingsError(f"--index={redact(config.index)} holds no vectors; run "
                                "--task=pretrain first or pass a pre-training config.")
        from tfmm import pretrain

        print(f"the index {redact(config.index)} is empty: pre-training the encoder first ...",
              flush=True)
        result = pretrain.run(dataclasses.replace(pretrain_config, index=config.index),
                              fallback=True)
        source = result and result["source"]  # None on a worker that is not the chief
    else:
        source = None
    index = open_index(config.index)
    try:
        if distribute.is_chief(strategy):
            index.claim(schema.catalogue_fingerprint(config.data_dir))
    except ValueError as e:
        raise SettingsError(f"--index: {e}") from None
    distribute.chief_value(strategy, 0)  # the chief's vectors and claim are in
    try:
        return index.snapshot(num_items), source
    except ValueError as e:  # ids no writer accepts now: written by hand or an old encoder
        raise SettingsError(f"--index: {e} Rebuild it: --task=pretrain with a fresh "
                            "--index.") from None


def _fit(model, config, train, epochs, test, out, callbacks=(), weights=None, strategy=None):
    """Fits with checkpoints (resume), TensorBoard logs and per-epoch test metrics
    (and weights, with `weights`: see `EpochRecord`).

    `train(slices, shard)` makes the training batches: under a `strategy`, with
    `tfmm.distribute.replica_slices`, under a ParameterServerStrategy a worker's
    `shard`, repeated; only the chief evaluates and writes.
    """
    backup = os.path.join(out, "backup")
    evaluation = EpochEvaluation(test, os.path.join(out, "epochs.json"), backup, weights)
    with distribute.scope(strategy):
        model.compile(OPTIMIZERS[config.optimizer](config.learning_rate), "binary_crossentropy")
    tensorboard = keras.callbacks.TensorBoard(os.path.join(out, "logs"))
    if isinstance(strategy, tf.distribute.ParameterServerStrategy):
        rows = schema.read_metadata(config.data_dir)["counts"]["impressions/train"]
        distribute.fit(model, strategy, lambda workers, index: train(shard=(workers, index)),
                       epochs, backup, steps=-(-rows // config.batch_size), callbacks=callbacks,
                       chief_callbacks=[evaluation, tensorboard], verbose=config.verbose)
        return evaluation.values
    if strategy is not None:
        replicas = strategy.num_replicas_in_sync
        distribute.fit(model, strategy, lambda c: train(distribute.replica_slices(c, replicas)),
                       epochs, backup, callbacks=callbacks,
                       chief_callbacks=[evaluation, tensorboard], verbose=config.verbose)
        return evaluation.values
    # The evaluation first: an epoch's metrics are written before its backup marks it done.
    callbacks = [evaluation, BackupAndRestore(backup), tensorboard, *callbacks]
    model.fit(train(), epochs=epochs, shuffle=False, callbacks=callbacks,
              verbose=config.verbose)
    return evaluation.values


def config_json(config):
    """Every setting, JSON-ready, with no index password (metrics.json, config.json)."""
    return json.loads(json.dumps(dict(dataclasses.asdict(config), index=redact(config.index))))


def _settings(config, names=None):
    values = config_json(config)
    return {k: v for k, v in values.items() if k != "verbose" and (names is None or k in names)}


def check_dir(directory, settings, flag):
    """Refuses a directory that holds a run with other `settings` (writes nothing)."""
    path = os.path.join(directory, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        changed = sorted(k for k in set(settings) | set(theirs)
                         if settings.get(k) != theirs.get(k))
        if changed:
            raise SettingsError(f"--{flag}={directory} holds a run with other settings "
                                f"({', '.join(changed)}); use a fresh --{flag}.")


def claim_dir(directory, settings):
    """Records `settings` in `directory`, which `check_dir` then holds to them."""
    os.makedirs(directory, exist_ok=True)
    write_json(os.path.join(directory, "config.json"), settings)


MAKE_SETTINGS = ("data_dir", "index", "make_units", "make_target_in_mlp", "max_history",
                 "optimizer", "learning_rate", "batch_size", "seed")


def run_dirs(config):
    """(directory, settings, flag) of each directory the run writes and holds to its settings."""
    dirs = [(config.model_dir, _settings(config), "model_dir")]
    if config.uses_make and config.make_epochs:
        dirs.append((make_dir(config), _settings(config, MAKE_SETTINGS), "make_dir"))
    return dirs


def make_dir(config):
    return config.make_dir or os.path.join(config.model_dir, "make")


def pretrain_make(config, vectors, test, length, refresh=(), strategy=None):
    """MAKE trained alone on the CTR task (paper eq. 5); frozen unless make_trainable.

    Every epoch's weights stay in the MAKE directory, so rankers sharing it
    (``make_dir``) pre-train MAKE once, for the most epochs any of them needs.
    Its epochs.json lists the epochs whose weights are there, all of one run
    (`EpochRecord`): a ranker uses them only when it lists epochs 1..make_epochs.
    """
    with distribute.scope(strategy):
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
    if not distribute.chief_value(strategy, int(done)):
        print(f"pre-training MAKE for {config.make_epochs} epochs ...", flush=True)
        values = _fit(model, config, _train_data(config, length, vectors, model),
                      config.make_epochs, test, out, refresh,
                      weights=os.path.join(out, "epoch{epoch}.weights.h5"), strategy=strategy)
    else:
        model.load_weights(os.path.join(out, f"epoch{config.make_epochs}.weights.h5"))
    make.trainable = config.make_trainable
    return make, values


def _train_data(config, length, vectors, model):
    """The training batches for `model` in time order, as `_fit` takes them."""
    return lambda slices=None, shard=None: data.impressions(
        config.data_dir, "train", batch_size=config.batch_size, max_history=length,
        vectors=vectors, features=list(model.input), validate=False, slices=slices,
        shard=shard, repeat=shard is not None)


def run(config, vectors=None, pretrain_config=None):
    """Trains, evaluates and exports one ranker; returns the metrics dict (None on a
    worker that is not the chief of a `strategy`: it writes nothing).

    Raises `SettingsError` before writing anything when the settings, the
    data directory or the index cannot be used.

    Args:
        vectors: a `tfmm.data.Vectors` snapshot to use instead of the index.
        pretrain_config: a `tfmm.pretrain.PretrainConfig` run first when a
            multimodal model finds the index empty.
    """
    try:
        return _run(config, vectors, pretrain_config)
    except tf.errors.DataLossError:  # a file went bad after check_data: name it
        check_data(config)
        raise


def _run(config, vectors, pretrain_config):
    config.validate()
    try:  # first: a multi-worker strategy must exist before TensorFlow runs anything
        strategy = distribute.strategy(config.strategy)
    except ValueError as e:
        raise SettingsError(f"--strategy={config.strategy}: {e}") from None
    chief = distribute.is_chief(strategy)
    start = time.time()
    dirs = run_dirs(config)
    for directory, settings, flag in dirs:
        check_dir(directory, settings, flag)
    meta = check_data(config)
    vocab, length = meta["vocab"], config.max_history or meta["max_history"]
    source = None
    if config.model != "id" and vectors is None:
        vectors, source = load_vectors(config, vocab["num_items"], pretrain_config, strategy)
    elif config.model == "id":
        vectors = None
    for directory, settings, _ in dirs if chief else ():  # the run can start
        claim_dir(directory, settings)
    refresh = []
    if config.refresh_vectors and vectors is not None:
        vectors = vectors.live()
        refresh = [RefreshVectors(open_index(config.index), vectors)]
    keras.utils.set_random_seed(config.seed)
    test = TestSet(config, meta, vectors, strategy) if chief else None
    make, make_epochs = (pretrain_make(config, vectors, test, length, refresh, strategy)
                         if config.uses_make else (None, []))
    parameter_servers = isinstance(strategy, tf.distribute.ParameterServerStrategy)
    shards = (parameter_server.num_parameter_servers(parameter_server.cluster_resolver(strategy))
              if parameter_servers else 1)
    # The ranker's weights are the seed's alone, whatever MAKE drew: a multimodal ranker
    # starts as the ID ranker of its seed (start_as_id).
    keras.utils.set_random_seed(config.seed)
    with distribute.scope(strategy):
        model = DINRanker(vocab, length, method=config.model,
                          vector_dim=None if vectors is None else vectors.table.shape[1],
                          make=make, embedding_dim=config.embedding_dim,
                          attention_units=config.attention_units, mlp_units=config.mlp_units,
                          num_tiers=config.num_tiers, simtier_output=config.simtier_output,
                          batch_norm=config.batch_norm, embedding_shards=shards,
                          start_as_id=config.start_as_id,
                          make_integration=config.make_integration)
    print(f"training the {config.model} ranker for {config.epochs} epoch(s) ...", flush=True)
    epochs = _fit(model, config, _train_data(config, length, vectors, model), config.epochs, test,
                  config.model_dir, refresh, strategy=strategy)
    digest = None if strategy is None else distribute.weights_digest(model, strategy)
    if not chief:
        return None
    groups = metrics.frequency_groups(train_counts(config, vocab["num_items"]),
                                      NUM_FREQUENCY_GROUPS)
    result = {"model": config.model, **test.report(test.predict(model), groups),
              "epochs": epochs}
    if digest:
        result["weights_sha256"] = digest
    if parameter_servers:
        result["embedding_shards"] = parameter_server.placement(model)
    if config.uses_make:
        result["make"] = {"pretrain_epochs": config.make_epochs,
                          "trainable": config.make_trainable, "epochs": make_epochs}
        if model.make_head is not None:  # the same run without MAKE's head: what MAKE adds
            result["make"]["without_make"] = test.summary(
                test.predict(model, tf.function(model.without_make)))
    if refresh:
        result["vector_refreshes"] = refresh[0].values
    if source:
        result["pretrain_source"] = source
    if config.export_dir:
        result["export_path"] = export_saved_model(
            parameter_server.joined(model) if parameter_servers else model, config.export_dir,
            "probability")
    result.update(train_seconds=time.time() - start, config=config_json(config))
    write_json(os.path.join(config.model_dir, "metrics.json"), result)
    return result


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

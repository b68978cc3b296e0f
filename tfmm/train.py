"""tfmm's training entry point.

    python -m tfmm.train --flagfile=configs/ctr.flags        # the CTR ranker, end to end
    python -m tfmm.train --flagfile=configs/ctr.flags --world=tiny --model=id
    python -m tfmm.train --flagfile=configs/pretrain.flags   # SCL pre-training alone

``--task=ctr`` trains the ranker ``--model`` (paper §4; `tfmm.ctr`): it
reads item vectors from ``--index``, running the pre-training first
(the pre-training flags, with ``--pretrain_*`` for its epochs, batch size,
learning rate and directories) when the index is empty, on the best source
the data directory has: SCL on its triplets, else image <-> title pairs
(items with both), else SCL on click pairs mined from its training
impressions, else the generic objective (`tfmm.pretrain.choose_source`), and
says which
(``pretrain_source`` in metrics.json); pre-trains MAKE for
``--make_epochs`` when the model has it; trains, evaluates after each epoch,
writes ``<model_dir>/metrics.json`` and exports the ranker under
``<export_dir>/<version>/``.

``--task=pretrain`` trains the multimodal encoder (paper §3) on a data
directory's triplets (``--objective=scl``) or items (``generic``,
``random``), writes ``<model_dir>/metrics.json`` (``acc@1``, ``acc@5`` on
held-out pairs where there are any; the label-free check
``neighbours_same_category@10``), exports the encoder under
``<export_dir>/<version>/`` and writes every item's vector to ``--index``.

A data directory without data is generated from ``--world`` first, when it
is the default ``data/<world>`` or ``--world`` is given (on the command line
or in a flagfile); another ``--data_dir`` without data is an error, so a
mistyped path does not train on a new world. Any flag overrides the flagfile.
A refused run prints one line naming the flag, file or record and writes
nothing.

``--strategy=multi_worker`` trains on the machines named by ``$TF_CONFIG``
(the same command on every worker; `tfmm.distribute`), ``mirrored`` on the
devices of this one; the chief (worker 0) alone writes metrics, logs and
exports. ``--strategy=parameter_server`` (``--task=ctr``) splits the ranker's
ID tables over the ``ps`` tasks of ``$TF_CONFIG``; the same command on a
``worker`` or ``ps`` task runs its server, on the ``chief`` the job
(`tfmm.parameter_server`).
"""

import json
import os
import sys

from absl import app, flags

from tfmm import _startup, ctr, distribute, image_title, parameter_server, pretrain as pretraining
from tfmm.config import SettingsError, define_flags, from_flags
from tfmm.data import schema
from tfmm.layers.simtier import OUTPUTS as SIMTIER_OUTPUTS
from tfmm.ranker import MAKE_INTEGRATIONS, METHODS
from tfmm.scl import POSITIVE_TOWERS

CTR, PRETRAIN = ctr.CTRConfig, pretraining.PretrainConfig
TASKS = ("pretrain", "ctr")
FLAGS = flags.FLAGS
flags.DEFINE_enum("task", "pretrain", TASKS, "What to train.")
flags.DEFINE_enum("world", "small", ["tiny", "small", "large"],
                  "Synthetic world generated into data/<world>, or into --data_dir when "
                  "--world is given, when it holds no data.")
flags.DEFINE_string("data_dir", None, "tfmm data directory (default data/<world>).")
flags.DEFINE_string("model_dir", None, "Checkpoints, TensorBoard logs, metrics.json "
                    "(default runs/<dataset>/<task>, <dataset> the data directory's name).")
flags.DEFINE_string("export_dir", None, "SavedModels go to <export_dir>/<version>/ "
                    "(default runs/<dataset>/export/encoder or .../ranker; '' to skip).")
flags.DEFINE_string("index", None, "Index table: a SQLite file (default "
                    "runs/<dataset>/index/vectors.db) or a Redis URL "
                    "redis://host:port/db[?prefix=name] (password from $TFMM_REDIS_PASSWORD, "
                    "keeping it out of the command line and metrics.json); "
                    "'' to skip with --task=pretrain).")
# Their defaults differ by task: each config's own.
flags.DEFINE_integer("epochs", None, f"Training epochs (default {PRETRAIN.epochs} for pretrain, "
                     f"{CTR.epochs} for ctr: ID rankers overfit from the second, paper Fig. 3).")
flags.DEFINE_integer("batch_size", None, f"Batch size (default {PRETRAIN.batch_size} for "
                     f"pretrain, {CTR.batch_size} for ctr).")
flags.DEFINE_float("learning_rate", CTR.learning_rate, "Learning rate.")
flags.DEFINE_integer("seed", CTR.seed, "Random seed.")

# --task=ctr: CTRConfig's fields.
define_flags(CTR, {
    "model": "Ranker: the ID baseline or a multimodal method (paper §6.1.3).",
    "make_epochs": "Epochs MAKE is pre-trained alone (0: trained jointly).",
    "make_trainable": "Fine-tune the pre-trained MAKE in the ranker (default: frozen).",
    "make_dir": "MAKE's pre-training directory (default <model_dir>/make); rankers that "
                "share one pre-train MAKE once.",
    "max_history": "History length L (0: the dataset's).",
    "embedding_dim": "ID embedding width.",
    "attention_units": "DIN attention MLP.",
    "mlp_units": "Ranker MLP.",
    "make_units": "MAKE's four MLP layers.",
    "make_target_in_mlp": "MAKE's MLP reads concat(v_MAKE, target vector), as DIN's own head "
                          "does; false: v_MAKE alone (paper eq. 4), which cannot tell which "
                          "target it scores except through the attention weights.",
    "num_tiers": "SimTier tiers.",
    "simtier_output": "SimTier's histogram in the ranker: fractions of the history, "
                      "log(1 + count) or raw counts (the paper's; they trained worse here).",
    "batch_norm": "Batch-normalise the ranker's MLP input (as the DIN reference code does).",
    "start_as_id": "Multimodal features enter the ranker's MLP with zero weights, so it starts "
                   "as the ID ranker of the same seed; false: Glorot weights for them too (a "
                   "plain concatenation, as the paper).",
    "make_integration": "How MAKE's knowledge joins the ranker: residual (the ranker without "
                        "MAKE trains on its own loss; a head over MAKE's knowledge adds to its "
                        "logit, so MAKE cannot make it worse) or concat (concatenated before "
                        "the MLP, as the paper).",
    "refresh_vectors": "Re-read the index table at every epoch, so vectors the encoder "
                       "service writes meanwhile join training (near-line).",
    "strategy": "tf.distribute strategy: none (one process, Keras fit), mirrored (this "
                "machine's devices) or multi_worker (the cluster in $TF_CONFIG, the same "
                "command on every worker; worker 0 writes metrics, logs and exports) or "
                "parameter_server (--task=ctr: ID tables split over the cluster's ps tasks, "
                "asynchronous steps on its workers; on a worker or ps task the command runs "
                "its server, on the chief the job).",
    "optimizer": "Ranker optimizer: adam is Keras 3's, whose second moment of an embedding "
                 "row looked up n times in a batch sums n squares instead of squaring the "
                 "sum; dense_adam is Adam's (as tf-keras'), and faster.",
}, choices={"model": METHODS, "simtier_output": SIMTIER_OUTPUTS,
            "make_integration": MAKE_INTEGRATIONS,
            "optimizer": list(ctr.OPTIMIZERS), "strategy": distribute.STRATEGIES})
flags.DEFINE_integer("pretrain_epochs", PRETRAIN.epochs, "Pre-training epochs when --task=ctr "
                     "finds the index empty.", lower_bound=0)
flags.DEFINE_integer("pretrain_batch_size", PRETRAIN.batch_size, "Its batch size.",
                     lower_bound=1)
flags.DEFINE_float("pretrain_learning_rate", PRETRAIN.learning_rate, "Its learning rate.")
# Checked when parsed: PretrainConfig's own errors would name --epochs etc.
flags.register_validator("pretrain_learning_rate", lambda v: v > 0, "must be > 0")
flags.DEFINE_string("pretrain_model_dir", None, "Its model directory (default "
                    "runs/<dataset>/pretrain).")
flags.DEFINE_string("encoder_export_dir", None, "Where it exports the encoder (default "
                    "runs/<dataset>/export/encoder).")

# --task=pretrain, and the pre-training --task=ctr runs when the index is empty:
# PretrainConfig's fields.
define_flags(PRETRAIN, {
    "modality": "Which tower to pre-train.",
    "objective": "Pre-training objective: SCL on query -> item pairs; image_title, an item's "
                 "image and its own title are a pair (CLIP-style); generic, two augmentations "
                 "of an image (or views of a title); random, the untrained tower.",
    "pairs_from": "Where --objective=scl takes its pairs: the data dir's pretrain tables, or "
                  "clicks: mined from its training impressions (a click and the same user's "
                  "next click); with --objective=image_title, clicks adds those pairs' loss "
                  "on the item vectors.",
    "queue_size": "MoCo queue size K (0: in-batch negatives only).",
    "momentum": "EMA momentum of the key tower.",
    "triplet_weight": "Weight of the hard-negative triplet loss (0: off).",
    "margin": "Triplet margin.",
    "temperature": "Initial InfoNCE temperature (learned).",
    "mask_own_positive": "Leave a query's own item out of its negatives.",
    "positive_tower": "With MoCo, the tower that encodes the batch's positives: the key tower "
                      "(MoCo) or the query tower, with gradient (the key tower then only "
                      "fills the queue).",
    "dim": "Vector dimension d.",
    "backbone": "Backbone: a config name (resnet_tiny, resnet_small), a KerasHub preset name "
                "(e.g. resnet_50_imagenet, clip_vit_base_patch16; downloaded) or a local "
                "preset directory; a CLIP preset gives its vision or text encoder (--modality).",
    "freeze_backbone": "Keep the backbone's weights as loaded; train only the projection head.",
    "image_size": "Backbone input size (images are resized to it).",
    "center_vectors": "End the trained tower with subtracting the mean of the catalogue's "
                      "vectors (then re-normalising): the exported encoder, the index and "
                      "Acc@N see centred vectors. Weak pairs (--pairs_from=clicks) leave all "
                      "vectors in a narrow cone that SimTier's tiers cannot resolve. Default: "
                      "on where the data dir's pairs come from clicks, else off.",
    "index_vector": "--objective=image_title: an item's vector in the index and the exported "
                    "encoder: its image tower's, its title tower's, or both fused (the one "
                    "an item has where it lacks the other).",
    "train_towers": "--objective=image_title: train both towers, or only the image or the "
                    "text tower (the other kept as built, e.g. a pretrained preset).",
    "min_steps": "Train at least this many steps in all: a small catalogue's epochs are "
                 "stretched to reach them.",
}, choices={"modality": pretraining.MODALITIES, "objective": pretraining.OBJECTIVES,
            "positive_tower": POSITIVE_TOWERS, "index_vector": image_title.VECTORS,
            "train_towers": image_title.TRAIN, "pairs_from": pretraining.PAIR_SOURCES})


def fail(message):
    """Ends the run with one line on stderr (no traceback, no flag help), exit status 1."""
    sys.exit(message)


def data_dir():
    """The data directory; generated from --world when missing, only where asked for."""
    from tfmm.data.synthetic import ensure_world

    default = os.path.join("data", FLAGS.world)
    path = FLAGS.data_dir or default
    if (not os.path.exists(os.path.join(path, "metadata.json")) and not FLAGS["world"].present
            and os.path.normpath(path) != default):
        fail(f"--data_dir={path} " + ("holds no tfmm data (no metadata.json)"
                                       if os.path.isdir(path) else "does not exist")
             + "; give --world to generate a synthetic world there.")
    try:
        return ensure_world(path, FLAGS.world)
    except (ValueError, OSError) as e:  # a directory of user files, a full disk
        fail(str(e))


def _config(cls, names, renamed=None, **fixed):
    """A config dataclass from the flags of the same names, then `fixed`, validated.

    `renamed` (setting -> flag) names the flags that set a `fixed` value in errors.
    """
    try:  # bad flag values: one line naming the flag, not a trace
        return from_flags(cls, FLAGS, names, **fixed).validate()
    except ValueError as e:
        message = str(e)
        for setting, flag in (renamed or {}).items():
            message = message.replace(f"--{setting}=", f"--{flag}=")
        fail(message)


def _default(name, default):
    return default if FLAGS[name].value is None else FLAGS[name].value


def _runs(data_dir, *parts):
    """Default output paths: runs/<data directory's name>/..., one tree per dataset."""
    return os.path.join("runs", os.path.basename(os.path.normpath(data_dir)), *parts)


def _verbose():
    return 1 if os.isatty(1) else 2


def _pairs_from_clicks(data_dir):
    try:
        return schema.read_metadata(data_dir).get("pairs", {}).get("source") == "clicks"
    except (OSError, ValueError):  # the job's own checks name what is wrong
        return False


def pretrain_config(data_dir, model_dir, export_dir, epochs, batch_size, learning_rate,
                    renamed=None):
    # Centred by default where the pairs are clicks: their vectors need it (BUILD.md).
    center = (FLAGS.center_vectors if FLAGS["center_vectors"].present
              else _pairs_from_clicks(data_dir))
    return _config(PRETRAIN, list(FLAGS), renamed, data_dir=data_dir, center_vectors=center,
                   model_dir=model_dir, export_dir=export_dir, epochs=epochs,
                   batch_size=batch_size, learning_rate=learning_rate, verbose=_verbose(),
                   index=_default("index", _runs(data_dir, "index", "vectors.db")))


def run_pretrain():
    path = data_dir()
    config = pretrain_config(path, _default("model_dir", _runs(path, "pretrain")),
                             _default("export_dir", _runs(path, "export", "encoder")),
                             _default("epochs", PRETRAIN.epochs),
                             _default("batch_size", PRETRAIN.batch_size),
                             FLAGS.learning_rate)
    try:
        result = pretraining.run(config)
    except SettingsError as e:
        fail(str(e))
    if result is None:  # a worker that is not the chief: it writes nothing
        return
    summary = {k: v for k, v in result.items() if k not in ("history", "config")}
    print(json.dumps(summary, indent=1))
    print(f"metrics: {os.path.join(config.model_dir, 'metrics.json')}")


def run_ctr():
    path = data_dir()
    config = _config(CTR, list(FLAGS), data_dir=path, verbose=_verbose(),
                     model_dir=_default("model_dir", _runs(path, "ctr")),
                     export_dir=_default("export_dir", _runs(path, "export", "ranker")),
                     index=_default("index", _runs(path, "index", "vectors.db")),
                     epochs=_default("epochs", CTR.epochs),
                     batch_size=_default("batch_size", CTR.batch_size))
    encoder = None
    # Pre-training does not run under parameter servers: the index must hold vectors.
    if config.model != "id" and config.strategy != "parameter_server":
        encoder = pretrain_config(
            path, _default("pretrain_model_dir", _runs(path, "pretrain")),
            _default("encoder_export_dir", _runs(path, "export", "encoder")),
            FLAGS.pretrain_epochs, FLAGS.pretrain_batch_size, FLAGS.pretrain_learning_rate,
            renamed={name: f"pretrain_{name}" for name in ("epochs", "batch_size",
                                                            "learning_rate")}
            | {"export_dir": "encoder_export_dir", "model_dir": "pretrain_model_dir"})
    try:
        result = ctr.run(config, pretrain_config=encoder)
    except SettingsError as e:
        fail(str(e))
    if result is None:  # a worker that is not the chief: it writes nothing
        return
    print(ctr.summary_table(result))
    print(f"metrics: {os.path.join(config.model_dir, 'metrics.json')}")
    if config.export_dir:
        print(f"SavedModel: {result['export_path']}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _startup.quiet_logging()
    try:  # before anything runs TensorFlow operations (generating a world does)
        if FLAGS.strategy == "parameter_server":
            if "TF_CONFIG" in os.environ and parameter_server.is_server():
                parameter_server.serve()  # until killed
            if FLAGS.task == "pretrain":  # its config refuses the strategy
                return run_pretrain()
        distribute.strategy(FLAGS.strategy)
    except ValueError as e:
        fail(f"--strategy={FLAGS.strategy}: {e}")
    run_pretrain() if FLAGS.task == "pretrain" else run_ctr()


if __name__ == "__main__":
    app.run(main)

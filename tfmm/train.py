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

``--run_dir`` names the root of the run's outputs: ``ctr/`` (or
``pretrain/``), ``index/vectors.db``, ``export/ranker/`` and
``export/encoder/`` under it (default ``runs/<dataset>``, the data
directory's name); ``--model_dir``, ``--index`` and the other path flags
override it.

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

`ranker` is ``--task=ctr`` as a library function: the CTR job, after
pre-training the encoder into an empty index.
"""

import dataclasses
import json
import os

from absl import flags

from tfmm import cli, ctr, distribute, jobs, parameter_server, pretrain as pretraining
from tfmm.config import RunTree, SettingsError, from_flags, renamed
from tfmm.config import define_flags as define_settings
from tfmm.index import redact

CTR, PRETRAIN = ctr.CTRConfig, pretraining.PretrainConfig
TASKS = ("pretrain", "ctr")
FLAGS = flags.FLAGS
# The flags that set the pre-training --task=ctr runs into an empty index (setting -> flag).
PRETRAIN_FLAGS = {"epochs": "pretrain_epochs", "batch_size": "pretrain_batch_size",
                  "learning_rate": "pretrain_learning_rate", "model_dir": "pretrain_model_dir",
                  "export_dir": "encoder_export_dir"}


def define_flags():
    """The command's flags: its own, then every setting of the two jobs (`tfmm.config`)."""
    flags.DEFINE_enum("task", "pretrain", TASKS, "What to train.")
    cli.define_data_flags()
    flags.DEFINE_string("run_dir", None, "Root of the run's outputs: <run_dir>/ctr or "
                        "<run_dir>/pretrain, index/vectors.db, export/ranker, export/encoder "
                        "(default runs/<dataset>, <dataset> the data directory's name); "
                        "--model_dir, --index, --export_dir, --pretrain_model_dir and "
                        "--encoder_export_dir override it.")
    flags.DEFINE_string("model_dir", None, "Checkpoints, TensorBoard logs, metrics.json "
                        "(default <run_dir>/<task>).")
    flags.DEFINE_string("export_dir", None, "SavedModels go to <export_dir>/<version>/ "
                        "(default <run_dir>/export/encoder or .../ranker; '' to skip).")
    flags.DEFINE_string("index", None, "Index table: a SQLite file (default "
                        "<run_dir>/index/vectors.db) or a Redis URL "
                        "redis://host:port/db[?prefix=name] (password from $TFMM_REDIS_PASSWORD, "
                        "keeping it out of the command line and metrics.json); "
                        "'' to skip with --task=pretrain).")
    # Their defaults differ by task: each config's own.
    flags.DEFINE_integer("epochs", None, f"Training epochs (default {PRETRAIN.epochs} for "
                         f"pretrain, {CTR.epochs} for ctr: ID rankers overfit from the second, "
                         "paper Fig. 3).")
    flags.DEFINE_integer("batch_size", None, f"Batch size (default {PRETRAIN.batch_size} for "
                         f"pretrain, {CTR.batch_size} for ctr).")
    flags.DEFINE_integer("pretrain_epochs", PRETRAIN.epochs, "Pre-training epochs when "
                         "--task=ctr finds the index empty.")
    flags.DEFINE_integer("pretrain_batch_size", PRETRAIN.batch_size, "Its batch size.")
    flags.DEFINE_float("pretrain_learning_rate", PRETRAIN.learning_rate, "Its learning rate.")
    flags.DEFINE_string("pretrain_model_dir", None, "Its model directory (default "
                        "<run_dir>/pretrain).")
    flags.DEFINE_string("encoder_export_dir", None, "Where it exports the encoder (default "
                        "<run_dir>/export/encoder).")
    # --task=ctr: CTRConfig's settings; --task=pretrain, and the pre-training --task=ctr
    # runs when the index is empty: PretrainConfig's.
    define_settings(CTR)
    define_settings(PRETRAIN)


def ranker(config, pretrain_config=None):
    """Trains the CTR ranker of `config` (`tfmm.ctr.run`), as ``--task=ctr`` does: a
    multimodal ranker that finds its index empty first pre-trains the encoder into it
    with `pretrain_config` (a `tfmm.pretrain.PretrainConfig`), on the best source the
    data has (`tfmm.pretrain.run`'s ``fallback``), named in metrics.json's
    ``pretrain_source``. Returns the metrics (None on a worker that is not the chief).
    """
    job = ctr.CTRJob(config)
    before = [_encoder_first(config, pretrain_config)] if (
        pretrain_config is not None and job.reads_index) else []
    return jobs.run(job, before)


def _encoder_first(config, pretrain_config):
    """The step that fills `config`'s index by pre-training, when it is empty."""
    def fill(dist):
        if not ctr.index_empty(config, dist):
            return {}
        print(f"the index {redact(config.index)} is empty: pre-training the encoder first ...",
              flush=True)
        try:
            result = pretraining.run(dataclasses.replace(pretrain_config, index=config.index),
                                     fallback=True)
        except SettingsError as e:
            raise renamed(e, PRETRAIN_FLAGS) from None
        return {"pretrain_source": result["source"]} if result else {}  # None: not the chief

    return fill


def _config(cls, renames=None, **fixed):
    """A config dataclass from the flags of the same names, then `fixed`, validated.

    `renames` (setting -> flag) names the flags that set a `fixed` value in errors.
    """
    try:
        return from_flags(cls, FLAGS, list(FLAGS), **fixed).validate()
    except SettingsError as e:
        raise renamed(e, renames or {}) from None


def _flag(name, default):
    return default if FLAGS[name].value is None else FLAGS[name].value


def _verbose():
    return 1 if os.isatty(1) else 2


def run_pretrain():
    path = cli.data_dir()
    tree = RunTree.of(FLAGS.run_dir, path)
    config = _config(PRETRAIN, data_dir=path, verbose=_verbose(),
                     model_dir=_flag("model_dir", tree.model_dir("pretrain")),
                     export_dir=_flag("export_dir", tree.export("encoder")),
                     index=_flag("index", tree.index),
                     epochs=_flag("epochs", PRETRAIN.epochs),
                     batch_size=_flag("batch_size", PRETRAIN.batch_size))
    result = pretraining.run(config)
    if result is None:  # a worker that is not the chief: it writes nothing
        return
    summary = {k: v for k, v in result.items() if k not in ("history", "config")}
    print(json.dumps(summary, indent=1))
    print(f"metrics: {os.path.join(config.model_dir, 'metrics.json')}")


def run_ctr():
    path = cli.data_dir()
    tree = RunTree.of(FLAGS.run_dir, path)
    config = _config(CTR, data_dir=path, verbose=_verbose(),
                     model_dir=_flag("model_dir", tree.model_dir("ctr")),
                     export_dir=_flag("export_dir", tree.export("ranker")),
                     index=_flag("index", tree.index),
                     epochs=_flag("epochs", CTR.epochs),
                     batch_size=_flag("batch_size", CTR.batch_size))
    encoder = None
    # Pre-training does not run under parameter servers: the index must hold vectors.
    if config.model != "id" and config.strategy != "parameter_server":
        encoder = _config(PRETRAIN, PRETRAIN_FLAGS, data_dir=path, verbose=_verbose(),
                          model_dir=_flag("pretrain_model_dir", tree.model_dir("pretrain")),
                          export_dir=_flag("encoder_export_dir", tree.export("encoder")),
                          index=config.index, epochs=FLAGS.pretrain_epochs,
                          batch_size=FLAGS.pretrain_batch_size,
                          learning_rate=FLAGS.pretrain_learning_rate)
    result = ranker(config, encoder)
    if result is None:  # a worker that is not the chief: it writes nothing
        return
    print(ctr.summary_table(result))
    print(f"metrics: {os.path.join(config.model_dir, 'metrics.json')}")
    if config.export_dir:
        print(f"SavedModel: {result['export_path']}")


def start():
    """Runs a parameter-server task's server, or builds the distribution first thing:
    before anything runs TensorFlow operations (generating a world does)."""
    try:
        if FLAGS.strategy != "parameter_server":
            distribute.distribution(FLAGS.strategy)
        elif "TF_CONFIG" in os.environ and parameter_server.is_server():
            parameter_server.serve()  # until killed
        elif FLAGS.task == "ctr":  # pre-training's settings refuse the strategy
            distribute.distribution(FLAGS.strategy, FLAGS.cluster_timeout)
    except ValueError as e:
        raise SettingsError(f"--strategy={FLAGS.strategy}: {e}") from None


def main(argv):
    del argv
    start()
    run_pretrain() if FLAGS.task == "pretrain" else run_ctr()


if __name__ == "__main__":
    define_flags()
    cli.run(main)

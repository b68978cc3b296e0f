"""tfmm's training entry point.

    python -m tfmm.train --flagfile=configs/pretrain.flags   # SCL pre-training
    python -m tfmm.train --flagfile=configs/pretrain.flags --world=tiny --epochs=1

``--task=pretrain`` trains the multimodal encoder (paper §3) on a data
directory's triplets, writes ``<model_dir>/metrics.json`` (``acc@1``,
``acc@5`` on held-out pairs), exports the encoder under
``<export_dir>/<version>/`` and writes every item's vector to ``--index``.
A data directory that does not exist is generated from ``--world`` first.
Any flag overrides the flagfile.
"""

import dataclasses
import json
import os

from absl import app, flags

TASKS = ("pretrain", "ctr")
FLAGS = flags.FLAGS
flags.DEFINE_enum("task", "pretrain", TASKS, "What to train.")
flags.DEFINE_enum("world", "small", ["tiny", "small", "large"],
                  "Synthetic world generated into --data_dir when it does not exist.")
flags.DEFINE_string("data_dir", None, "tfmm data directory (default data/<world>).")
flags.DEFINE_string("model_dir", "runs/pretrain", "Checkpoints, TensorBoard logs, metrics.json.")
flags.DEFINE_string("export_dir", "runs/export/encoder", "SavedModels go to <export_dir>/<version>/.")
flags.DEFINE_string("index", "runs/index/vectors.db", "Index table file ('' to skip).")
flags.DEFINE_enum("modality", "image", ["image", "text"], "Which tower to pre-train.")
flags.DEFINE_enum("objective", "scl", ["random", "generic", "scl"], "Pre-training objective.")
flags.DEFINE_integer("queue_size", 4096, "MoCo queue size K (0: in-batch negatives only).")
flags.DEFINE_float("momentum", 0.999, "EMA momentum of the key tower.")
flags.DEFINE_float("triplet_weight", 1.0, "Weight of the hard-negative triplet loss (0: off).")
flags.DEFINE_float("margin", 0.2, "Triplet margin.")
flags.DEFINE_float("temperature", 0.07, "Initial InfoNCE temperature (learned).")
flags.DEFINE_bool("mask_own_positive", True, "Leave a query's own item out of its negatives.")
flags.DEFINE_integer("dim", 128, "Vector dimension d.")
flags.DEFINE_string("backbone", "resnet_tiny", "KerasHub backbone config name or preset.")
flags.DEFINE_integer("image_size", 32, "Backbone input size (images are resized to it).")
flags.DEFINE_integer("epochs", 2, "Training epochs.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.DEFINE_integer("seed", 0, "Random seed.")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def data_dir():
    """The data directory, generated from --world when missing."""
    from tfmm.data.synthetic import ensure_world

    return ensure_world(FLAGS.data_dir or os.path.join("data", FLAGS.world), FLAGS.world)


def pretrain():
    from tfmm.pretrain import PretrainConfig, run

    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    config = PretrainConfig(
        **{k: FLAGS[k].value for k in fields if k in FLAGS and k != "data_dir"},
        data_dir=data_dir(), verbose=1 if os.isatty(1) else 2)
    try:
        config.validate()
    except ValueError as e:
        raise app.UsageError(str(e))
    result = run(config)
    summary = {k: v for k, v in result.items() if k not in ("history", "config")}
    print(json.dumps(summary, indent=1))
    print(f"metrics: {os.path.join(config.model_dir, 'metrics.json')}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.task == "pretrain":
        pretrain()
    else:
        raise app.UsageError("--task=ctr is not built yet (it lands with the CTR training "
                             "issue); --task=pretrain is.")


if __name__ == "__main__":
    app.run(main)

"""Pre-training of the multimodal encoder (paper §3) and its evaluation (§6.2).

`run(config)` trains a tower on a tfmm data directory's pre-training triplets
with one of the objectives of paper Table 2, reports Acc@N on the held-out
triplets, exports the tower as a SavedModel (images or text in, vectors out)
and writes every catalogue item's vector into the index table.

Objectives:
- ``random``: the randomly initialised tower, untrained.
- ``generic``: semantic-agnostic; two augmentations (crop, zoom, rotation,
  flips, colour jitter) of the same catalogue image are the positive pair, or
  two word-dropout views of the same title for text.
- ``scl``: query -> purchased item, with ``queue_size`` (0: in-batch negatives
  only; > 0: MoCo) and ``triplet_weight`` (0: no hard-negative triplet loss).
"""

import dataclasses
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tfmm import data, metrics
from tfmm.ctr import SettingsError
from tfmm.data import schema
from tfmm.export import export_saved_model
from tfmm.index import open_index, redact
from tfmm.resume import EpochRecord, write_json
from tfmm.scl import POSITIVE_TOWERS, SCLModel
from tfmm.towers import (BACKBONES, BackboneError, check_backbone, image_tower,
                         preset_text_tower, text_tower, vocabulary_of)

OBJECTIVES = ("random", "generic", "scl")
MODALITIES = ("image", "text")


@dataclasses.dataclass
class PretrainConfig:
    data_dir: str
    model_dir: str
    export_dir: str = ""
    index: str = ""
    modality: str = "image"
    objective: str = "scl"
    queue_size: int = 4096
    momentum: float = 0.999
    triplet_weight: float = 1.0
    margin: float = 0.2
    temperature: float = 0.07
    mask_own_positive: bool = True
    positive_tower: str = "momentum"
    dim: int = 128
    backbone: str = "resnet_tiny"  # a config name of towers.BACKBONES or a KerasHub preset
    freeze_backbone: bool = False  # fine-tune only the projection head on a pretrained backbone
    image_size: int = 32
    epochs: int = 2
    batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 0
    verbose: int = 2

    def validate(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective={self.objective!r} is not one of {OBJECTIVES}.")
        if self.modality not in MODALITIES:
            raise ValueError(f"--modality={self.modality!r} is not one of {MODALITIES}.")
        for name in ("epochs", "queue_size", "batch_size", "dim", "image_size"):
            if getattr(self, name) < (0 if name in ("epochs", "queue_size") else 1):
                raise ValueError(f"--{name}={getattr(self, name)} is out of range.")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate={self.learning_rate} must be > 0.")
        if self.queue_size and self.queue_size % self.batch_size:
            raise ValueError(f"--queue_size={self.queue_size} must be a multiple of "
                             f"--batch_size={self.batch_size}.")
        if self.positive_tower not in POSITIVE_TOWERS:
            raise ValueError(f"--positive_tower={self.positive_tower!r} is not one of "
                             f"{POSITIVE_TOWERS}.")
        if self.objective == "generic" and self.triplet_weight:
            raise ValueError("--objective=generic has no hard negatives: set --triplet_weight=0.")
        try:
            check_backbone(self.backbone)
        except BackboneError as e:
            raise ValueError(f"--{e}") from None
        if self.modality == "text" and self.backbone not in BACKBONES and self.export_dir:
            raise ValueError(f"--backbone={self.backbone} --modality=text: the preset's tokenizer "
                             "runs tensorflow-text ops, which TF Serving need not have; set "
                             "--export_dir='' (--encoder_export_dir='' with --task=ctr); the "
                             "vectors still go to --index.")
        return self


class Catalogue:
    """Every item's image and title, in memory, addressable by dense item id."""

    def __init__(self, data_dir):
        batches = list(data.items(data_dir, batch_size=4096))
        self.ids = np.concatenate([b["item_id"].numpy() for b in batches])
        self.images = np.concatenate([b["image"].numpy() for b in batches])
        self.titles = np.concatenate([b["title"].numpy() for b in batches])
        self.row = np.full(self.ids.max() + 1, -1, np.int64)
        self.row[self.ids] = np.arange(len(self.ids))

    def content(self, modality):
        return self.images if modality == "image" else self.titles


def augment_images(seed):
    """Generic pre-training's views: geometry and colour change, identity does not."""
    layers = keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(0.1, seed=seed),
        keras.layers.RandomZoom((-0.3, 0.1), seed=seed),
        keras.layers.RandomTranslation(0.15, 0.15, seed=seed),
        keras.layers.RandomColorJitter(value_range=(0, 255), brightness_factor=0.3,
                                       contrast_factor=0.3, saturation_factor=(0.3, 0.7),
                                       hue_factor=0.15, seed=seed),
    ])

    def views(images):
        x = tf.cast(images, tf.float32)
        return tuple(tf.cast(tf.clip_by_value(layers(x, training=True), 0, 255), tf.uint8)
                     for _ in range(2))

    return views


def word_dropout(texts, rate=0.3, seed=None):
    """Drops each word with probability `rate` (keeping at least one)."""
    words = tf.strings.split(texts)
    keep = tf.random.stateless_uniform(tf.shape(words.flat_values), seed=seed) >= rate
    kept = tf.ragged.boolean_mask(words, words.with_flat_values(keep))
    kept = tf.where(kept.row_lengths() > 0, tf.strings.reduce_join(kept, axis=1, separator=" "),
                    texts)
    return kept


def training_data(config, catalogue):
    """Batches {query, positive, negative, positive_id} for the objective."""
    content = tf.constant(catalogue.content(config.modality))
    row = tf.constant(catalogue.row)
    if config.objective == "generic":
        ds = tf.data.Dataset.from_tensor_slices(catalogue.ids).shuffle(
            len(catalogue.ids), seed=config.seed).repeat()
        ds = ds.batch(config.batch_size, drop_remainder=True).enumerate()
        views = augment_images(config.seed) if config.modality == "image" else None

        def pair(step, ids):
            items = tf.gather(content, tf.gather(row, ids))
            if views:
                query, positive = views(items)
            else:  # a fresh stateless seed per batch and view
                query, positive = (word_dropout(items, seed=tf.stack(
                    [tf.constant(config.seed, tf.int64), 2 * step + k])) for k in (1, 2))
            return {"query": query, "positive": positive, "positive_id": ids}

        return ds.map(pair, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2), _steps(config)

    key = "query_image" if config.modality == "image" else "query_text"
    ds = data.triplets(config.data_dir, "train", batch_size=config.batch_size, shuffle=True,
                       seed=config.seed, repeat=True, drop_remainder=True)

    def triple(t):
        return {"query": t[key], "positive_id": t["positive_item_id"],
                "positive": tf.gather(content, tf.gather(row, t["positive_item_id"])),
                "negative": tf.gather(content, tf.gather(row, t["negative_item_id"]))}

    return ds.map(triple, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2), _steps(config)


def _steps(config):
    """Steps per epoch: one pass over the training triplets, for every objective
    (the generic baseline gets the same compute)."""
    meta = schema.read_metadata(config.data_dir)
    return max(1, meta["counts"]["pretrain/train"] // config.batch_size)


def build_tower(config, catalogue):
    if config.modality == "image":
        return lambda: image_tower(config.backbone, config.dim, catalogue.images.shape[1],
                                   config.image_size, freeze_backbone=config.freeze_backbone)
    if config.backbone not in BACKBONES:  # the image configs are no text towers
        return lambda: preset_text_tower(config.backbone, config.dim,
                                         freeze_backbone=config.freeze_backbone)
    vocabulary = vocabulary_of(t.decode() for t in catalogue.titles)
    vocabulary += [w for w in vocabulary_of(_query_texts(config.data_dir)) if w not in vocabulary]
    return lambda: text_tower(vocabulary, config.dim)


def _query_texts(data_dir):
    for batch in data.triplets(data_dir, "train", batch_size=4096, validate=False):
        yield from (t.decode() for t in batch["query_text"].numpy())


def embed(tower, inputs, batch_size=512):
    return np.concatenate([tower.predict_on_batch(inputs[i:i + batch_size])
                           for i in range(0, len(inputs), batch_size)])


def evaluate(config, tower, catalogue, ns=(1, 5)):
    """Acc@N on the held-out triplets: queries against all their positives."""
    key = "query_image" if config.modality == "image" else "query_text"
    batches = list(data.triplets(config.data_dir, "test", batch_size=1024))
    queries = np.concatenate([b[key].numpy() for b in batches])
    positives = np.concatenate([b["positive_item_id"].numpy() for b in batches])
    q = embed(tower, queries)
    p = embed(tower, catalogue.content(config.modality)[catalogue.row[positives]])
    return metrics.acc_at_n(q, p, ns)


def run(config):
    """Trains, evaluates, exports and indexes; returns the metrics dict."""
    config.validate()
    start = time.time()
    keras.utils.set_random_seed(config.seed)
    catalogue = Catalogue(config.data_dir)
    make_tower = build_tower(config, catalogue)
    try:  # before anything is written: a preset may not load
        tower = make_tower()
    except BackboneError as e:
        raise SettingsError(f"--{e}") from None
    os.makedirs(config.model_dir, exist_ok=True)
    history = {}
    if config.objective != "random" and config.epochs:
        model = SCLModel(tower, make_key_tower=make_tower, queue_size=config.queue_size,
                         momentum=config.momentum, triplet_weight=config.triplet_weight,
                         margin=config.margin, temperature=config.temperature,
                         mask_own_positive=config.mask_own_positive,
                         positive_tower=config.positive_tower)
        model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
        ds, steps = training_data(config, catalogue)
        backup = os.path.join(config.model_dir, "backup")
        # Each epoch's losses, kept across a kill (fit's history has only the resumed epochs).
        record = EpochRecord(os.path.join(config.model_dir, "epochs.json"), backup)
        callbacks = [record, keras.callbacks.BackupAndRestore(backup),
                     keras.callbacks.TensorBoard(os.path.join(config.model_dir, "logs"))]
        model.fit(ds, epochs=config.epochs, steps_per_epoch=steps, callbacks=callbacks,
                  verbose=config.verbose)
        history = {k: [v[k] for v in record.values] for k in record.values[0] if k != "epoch"}
    result = evaluate(config, tower, catalogue)
    result.update(history=history,
                  train_seconds=time.time() - start, config=dict(dataclasses.asdict(config), index=redact(config.index)))
    if config.export_dir:
        result["export_path"] = export_saved_model(tower, config.export_dir, "vector")
    if config.index:
        vectors = embed(tower, catalogue.content(config.modality))
        index = open_index(config.index, dim=config.dim)
        index.claim(schema.catalogue_fingerprint(config.data_dir))
        result["index_version"] = index.put(catalogue.ids, vectors)
        result["index_items"] = len(catalogue.ids)
    write_json(os.path.join(config.model_dir, "metrics.json"), result)
    return result

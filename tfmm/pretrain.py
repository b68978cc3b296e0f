"""Pre-training of the multimodal encoder (paper §3) and its evaluation (§6.2).

`run(config)` trains a tower on a tfmm data directory with one of the
objectives of paper Table 2, reports Acc@N on the held-out triplets (where the
data has them) and the label-free check, exports the tower as a SavedModel
(images or text in, vectors out) and writes the vector of every catalogue item
with content for the modality (an image, a title) into the index table; items
without are counted (``items_without_content``) and left out.

SCL trains on the triplets (table ``pretrain/train``); ``generic`` and
``random`` need only the items. An epoch is one pass over the training
triplets where the data has them, for every objective (the generic baseline
gets SCL's compute), else over the items with content.

With ``center_vectors``, the trained tower gets a last step
that subtracts the mean of the catalogue's vectors and re-normalises
(`tfmm.towers.Centring`), so the exported encoder, the index and Acc@N all
see centred vectors. Pairs that barely tell items apart, as behaviour pairs
do, train a tower whose vectors all lie in a narrow cone (cosines 0.97-1 on
the ``small`` world's click pairs), which SimTier's fixed tiers cannot
resolve; centring spreads them (BUILD.md, "Pairs from clicks").

The label-free check, for every run: ``neighbours_same_category@10``, the mean
share of an item's 10 nearest items (by cosine of their vectors) that share its
category, over items with content and a category; next to it the same for the
untrained tower (``..._untrained``) and for random neighbours (``..._chance``).

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

from tfmm import data, distribute, metrics
from tfmm.callbacks import BackupAndRestore, EpochRecord, write_json
from tfmm.config import SettingsError, as_flags, default_of
from tfmm.data import schema
from tfmm.export import check_export_dir, export_saved_model
from tfmm.index import IndexUnavailable, is_empty, local_index, open_index, redact
from tfmm.momentum_queue import MomentumQueueCallback
from tfmm.scl import SCLModel, check_arguments
from tfmm.towers import (BACKBONES, BackboneError, Centring, centred, check_backbone,
                         image_tower, preset_text_tower, text_tower, vocabulary_of)

OBJECTIVES = ("random", "generic", "scl")
MODALITIES = ("image", "text")
NEIGHBOURS = 10  # k of the label-free check


@dataclasses.dataclass
class PretrainConfig:
    data_dir: str
    model_dir: str
    export_dir: str = ""
    index: str = ""
    modality: str = "image"
    objective: str = "scl"
    queue_size: int = 4096  # SCLModel's default is none
    momentum: float = default_of(SCLModel, "momentum")
    triplet_weight: float = default_of(SCLModel, "triplet_weight")
    margin: float = default_of(SCLModel, "margin")
    temperature: float = default_of(SCLModel, "temperature")
    mask_own_positive: bool = default_of(SCLModel, "mask_own_positive")
    positive_tower: str = default_of(SCLModel, "positive_tower")
    dim: int = default_of(image_tower, "dim")
    # a config name of towers.BACKBONES, a KerasHub preset or a preset directory
    backbone: str = default_of(image_tower, "backbone")
    # fine-tune only the projection head on a pretrained backbone
    freeze_backbone: bool = default_of(image_tower, "freeze_backbone")
    image_size: int = default_of(image_tower, "image_size")
    center_vectors: bool = False
    epochs: int = 2
    batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 0
    strategy: str = "none"  # tfmm.distribute.STRATEGIES
    verbose: int = 2

    def validate(self):
        if self.strategy not in distribute.STRATEGIES:
            raise ValueError(f"--strategy={self.strategy!r} is not one of "
                             f"{distribute.STRATEGIES}.")
        if self.strategy == "parameter_server":
            raise ValueError("--strategy=parameter_server is for --task=ctr, whose ID tables "
                             "may outgrow a machine; pre-training's are small: use "
                             "multi_worker.")
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
        try:  # the library's own checks, in flag terms
            check_arguments(triplet_weight=self.triplet_weight, temperature=self.temperature,
                            positive_tower=self.positive_tower)
            MomentumQueueCallback(self.momentum)
        except ValueError as e:
            raise ValueError(as_flags(e, [f.name for f in dataclasses.fields(self)])) from None
        if self.objective == "generic" and self.triplet_weight:
            raise ValueError("--objective=generic has no hard negatives: set --triplet_weight=0.")
        try:
            check_backbone(self.backbone)
        except BackboneError as e:
            raise ValueError(f"--{e}") from None
        if self.export_dir:  # before anything runs: a base of user files is refused
            check_export_dir(self.export_dir, (self.data_dir, local_index(self.index)))
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
        self.categories = np.concatenate([b["category_id"].numpy() for b in batches])
        self.has_image = np.concatenate([b["has_image"].numpy() for b in batches])
        self.has_title = np.concatenate([b["has_title"].numpy() for b in batches])
        self.row = np.full(self.ids.max() + 1, -1, np.int64)
        self.row[self.ids] = np.arange(len(self.ids))

    def content(self, modality):
        return self.images if modality == "image" else self.titles

    def present(self, modality):
        """Which items have content for `modality`: image bytes, or a non-blank title."""
        return self.has_image if modality == "image" else self.has_title


def check_data(config):
    """The data directory's `Catalogue`, after reading every record of its tables once.

    A damaged metadata.json, a count its files do not hold, a missing or corrupt
    file fails here as a SettingsError naming it, before the run writes anything.
    """
    try:
        meta = schema.read_metadata(config.data_dir)
        for table in ("pretrain/train", "pretrain/test"):
            if table in meta["files"]:
                data.triplets(config.data_dir, table.split("/")[1])  # validates
        return Catalogue(config.data_dir)
    except (OSError, ValueError, tf.errors.NotFoundError) as e:
        raise SettingsError(f"--data_dir: {e}") from None


def choose_source(config, catalogue, fallback=False):
    """`config` as the data directory supports it, and a line saying what it trains on.

    SCL needs the training triplets; every objective needs items with content
    for the modality. With `fallback` (the CTR job's pre-training), SCL without
    triplets becomes the generic objective on the items, and an image tower
    without images a text tower on the titles. Raises SettingsError saying what
    is missing and what to run otherwise, or when no item has any content.
    """
    meta = schema.read_metadata(config.data_dir)
    if not (catalogue.has_image.any() or catalogue.has_title.any()):
        raise SettingsError(f"{config.data_dir}: no item has an image or a title, so there is "
                            "nothing to pre-train the encoder on or to embed; prepare the items "
                            "with --images_dir and/or a 'title' column.")
    changes, why = {}, []
    if not catalogue.present(config.modality).any():
        other = "text" if config.modality == "image" else "image"
        what = "an image" if config.modality == "image" else "a title"
        if not fallback:
            raise SettingsError(f"--modality={config.modality}: no item in {config.data_dir} "
                                f"has {what}; use --modality={other}.")
        changes["modality"] = other
        why.append(f"no item has {what}")
    if config.objective == "scl" and "pretrain/train" not in meta["files"]:
        missing = [t for t in ("pretrain/train", "pretrain/test") if t not in meta["files"]]
        if not fallback:
            raise SettingsError(
                f"--objective=scl needs query -> item pairs: {config.data_dir} has no table "
                f"{' or '.join(map(repr, missing))}; make them with `python -m "
                "tfmm.data.prepare --pairs=FILE` (your pairs) or `--pairs_from=clicks` (from "
                "behaviour), or pre-train on the items alone: --objective=generic "
                "--triplet_weight=0.")
        changes.update(objective="generic", triplet_weight=0.0)
        why.append("no triplets for SCL")
    config = dataclasses.replace(config, **changes)
    image = config.modality == "image"
    if config.objective == "scl":
        source = f"SCL on the {meta['counts']['pretrain/train']} triplets of pretrain/train"
    elif config.objective == "generic":
        source = (f"generic, on the {int(catalogue.present(config.modality).sum())} item "
                  + ("images (two augmentations of an image are a pair)" if image
                     else "titles (two word-dropout views of a title are a pair)"))
    else:
        source = "random: the untrained tower"
    return config, f"{source}; {config.modality} tower" + (f" ({', '.join(why)})" if why else "")


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
        ids = catalogue.ids[catalogue.present(config.modality)]  # an empty view is no pair
        ds = tf.data.Dataset.from_tensor_slices(ids).shuffle(len(ids), seed=config.seed).repeat()
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

        return (ds.map(pair, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2),
                _steps(config, catalogue))

    key = "query_image" if config.modality == "image" else "query_text"
    ds = data.triplets(config.data_dir, "train", batch_size=config.batch_size, shuffle=True,
                       seed=config.seed, repeat=True, drop_remainder=True)

    def triple(t):
        return {"query": queries(t, key, content, row), "positive_id": t["positive_item_id"],
                "positive": tf.gather(content, tf.gather(row, t["positive_item_id"])),
                "negative": tf.gather(content, tf.gather(row, t["negative_item_id"]))}

    return (ds.map(triple, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2),
            _steps(config, catalogue))


def queries(triplets, key, content, row):
    """A triplet batch's queries: each record's own (its `key`), or, where it names a query
    item (pairs from clicks), that item's `content` (a catalogue's, `row`: its row by id)."""
    item = triplets[schema.QUERY_ITEM]
    looked_up = tf.gather(content, tf.maximum(tf.gather(row, item), 0))  # row -1: not an item
    by_id = tf.reshape(item != schema.PAD_ID, [-1] + [1] * (content.shape.rank - 1))
    return tf.where(by_id, looked_up, triplets[key])


def _steps(config, catalogue):
    """Steps per epoch: one pass over the training triplets where the data has them,
    for every objective (the generic baseline gets SCL's compute), else over the
    items with content."""
    counts = schema.read_metadata(config.data_dir)["counts"]
    n = counts.get("pretrain/train") or int(catalogue.present(config.modality).sum())
    return max(1, n // config.batch_size)


def build_tower(config, catalogue):
    if config.modality == "image":
        return lambda: image_tower(config.backbone, config.dim, catalogue.images.shape[1],
                                   config.image_size, freeze_backbone=config.freeze_backbone)
    if config.backbone not in BACKBONES:  # the image configs are no text towers
        return lambda: preset_text_tower(config.backbone, config.dim,
                                         freeze_backbone=config.freeze_backbone)
    vocabulary = vocabulary_of(t.decode() for t in catalogue.titles)
    if "pretrain/train" in schema.read_metadata(config.data_dir)["files"]:
        vocabulary += [w for w in vocabulary_of(_query_texts(config.data_dir))
                       if w not in vocabulary]
    return lambda: text_tower(vocabulary, config.dim)


def _query_texts(data_dir):
    for batch in data.triplets(data_dir, "train", batch_size=4096, validate=False):
        yield from (t.decode() for t in batch["query_text"].numpy())


def embed(tower, inputs, batch_size=512, strategy=None):
    # Under a strategy the chief embeds alone (tfmm.distribute.predictor).
    predict = (tower.predict_on_batch if strategy is None
               else lambda x: distribute.predictor(tower)(x).numpy())
    return np.concatenate([predict(inputs[i:i + batch_size])
                           for i in range(0, len(inputs), batch_size)])


def evaluate(config, tower, catalogue, ns=(1, 5), strategy=None):
    """Acc@N on the held-out triplets, queries against all their positives, and
    their count (``test_pairs``: 0, and no Acc@N, where the data has none)."""
    if "pretrain/test" not in schema.read_metadata(config.data_dir)["files"]:
        print(f"no test pairs in {config.data_dir} (no table 'pretrain/test'): no Acc@N, "
              "only the label-free check.", flush=True)
        return {"test_pairs": 0}
    key = "query_image" if config.modality == "image" else "query_text"
    batches = list(data.triplets(config.data_dir, "test", batch_size=1024))
    content, row = tf.constant(catalogue.content(config.modality)), tf.constant(catalogue.row)
    q = embed(tower, np.concatenate([queries(b, key, content, row).numpy() for b in batches]),
              strategy=strategy)
    positives = np.concatenate([b["positive_item_id"].numpy() for b in batches])
    p = embed(tower, catalogue.content(config.modality)[catalogue.row[positives]],
              strategy=strategy)
    return dict(metrics.acc_at_n(q, p, ns), test_pairs=len(positives))


def label_free_check(catalogue, present, vectors, untrained):
    """neighbours_same_category@k of the vectors of the `present` items, of the
    untrained tower's, and by chance; None where fewer than 2 have a category."""
    key = f"neighbours_same_category@{NEIGHBOURS}"
    known = catalogue.categories[present] != schema.OOV_ID
    if known.sum() < 2:
        return {key: None, "neighbours_items": int(known.sum())}
    labels = catalogue.categories[present][known]
    return {key: metrics.neighbours_same_label(vectors[known], labels, NEIGHBOURS),
            f"{key}_untrained": metrics.neighbours_same_label(untrained[known], labels,
                                                              NEIGHBOURS),
            f"{key}_chance": metrics.same_label_chance(labels),
            "neighbours_items": int(known.sum())}


def run(config, fallback=False):
    """Trains, evaluates, exports and indexes; returns the metrics dict.

    Raises SettingsError, before writing anything, when the data directory
    cannot feed `config`; with `fallback`, trains on the best source it has
    instead (`choose_source`), which ``source`` in the result names. Under a
    ``strategy`` only the chief evaluates and writes; the others return None.
    """
    config.validate()
    try:  # first: a multi-worker strategy must exist before TensorFlow runs anything
        strategy = distribute.strategy(config.strategy)
    except ValueError as e:
        raise SettingsError(f"--strategy={config.strategy}: {e}") from None
    chief = distribute.is_chief(strategy)
    start = time.time()
    catalogue = check_data(config)
    try:  # before training: the vectors must have somewhere to go
        config.index and chief and is_empty(config.index)
    except (ValueError, OSError, IndexUnavailable) as e:  # a corrupt file, a server down
        raise SettingsError(f"--index: {e}") from None
    config, source = choose_source(config, catalogue, fallback)
    print(f"pre-training: {source}", flush=True)
    present = catalogue.present(config.modality)
    if not present.all():
        print(f"{(~present).sum()} of {len(present)} items have no "
              f"{'image' if config.modality == 'image' else 'title'}: not embedded, so not in "
              "the index (the CTR reader flags their vectors missing).", flush=True)
    keras.utils.set_random_seed(config.seed)
    make_tower = build_tower(config, catalogue)
    try:  # before anything is written: a preset may not load
        with distribute.scope(strategy):
            tower = make_tower()
    except BackboneError as e:
        raise SettingsError(f"--{e}") from None
    if chief:
        os.makedirs(config.model_dir, exist_ok=True)
    content = catalogue.content(config.modality)[present]
    trains = config.objective != "random" and config.epochs
    untrained = embed(tower, content, strategy=strategy) if trains and chief else None
    history = {}
    if trains:
        with distribute.scope(strategy):
            model = SCLModel(tower, make_key_tower=make_tower, queue_size=config.queue_size,
                             momentum=config.momentum, triplet_weight=config.triplet_weight,
                             margin=config.margin, temperature=config.temperature,
                             mask_own_positive=config.mask_own_positive,
                             positive_tower=config.positive_tower)
            model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
        backup = os.path.join(config.model_dir, "backup")
        # Each epoch's losses, kept across a kill (fit's history has only the resumed epochs).
        record = EpochRecord(os.path.join(config.model_dir, "epochs.json"), backup)
        tensorboard = keras.callbacks.TensorBoard(os.path.join(config.model_dir, "logs"))
        steps = _steps(config, catalogue)
        if strategy is None:
            callbacks = [record, BackupAndRestore(backup), tensorboard]
            model.fit(training_data(config, catalogue)[0], epochs=config.epochs,
                      steps_per_epoch=steps, callbacks=callbacks, verbose=config.verbose)
        else:
            with strategy.scope():  # what SCLModel.fit does
                model.optimizer.build(model.trained_weights())
            queue = [MomentumQueueCallback(config.momentum)] if model.queue is not None else []
            replicas = strategy.num_replicas_in_sync
            distribute.fit(
                model, strategy, lambda c: distribute.replica_slices(c, replicas, weights=False)(
                    training_data(config, catalogue)[0]),
                config.epochs, backup, steps=steps, callbacks=queue,
                chief_callbacks=[record, tensorboard], verbose=config.verbose)
            distribute.weights_digest(model, strategy)
        if not chief:
            return None
        history = {k: [v[k] for v in record.values] for k in record.values[0] if k != "epoch"}
    elif not chief:
        return None
    vectors = embed(tower, content, strategy=strategy)
    if config.center_vectors and len(vectors) > 1:
        tower = centred(tower, vectors.mean(axis=0))
        vectors = tower.get_layer("centre")(vectors).numpy()  # its output; not embedded again
        if untrained is not None:  # compared as it would be indexed
            untrained = Centring(untrained.mean(axis=0))(untrained).numpy()
    result = evaluate(config, tower, catalogue, strategy=strategy)
    result.update(label_free_check(catalogue, present, vectors,
                                   vectors if untrained is None else untrained))
    result.update(source=source, items_without_content=int((~present).sum()), history=history,
                  train_seconds=time.time() - start, config=dict(dataclasses.asdict(config), index=redact(config.index)))
    if config.export_dir:
        result["export_path"] = export_saved_model(tower, config.export_dir, "vector")
    if config.index:
        index = open_index(config.index, dim=config.dim)
        index.claim(schema.catalogue_fingerprint(config.data_dir))
        result["index_version"] = index.put(catalogue.ids[present], vectors)
        result["index_items"] = int(present.sum())
    write_json(os.path.join(config.model_dir, "metrics.json"), result)
    return result

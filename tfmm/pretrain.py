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

`run` is the job (`PretrainJob`) in the steps every job takes
(`tfmm.jobs.run`), with the ``strategy`` setting's
`tfmm.distribute.Distribution`: under ``mirrored`` or ``multi_worker`` the
chief alone evaluates, exports and writes.

With ``center_vectors`` (by default where the pairs come from clicks), the
trained tower gets a last step that subtracts the mean of the catalogue's
vectors and re-normalises (`tfmm.towers.Centring`), so the exported encoder,
the index and Acc@N all see centred vectors. Pairs that barely tell items apart, as behaviour pairs
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

import keras
import numpy as np
import tensorflow as tf

from tfmm import data, distribute, jobs, metrics
from tfmm.callbacks import EpochRecord
from tfmm.config import SettingsError, as_flags, check_settings, default_of, setting
from tfmm.data import schema
from tfmm.export import export_saved_model
from tfmm.index import open_index
from tfmm.momentum_queue import MomentumQueueCallback
from tfmm.scl import POSITIVE_TOWERS, SCLModel, check_arguments
from tfmm.towers import (BACKBONES, BackboneError, Centring, centred, check_backbone,
                         image_tower, preset_text_tower, text_tower, vocabulary_of)

OBJECTIVES = ("random", "generic", "scl")
MODALITIES = ("image", "text")
NEIGHBOURS = 10  # k of the label-free check


@dataclasses.dataclass
class PretrainConfig:
    data_dir: str = setting(dataclasses.MISSING, "tfmm data directory.")
    model_dir: str = setting(dataclasses.MISSING, "Checkpoints, TensorBoard logs, metrics.json.")
    export_dir: str = setting("", "The encoder's SavedModels go to <export_dir>/<version>/ "
                                  "('': none).")
    index: str = setting("", "Index table every item's vector is written to: a SQLite file or "
                             "a Redis URL (tfmm.index.open_index; '': none).")
    modality: str = setting("image", "Which tower to pre-train.", choices=MODALITIES)
    objective: str = setting("scl", "Pre-training objective.", choices=OBJECTIVES)
    queue_size: int = setting(4096, "MoCo queue size K (0: in-batch negatives only).",
                              low=0)  # SCLModel's default is none
    momentum: float = setting(default_of(SCLModel, "momentum"),
                              "EMA momentum of the key tower.")
    triplet_weight: float = setting(default_of(SCLModel, "triplet_weight"),
                                    "Weight of the hard-negative triplet loss (0: off).")
    margin: float = setting(default_of(SCLModel, "margin"), "Triplet margin.")
    temperature: float = setting(default_of(SCLModel, "temperature"),
                                 "Initial InfoNCE temperature (learned).")
    mask_own_positive: bool = setting(default_of(SCLModel, "mask_own_positive"),
                                      "Leave a query's own item out of its negatives.")
    positive_tower: str = setting(
        default_of(SCLModel, "positive_tower"),
        "With MoCo, the tower that encodes the batch's positives: the key tower (MoCo) or the "
        "query tower, with gradient (the key tower then only fills the queue).",
        choices=POSITIVE_TOWERS)
    dim: int = setting(default_of(image_tower, "dim"), "Vector dimension d.", low=1)
    backbone: str = setting(
        default_of(image_tower, "backbone"),
        "Backbone: a config name (resnet_tiny, resnet_small), a KerasHub preset name (e.g. "
        "resnet_50_imagenet, clip_vit_base_patch16; downloaded) or a local preset directory; "
        "a CLIP preset gives its vision or text encoder (--modality).")
    freeze_backbone: bool = setting(default_of(image_tower, "freeze_backbone"),
                                    "Keep the backbone's weights as loaded; train only the "
                                    "projection head.")
    image_size: int = setting(default_of(image_tower, "image_size"),
                              "Backbone input size (images are resized to it).", low=1)
    center_vectors: bool | None = setting(
        None, "End the trained tower with subtracting the mean of the catalogue's vectors "
              "(then re-normalising): the exported encoder, the index and Acc@N see centred "
              "vectors. Weak pairs (--pairs_from=clicks) leave all vectors in a narrow cone "
              "that SimTier's tiers cannot resolve. Default: on where the data dir's pairs "
              "come from clicks, else off.")
    epochs: int = setting(2, "Pre-training epochs.", low=0)
    batch_size: int = setting(128, "Batch size.", low=1)
    learning_rate: float = setting(1e-3, "Learning rate.", above=0)
    seed: int = setting(0, "Random seed.")
    strategy: str = setting("none", "tf.distribute strategy (tfmm.distribute.STRATEGIES; not "
                                    "parameter_server).", choices=distribute.STRATEGIES)
    verbose: int = setting(2, "Keras' progress output: 0 none, 1 a bar, 2 a line an epoch.",
                           flag=False)

    def validate(self):
        check_settings(self)
        if self.strategy == "parameter_server":  # its tables are small
            raise SettingsError("--strategy=parameter_server is for --task=ctr, whose ID tables "
                                "may outgrow a machine; pre-training's are small: use "
                                "multi_worker.")
        if self.queue_size and self.queue_size % self.batch_size:
            raise SettingsError(f"--queue_size={self.queue_size} must be a multiple of "
                                f"--batch_size={self.batch_size}.")
        try:  # the library's own checks, in flag terms
            check_arguments(triplet_weight=self.triplet_weight, temperature=self.temperature,
                            positive_tower=self.positive_tower)
            MomentumQueueCallback(self.momentum)
        except ValueError as e:
            raise SettingsError(as_flags(e, [f.name for f in dataclasses.fields(self)])) from None
        if self.objective == "generic" and self.triplet_weight:
            raise SettingsError("--objective=generic has no hard negatives: set "
                                "--triplet_weight=0.")
        try:
            check_backbone(self.backbone)
        except BackboneError as e:
            raise SettingsError(f"--{e}") from None
        if self.modality == "text" and self.backbone not in BACKBONES and self.export_dir:
            raise SettingsError(f"--backbone={self.backbone} --modality=text: the preset's "
                                "tokenizer runs tensorflow-text ops, which TF Serving need not "
                                "have; set --export_dir='' (--encoder_export_dir='' with "
                                "--task=ctr); the vectors still go to --index.")
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


def choose_source(config, catalogue, fallback=False):
    """`config` as the data directory supports it, and a line saying what it trains on.

    SCL needs the training triplets; every objective needs items with content
    for the modality. With `fallback` (the CTR job's pre-training), SCL without
    triplets becomes the generic objective on the items, and an image tower
    without images a text tower on the titles. Raises SettingsError saying what
    is missing and what to run otherwise, or when no item has any content.
    ``center_vectors`` left None becomes True where the pairs come from clicks
    (their vectors need it: BUILD.md, "Pairs from clicks"), else False.
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
    if config.center_vectors is None:
        changes["center_vectors"] = meta.get("pairs", {}).get("source") == "clicks"
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


def training_data(config, catalogue, slices=None):
    """Batches {query, positive, negative, positive_id} for the objective, repeated.

    `slices`: under tf.distribute, `tfmm.distribute.replica_slices` (without
    weights): keeps this input pipeline's rows of every batch.
    """
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

        ds = ds.map(pair, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
        return ds if slices is None else slices(ds)

    key = "query_image" if config.modality == "image" else "query_text"
    ds = data.triplets(config.data_dir, "train", batch_size=config.batch_size, shuffle=True,
                       seed=config.seed, repeat=True, drop_remainder=True)

    def triple(t):
        return {"query": t[key], "positive_id": t["positive_item_id"],
                "positive": tf.gather(content, tf.gather(row, t["positive_item_id"])),
                "negative": tf.gather(content, tf.gather(row, t["negative_item_id"]))}

    ds = ds.map(triple, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    return ds if slices is None else slices(ds)


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


def embed(tower, inputs, dist, batch_size=512):
    """The vectors of `inputs` (a `tfmm.distribute.Distribution`'s predictions)."""
    return np.concatenate([dist.predict_on_batch(tower, inputs[i:i + batch_size])
                           for i in range(0, len(inputs), batch_size)])


def evaluate(config, tower, catalogue, dist, ns=(1, 5)):
    """Acc@N on the held-out triplets, queries against all their positives, and
    their count (``test_pairs``: 0, and no Acc@N, where the data has none)."""
    if "pretrain/test" not in schema.read_metadata(config.data_dir)["files"]:
        print(f"no test pairs in {config.data_dir} (no table 'pretrain/test'): no Acc@N, "
              "only the label-free check.", flush=True)
        return {"test_pairs": 0}
    key = "query_image" if config.modality == "image" else "query_text"
    batches = list(data.triplets(config.data_dir, "test", batch_size=1024))
    queries = np.concatenate([b[key].numpy() for b in batches])
    positives = np.concatenate([b["positive_item_id"].numpy() for b in batches])
    q = embed(tower, queries, dist)
    p = embed(tower, catalogue.content(config.modality)[catalogue.row[positives]], dist)
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


class PretrainJob(jobs.Job):
    """Pre-training as `tfmm.jobs.run` takes it through its steps.

    Args:
        config: a `PretrainConfig`.
        fallback: train on the best source the data has (`choose_source`).
    """

    def __init__(self, config, fallback=False):
        super().__init__(config)
        self.fallback = fallback

    def check(self, dist):
        catalogue = Catalogue(self.config.data_dir)
        config, source = choose_source(self.config, catalogue, self.fallback)
        print(f"pre-training: {source}", flush=True)
        present = catalogue.present(config.modality)
        if not present.all():
            print(f"{(~present).sum()} of {len(present)} items have no "
                  f"{'image' if config.modality == 'image' else 'title'}: not embedded, so not "
                  "in the index (the CTR reader flags their vectors missing).", flush=True)
        keras.utils.set_random_seed(config.seed)
        make_tower = build_tower(config, catalogue)
        try:  # before anything is written: a preset may not load
            with dist.scope():
                tower = make_tower()
        except BackboneError as e:
            raise SettingsError(f"--{e}") from None
        self.config, self.source, self.catalogue, self.present = config, source, catalogue, present
        self.make_tower, self.tower = make_tower, tower

    def train(self, dist):
        config, catalogue, present, tower = self.config, self.catalogue, self.present, self.tower
        content = catalogue.content(config.modality)[present]
        trains = config.objective != "random" and config.epochs
        untrained = embed(tower, content, dist) if trains and dist.is_chief else None
        history, distributed = {}, {}
        if trains:
            with dist.scope():
                model = SCLModel(tower, make_key_tower=self.make_tower,
                                 queue_size=config.queue_size, momentum=config.momentum,
                                 triplet_weight=config.triplet_weight, margin=config.margin,
                                 temperature=config.temperature,
                                 mask_own_positive=config.mask_own_positive,
                                 positive_tower=config.positive_tower)
                model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
                model.optimizer.build(model.trained_weights())  # not the key tower's
            queue = [MomentumQueueCallback(config.momentum)] if model.queue is not None else []
            # Each epoch's losses, kept across a kill (fit's history has only the resumed epochs).
            record = EpochRecord(os.path.join(config.model_dir, "epochs.json"),
                                 distribute.backup_dir(config.model_dir))

            def batches(slices=None, shard=None):  # no shard: no parameter servers here
                return training_data(config, catalogue, slices)

            dist.fit(model, batches, config.epochs, config.model_dir, record,
                     steps=_steps(config, catalogue), callbacks=queue, verbose=config.verbose,
                     weigh_rows=False)
            distributed, history = dist.describe(model), record.columns()
        if not dist.is_chief:
            return None
        vectors = embed(tower, content, dist)
        if config.center_vectors and len(vectors) > 1:
            tower = centred(tower, vectors.mean(axis=0))
            vectors = tower.get_layer("centre")(vectors).numpy()  # its output; not embedded again
            if untrained is not None:  # compared as it would be indexed
                untrained = Centring(untrained.mean(axis=0))(untrained).numpy()
        result = evaluate(config, tower, catalogue, dist)
        result.update(label_free_check(catalogue, present, vectors,
                                       vectors if untrained is None else untrained))
        result.update(source=self.source, items_without_content=int((~present).sum()),
                      history=history, **distributed)
        if config.export_dir:
            result["export_path"] = export_saved_model(tower, config.export_dir, "vector")
        if config.index:
            index = open_index(config.index, dim=config.dim)
            index.claim(schema.catalogue_fingerprint(config.data_dir))
            result["index_version"] = index.put(catalogue.ids[present], vectors)
            result["index_items"] = int(present.sum())
        return result


def run(config, fallback=False):
    """Trains, evaluates, exports and indexes (`tfmm.jobs.run`); returns the metrics dict.

    Raises SettingsError, before writing anything, when the data directory
    cannot feed `config`; with `fallback`, trains on the best source it has
    instead (`choose_source`), which ``source`` in the result names. Under a
    ``strategy`` only the chief evaluates and writes; the others return None.
    """
    return jobs.run(PretrainJob(config, fallback))

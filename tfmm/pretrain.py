"""Pre-training of the multimodal encoder (paper §3) and its evaluation (§6.2).

`run(config)` trains a tower on a tfmm data directory with one of the
objectives of paper Table 2, reports Acc@N on the held-out triplets (where the
data has them) and the label-free check, exports the tower as a SavedModel
(images or text in, vectors out) and writes the vector of every catalogue item
with content for the modality (an image, a title) into the index table; items
without are counted (``items_without_content``) and left out.

SCL trains on the triplets (table ``pretrain/train``), or with ``pairs_from
="clicks"`` on click pairs it mines from the training impressions;
``image_title``, ``generic`` and ``random`` need only the items. An epoch is
one pass over the training triplets where the data has them, for every
objective (the generic baseline gets SCL's compute), else over the mined
pairs, image_title's training items or the items with content; a run takes
at least ``min_steps`` steps in all (a small catalogue's epochs are
stretched): 2 epochs of a 4,000-item catalogue in batches of 128 are 62
steps, after which the generic objective's vectors group categories worse
than the untrained tower's (``small``: 0.71 against 0.82; after 500 steps
0.87).

`run` is the job (`PretrainJob`) in the steps every job takes
(`tfmm.jobs.run`), with the ``strategy`` setting's
`tfmm.distribute.Distribution`: under ``mirrored`` or ``multi_worker`` the
chief alone evaluates, exports and writes.

With ``center_vectors`` (by default where the data dir's pairs come from
clicks), the trained tower gets a last step that subtracts the mean of the
catalogue's vectors and re-normalises (`tfmm.towers.Centring`), so the
exported encoder, the index and Acc@N all see centred vectors. Pairs that
barely tell items apart, as behaviour pairs do, train a tower whose vectors
all lie in a narrow cone (cosines 0.97-1 on the ``small`` world's click
pairs), which SimTier's fixed tiers cannot resolve; centring spreads them
(DECISIONS.md, "Pairs from clicks: centre the vectors").

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
- ``image_title``: an item's image and its own title are a pair, for an image
  and a text tower (`tfmm.image_title`); the index gets ``index_vector``: the
  image tower's vectors, the text tower's, or both fused (the encoder then
  takes an image and a title).

`choose_source` with ``fallback`` (the CTR job's empty index) follows what
measured best on ``small`` (README, "Your own data"): the data dir's triplets;
else image_title where items have images and titles; else the generic
objective on the modality the items have.
"""

import dataclasses
import functools
import os

import keras
import numpy as np
import tensorflow as tf

from tfmm import data, distribute, encoder_checks, image_title, jobs, metrics
from tfmm.callbacks import EpochRecord
from tfmm.config import SettingsError, as_flags, check_settings, default_of, setting
from tfmm.data import pairs as behaviour, schema
from tfmm.export import export_saved_model
from tfmm.index import IndexUnavailable, is_empty, open_index
from tfmm.momentum_queue import MomentumQueueCallback
from tfmm.scl import POSITIVE_TOWERS, SCLModel, check_arguments
from tfmm.towers import (BACKBONES, BackboneError, Centring, centred, check_backbone,
                         image_tower, preset_text_tower, text_tower, vocabulary_of)

OBJECTIVES = ("random", "generic", "scl", "image_title")
MODALITIES = ("image", "text")
PAIR_SOURCES = ("data", "clicks")  # SCL's pairs: the data dir's tables, or mined from clicks
HELD_OUT_WORDS = f"{image_title.HELD_OUT:.0%} of them"


@dataclasses.dataclass
class PretrainConfig:
    data_dir: str = setting(dataclasses.MISSING, "tfmm data directory.")
    model_dir: str = setting(dataclasses.MISSING, "Checkpoints, TensorBoard logs, metrics.json.")
    export_dir: str = setting("", "The encoder's SavedModels go to <export_dir>/<version>/ "
                                  "('': none).")
    index: str = setting("", "Index table every item's vector is written to: a SQLite file or "
                             "a Redis URL (tfmm.index.open_index; '': none).")
    modality: str = setting("image", "Which tower to pre-train.", choices=MODALITIES)
    objective: str = setting(
        "scl", "Pre-training objective: SCL on query -> item pairs; image_title, an item's "
               "image and its own title are a pair (CLIP-style); generic, two augmentations "
               "of an image (or views of a title); random, the untrained tower.",
        choices=OBJECTIVES)
    pairs_from: str = setting(
        "data", "Where --objective=scl takes its pairs: the data dir's pretrain tables, or "
                "clicks: mined from its training impressions (a click and the same user's "
                "next click); with --objective=image_title, clicks adds those pairs' loss on "
                "the item vectors.", choices=PAIR_SOURCES)
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
    index_vector: str = setting(
        "fused", "--objective=image_title: an item's vector in the index and the exported "
                 "encoder: its image tower's, its title tower's, or both fused (the one an "
                 "item has where it lacks the other).", choices=image_title.VECTORS)
    train_towers: str = setting(
        default_of(image_title.ImageTitleModel, "train"),
        "--objective=image_title: train both towers, or only the image or the text tower "
        "(the other kept as built, e.g. a pretrained preset).", choices=image_title.TRAIN)
    epochs: int = setting(2, "Pre-training epochs.", low=0)
    min_steps: int = setting(500, "Train at least this many steps in all: a small "
                                  "catalogue's epochs are stretched to reach them.", low=0)
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
        if self.pairs_from == "clicks" and self.objective not in ("scl", "image_title"):
            raise SettingsError(f"--pairs_from=clicks mines pairs for --objective=scl or "
                                f"image_title: --objective={self.objective} takes none.")
        if self.objective == "image_title" and self.strategy != "none":
            raise SettingsError(f"--objective=image_title trains in one process: --strategy="
                                f"{self.strategy} is not supported with it.")
        if self.queue_size and self.queue_size % self.batch_size:
            raise SettingsError(f"--queue_size={self.queue_size} must be a multiple of "
                                f"--batch_size={self.batch_size}.")
        try:  # the library's own checks, in flag terms
            check_arguments(triplet_weight=self.triplet_weight, temperature=self.temperature,
                            positive_tower=self.positive_tower)
            MomentumQueueCallback(self.momentum)
            image_title.check_arguments(train=self.train_towers, temperature=self.temperature)
        except ValueError as e:
            raise SettingsError(as_flags(e, [f.name for f in dataclasses.fields(self)])) from None
        if self.objective == "generic" and self.triplet_weight:
            raise SettingsError("--objective=generic has no hard negatives: set "
                                "--triplet_weight=0.")
        try:
            check_backbone(self.backbone)
        except BackboneError as e:
            raise SettingsError(f"--{e}") from None
        if self.freeze_backbone and self.backbone in BACKBONES:
            raise SettingsError(f"--freeze_backbone keeps a pretrained backbone's weights, but "
                                f"--backbone={self.backbone} is a config backbone, randomly "
                                "initialised (only the projection head would learn); give a "
                                "KerasHub preset or preset directory as --backbone, or drop "
                                "--freeze_backbone.")
        jobs.check_export_dir(self)
        if self.embeds() != "image" and self.backbone not in BACKBONES and self.export_dir:
            what = ("--modality=text" if self.objective != "image_title"
                    else f"--index_vector={self.index_vector}")
            raise SettingsError(f"--backbone={self.backbone} {what}: the preset's tokenizer "
                                "runs tensorflow-text ops, which TF Serving need not have; set "
                                "--export_dir='' (--encoder_export_dir='' with --task=ctr); "
                                "the vectors still go to --index.")
        return self

    def embeds(self):
        """What the encoder embeds: a `--modality`, or with image_title `--index_vector`."""
        return self.index_vector if self.objective == "image_title" else self.modality


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
        """The items' images, titles, or for "fused" both (the fused encoder's inputs)."""
        if modality == "fused":
            return {"image": self.images, "text": self.titles}
        return self.images if modality == "image" else self.titles

    def present(self, modality):
        """Which items have content for `modality`: image bytes, a non-blank title, or
        for "fused" either."""
        if modality == "fused":
            return self.has_image | self.has_title
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

    SCL needs the training triplets (or, with ``pairs_from="clicks"``, a batch
    of click pairs in the training impressions); image_title at least a batch
    of items with both an image and a title once some are held out; every
    objective needs items with content for the modality. Without `fallback`,
    raises SettingsError saying what is missing and what to run otherwise.
    With `fallback` (the CTR job's pre-training), an objective the data cannot
    feed becomes the first of these it can, in the order they measured on
    ``small`` (README, "Your own data"): image_title (fused vectors), SCL on
    click pairs mined from the training impressions (centred, as such pairs
    need), the generic objective; an image tower without images becomes a
    text tower. SettingsError too when no item has any content. ``center_vectors``
    left None becomes True where the data dir's pairs come from clicks (their
    vectors need it: DECISIONS.md, "Pairs from clicks"), else False.
    """
    meta = schema.read_metadata(config.data_dir)
    if not (catalogue.has_image.any() or catalogue.has_title.any()):
        raise SettingsError(f"{config.data_dir}: no item has an image or a title, so there is "
                            "nothing to pre-train the encoder on or to embed; prepare the items "
                            "with --images_dir and/or a 'title' column.")
    why = []
    if fallback and not catalogue.present(config.modality).any():
        why.append(f"no item has {'an image' if config.modality == 'image' else 'a title'}")
        config = dataclasses.replace(config, modality=MODALITIES[config.modality == "image"])
    missing = _missing(config, catalogue, meta)
    if missing and fallback:
        why.append(missing[0])
        candidates = (dict(objective="image_title", pairs_from="data"),
                      dict(objective="scl", pairs_from="clicks", center_vectors=True),
                      dict(objective="generic", pairs_from="data", triplet_weight=0.0))
        for changes in candidates:
            candidate = dataclasses.replace(config, **changes)
            if not _missing(candidate, catalogue, meta):
                config = candidate
                break
    elif missing:
        raise SettingsError(missing[1])
    if config.center_vectors is None:
        config = dataclasses.replace(
            config, center_vectors=meta.get("pairs", {}).get("source") == "clicks")
    line = _source_line(config, catalogue, meta)
    return config, line + (f" ({', '.join(why)})" if why else "")


def _missing(config, catalogue, meta):
    """None where the data can feed `config`, else (a short reason, the error line)."""
    if config.objective != "image_title" and not catalogue.present(config.modality).any():
        other = MODALITIES[config.modality == "image"]
        what = "an image" if config.modality == "image" else "a title"
        return (f"no item has {what}", f"--modality={config.modality}: no item in "
                f"{config.data_dir} has {what}; use --modality={other}.")
    if config.objective == "image_title":
        if len(image_title_split(config, catalogue)[0]) >= config.batch_size:
            return None
        both = int((catalogue.has_image & catalogue.has_title).sum())
        return ("too few items with an image and a title",
                f"--objective=image_title needs items with both an image and a title: {both} "
                f"of {len(catalogue.ids)} in {config.data_dir} have both, fewer than a batch "
                f"(--batch_size={config.batch_size}) once {HELD_OUT_WORDS} are held out; "
                "prepare the items with --images_dir and a 'title' column, or use "
                "--objective=generic --triplet_weight=0.")
    if config.objective == "scl" and config.pairs_from == "clicks":
        mined = len(mined_pairs(config.data_dir, "train", config.seed)[0])
        if mined >= config.batch_size:
            return None
        return ("too few click pairs",
                f"--pairs_from=clicks: the training impressions of {config.data_dir} hold "
                f"{mined} click pairs (a click and the same user's next click of another "
                f"item), fewer than a batch (--batch_size={config.batch_size}).")
    if config.objective == "scl" and "pretrain/train" not in meta["files"]:
        tables = [t for t in ("pretrain/train", "pretrain/test") if t not in meta["files"]]
        return ("no triplets for SCL",
                f"--objective=scl needs query -> item pairs: {config.data_dir} has no table "
                f"{' or '.join(map(repr, tables))}; make them with `python -m "
                "tfmm.data.prepare --pairs=FILE` (your pairs) or `--pairs_from=clicks` (from "
                "behaviour), or pre-train on the items alone: --objective=image_title (images "
                "and titles) or --objective=generic --triplet_weight=0.")
    return None


def _source_line(config, catalogue, meta):
    """What `config` trains on, in words."""
    clicks = (f"the {len(mined_pairs(config.data_dir, 'train', config.seed)[0])} click pairs "
              "of the training impressions (a click and the same user's next click)"
              if config.pairs_from == "clicks" else "")
    if config.objective == "image_title":
        train, held = (len(ids) for ids in image_title_split(config, catalogue))
        what = {"image": "the image tower's vectors", "text": "the text tower's vectors",
                "fused": "both towers' vectors fused"}[config.index_vector]
        return (f"image_title, on the {train} items with an image and a title ({held} held "
                f"out for Acc@N)" + (f", and {clicks}" if clicks else "") + f"; {what}")
    if config.objective == "scl":
        source = (f"SCL on {clicks}" if clicks else
                  f"SCL on the {meta['counts']['pretrain/train']} triplets of pretrain/train")
    elif config.objective == "generic":
        source = (f"generic, on the {int(catalogue.present(config.modality).sum())} item "
                  + ("images (two augmentations of an image are a pair)"
                     if config.modality == "image"
                     else "titles (two word-dropout views of a title are a pair)"))
    else:
        source = "random: the untrained tower"
    return f"{source}; {config.modality} tower" + (", centred" if config.center_vectors else "")


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
    """Batches {query, positive, negative, positive_id} for the objective (image_title:
    {image, title, item_id}), repeated.

    `slices`: under tf.distribute, `tfmm.distribute.replica_slices` (without
    weights): keeps this input pipeline's rows of every batch.
    """
    if config.objective == "image_title":  # one process (validate)
        pairs = (mined_pairs(config.data_dir, "train", config.seed)[:2]
                 if config.pairs_from == "clicks" else None)
        return image_title.training_data(catalogue, image_title_split(config, catalogue)[0],
                                         config.batch_size, config.seed, pairs,
                                         config.index_vector)
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

    if config.pairs_from == "clicks":  # item ids: the query is the first item's content
        first, second, negative = mined_pairs(config.data_dir, "train", config.seed)
        ds = tf.data.Dataset.from_tensor_slices({"query_id": first, "positive_item_id": second,
                                                 "negative_item_id": negative})
        ds = ds.shuffle(len(first), seed=config.seed).repeat()
        ds = ds.batch(config.batch_size, drop_remainder=True)
        query = lambda t: tf.gather(content, tf.gather(row, t["query_id"]))  # noqa: E731
    else:
        key = "query_image" if config.modality == "image" else "query_text"
        ds = data.triplets(config.data_dir, "train", batch_size=config.batch_size, shuffle=True,
                           seed=config.seed, repeat=True, drop_remainder=True)
        query = lambda t: queries(t, key, content, row)  # noqa: E731

    def triple(t):
        return {"query": query(t), "positive_id": t["positive_item_id"],
                "positive": tf.gather(content, tf.gather(row, t["positive_item_id"])),
                "negative": tf.gather(content, tf.gather(row, t["negative_item_id"]))}

    ds = ds.map(triple, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    return ds if slices is None else slices(ds)


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
    items with content (image_title: its training items); more where
    ``min_steps`` asks for more in all."""
    counts = schema.read_metadata(config.data_dir)["counts"]
    if config.objective == "image_title":
        n = len(image_title_split(config, catalogue)[0])
    elif config.objective == "scl" and config.pairs_from == "clicks":
        n = len(mined_pairs(config.data_dir, "train", config.seed)[0])
    else:
        n = counts.get("pretrain/train") or int(catalogue.present(config.modality).sum())
    return max(1, n // config.batch_size, -(-config.min_steps // max(config.epochs, 1)))


@functools.lru_cache(maxsize=4)
def mined_pairs(data_dir, split, seed):
    """``--pairs_from=clicks``: (query, positive, hard negative) item ids of the click
    pairs of the `split` impressions (`tfmm.data.pairs.click_pairs`); the hard
    negative a random other item of the positive's category, as prepare mines them."""
    first, second = behaviour.click_pairs(data_dir, split)
    category_of = np.zeros(schema.read_metadata(data_dir)["vocab"]["num_items"], np.int64)
    for batch in data.items(data_dir, batch_size=4096, validate=False):
        category_of[batch["item_id"].numpy()] = batch["category_id"].numpy()
    negative = (behaviour.hard_negatives(second, category_of, np.random.default_rng(seed))
                if len(second) else second)
    return first, second, negative


def image_title_split(config, catalogue):
    """image_title's (training item ids, held-out item ids) (`tfmm.image_title.split_items`)."""
    return image_title.split_items(catalogue.ids, catalogue.has_image, catalogue.has_title,
                                   config.seed)


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
    """The tower's vectors of `inputs` (an array, or a dict of arrays: a model of named
    inputs), predicted by `dist` (a `tfmm.distribute.Distribution`)."""
    named = isinstance(inputs, dict)
    n = len(next(iter(inputs.values()))) if named else len(inputs)
    return np.concatenate([
        dist.predict_on_batch(tower, {k: v[i:i + batch_size] for k, v in inputs.items()}
                              if named else inputs[i:i + batch_size])
        for i in range(0, n, batch_size)])


def evaluate(config, tower, catalogue, dist, ns=(1, 5), towers=None, say=None):
    """Acc@N on the held-out triplets, queries against all their positives, and
    their count (``test_pairs``: 0, and no Acc@N, where the data has none).

    image_title (`towers` = the image and text towers): Acc@N of each held-out
    item's image against the titles of all held-out items (``test_pairs``:
    their count, ``acc_pairs``: what the pairs are). `say` prints why there is no
    Acc@N (default: print).
    """
    say = say or (lambda line: print(line, flush=True))
    if config.objective == "image_title":
        rows = catalogue.row[image_title_split(config, catalogue)[1]]
        if not len(rows):
            say("too few items with both an image and a title to hold some out: no Acc@N, "
                "only the label-free check.")
            return {"test_pairs": 0}
        images = embed(towers[0], catalogue.images[rows], dist)
        titles = embed(towers[1], catalogue.titles[rows], dist)
        return dict(metrics.acc_at_n(images, titles, ns), test_pairs=len(rows),
                    acc_pairs="held-out items: image -> title")
    content = catalogue.content(config.modality)
    if config.pairs_from == "clicks":
        first, positives, _ = mined_pairs(config.data_dir, "test", config.seed)
        if not len(first):
            say(f"no click pairs in the test impressions of {config.data_dir}: no Acc@N, "
                "only the label-free check.")
            return {"test_pairs": 0}
        query_inputs = content[catalogue.row[first]]
    elif "pretrain/test" not in schema.read_metadata(config.data_dir)["files"]:
        say(f"no test pairs in {config.data_dir} (no table 'pretrain/test'): no Acc@N, "
            "only the label-free check.")
        return {"test_pairs": 0}
    else:
        key = "query_image" if config.modality == "image" else "query_text"
        batches = list(data.triplets(config.data_dir, "test", batch_size=1024))
        by_id, row = tf.constant(content), tf.constant(catalogue.row)
        query_inputs = np.concatenate([queries(b, key, by_id, row).numpy() for b in batches])
        positives = np.concatenate([b["positive_item_id"].numpy() for b in batches])
    q = embed(tower, query_inputs, dist)
    p = embed(tower, content[catalogue.row[positives]], dist)
    return dict(metrics.acc_at_n(q, p, ns), test_pairs=len(positives))


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
        catalogue = check_data(self.config)
        try:  # before training: the vectors must have somewhere to go
            self.config.index and dist.is_chief and is_empty(self.config.index)
        except (ValueError, OSError, IndexUnavailable) as e:  # a corrupt file, a server down
            raise SettingsError(f"--index: {e}") from None
        config, source = choose_source(self.config, catalogue, self.fallback)
        print(f"pre-training: {source}", flush=True)
        embeds = config.embeds()
        present = catalogue.present(embeds)
        if not present.all():
            what = {"image": "image", "text": "title", "fused": "image or title"}[embeds]
            print(f"{(~present).sum()} of {len(present)} items have no {what}: not embedded, "
                  "so not in the index (the CTR reader flags their vectors missing).",
                  flush=True)
        keras.utils.set_random_seed(config.seed)
        pairs = config.objective == "image_title"
        # image_title: an image and a text tower; the tower whose vectors are indexed is
        # one of them, or both fused.
        makers = ([build_tower(dataclasses.replace(config, modality=m), catalogue)
                   for m in MODALITIES] if pairs else [build_tower(config, catalogue)])
        try:  # before anything is written: a preset may not load
            with dist.scope():
                towers = [make() for make in makers]
        except BackboneError as e:
            raise SettingsError(f"--{e}") from None
        self.config, self.source, self.catalogue, self.present = config, source, catalogue, present
        self.makers, self.towers = makers, towers
        self.tower = image_title.item_encoder(*towers, config.index_vector) if pairs else towers[0]

    def train(self, dist):
        config, catalogue, present = self.config, self.catalogue, self.present
        makers, towers, tower = self.makers, self.towers, self.tower
        content = catalogue.content(config.embeds())
        content = ({k: v[present] for k, v in content.items()} if isinstance(content, dict)
                   else content[present])
        trains = config.objective != "random" and config.epochs
        untrained = embed(tower, content, dist) if trains and dist.is_chief else None
        untrained_acc = {}  # the untrained tower's Acc@N, the trained one's reference
        if untrained is not None:
            before = (centred(tower, untrained.mean(axis=0))
                      if config.center_vectors and len(untrained) > 1 else tower)
            untrained_acc = {f"{k}_untrained": v for k, v in evaluate(
                config, before, catalogue, dist, towers=towers, say=lambda line: None).items()
                if k.startswith("acc@")}
        history, distributed = {}, {}
        if trains:
            with dist.scope():
                if config.objective == "image_title":
                    model = image_title.ImageTitleModel(
                        *towers, *makers, queue_size=config.queue_size,
                        momentum=config.momentum, temperature=config.temperature,
                        train=config.train_towers,
                        encoder=tower if config.pairs_from == "clicks" else None)
                else:
                    model = SCLModel(towers[0], make_key_tower=makers[0],
                                     queue_size=config.queue_size, momentum=config.momentum,
                                     triplet_weight=config.triplet_weight, margin=config.margin,
                                     temperature=config.temperature,
                                     mask_own_positive=config.mask_own_positive,
                                     positive_tower=config.positive_tower)
                model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
                model.optimizer.build(model.trained_weights())  # not the key towers'
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
        result = evaluate(config, tower, catalogue, dist, towers=towers)
        result.update(untrained_acc)
        result.update(encoder_checks.label_free(
            vectors, catalogue.categories[present], vectors if untrained is None else untrained))
        result.update(source=self.source, items_without_content=int((~present).sum()),
                      history=history, **distributed)
        if config.export_dir:
            result["export_path"] = export_saved_model(tower, config.export_dir, "vector")
        if config.index:
            index = open_index(config.index, dim=config.dim)
            index.claim(schema.catalogue_fingerprint(config.data_dir))
            result["index_version"] = index.put(catalogue.ids[present], vectors)
            result["index_items"] = int(present.sum())
            index.describe(encoder_checks.record(result))
        return result


def run(config, fallback=False):
    """Trains, evaluates, exports and indexes (`tfmm.jobs.run`); returns the metrics dict.

    Raises SettingsError, before writing anything, when the data directory
    cannot feed `config`; with `fallback`, trains on the best source it has
    instead (`choose_source`), which ``source`` in the result names. Under a
    ``strategy`` only the chief evaluates and writes; the others return None.
    """
    return jobs.run(PretrainJob(config, fallback))

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
import time

import keras
import numpy as np
import tensorflow as tf

from tfmm import data, distribute, image_title, metrics
from tfmm.callbacks import BackupAndRestore, EpochRecord, write_json
from tfmm.config import SettingsError, as_flags, default_of
from tfmm.data import pairs as behaviour, schema
from tfmm.export import check_export_dir, export_saved_model
from tfmm.index import IndexUnavailable, is_empty, local_index, open_index, redact
from tfmm.momentum_queue import MomentumQueueCallback
from tfmm.scl import SCLModel, check_arguments
from tfmm.towers import (BACKBONES, BackboneError, Centring, centred, check_backbone,
                         image_tower, preset_text_tower, text_tower, vocabulary_of)

OBJECTIVES = ("random", "generic", "scl", "image_title")
MODALITIES = ("image", "text")
PAIR_SOURCES = ("data", "clicks")  # SCL's pairs: the data dir's tables, or mined from clicks
NEIGHBOURS = 10  # k of the label-free check
HELD_OUT_WORDS = f"{image_title.HELD_OUT:.0%} of them"


@dataclasses.dataclass
class PretrainConfig:
    data_dir: str
    model_dir: str
    export_dir: str = ""
    index: str = ""
    modality: str = "image"
    objective: str = "scl"
    pairs_from: str = "data"
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
    # image_title: the vector an item gets (image, text or both fused) and the towers trained
    index_vector: str = "fused"
    train_towers: str = default_of(image_title.ImageTitleModel, "train")
    epochs: int = 2
    # at least this many steps in all: epochs stretch on a small catalogue
    min_steps: int = 500
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
        if self.pairs_from not in PAIR_SOURCES:
            raise ValueError(f"--pairs_from={self.pairs_from!r} is not one of {PAIR_SOURCES}.")
        if self.pairs_from == "clicks" and self.objective not in ("scl", "image_title"):
            raise ValueError(f"--pairs_from=clicks mines pairs for --objective=scl or "
                             f"image_title: --objective={self.objective} takes none.")
        if self.index_vector not in image_title.VECTORS:
            raise ValueError(f"--index_vector={self.index_vector!r} is not one of "
                             f"{image_title.VECTORS}.")
        if self.objective == "image_title" and self.strategy != "none":
            raise ValueError(f"--objective=image_title trains in one process: --strategy="
                             f"{self.strategy} is not supported with it.")
        for name in ("epochs", "queue_size", "batch_size", "dim", "image_size", "min_steps"):
            if getattr(self, name) < (0 if name in ("epochs", "queue_size", "min_steps") else 1):
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
            image_title.check_arguments(train=self.train_towers, temperature=self.temperature)
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
        if self.embeds() != "image" and self.backbone not in BACKBONES and self.export_dir:
            what = ("--modality=text" if self.objective != "image_title"
                    else f"--index_vector={self.index_vector}")
            raise ValueError(f"--backbone={self.backbone} {what}: the preset's tokenizer "
                             "runs tensorflow-text ops, which TF Serving need not have; set "
                             "--export_dir='' (--encoder_export_dir='' with --task=ctr); the "
                             "vectors still go to --index.")
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
    text tower. SettingsError too when no item has any content.
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


def training_data(config, catalogue):
    """Batches {query, positive, negative, positive_id} for the objective (image_title:
    {image, title, item_id}), and the steps of an epoch."""
    if config.objective == "image_title":
        pairs = (mined_pairs(config.data_dir, "train", config.seed)[:2]
                 if config.pairs_from == "clicks" else None)
        return (image_title.training_data(catalogue, image_title_split(config, catalogue)[0],
                                          config.batch_size, config.seed, pairs,
                                          config.index_vector),
                _steps(config, catalogue))
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


def embed(tower, inputs, batch_size=512, strategy=None):
    """The tower's vectors of `inputs`: an array, or a dict of arrays (a model of named inputs)."""
    # Under a strategy the chief embeds alone (tfmm.distribute.predictor).
    predict = (tower.predict_on_batch if strategy is None
               else lambda x: distribute.predictor(tower)(x).numpy())
    named = isinstance(inputs, dict)
    n = len(next(iter(inputs.values()))) if named else len(inputs)
    return np.concatenate([predict({k: v[i:i + batch_size] for k, v in inputs.items()} if named
                                   else inputs[i:i + batch_size])
                           for i in range(0, n, batch_size)])


def evaluate(config, tower, catalogue, ns=(1, 5), strategy=None, towers=None):
    """Acc@N on the held-out triplets, queries against all their positives, and
    their count (``test_pairs``: 0, and no Acc@N, where the data has none).

    image_title (`towers` = the image and text towers): Acc@N of each held-out
    item's image against the titles of all held-out items (``test_pairs``:
    their count, ``acc_pairs``: what the pairs are).
    """
    if config.objective == "image_title":
        rows = catalogue.row[image_title_split(config, catalogue)[1]]
        if not len(rows):
            print("too few items with both an image and a title to hold some out: no Acc@N, "
                  "only the label-free check.", flush=True)
            return {"test_pairs": 0}
        images = embed(towers[0], catalogue.images[rows], strategy=strategy)
        titles = embed(towers[1], catalogue.titles[rows], strategy=strategy)
        return dict(metrics.acc_at_n(images, titles, ns), test_pairs=len(rows),
                    acc_pairs="held-out items: image -> title")
    content = catalogue.content(config.modality)
    if config.pairs_from == "clicks":
        first, positives, _ = mined_pairs(config.data_dir, "test", config.seed)
        if not len(first):
            print(f"no click pairs in the test impressions of {config.data_dir}: no Acc@N, "
                  "only the label-free check.", flush=True)
            return {"test_pairs": 0}
        query_inputs = content[catalogue.row[first]]
    elif "pretrain/test" not in schema.read_metadata(config.data_dir)["files"]:
        print(f"no test pairs in {config.data_dir} (no table 'pretrain/test'): no Acc@N, "
              "only the label-free check.", flush=True)
        return {"test_pairs": 0}
    else:
        key = "query_image" if config.modality == "image" else "query_text"
        batches = list(data.triplets(config.data_dir, "test", batch_size=1024))
        by_id, row = tf.constant(content), tf.constant(catalogue.row)
        query_inputs = np.concatenate([queries(b, key, by_id, row).numpy() for b in batches])
        positives = np.concatenate([b["positive_item_id"].numpy() for b in batches])
    q = embed(tower, query_inputs, strategy=strategy)
    p = embed(tower, content[catalogue.row[positives]], strategy=strategy)
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
    embeds = config.embeds()
    present = catalogue.present(embeds)
    if not present.all():
        what = {"image": "image", "text": "title", "fused": "image or title"}[embeds]
        print(f"{(~present).sum()} of {len(present)} items have no {what}: not embedded, so "
              "not in the index (the CTR reader flags their vectors missing).", flush=True)
    keras.utils.set_random_seed(config.seed)
    pairs = config.objective == "image_title"
    # image_title: an image and a text tower; the tower whose vectors are indexed is
    # one of them, or both fused.
    makers = ([build_tower(dataclasses.replace(config, modality=m), catalogue)
               for m in MODALITIES] if pairs else [build_tower(config, catalogue)])
    try:  # before anything is written: a preset may not load
        with distribute.scope(strategy):
            towers = [make() for make in makers]
    except BackboneError as e:
        raise SettingsError(f"--{e}") from None
    tower = image_title.item_encoder(*towers, config.index_vector) if pairs else towers[0]
    if chief:
        os.makedirs(config.model_dir, exist_ok=True)
    content = catalogue.content(embeds)
    content = ({k: v[present] for k, v in content.items()} if isinstance(content, dict)
               else content[present])
    trains = config.objective != "random" and config.epochs
    untrained = embed(tower, content, strategy=strategy) if trains and chief else None
    history = {}
    if trains:
        with distribute.scope(strategy):
            if pairs:
                model = image_title.ImageTitleModel(
                    *towers, *makers, queue_size=config.queue_size, momentum=config.momentum,
                    temperature=config.temperature, train=config.train_towers,
                    encoder=tower if config.pairs_from == "clicks" else None)
            else:
                model = SCLModel(towers[0], make_key_tower=makers[0],
                                 queue_size=config.queue_size, momentum=config.momentum,
                                 triplet_weight=config.triplet_weight, margin=config.margin,
                                 temperature=config.temperature,
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
    result = evaluate(config, tower, catalogue, strategy=strategy, towers=towers)
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

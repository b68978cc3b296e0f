"""Image <-> title contrastive pre-training on the items table itself (CLIP-style).

Most catalogues have an image and a title per item and no query log. An
item's own image and title are a positive pair: the image tower and the
title (text) tower are trained so that each image is nearest its own title
among the batch's titles, and each title nearest its own image (symmetric
InfoNCE, a learnable temperature; Radford et al. 2021, "CLIP"). With a queue
(``queue_size > 0``), key towers that follow the two towers by EMA (MoCo)
add the image and title keys of past batches as more negatives, one queue
holding both (`tfmm.momentum_queue`). Either tower can be kept as built
(``train="image"``: the title tower is a fixed target; ``"text"``: the image
tower is, e.g. a pretrained backbone).

An item's vector (`item_encoder`) is its image tower's, its title tower's, or
the two fused: ``unit(image vector + title vector)``, the one it has where an
item lacks the other (`Fuse`). The fused encoder takes ``{"image", "text"}``;
an item without an image sends zeros (as `tfmm.data.items` gives them), one
without a title an empty string.

Held-out items (`split_items`) are never trained on: Acc@N of image -> title
retrieval among them says whether the towers learned more than the
training items.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from tfmm.keras_compat import register
from tfmm.momentum_queue import MomentumQueue, MomentumQueueCallback
from tfmm.scl import info_nce

VECTORS = ("image", "text", "fused")  # what an item's vector is
TRAIN = ("both", "image", "text")  # which towers the optimizer updates
HELD_OUT = 0.1  # share of the items with both an image and a title, for Acc@N
MAX_HELD_OUT = 2000


def split_items(ids, has_image, has_title, seed):
    """(training ids, held-out ids): of the items with both an image and a title,
    a random ``HELD_OUT`` share (at most ``MAX_HELD_OUT``, at least 2 where
    there are 4) is held out; training also gets none of the items with one
    modality only, which have no pair."""
    both = np.asarray(ids)[np.asarray(has_image) & np.asarray(has_title)]
    n = min(MAX_HELD_OUT, int(round(HELD_OUT * len(both))))
    n = max(n, 2) if len(both) >= 4 else 0
    held = np.random.default_rng(seed).permutation(len(both))[:n]
    mask = np.zeros(len(both), bool)
    mask[held] = True
    return both[~mask], both[mask]


def present_images(images):
    """Which uint8 images [B, h, w, 3] are an image: not all zeros (the readers'
    and the encoder service's 'no image')."""
    return tf.reduce_any(tf.not_equal(images, 0), axis=[1, 2, 3])


def present_titles(texts):
    """Which strings [B] are a title: not blank."""
    return tf.strings.length(tf.strings.strip(texts)) > 0


@register
class Fuse(keras.layers.Layer):
    """``unit(image_vector + title_vector)`` over the modalities an item has.

    Inputs ``[image_vectors, title_vectors, images, titles]``: the two towers'
    unit vectors ``[B, d]`` and the raw inputs they came from, which say
    whether the item has each (an all-zero image or a blank title is none).
    An item with one modality gets that tower's vector; one with neither,
    zeros.

    Example:
        >>> fused = Fuse()([image_tower(images), text_tower(titles), images, titles])
    """

    def call(self, inputs):
        image_vectors, title_vectors, images, titles = inputs
        has_image = tf.cast(present_images(images), image_vectors.dtype)[:, None]
        has_title = tf.cast(present_titles(titles), title_vectors.dtype)[:, None]
        return tf.math.l2_normalize(has_image * image_vectors + has_title * title_vectors,
                                    axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape[0]


def fuse(image_vectors, title_vectors, has_image, has_title):
    """`Fuse` in NumPy, from the towers' vectors and presence flags [n]."""
    x = (np.asarray(has_image, np.float32)[:, None] * image_vectors
         + np.asarray(has_title, np.float32)[:, None] * title_vectors)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def item_encoder(image_tower, text_tower, vector):
    """The model whose outputs are the items' vectors: one tower, or both fused
    (inputs ``{"image", "text"}``)."""
    if vector not in VECTORS:
        raise ValueError(f"item_encoder: vector={vector!r} is not one of {VECTORS}.")
    if vector == "image":
        return image_tower
    if vector == "text":
        return text_tower
    images = keras.Input(image_tower.input.shape[1:], dtype="uint8", name="image")
    texts = keras.Input((), dtype="string", name="text")
    fused = Fuse(name="fuse")([image_tower(images), text_tower(texts), images, texts])
    return keras.Model({"image": images, "text": texts}, fused, name="item_encoder")


def check_arguments(train="both", temperature=0.07, max_inverse_temperature=100.0):
    """`ImageTitleModel`'s checks of its scalar arguments; ValueError names the argument."""
    if train not in TRAIN:
        raise ValueError(f"ImageTitleModel: train={train!r} is not one of {TRAIN}.")
    if temperature <= 0 or 1.0 / temperature > max_inverse_temperature:
        raise ValueError(f"ImageTitleModel: temperature={temperature} must be > 0 with "
                         f"1/temperature <= {max_inverse_temperature}.")


@register
class ImageTitleModel(keras.Model):
    """Trains an image tower and a title tower on the items' own (image, title) pairs.

    ``fit`` takes batches ``{"image": uint8 [B, h, w, 3], "title": string [B],
    "item_id": int [B]}``. The loss is the mean of image -> title and title ->
    image InfoNCE (`tfmm.scl.info_nce`), the item's own title (image) the
    positive, the batch's others and, with a queue, the queue's the
    negatives; entries of the same item id are never negatives.

    With `encoder` (the item encoder, `item_encoder`), batches may also hold
    behaviour pairs ``{"query", "positive", "positive_id"}`` (the encoder's
    inputs of an item and of the item the same user clicked next): their
    InfoNCE over the batch's positives (`tfmm.scl.info_nce`, a temperature of
    its own) is added to the loss, so the item vectors learn what the clicks
    tell as well as what the titles do.

    Args:
        image_tower, text_tower: Keras models to unit vectors [B, d] (one d).
        make_image_tower, make_text_tower: callables returning fresh towers of
            the same architecture, the key towers of MoCo (default:
            `keras.models.clone_model`); only with a queue.
        queue_size: K; 0 means in-batch negatives only.
        momentum: EMA momentum of the key towers.
        temperature: initial tau; 1/tau is learned in log space, clamped at
            `max_inverse_temperature`.
        train: ``"both"`` towers, or only ``"image"`` or ``"text"``: the other
            is kept as built (run in inference mode) and is its own key tower.
        encoder: the item encoder made of the two towers, for behaviour pairs.
    """

    def __init__(self, image_tower, text_tower, make_image_tower=None, make_text_tower=None,
                 queue_size=0, momentum=0.999, temperature=0.07, max_inverse_temperature=100.0,
                 train="both", encoder=None, **kwargs):
        super().__init__(**kwargs)
        check_arguments(train, temperature, max_inverse_temperature)
        self.image_tower, self.text_tower = image_tower, text_tower
        self.dim = int(image_tower.output_shape[-1])
        if int(text_tower.output_shape[-1]) != self.dim:
            raise ValueError(f"ImageTitleModel: the image tower's vectors have {self.dim} "
                             f"values, the text tower's {text_tower.output_shape[-1]}.")
        self.train = train
        self.trains_image, self.trains_text = train in ("both", "image"), train in ("both", "text")
        self.default_momentum = momentum
        self.temperature = float(temperature)
        self.max_inverse_temperature = float(max_inverse_temperature)
        self.log_inverse_temperature = self.add_weight(
            name="log_inverse_temperature", shape=(),
            initializer=keras.initializers.Constant(math.log(1.0 / temperature)))
        self.encoder = encoder
        if encoder is not None:
            self.log_inverse_pair_temperature = self.add_weight(
                name="log_inverse_pair_temperature", shape=(),
                initializer=keras.initializers.Constant(math.log(1.0 / temperature)))
        self.key_image_tower, self.key_text_tower = image_tower, text_tower
        self.queue = None
        self._weight_pairs = []
        if queue_size:
            if self.trains_image:
                self.key_image_tower = (make_image_tower
                                        or (lambda: keras.models.clone_model(image_tower)))()
                self.key_image_tower.set_weights(image_tower.get_weights())
                self._weight_pairs += zip(image_tower.trainable_weights,
                                          self.key_image_tower.trainable_weights)
            if self.trains_text:
                self.key_text_tower = (make_text_tower
                                       or (lambda: keras.models.clone_model(text_tower)))()
                self.key_text_tower.set_weights(text_tower.get_weights())
                self._weight_pairs += zip(text_tower.trainable_weights,
                                          self.key_text_tower.trainable_weights)
            # One queue of [image key, title key] rows: one pointer, one enqueue.
            self.queue = MomentumQueue(self, queue_size, 2 * self.dim)
        if tf.distribute.get_strategy().num_replicas_in_sync > 1:
            raise ValueError("ImageTitleModel: one replica only (no tf.distribute strategy).")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.image_tracker = keras.metrics.Mean(name="image_to_title")
        self.title_tracker = keras.metrics.Mean(name="title_to_image")
        self.pair_tracker = keras.metrics.Mean(name="behaviour_pairs")
        self.built = True  # the towers own every weight already

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                "image_tower": keras.saving.serialize_keras_object(self.image_tower),
                "text_tower": keras.saving.serialize_keras_object(self.text_tower),
                "queue_size": 0 if self.queue is None else self.queue.size,
                "momentum": self.default_momentum, "temperature": self.temperature,
                "max_inverse_temperature": self.max_inverse_temperature, "train": self.train,
                "encoder": (None if self.encoder is None
                            else keras.saving.serialize_keras_object(self.encoder))}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("image_tower", "text_tower", "encoder"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)

    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.image_tracker, self.title_tracker]
        return trackers + ([self.pair_tracker] if self.encoder is not None else [])

    def trained_weights(self):
        """What the optimizer updates: the trained towers and the temperature."""
        towers = [t for t, on in ((self.image_tower, self.trains_image),
                                  (self.text_tower, self.trains_text)) if on]
        scales = [self.log_inverse_temperature] + (
            [self.log_inverse_pair_temperature] if self.encoder is not None else [])
        return [w for t in towers for w in t.trainable_weights] + scales

    def inverse_temperature(self, log=None):
        log = self.log_inverse_temperature if log is None else log
        return tf.minimum(tf.exp(log), self.max_inverse_temperature)

    def encode(self, batch, training=False):
        """The batch's image and title vectors, each tower in training mode only if trained."""
        return (self.image_tower(batch["image"], training=training and self.trains_image),
                self.text_tower(batch["title"], training=training and self.trains_text))

    def pair_loss(self, batch, training=False):
        """InfoNCE of the behaviour pairs' item vectors, the mean over the batch (0
        without pairs)."""
        if self.encoder is None or "positive_id" not in batch:
            return tf.constant(0.0)
        query = self.encoder(batch["query"], training=training)
        positive = self.encoder(batch["positive"], training=training)
        ids = tf.cast(batch["positive_id"], tf.int64)
        scale = self.inverse_temperature(self.log_inverse_pair_temperature)
        return tf.reduce_mean(info_nce(query, positive, scale, key_ids=ids))

    def compute_losses(self, batch, training=False):
        """(image -> title InfoNCE, title -> image InfoNCE), means over the batch."""
        images, titles = self.encode(batch, training)
        ids = tf.cast(batch["item_id"], tf.int64)
        queue = queue_ids = None
        if self.queue is not None:  # rows of [image key, title key]
            queue, queue_ids = tf.cast(self.queue.keys, images.dtype), self.queue.ids
        scale = self.inverse_temperature()
        image_to_title = info_nce(images, titles, scale, queue, ids, queue_ids,
                                  extra_columns=slice(self.dim, None))
        title_to_image = info_nce(titles, images, scale, queue, ids, queue_ids,
                                  extra_columns=slice(0, self.dim))
        return tf.reduce_mean(image_to_title), tf.reduce_mean(title_to_image)

    def _keys(self, batch):
        """The batch's keys for the queue: [image key, title key] of the key towers."""
        return tf.stop_gradient(tf.concat(
            [self.key_image_tower(batch["image"], training=self.trains_image),
             self.key_text_tower(batch["title"], training=self.trains_text)], axis=1))

    def train_step(self, batch):
        batch = keras.utils.unpack_x_y_sample_weight(batch)[0]  # (x,) from train_on_batch
        if self.queue is not None:
            self.queue.check_batch(batch["item_id"].shape[0])
        trainable = self.trained_weights()
        with tf.GradientTape() as tape:
            image_to_title, title_to_image = self.compute_losses(batch, training=True)
            pairs = self.pair_loss(batch, training=True)
            loss = (image_to_title + title_to_image) / 2 + pairs
        self.optimizer.apply(tape.gradient(loss, trainable), trainable)
        if self.queue is not None:
            self.queue.step(self._weight_pairs, self._keys(batch),
                            tf.cast(batch["item_id"], tf.int64))
        return self._track(loss, image_to_title, title_to_image, pairs)

    def test_step(self, batch):
        batch = keras.utils.unpack_x_y_sample_weight(batch)[0]
        image_to_title, title_to_image = self.compute_losses(batch, training=False)
        pairs = self.pair_loss(batch, training=False)
        return self._track((image_to_title + title_to_image) / 2 + pairs, image_to_title,
                           title_to_image, pairs)

    def _track(self, loss, image_to_title, title_to_image, pairs):
        self.loss_tracker.update_state(loss)
        self.image_tracker.update_state(image_to_title)
        self.title_tracker.update_state(title_to_image)
        if self.encoder is not None:
            self.pair_tracker.update_state(pairs)
        return {m.name: m.result() for m in self.metrics}

    def fit(self, *args, callbacks=None, **kwargs):
        """Keras fit; with a queue, adds a MomentumQueueCallback if none was given."""
        callbacks = list(callbacks or [])
        if self.queue is not None and not any(isinstance(c, MomentumQueueCallback)
                                              for c in callbacks):
            callbacks.append(MomentumQueueCallback(self.default_momentum))
        kwargs.setdefault("shuffle", False)  # datasets arrive shuffled
        if not self.optimizer.built:
            self.optimizer.build(self.trained_weights())
        return super().fit(*args, callbacks=callbacks, **kwargs)


def training_data(catalogue, ids, batch_size, seed, pairs=None, vector="fused"):
    """Endless shuffled batches ``{"image", "title", "item_id"}`` of the items `ids`
    (dense ids of a `tfmm.pretrain.Catalogue`); with `pairs` (item ids: first,
    second [n]) also ``{"query", "positive", "positive_id"}``: as many pairs a
    batch, each item as the item encoder of `vector` takes it."""
    images, titles = tf.constant(catalogue.images), tf.constant(catalogue.titles)
    row = tf.constant(catalogue.row)
    ds = tf.data.Dataset.from_tensor_slices(np.asarray(ids, np.int64))
    ds = ds.shuffle(len(ids), seed=seed).repeat().batch(batch_size, drop_remainder=True)

    def encoder_input(ids):
        rows = tf.gather(row, ids)
        image, title = tf.gather(images, rows), tf.gather(titles, rows)
        return {"image": image, "text": title} if vector == "fused" else (
            image if vector == "image" else title)

    def batch(ids, pair=None):
        rows = tf.gather(row, ids)
        out = {"image": tf.gather(images, rows), "title": tf.gather(titles, rows),
               "item_id": ids}
        if pair is not None:
            out.update(query=encoder_input(pair[0]), positive=encoder_input(pair[1]),
                       positive_id=pair[1])
        return out

    if pairs is not None:
        more = tf.data.Dataset.from_tensor_slices(tuple(np.asarray(p, np.int64) for p in pairs))
        more = more.shuffle(len(pairs[0]), seed=seed + 1).repeat()
        ds = tf.data.Dataset.zip(ds, more.batch(batch_size, drop_remainder=True))
    return ds.map(batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)

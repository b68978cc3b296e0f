"""The ID-based DIN ranker (paper §2) and the ways multimodal vectors join it.

The ID baseline embeds the user, the target item and its category, and pools
the history's item and category embeddings with DIN attention; an MLP maps
``[user, target, interest]`` to the click probability. Each multimodal method
of paper §4 and §6.1.3 adds its features to that same ranker:

- ``vector``: each item's vector appended to its ID embeddings (target and history).
- ``simscore``: each history item's similarity to the target appended.
- ``simtier``: the SimTier histogram concatenated before the MLP.
- ``make``: the knowledge of a (pre-trained) MAKE block (paper §4.3), by default as a
  residual: a head over MAKE's knowledge and logit adds to the logit of the
  ranker without MAKE, which trains on its own loss (`DINRanker`).
- ``simtier_make``: both.

Every multimodal ranker starts as the ID ranker of the same seed
(``start_as_id``): its first MLP layer draws the ID ranker's weights over the
ID inputs and zeros over the multimodal ones.

Inputs are named like `tfmm.data.impressions` features; the multimodal
methods also take ``item_vector`` [d] and ``history_vectors`` [L, d].

`DINRanker.rank` scores the same trained model one *user* per row: C
candidates against one copy of the history (the SavedModel's ``rank``
signature, `tfmm.export`), instead of one example per row that repeats the
history for every candidate.
"""

from types import FunctionType

import numpy as np
import tensorflow as tf

from tfmm.keras_compat import LEGACY, keras, register
from tfmm.layers import (DINAttention, KnownIds, MAKEBlock, ShardedEmbedding, SimScore,
                         SimTierLayer, VectorFeature)

# Ops on the functional graph's tensors: Keras 3 takes only keras.ops there; tf-keras
# (TFRS) has no keras.ops and takes tf ops.
_stop_gradient = tf.stop_gradient if LEGACY else keras.ops.stop_gradient
_concatenate = tf.concat if LEGACY else keras.ops.concatenate

METHODS = ("id", "vector", "simscore", "simtier", "make", "simtier_make")
MAKE_INTEGRATIONS = ("residual", "concat")
ID_INPUTS = ("user_id", "item_id", "category_id", "history_item_ids", "history_category_ids",
             "history_mask")
RANK_SIGNATURE = "rank"


def model_inputs(max_history, vector_dim=None):
    """Keras inputs named like the reader's features (vectors when vector_dim is set)."""
    inputs = {k: keras.Input((), dtype="int64", name=k) for k in ID_INPUTS[:3]}
    inputs.update({k: keras.Input((max_history,), dtype="int64", name=k) for k in ID_INPUTS[3:5]})
    inputs["history_mask"] = keras.Input((max_history,), dtype="bool", name="history_mask")
    if vector_dim:
        inputs["item_vector"] = keras.Input((vector_dim,), name="item_vector")
        inputs["history_vectors"] = keras.Input((max_history, vector_dim), name="history_vectors")
    return inputs


@register
class DINRanker(keras.Model):
    """The DIN ranker from reader features to P(click) [B, 1], with any method.

    A functional model whose layers are built once, as attributes: calling it
    scores one example per row, and `rank` scores C candidates per user
    against one copy of the history with the same layers and the same
    forward pass (`_forward` serves both), so the two cannot drift apart.
    Works in Keras 3 and, with ``TF_USE_LEGACY_KERAS=1``, in tf-keras.

    Args:
        vocab: sizes ``num_items``, ``num_users``, ``num_categories`` (metadata.json).
        max_history: history length L of the inputs.
        method: one of METHODS.
        vector_dim: width of the multimodal vectors (all methods but ``id``).
        make: for ``make``/``simtier_make``, a MAKEBlock built with
            ``return_knowledge=True``, usually pre-trained with
            `build_make_pretrainer` and frozen; None trains a fresh one jointly.
        embedding_dim: width of the user, item and category ID embeddings.
        attention_units: DIN's attention MLP.
        mlp_units: the ranker's MLP, before its one-unit sigmoid output.
        activation: the MLP's activation.
        num_tiers, simtier_output: SimTier's tiers and output (`SimTierLayer`).
            Fractions of the history by default, not the paper's raw counts:
            counts of up to L beside small ID embeddings trained the MLP worse
            (DECISIONS.md, "SimTier gives the ranker fractions").
        batch_norm: batch-normalise the concatenated features before the MLP,
            as the DIN reference code does (off: it cost AUC on time-ordered
            batches here).
        embedding_shards: above 1, each ID table is a `ShardedEmbedding` of
            that many row shards, which ``ParameterServerStrategy`` places on
            its parameter servers (`tfmm.parameter_server`).
        start_as_id: the first MLP layer's weights over the multimodal inputs
            (SimTier's tiers, MAKE's knowledge, the vectors' components) start
            at zero and those over the ID inputs as the ID ranker draws them,
            so that at initialisation the ranker scores as the ID ranker of
            the same seed; False: Glorot over all of them (the paper's
            plain concatenation), which on uninformative vectors injects
            random features the ranker then has to unlearn.
        make_integration: how MAKE's knowledge joins the ranker.
            ``"residual"``: the ranker without MAKE computes its logit and
            trains on its own loss, untouched by MAKE; a head over MAKE's
            knowledge and logit (zero at first) adds to that logit, trained
            on the loss of the sum, and MAKE, where it trains, on its own
            loss (`train_step`): MAKE can only add what the training data
            says it adds. ``"concat"``: the knowledge is concatenated with
            the other features before the MLP, as in the paper.

    Example:

    >>> vocab = {"num_items": 100, "num_users": 10, "num_categories": 5}
    >>> ranker = DINRanker(vocab, max_history=4, method="simtier", vector_dim=8)
    >>> import numpy as np
    >>> x = {"user_id": np.array([3]), "item_id": np.array([[5, 6, 7]]),
    ...      "category_id": np.array([[1, 2, 1]]),
    ...      "history_item_ids": np.array([[8, 9, 0, 0]]),
    ...      "history_category_ids": np.array([[1, 1, 0, 0]]),
    ...      "history_mask": np.array([[True, True, False, False]]),
    ...      "item_vector": np.ones((1, 3, 8), "float32"),
    ...      "history_vectors": np.ones((1, 4, 8), "float32")}
    >>> tuple(ranker.rank(x).shape)  # one user, three candidates
    (1, 3)
    """

    def __init__(self, vocab, max_history, method="id", vector_dim=None, make=None,
                 embedding_dim=16, attention_units=(80, 40), mlp_units=(200, 80),
                 activation="relu", num_tiers=10, simtier_output="fraction", batch_norm=False,
                 embedding_shards=1, start_as_id=True, make_integration="residual",
                 **kwargs):
        if method not in METHODS:
            raise ValueError(f"DINRanker: method={method!r} is not one of {METHODS}.")
        if method != "id" and not vector_dim:
            raise ValueError(f"DINRanker: method={method!r} needs multimodal vectors "
                             "(vector_dim).")
        if make_integration not in MAKE_INTEGRATIONS:
            raise ValueError(f"DINRanker: make_integration={make_integration!r} is not one of "
                             f"{MAKE_INTEGRATIONS}.")
        uses_make = method in ("make", "simtier_make")
        residual = uses_make and make_integration == "residual"
        if uses_make and make is not None and not make.return_knowledge:
            raise ValueError("DINRanker: `make` must be built with return_knowledge=True.")
        # === Layers === (attributes once the functional init has run, as tf-keras
        # requires; until then `_forward` reads them from a `_FirstUse`). Keras
        # draws an initializer's seed from Python's `random` when the initializer
        # is made: an Embedding's or Dense's when the layer is, DINAttention's
        # when it is built. The layers after the attention are made (lambdas)
        # when the graph first reaches them, so a seed gives the same weights
        # as the ranker built its layers in that order before.
        # Which inputs of the MLP are the ID ranker's: filled by the first trace, before
        # the first MLP layer is built (`_StartAsId`).
        id_rows = []

        def embedding(rows, name):
            if embedding_shards > 1:
                return ShardedEmbedding(rows, embedding_dim, embedding_shards, name=name)
            return keras.layers.Embedding(rows, embedding_dim, name=name)

        layers = {
            "item_embedding": embedding(vocab["num_items"], "item_embedding"),
            "category_embedding": embedding(vocab["num_categories"], "category_embedding"),
            "user_embedding": embedding(vocab["num_users"], "user_embedding"),
            # New items and users (created after training) look up the padding row.
            "known_items": KnownIds(vocab["num_items"], name="known_items"),
            "known_categories": KnownIds(vocab["num_categories"], name="known_categories"),
            "known_users": KnownIds(vocab["num_users"], name="known_users"),
            "target_concat": keras.layers.Concatenate(name="target"),
            "history_concat": keras.layers.Concatenate(name="history"),
            "vector": VectorFeature(name="vector") if method == "vector" else None,
            "simscore": SimScore(name="simscore") if method == "simscore" else None,
            "din": DINAttention(hidden_units=attention_units, name="din"),
            "simtier": (SimTierLayer(num_tiers, output=simtier_output, name="simtier")
                        if method in ("simtier", "simtier_make") else None),
            "make": lambda: ((make or MAKEBlock(return_knowledge=True, name="make"))
                             if uses_make else None),
            "features_concat": keras.layers.Concatenate(name="features"),
            # Under tf.distribute, statistics of the global batch, as in one process.
            "features_bn": lambda: (keras.layers.BatchNormalization(
                synchronized=tf.distribute.has_strategy(), name="features_bn")
                if batch_norm else None),
            "mlp": lambda: [keras.layers.Dense(
                units, activation=activation,
                kernel_initializer=(_StartAsId(id_rows) if i == 0 and start_as_id
                                    else "glorot_uniform"))
                for i, units in enumerate(mlp_units)],
            "ctr": lambda: keras.layers.Dense(1, name="ctr"),  # the logit
            "make_head": lambda: (keras.layers.Dense(1, kernel_initializer="zeros",
                                                     name="make_head") if residual else None),
        }
        # === Functional model ===
        inputs = model_inputs(max_history, None if method == "id" else vector_dim)
        kwargs.setdefault("name", f"din_{method}")
        traced = _FirstUse(layers, id_rows=id_rows)
        super().__init__(inputs=inputs, outputs=_forward(traced, inputs), **kwargs)
        for name in layers:
            setattr(self, name, getattr(traced, name))
        # === Config ===
        self.vocab = {k: int(vocab[k]) for k in ("num_items", "num_users", "num_categories")}
        self.max_history, self.method = int(max_history), method
        self.vector_dim = None if method == "id" else int(vector_dim)
        self.embedding_dim, self.activation = embedding_dim, activation
        self.attention_units, self.mlp_units = tuple(attention_units), tuple(mlp_units)
        self.num_tiers, self.simtier_output, self.batch_norm = num_tiers, simtier_output, batch_norm
        self.embedding_shards = int(embedding_shards)
        self.start_as_id, self.make_integration = bool(start_as_id), make_integration
        # Each part's own loss in `train_step`: MAKE's where it trains here.
        self._own_loss = keras.losses.BinaryCrossentropy()
        self.rank_input_signature = rank_input_signature(self.max_history, self.vector_dim)

    def rank(self, inputs, training=False):
        """P(click) [B, C] for B users with C candidates each (`rank_input_signature`).

        The probabilities `call` gives the B * C rows that repeat each user's
        history for each candidate, computed with one copy of the history per
        user (DIN attends C queries to it at once, SimTier and MAKE likewise;
        SimScore's keys are per candidate by nature).
        """
        x = {s.name: tf.convert_to_tensor(inputs[s.name], s.dtype)
             for s in self.rank_input_signature}
        return tf.squeeze(_forward(self, x, training=training), -1)

    def without_make(self, inputs):
        """P(click) [B, 1] of a residual-MAKE ranker's own part: the ranker without MAKE,
        trained on the same steps (what MAKE's head adds is the difference)."""
        if self.make_head is None:
            raise ValueError(f"DINRanker.without_make: method={self.method!r} with "
                             f"make_integration={self.make_integration!r} has no residual "
                             "MAKE.")
        return _forward(self, inputs, training=False, own=True)[1][0]

    def train_step(self, data):
        """Keras' step, or with a residual MAKE one that adds each part's own loss: the
        ranker without MAKE trains on its logit's loss, the head on the sum's, and
        MAKE, where it trains, on its own logit's."""
        if self.make_head is None:
            return super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            p, own = _forward(self, x, training=True, own=True)
            loss = self.compute_loss(x, y, p, sample_weight)
            for q in own:
                loss += self._own_loss(y, q, sample_weight)
        tracker = getattr(self, "_loss_tracker", None)  # Keras 3's "loss" log
        if tracker is not None:
            tracker.update_state(loss)
        weights = self.trainable_weights
        self.optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights))
        return self.compute_metrics(x, y, p, sample_weight)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "vocab": dict(self.vocab),
                "max_history": self.max_history, "method": self.method,
                "vector_dim": self.vector_dim,
                "make": (None if self.make is None
                         else keras.saving.serialize_keras_object(self.make)),
                "embedding_dim": self.embedding_dim,
                "attention_units": list(self.attention_units), "mlp_units": list(self.mlp_units),
                "activation": self.activation, "num_tiers": self.num_tiers,
                "simtier_output": self.simtier_output, "batch_norm": self.batch_norm,
                "embedding_shards": self.embedding_shards, "start_as_id": self.start_as_id,
                "make_integration": self.make_integration}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("make") is not None:
            config["make"] = keras.saving.deserialize_keras_object(config["make"])
        return cls(**config)


def build_make_pretrainer(make, max_history, vector_dim):
    """MAKE alone on the CTR task (paper eq. 5): vectors and mask in, P(click) out."""
    inputs = {k: v for k, v in model_inputs(max_history, vector_dim).items()
              if k in ("item_vector", "history_vectors", "history_mask")}
    logit = make(inputs["item_vector"], inputs["history_vectors"], mask=inputs["history_mask"])
    logit = logit[0] if make.return_knowledge else logit
    out = keras.layers.Activation("sigmoid", name="ctr")(logit)
    return keras.Model(inputs, out, name="make_pretrainer")


def rank_input_signature(max_history, vector_dim=None):
    """TensorSpecs of the ``rank`` signature: one row per user, C candidates each.

    ``user_id`` [B]; ``item_id``, ``category_id`` [B, C] (the candidates);
    ``history_item_ids``, ``history_category_ids``, ``history_mask`` [B, L];
    with vectors ``item_vector`` [B, C, d] and ``history_vectors`` [B, L, d].
    """
    specs = [tf.TensorSpec([None], tf.int64, name="user_id"),
             tf.TensorSpec([None, None], tf.int64, name="item_id"),
             tf.TensorSpec([None, None], tf.int64, name="category_id"),
             tf.TensorSpec([None, max_history], tf.int64, name="history_item_ids"),
             tf.TensorSpec([None, max_history], tf.int64, name="history_category_ids"),
             tf.TensorSpec([None, max_history], tf.bool, name="history_mask")]
    if vector_dim:
        specs += [tf.TensorSpec([None, None, vector_dim], tf.float32, name="item_vector"),
                  tf.TensorSpec([None, max_history, vector_dim], tf.float32,
                                name="history_vectors")]
    return specs


class _StartAsId(keras.initializers.Initializer):
    """Glorot-uniform over the rows of the ID ranker's inputs, drawn as the ID ranker
    draws its whole kernel (same seed, fan-in and values), and zeros over the rest.

    `rows` (one bool per input, True for the ID ranker's) may be filled after the
    initializer is made, as long as it is before the kernel is built.
    """

    def __init__(self, rows):
        self.rows = rows
        self.glorot = keras.initializers.GlorotUniform()  # its seed: where Dense draws one

    def __call__(self, shape, dtype=None):
        rows = np.asarray(self.rows, bool)
        if rows.shape != (shape[0],):
            raise ValueError(f"_StartAsId: {len(rows)} rows known for a kernel of shape "
                             f"{tuple(shape)}.")
        ids = self.glorot((int(rows.sum()), *shape[1:]), dtype=dtype)
        ids = tf.concat([ids, tf.zeros([1, *shape[1:]], ids.dtype)], 0)  # the zero row
        return tf.gather(ids, np.where(rows, np.cumsum(rows) - 1, len(ids) - 1))

    def get_config(self):
        return {"rows": [bool(r) for r in self.rows]}


class _FirstUse:
    """Layers by name, each made on first use where given as a function."""

    def __init__(self, layers, id_rows):
        self._layers = layers
        self.id_rows = id_rows

    def __getattr__(self, name):
        layer = self._layers[name]
        if isinstance(layer, FunctionType):
            layer = self._layers[name] = layer()
        return layer


def _forward(n, x, training=None, own=False):
    """P(click) [B, 1] of reader features, or [B, C, 1] of the ``rank`` inputs.

    `n` holds the ranker's layers (`DINRanker`'s attributes): per-example
    scoring and `DINRanker.rank` share this one forward pass. With `own` (a
    residual MAKE, training) also the parts' own probabilities: the ranker's
    without MAKE, and MAKE's where it trains.
    """
    mask = x["history_mask"]
    target = n.target_concat([n.item_embedding(n.known_items(x["item_id"])),
                              n.category_embedding(n.known_categories(x["category_id"]))])
    history = n.history_concat([n.item_embedding(n.known_items(x["history_item_ids"])),
                                n.category_embedding(
                                    n.known_categories(x["history_category_ids"]))])
    vectors = (x.get("item_vector"), x.get("history_vectors"))
    if n.vector is not None:
        target, history = n.vector(target, history, *vectors)
    elif n.simscore is not None:
        target, history = n.simscore(target, history, *vectors, mask=mask)
    interest = n.din(target, history, mask=mask, training=training)
    mlp, ctr = n.mlp, n.ctr  # made before any MAKE layer draws its weights' seeds (start_as_id)
    user = n.user_embedding(n.known_users(x["user_id"]))
    candidates = len(target.shape) == 3  # never in the symbolic (functional) pass
    if candidates:  # the C candidates share their user's row
        rows = tf.shape(target)[:2]
        user = tf.broadcast_to(user[:, None, :], tf.concat([rows, tf.shape(user)[1:]], 0))
    parts = [user, target, interest]
    if n.simtier is not None:
        parts.append(n.simtier(*vectors, mask=mask))
    if n.make is not None:
        make_logit, knowledge = n.make(*vectors, mask=mask, training=training)
        if n.make_head is None:
            parts.append(knowledge)
    if isinstance(n, _FirstUse):  # the MLP's inputs that the ID ranker has, leading each part
        ids = (n.user_embedding.output_dim,) + 2 * (
            n.item_embedding.output_dim + n.category_embedding.output_dim,)
        n.id_rows[:] = [i < width for part, width in zip(parts, ids + (0,) * len(parts))
                        for i in range(part.shape[-1])]
    h = n.features_concat(parts)
    if candidates:  # the head scores one row per example, as it was built
        h = tf.reshape(h, [-1, h.shape[-1]])
    if n.features_bn is not None:
        h = n.features_bn(h, training=training)
    for dense in mlp:
        h = dense(h)
    logit = ctr(h)
    heads = []
    if n.make_head is not None:
        # Neither the ranker nor MAKE learns from the sum: each from its own loss.
        extra = n.make_head(_stop_gradient(_concatenate([knowledge, make_logit], axis=-1)))
        if candidates:
            extra = tf.reshape(extra, [-1, 1])
        heads = [logit] + ([make_logit] if own and n.make.trainable else [])
        logit = _stop_gradient(logit) + extra
    p = keras.activations.sigmoid(logit)
    if own:
        return p, [keras.activations.sigmoid(h) for h in heads]
    return tf.reshape(p, tf.concat([rows, [1]], 0)) if candidates else p

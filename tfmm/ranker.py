"""The ID-based DIN ranker (paper §2) and the ways multimodal vectors join it.

The ID baseline embeds the user, the target item and its category, and pools
the history's item and category embeddings with DIN attention; an MLP maps
``[user, target, interest]`` to the click probability. Each multimodal method
of paper §4 and §6.1.3 adds its features to that same ranker:

- ``vector``: each item's vector appended to its ID embeddings (target and history).
- ``simscore``: each history item's similarity to the target appended.
- ``simtier``: the SimTier histogram concatenated before the MLP.
- ``make``: the knowledge of a (pre-trained) MAKE block concatenated.
- ``simtier_make``: both.

Inputs are named like `tfmm.data.impressions` features; the multimodal
methods also take ``item_vector`` [d] and ``history_vectors`` [L, d].

`CandidateRanker` scores the same trained model one *user* per row: C
candidates against one copy of the history (the SavedModel's ``rank``
signature, `tfmm.export`), instead of one example per row that repeats the
history for every candidate.
"""

import tensorflow as tf

from tfmm.keras_compat import keras
from tfmm.layers import DINAttention, KnownIds, MAKEBlock, SimScore, SimTierLayer, VectorFeature

METHODS = ("id", "vector", "simscore", "simtier", "make", "simtier_make")
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


def build_ranker(vocab, max_history, method="id", vector_dim=None, make=None,
                 embedding_dim=16, attention_units=(80, 40), mlp_units=(200, 80),
                 activation="relu", num_tiers=10, simtier_output="fraction", batch_norm=False):
    """A Keras model from reader features to P(click) [B, 1].

    Args:
        vocab: sizes ``num_items``, ``num_users``, ``num_categories`` (metadata.json).
        method: one of METHODS.
        vector_dim: width of the multimodal vectors (all methods but ``id``).
        num_tiers, simtier_output: SimTier's tiers and output (`SimTierLayer`).
            Fractions of the history, not the paper's raw counts: counts of up
            to L beside small ID embeddings trained the MLP worse (small
            world, seed 0: GAUC 0.6743 with counts, 0.6815 log1p, 0.6853
            fractions; random vectors' counts even cost 2.5% against ID).
        batch_norm: batch-normalise the concatenated features before the MLP,
            as the DIN reference code does. Off by default: on time-ordered
            batches it raised the ID ranker's GAUC (0.6713 -> 0.6781) but
            cost AUC (0.7129 -> 0.6935), small world, seed 0.
        make: for ``make``/``simtier_make``, a MAKEBlock built with
            ``return_knowledge=True``, usually pre-trained with
            `build_make_pretrainer` and frozen; None trains a fresh one jointly.
    """
    if method not in METHODS:
        raise ValueError(f"build_ranker: --model={method!r} is not one of {METHODS}.")
    if method != "id" and not vector_dim:
        raise ValueError(f"build_ranker: --model={method} needs multimodal vectors (vector_dim).")
    inputs = model_inputs(max_history, None if method == "id" else vector_dim)
    mask = inputs["history_mask"]
    item = keras.layers.Embedding(vocab["num_items"], embedding_dim, name="item_embedding")
    category = keras.layers.Embedding(vocab["num_categories"], embedding_dim,
                                      name="category_embedding")
    user = keras.layers.Embedding(vocab["num_users"], embedding_dim, name="user_embedding")
    # New items and users (created after training) look up the padding row.
    known_item = KnownIds(vocab["num_items"], name="known_items")
    known_category = KnownIds(vocab["num_categories"], name="known_categories")
    target = keras.layers.Concatenate(name="target")(
        [item(known_item(inputs["item_id"])), category(known_category(inputs["category_id"]))])
    history = keras.layers.Concatenate(name="history")(
        [item(known_item(inputs["history_item_ids"])),
         category(known_category(inputs["history_category_ids"]))])
    vectors = (inputs.get("item_vector"), inputs.get("history_vectors"))
    if method == "vector":
        target, history = VectorFeature(name="vector")(target, history, *vectors)
    elif method == "simscore":
        target, history = SimScore(name="simscore")(target, history, *vectors, mask=mask)
    interest = DINAttention(hidden_units=attention_units, name="din")(target, history, mask=mask)
    parts = [user(KnownIds(vocab["num_users"], name="known_users")(inputs["user_id"])), target,
             interest]
    if method in ("simtier", "simtier_make"):
        simtier = SimTierLayer(num_tiers, output=simtier_output, name="simtier")
        parts.append(simtier(*vectors, mask=mask))
    if method in ("make", "simtier_make"):
        make = make or MAKEBlock(return_knowledge=True, name="make")
        if not make.return_knowledge:
            raise ValueError("build_ranker: `make` must be built with return_knowledge=True.")
        parts.append(make(*vectors, mask=mask)[1])
    x = keras.layers.Concatenate(name="features")(parts)
    if batch_norm:
        x = keras.layers.BatchNormalization(name="features_bn")(x)
    for units in mlp_units:
        x = keras.layers.Dense(units, activation=activation)(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="ctr")(x)
    return keras.Model(inputs, out, name=f"din_{method}")


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


def is_ranker(model):
    """Whether `model` looks built by `build_ranker` (what `CandidateRanker` needs)."""
    names = {layer.name for layer in getattr(model, "layers", ())}
    return (isinstance(getattr(model, "input", None), dict)
            and {"item_embedding", "category_embedding", "user_embedding", "known_items",
                 "known_categories", "known_users", "ctr"} <= names
            and sum(isinstance(layer, DINAttention) for layer in model.layers) == 1)


class CandidateRanker:
    """A `build_ranker` model, with its own weights, scoring C candidates per user.

    Calling it with the ``rank`` inputs (`rank_input_signature`) gives
    P(click) [B, C]: the probabilities the model gives the B * C rows that
    repeat each user's history for each candidate, computed with one copy of
    the history per user (DIN attends C queries to it at once, SimTier and
    MAKE likewise; SimScore's keys are per candidate by nature).

    Args:
        model: a model built by `build_ranker` (trained, or loaded from a
            ``.keras`` file); its layers are used, not copied.

    Example:

    >>> ranker = build_ranker(vocab, 5)  # doctest: +SKIP
    >>> CandidateRanker(ranker)({"user_id": [3], "item_id": [[5, 6, 7]], ...})  # doctest: +SKIP
    <tf.Tensor: shape=(1, 3), dtype=float32, numpy=...>
    """

    def __init__(self, model):
        self.model = model
        if not is_ranker(model):
            raise ValueError(f"CandidateRanker: {getattr(model, 'name', model)!r} is not a model "
                             "of tfmm.ranker.build_ranker (its named ID embeddings, KnownIds, "
                             "one DINAttention and the 'ctr' layer).")
        self.layers = {layer.name: layer for layer in model.layers}

        def one(cls):
            found = [layer for layer in model.layers if isinstance(layer, cls)]
            return found[0] if found else None

        self.din = one(DINAttention)
        self.vector, self.simscore = one(VectorFeature), one(SimScore)
        self.simtier, self.make = one(SimTierLayer), one(MAKEBlock)
        self.batch_norm = self.layers.get("features_bn")
        self.mlp = [layer for layer in model.layers
                    if isinstance(layer, keras.layers.Dense) and layer.name != "ctr"]
        inputs = model.input
        self.max_history = int(inputs["history_item_ids"].shape[1])
        self.vector_dim = (int(inputs["item_vector"].shape[-1]) if "item_vector" in inputs
                           else None)
        self.input_signature = rank_input_signature(self.max_history, self.vector_dim)

    def __call__(self, inputs, training=False):
        """P(click) [B, C] of the ``rank`` inputs (a dict of arrays or tensors)."""
        specs = {s.name: s for s in self.input_signature}
        x = {k: tf.convert_to_tensor(inputs[k], specs[k].dtype) for k in specs}
        layers = self.layers
        mask = x["history_mask"]

        def ids(kind, name):
            known = layers[f"known_{'categories' if kind == 'category' else kind + 's'}"]
            return layers[f"{kind}_embedding"](known(x[name]))

        target = tf.concat([ids("item", "item_id"), ids("category", "category_id")], -1)
        history = tf.concat([ids("item", "history_item_ids"),
                             ids("category", "history_category_ids")], -1)
        vectors = (x.get("item_vector"), x.get("history_vectors"))
        if self.vector is not None:
            target, history = self.vector(target, history, *vectors)
        elif self.simscore is not None:
            target, history = self.simscore(target, history, *vectors, mask=mask)
        interest = self.din(target, history, mask=mask, training=training)  # [B, C, e]
        user = ids("user", "user_id")
        shape = tf.shape(target)
        parts = [tf.broadcast_to(user[:, None, :], tf.concat([shape[:2], tf.shape(user)[1:]], 0)),
                 target, interest]
        if self.simtier is not None:
            parts.append(self.simtier(*vectors, mask=mask))
        if self.make is not None:
            parts.append(self.make(*vectors, mask=mask, training=training)[1])
        features = tf.concat([tf.cast(p, target.dtype) for p in parts], -1)
        # The per-example MLP on B * C rows.
        h = tf.reshape(features, [-1, features.shape[-1]])
        if self.batch_norm is not None:
            h = self.batch_norm(h, training=training)
        for dense in self.mlp:
            h = dense(h)
        return tf.reshape(layers["ctr"](h), shape[:2])

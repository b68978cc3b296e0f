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
"""

from tfmm.keras_compat import keras
from tfmm.layers import DINAttention, KnownIds, MAKEBlock, SimScore, SimTierLayer, VectorFeature

METHODS = ("id", "vector", "simscore", "simtier", "make", "simtier_make")
ID_INPUTS = ("user_id", "item_id", "category_id", "history_item_ids", "history_category_ids",
             "history_mask")


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

"""The ID-based DIN ranker (paper §2), fed by `tfmm.data.impressions` batches.

User, target item and category embeddings; DIN attention of the target over
the history's item and category embeddings; an MLP to the click probability.
The multimodal methods of paper §4 and §6.1.3 add their features to this
same ranker.
"""

from tfmm.keras_compat import keras
from tfmm.layers import DINAttention

ID_INPUTS = ("user_id", "item_id", "category_id", "history_item_ids", "history_category_ids",
             "history_mask")


def id_inputs(max_history):
    """Keras inputs named like the reader's features."""
    scalar = {k: keras.Input((), dtype="int64", name=k) for k in ID_INPUTS[:3]}
    seq = {k: keras.Input((max_history,), dtype="int64", name=k) for k in ID_INPUTS[3:5]}
    return {**scalar, **seq, "history_mask": keras.Input((max_history,), dtype="bool",
                                                          name="history_mask")}


def build_din(vocab, max_history, embedding_dim=16, attention_units=(80, 40),
              mlp_units=(200, 80), activation="relu"):
    """The ID baseline: a Keras model from reader features to P(click) [B, 1]."""
    inputs = id_inputs(max_history)
    item = keras.layers.Embedding(vocab["num_items"], embedding_dim, name="item_embedding")
    category = keras.layers.Embedding(vocab["num_categories"], embedding_dim,
                                      name="category_embedding")
    user = keras.layers.Embedding(vocab["num_users"], embedding_dim, name="user_embedding")
    target = keras.layers.Concatenate(name="target")(
        [item(inputs["item_id"]), category(inputs["category_id"])])
    history = keras.layers.Concatenate(name="history")(
        [item(inputs["history_item_ids"]), category(inputs["history_category_ids"])])
    interest = DINAttention(hidden_units=attention_units, name="din")(
        target, history, mask=inputs["history_mask"])
    x = keras.layers.Concatenate()([user(inputs["user_id"]), target, interest])
    for units in mlp_units:
        x = keras.layers.Dense(units, activation=activation)(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="ctr")(x)
    return keras.Model(inputs, out, name="din_id")


__all__ = ["build_din", "id_inputs"]

"""DeepCTR 0.9.4's DIN with tfmm's ranker shapes: the peer of the CTR benchmarks.

Needs tf-keras (run with TF_USE_LEGACY_KERAS=1) and the `bench` extra.
"""


def deepctr_din(max_history, num_users, num_items, num_categories, embedding_dim=16,
                attention_units=(80, 40)):
    """DIN over user, item and category, history of `max_history` items and their
    categories; attention MLP `attention_units` with sigmoid, MLP 200-80, as tfmm's ID-DIN.

    Its inputs: ``user``, ``item_id``, ``cate_id``, ``hist_item_id``,
    ``hist_cate_id`` and ``seq_length``.
    """
    from deepctr.feature_column import SparseFeat, VarLenSparseFeat
    from deepctr.models import DIN

    e = embedding_dim
    columns = [SparseFeat("user", num_users, embedding_dim=e),
               SparseFeat("item_id", num_items, embedding_dim=e),
               SparseFeat("cate_id", num_categories, embedding_dim=e)]
    columns += [VarLenSparseFeat(SparseFeat(f"hist_{k}", n, embedding_dim=e, embedding_name=k),
                                 maxlen=max_history, length_name="seq_length")
                for k, n in (("item_id", num_items), ("cate_id", num_categories))]
    return DIN(columns, ["item_id", "cate_id"], dnn_hidden_units=(200, 80),
               att_hidden_size=tuple(attention_units), att_activation="sigmoid", l2_reg_embedding=0.0)

"""DeepCTR 0.9.4's DIN with tfmm's ranker shapes: the peer of the CTR benchmarks.

Needs tf-keras (run with TF_USE_LEGACY_KERAS=1) and the `bench` extra.
"""


def deepctr_din(max_history, num_users, num_items, num_categories, embedding_dim=None,
                attention_units=None, mlp_units=None):
    """DIN over user, item and category, history of `max_history` items and their
    categories; attention MLP with sigmoid and the ranker MLP: by default the
    shapes of tfmm's `DINRanker` (its own defaults), so the two stay alike.

    Its inputs: ``user``, ``item_id``, ``cate_id``, ``hist_item_id``,
    ``hist_cate_id`` and ``seq_length``.
    """
    from deepctr.feature_column import SparseFeat, VarLenSparseFeat
    from deepctr.models import DIN

    from tfmm.config import default_of
    from tfmm.ranker import DINRanker

    e = embedding_dim or default_of(DINRanker, "embedding_dim")
    attention_units = attention_units or default_of(DINRanker, "attention_units")
    mlp_units = mlp_units or default_of(DINRanker, "mlp_units")
    columns = [SparseFeat("user", num_users, embedding_dim=e),
               SparseFeat("item_id", num_items, embedding_dim=e),
               SparseFeat("cate_id", num_categories, embedding_dim=e)]
    columns += [VarLenSparseFeat(SparseFeat(f"hist_{k}", n, embedding_dim=e, embedding_name=k),
                                 maxlen=max_history, length_name="seq_length")
                for k, n in (("item_id", num_items), ("cate_id", num_categories))]
    return DIN(columns, ["item_id", "cate_id"], dnn_hidden_units=tuple(mlp_units),
               att_hidden_size=tuple(attention_units), att_activation="sigmoid",
               l2_reg_embedding=0.0)

"""benchmarks.ctr_step's roofline: the FLOP count of its models against hand-computed values."""

from benchmarks.ctr_step import flops_per_example, shapes

TINY = {"embedding_dim": 1, "attention_units": (2,), "mlp_units": (3,), "num_tiers": 2,
        "make_attention_units": (1,), "make_mlp_units": (1, 1, 1, 1)}


def test_id_din_flops_by_hand():
    # Keys [item, category]: d = 2. Attention per position: two [2, 2] products 2 * 2*2*2 = 16,
    # then [2, 1]: 4 -> 20, times 2 positions = 40; the query's [2, 2]: 8; pooling [2] @ [2, 2]:
    # 8 -> 56. MLP [user 1, target 2, interest 2] = 5 -> 3 -> 1: 30 + 6 = 36. Trained: 3 x 92.
    assert flops_per_example(2, **TINY) == 3 * 92


def test_simtier_make_flops_by_hand():
    # The ranker's MLP also reads 2 tiers: 7 -> 3 -> 1 = 48; trained 3 x (56 + 48) = 312.
    # Frozen MAKE, forward only, d = 2: attention per position 2 * 2*2*1 + 2*1*1 = 10, x 2 = 20,
    # query 4, pooling 8 -> 32; MLP [v_make, target] 4 -> 1 -> 1 -> 1 -> 1: 8 + 2 + 2 + 2 = 14.
    # SimTier's similarities [2, 2] @ [2]: 8. The head (knowledge 2 + 3, logit 1) -> 1,
    # trained: 3 x 12 = 36.
    assert flops_per_example(2, **TINY, vector_dim=2) == 312 + 32 + 14 + 8 + 36


def test_the_default_id_din_step_is_about_2_7_mflop_with_full_histories():
    # Issue 23's estimate (~2.5 MFLOP with the split first layer), counted exactly: per position
    # 4*32*80 + 2*80*40 + 2*40 = 16,720, x 50 + 5,120 + 3,200; MLP 80-200-80-1: 64,160.
    assert flops_per_example(50, **shapes()) == 3 * (50 * 16720 + 5120 + 3200 + 64160)

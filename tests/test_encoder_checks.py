import numpy as np
import pytest

from tfmm import encoder_checks
from tfmm.data import Vectors
from tfmm.encoder_checks import KEY
from tfmm.index import open_index


def grouped(sizes, dim=4):
    """Vectors equal within each group: group g's items all point along axis g."""
    return np.repeat(np.eye(dim, dtype=np.float32)[:len(sizes)], sizes, axis=0)


def test_label_free_counts_same_category_neighbours_by_hand():
    vectors, categories = grouped([11, 11, 11]), np.repeat([2, 3, 4], 11)
    # Each item's 10 nearest are its own group's other 10: all in its category.
    untrained = np.random.default_rng(0).normal(size=(33, 4)).astype(np.float32)
    result = encoder_checks.label_free(vectors, categories, untrained)
    assert result[KEY] == 1.0
    assert result[f"{KEY}_chance"] == pytest.approx(3 * 11 * 10 / (33 * 32))
    assert 0 <= result[f"{KEY}_untrained"] < 1.0
    assert result["neighbours_items"] == 33
    # Items of the unknown category (1) are left out, and the share is of 10 neighbours:
    # 12 items in two groups of 6 (5 same-category others each: 0.5).
    six = encoder_checks.label_free(grouped([6, 6, 5]), np.r_[[2] * 6, [3] * 6, [1] * 5])
    assert six[KEY] == pytest.approx(0.5) and six["neighbours_items"] == 12
    assert f"{KEY}_untrained" not in six
    assert encoder_checks.label_free(grouped([1, 3]), [2, 1, 1, 1])[KEY] is None


def test_the_warning_compares_with_the_untrained_tower_then_chance():
    snapshot = {KEY: 0.30, f"{KEY}_chance": 0.20}
    warn = encoder_checks.warning
    assert warn({f"{KEY}_untrained": 0.295}, snapshot).startswith(
        "warning: the item vectors are no better than its untrained tower "
        f"({KEY} 0.300, untrained 0.295, chance 0.200):")
    assert warn({f"{KEY}_untrained": 0.28}, snapshot) is None  # 0.02 better: beyond the margin
    # A recorded Acc@1 that rose says the encoder learned, whatever the label-free check.
    assert warn({f"{KEY}_untrained": 0.30, "acc@1": 0.2, "acc@1_untrained": 0.01},
                snapshot) is None
    both = warn({f"{KEY}_untrained": 0.30, "acc@1": 0.012, "acc@1_untrained": 0.01}, snapshot)
    assert "Acc@1 0.012, untrained 0.010" in both
    # No record (imported vectors): against chance.
    assert warn({}, {KEY: 0.205, f"{KEY}_chance": 0.20}).startswith(
        "warning: the item vectors are no better than chance")
    assert warn({}, snapshot) is None
    # No categories: Acc@N alone; nothing to compare: no warning.
    assert "Acc@1 0.000" in warn({"acc@1": 0.0, "acc@1_untrained": 0.0}, {KEY: None})
    assert warn({}, {KEY: None}) is None


def test_checks_read_the_present_vectors_and_lines_say_them():
    table = np.zeros((40, 4), np.float32)
    table[2:35] = grouped([11, 11, 11])
    present = np.zeros(40, bool)
    present[2:35] = True
    categories = np.ones(40, np.int64)
    categories[2:35] = np.repeat([2, 3, 4], 11)
    categories[35:] = 2  # not present: not counted
    checks = encoder_checks.checks(None, Vectors(table, present), categories)
    assert checks["snapshot"]["neighbours_items"] == 33 and checks["warning"] is None
    assert encoder_checks.lines(checks) == [
        "encoder: no record in the index (vectors written by hand, or by an older tfmm)",
        f"encoder: {KEY} 1.000 over 33 items, chance 0.312"]
    recorded = {"source": "scl", "acc@1": 0.5, "acc@1_untrained": 0.1, "acc@5": 0.9,
                "test_pairs": 20, f"{KEY}": 1.0, f"{KEY}_untrained": 0.995}
    lines = encoder_checks.lines(encoder_checks.checks(recorded, Vectors(table, present),
                                                       categories))
    assert lines[0] == ("encoder: scl; acc@1 0.500 (untrained 0.100), acc@5 0.900 on 20 "
                        "held-out pairs")
    assert lines[1] == f"encoder: {KEY} 1.000 over 33 items, untrained 0.995, chance 0.312"
    assert len(lines) == 2  # Acc@1 rose: no warning


def test_record_keeps_the_checks_of_a_pretraining_run():
    result = {"source": "scl", "acc@1": 0.5, "acc@1_untrained": 0.1, "test_pairs": 20,
              KEY: 0.4, f"{KEY}_chance": 0.2, "history": {"loss": [1.0]}, "export_path": "x",
              "index_version": 3}
    assert encoder_checks.record(result) == {
        "source": "scl", "acc@1": 0.5, "acc@1_untrained": 0.1, "test_pairs": 20, KEY: 0.4,
        f"{KEY}_chance": 0.2}


def test_an_index_keeps_its_description(store_spec):
    index = open_index(store_spec, dim=4)
    assert index.description() is None
    index.describe({"source": "scl", "acc@1": 0.25})
    index.describe({"source": "image_title", "acc@1": 0.5})  # replaces
    assert open_index(store_spec).description() == {"source": "image_title", "acc@1": 0.5}

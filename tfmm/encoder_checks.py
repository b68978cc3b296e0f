"""What an index's vectors are worth, said before a ranker reads them.

Pre-training records its checks in the index it fills (`record`, stored by
`tfmm.index.VectorIndex.describe`): Acc@N on held-out pairs beside the
untrained tower's, and the label-free check, ``neighbours_same_category@10``
(the share of an item's 10 nearest items, by cosine, in its category) beside
the untrained tower's and chance. An import records its file instead. The CTR
job reads the record back, computes the label-free check again on the vectors
it loaded (so imported vectors are checked too), prints both and warns in one
line when the encoder is no better than its untrained tower, or where no
untrained reference exists, than chance (`checks`, `lines`).

Example:

>>> import numpy as np
>>> vectors = np.repeat(np.eye(3, dtype="float32"), 11, axis=0)  # 3 categories of 11 items
>>> checks = label_free(vectors, np.repeat([2, 3, 4], 11))
>>> checks[KEY], checks[KEY + "_chance"], checks["neighbours_items"]
(1.0, 0.3125, 33)
"""

import numpy as np

from tfmm import metrics
from tfmm.data import schema

NEIGHBOURS = 10  # k of the label-free check
KEY = f"neighbours_same_category@{NEIGHBOURS}"
# At most this many items enter the label-free check (a fixed sample beyond): its
# cost grows with the square of the items.
MAX_ITEMS = 20_000
# "No better" is within this of the reference: single runs differ by about 0.01 on
# this check (the untrained tower's seeds; DECISIONS.md, "The encoder's warning").
MARGIN = 0.01
# What a user can change, named in the warning.
ADVICE = ("try --objective=image_title where items have images and titles, more steps "
          "(--min_steps, --pretrain_epochs), a pretrained --backbone (a KerasHub preset), or "
          "pairs that say which items go together; python -m pipelines.never_hurts compares "
          "each method with random vectors")


def label_free(vectors, categories, untrained=None):
    """The label-free check of item `vectors` [n, d] whose categories are `categories` [n]
    (items of the unknown category, id 1, left out): the trained value, the untrained
    tower's (`untrained` [n, d], where given) and chance; None where fewer than 2 items
    have a category."""
    categories = np.asarray(categories)
    known = np.flatnonzero(categories != schema.OOV_ID)
    if len(known) > MAX_ITEMS:
        known = np.sort(np.random.default_rng(0).choice(known, MAX_ITEMS, replace=False))
    if len(known) < 2:
        return {KEY: None, "neighbours_items": int(len(known))}
    labels = categories[known]
    result = {KEY: metrics.neighbours_same_label(np.asarray(vectors)[known], labels, NEIGHBOURS)}
    if untrained is not None:
        result[f"{KEY}_untrained"] = metrics.neighbours_same_label(
            np.asarray(untrained)[known], labels, NEIGHBOURS)
    result.update({f"{KEY}_chance": metrics.same_label_chance(labels),
                   "neighbours_items": int(len(known))})
    return result


def record(pretrain_result):
    """The checks of a pre-training run (`tfmm.pretrain.run`'s metrics) that its index keeps."""
    return {k: v for k, v in pretrain_result.items()
            if k in ("source", "test_pairs", "acc_pairs", "neighbours_items")
            or k.startswith(("acc@", KEY))}


def checks(recorded, vectors, categories):
    """The CTR job's view of its vectors: `recorded` (the index's record, or None), the
    label-free check on the `vectors` snapshot (a `tfmm.data.Vectors`) with the items'
    `categories` by dense id, and ``warning`` (a line, or None)."""
    ids = np.flatnonzero(vectors.present)
    snapshot = label_free(vectors.table[ids], categories[ids])
    return {"recorded": recorded, "snapshot": snapshot,
            "warning": warning(recorded or {}, snapshot)}


def warning(recorded, snapshot, margin=MARGIN):
    """One line when the vectors are no better than the untrained tower (the recorded
    Acc@1 and label-free values, where recorded, both within `margin` of the untrained
    tower's) or, without an untrained reference, than chance; else None."""
    trained, chance = snapshot.get(KEY), snapshot.get(f"{KEY}_chance")
    untrained = recorded.get(f"{KEY}_untrained")
    acc, acc_untrained = recorded.get("acc@1"), recorded.get("acc@1_untrained")
    said = []
    if trained is not None and untrained is not None:
        if trained > untrained + margin:
            return None
        said.append(f"{KEY} {trained:.3f}, untrained {untrained:.3f}, chance {chance:.3f}")
        reference = "its untrained tower"
    elif acc is not None and acc_untrained is not None:
        reference = "its untrained tower"
    elif trained is not None:
        if trained > chance + margin:
            return None
        said.append(f"{KEY} {trained:.3f}, chance {chance:.3f}")
        reference = "chance"
    else:
        return None  # nothing to compare: no categories, no recorded Acc@N
    if acc is not None and acc_untrained is not None:
        if acc > acc_untrained + margin:
            return None
        said.append(f"Acc@1 {acc:.3f}, untrained {acc_untrained:.3f}")
    return (f"warning: the item vectors are no better than {reference} ({'; '.join(said)}): "
            f"the multimodal features may add nothing; {ADVICE}.")


def lines(checks):
    """What the CTR job prints of `checks`: the record, the snapshot's check, the warning."""
    recorded, snapshot = checks["recorded"], checks["snapshot"]
    out = []
    if recorded is None:
        out.append("encoder: no record in the index (vectors written by hand, or by an "
                   "older tfmm)")
    else:
        source = recorded.get("source", "?")
        accs = ", ".join(f"{k} {v:.3f}" + (
            f" (untrained {recorded[k + '_untrained']:.3f})"
            if recorded.get(k + "_untrained") is not None else "")
            for k, v in sorted(recorded.items())
            if k.startswith("acc@") and not k.endswith("_untrained") and v is not None)
        out.append(f"encoder: {source}" + (f"; {accs} on {recorded.get('test_pairs')} "
                                           "held-out pairs" if accs else ""))
    if snapshot.get(KEY) is None:
        out.append("encoder: no label-free check (fewer than 2 items with a category)")
    else:
        untrained = (recorded or {}).get(f"{KEY}_untrained")
        out.append(f"encoder: {KEY} {snapshot[KEY]:.3f} over {snapshot['neighbours_items']} "
                   "items" + (f", untrained {untrained:.3f}" if untrained is not None else "")
                   + f", chance {snapshot[f'{KEY}_chance']:.3f}")
    if checks["warning"]:
        out.append(checks["warning"])
    return out

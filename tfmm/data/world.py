"""A synthetic Taobao-like world, and the model that generates it.

**Catalogue.** Items come in families of 2-3 near-duplicates: the same
category (drawn as a shape) and colour, different patterns (the paper's three
pillows). Each item has a 64x64 catalogue image (`tfmm.data.render`) and a
title of attribute words ("red striped cushion classic"). Popularity is Zipf:
item ``i`` of popularity rank ``r`` has weight ``r ** -popularity_exponent``.
Each item has an idiosyncratic click bias ``b_i ~ N(0, item_bias_std)`` that
only an ID model can memorise. A fraction ``new_item_fraction`` of items is
released on the first test day (cold start).

**Users.** User ``u`` has tastes ``A_u[category]``, ``C_u[colour]``,
``P_u[pattern]``, all standard normal, and a log-normal activity weight.

**Impressions.** ``num_impressions`` are spread evenly over ``num_days`` days
at uniform random seconds. Each shows a user (drawn by activity) one released
item: with probability ``interest_exposure`` from a category the user likes
(drawn with weights ``exp(2 A_u)``), otherwise from the whole catalogue, by
popularity either way.

**Clicks.** ``P(click) = sigmoid(base_logit + category_weight * A_u[c]
+ visual_weight * (C_u[k] + P_u[p]) / sqrt(2) + b_i)``; then a fraction
``label_noise`` of labels is flipped. ``visual_weight`` is the knob for how
much the visual semantics drive clicks; at 0 pictures carry no signal beyond
their category.

**Histories.** An impression's history is the user's clicks strictly before its
timestamp, the most recent ``max_history``, oldest first.

**Pre-training triplets.** A user photographs an item and buys it: the query
is the item re-rendered with another pose, light, clutter and noise (colour and
pattern kept), or a text query of its attribute words (synonyms, shuffled,
sometimes a word dropped); the positive is the item, the hard negative a
near-duplicate from its family. Training triplets buy released items by
popularity; test triplets have distinct positives drawn from all items.

The last ``test_days`` days are the test split. The hidden variables are
written to ``truth.npz`` for oracles and tests; models never read it.
"""

import dataclasses
import math

import numpy as np

from tfmm.config import SettingsError
from tfmm.data import render
from tfmm.data.history import history_ranges
from tfmm.metrics import auc

T0 = 1_700_000_000  # timestamps start here (seconds)
DAY = 86_400

CATEGORY_WORDS = (("plate", "dish"), ("cushion", "pillow"), ("pennant", "flag"),
                  ("kite", "rhombus"), ("donut", "hoop"), ("plaster", "cross"),
                  ("coaster", "hexagon"), ("brooch", "starfish"), ("pendant", "moon"),
                  ("soap", "oval"), ("fan", "semicircle"), ("photoframe", "frame"))
HUE_WORDS = (("red", "scarlet"), ("orange", "tangerine"), ("yellow", "lemon"),
             ("lime", "chartreuse"), ("green", "emerald"), ("mint", "seafoam"),
             ("cyan", "aqua"), ("azure", "sky"), ("blue", "navy"), ("violet", "purple"),
             ("magenta", "fuchsia"), ("pink", "rose"))
PATTERN_WORDS = (("plain", "solid"), ("striped", "banded"), ("pinstriped", "lined"),
                 ("diagonal", "slanted"), ("dotted", "polka"), ("checkered", "plaid"),
                 ("grid", "lattice"), ("swirl", "spiral"))
STYLE_WORDS = ("classic", "modern", "soft", "premium", "cozy", "deluxe", "mini", "large",
               "handmade", "vintage")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Every knob of the world; `PRESETS` holds tiny, small and large."""

    num_items: int = 4000
    num_users: int = 3000
    num_impressions: int = 300_000
    num_days: int = 8
    test_days: int = 1
    num_categories: int = 8
    num_colours: int = 10
    num_patterns: int = 8
    max_history: int = 50
    new_item_fraction: float = 0.1
    popularity_exponent: float = 1.0
    interest_exposure: float = 0.5
    base_logit: float = -2.5
    category_weight: float = 1.0
    visual_weight: float = 1.0
    item_bias_std: float = 0.5
    label_noise: float = 0.0
    pretrain_train: int = 20_000
    pretrain_test: int = 2_000
    train_shards: int = 1
    seed: int = 0

    def validate(self):
        def need(ok, field, what):
            if not ok:
                raise SettingsError(f"world: --{field}={getattr(self, field)!r}: {what}.")

        for field in ("num_items", "num_users", "num_impressions", "max_history",
                      "pretrain_train", "pretrain_test", "train_shards"):
            need(getattr(self, field) >= 1, field, "must be >= 1")
        need(self.num_items >= 4, "num_items", "must be >= 4")
        need(2 <= self.num_days, "num_days", "must be >= 2")
        need(1 <= self.test_days < self.num_days, "test_days", "must be in [1, num_days)")
        need(1 <= self.num_categories <= len(render.SHAPES), "num_categories",
             f"must be in [1, {len(render.SHAPES)}]")
        need(1 <= self.num_colours <= len(render.COLOURS), "num_colours",
             f"must be in [1, {len(render.COLOURS)}]")
        need(4 <= self.num_patterns <= len(render.PATTERNS), "num_patterns",
             f"must be in [4, {len(render.PATTERNS)}]")
        for field in ("new_item_fraction", "interest_exposure", "label_noise"):
            need(0.0 <= getattr(self, field) <= 1.0, field, "must be in [0, 1]")
        for field in ("popularity_exponent", "item_bias_std", "category_weight", "visual_weight"):
            need(getattr(self, field) >= 0.0 and math.isfinite(getattr(self, field)), field,
                 "must be finite and >= 0")
        need(self.seed >= 0, "seed", "must be >= 0")
        return self

    @property
    def train_days(self):
        return self.num_days - self.test_days


PRESETS = {
    "tiny": WorldConfig(num_items=240, num_users=150, num_impressions=6_000, num_days=4,
                        num_categories=4, num_colours=4, num_patterns=4, max_history=20,
                        pretrain_train=600, pretrain_test=120),
    "small": WorldConfig(),
    "large": WorldConfig(num_items=60_000, num_users=50_000, num_impressions=1_200_000,
                         num_days=10, num_categories=12, num_colours=12, num_patterns=8,
                         pretrain_train=100_000, pretrain_test=5_000, train_shards=8),
}


@dataclasses.dataclass
class World:
    """The generated world, in arrays indexed by item / user / impression number."""

    config: WorldConfig
    # items
    category: np.ndarray
    colour: np.ndarray
    pattern: np.ndarray
    family: np.ndarray
    popularity: np.ndarray
    bias: np.ndarray
    first_day: np.ndarray
    titles: list
    # users
    taste_category: np.ndarray
    taste_colour: np.ndarray
    taste_pattern: np.ndarray
    # impressions, time-ordered
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    label: np.ndarray
    click_probability: np.ndarray
    history_start: np.ndarray
    history_end: np.ndarray
    clicks: np.ndarray  # impression numbers of clicks, by user then time

    def history(self, i):
        """Impression numbers of impression i's history clicks, oldest first."""
        return self.clicks[self.history_start[i]:self.history_end[i]]

    def oracle_aucs(self):
        """Test-day AUC of (the visual oracle, the category-only oracle)."""
        test = (self.timestamp - T0) // DAY >= self.config.train_days
        u, i, y = self.user[test], self.item[test], self.label[test]
        return auc(y, self.affinity(u, i, visual=True)), auc(y, self.affinity(u, i, visual=False))

    def affinity(self, user, item, visual=True):
        """The hidden logit without the item bias: what an oracle knows."""
        c = self.config
        score = c.category_weight * self.taste_category[user, self.category[item]]
        if visual:
            score = score + c.visual_weight * (
                self.taste_colour[user, self.colour[item]]
                + self.taste_pattern[user, self.pattern[item]]) / math.sqrt(2.0)
        return score


def streams(seed):
    # One independent stream per part, so that e.g. more triplets leave the
    # impressions unchanged.
    names = ("catalogue", "users", "impressions", "labels", "images", "pretrain/train",
             "pretrain/test")
    return dict(zip(names, (np.random.default_rng(s)
                            for s in np.random.SeedSequence(seed).spawn(len(names)))))


def _family_sizes(rng, n):
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(2, 4)))
    sizes[-1] -= sum(sizes) - n
    if sizes[-1] < 2:  # fold a lone last item into the family before it (<= 4 patterns)
        lone = sizes.pop()
        sizes[-1] += lone
    return sizes


def _title(rng, category, colour, pattern):
    return " ".join((HUE_WORDS[render.COLOURS[colour]][0], PATTERN_WORDS[pattern][0],
                     CATEGORY_WORDS[category][0], STYLE_WORDS[rng.integers(len(STYLE_WORDS))]))


def query_text(rng, category, colour, pattern):
    """A shopper's text query for an item: attribute words, synonyms, any order."""
    words = [HUE_WORDS[render.COLOURS[colour]][rng.integers(2)],
             PATTERN_WORDS[pattern][rng.integers(2)],
             CATEGORY_WORDS[category][rng.integers(2)]]
    if rng.random() < 0.1:
        del words[rng.integers(3)]
    rng.shuffle(words)
    return " ".join(words)


def _catalogue(cfg, rng):
    sizes = _family_sizes(rng, cfg.num_items)
    category, colour, pattern, family = [], [], [], []
    for f, size in enumerate(sizes):
        c, k = rng.integers(cfg.num_categories), rng.integers(cfg.num_colours)
        for p in rng.choice(cfg.num_patterns, size, replace=False):
            category.append(c), colour.append(k), pattern.append(p), family.append(f)
    category, colour, pattern, family = (np.array(a, np.int64) for a in
                                         (category, colour, pattern, family))
    rank = rng.permutation(cfg.num_items) + 1
    popularity = rank.astype(np.float64) ** -cfg.popularity_exponent
    bias = rng.normal(0.0, cfg.item_bias_std, cfg.num_items)
    first_day = np.where(rng.random(cfg.num_items) < cfg.new_item_fraction, cfg.train_days, 0)
    if not (first_day == 0).any():
        raise SettingsError(f"world: --new_item_fraction={cfg.new_item_fraction} left no "
                            "item for the training days.")
    titles = [_title(rng, *a) for a in zip(category, colour, pattern)]
    return category, colour, pattern, family, popularity, bias, first_day, titles


def _sample_by_weight(rng, candidates, weights, n):
    cum = np.cumsum(weights[candidates])
    return candidates[np.minimum(np.searchsorted(cum, rng.random(n) * cum[-1], side="right"),
                                 len(candidates) - 1)]


def generate(config):
    """Generates the world of `config` (deterministic in `config.seed`)."""
    cfg = config.validate()
    rng = streams(cfg.seed)
    category, colour, pattern, family, popularity, bias, first_day, titles = _catalogue(
        cfg, rng["catalogue"])

    r = rng["users"]
    taste_category = r.normal(size=(cfg.num_users, cfg.num_categories))
    taste_colour = r.normal(size=(cfg.num_users, cfg.num_colours))
    taste_pattern = r.normal(size=(cfg.num_users, cfg.num_patterns))
    activity = r.lognormal(0.0, 1.0, cfg.num_users)

    r = rng["impressions"]
    n = cfg.num_impressions
    day = np.repeat(np.arange(cfg.num_days),
                    np.diff(np.linspace(0, n, cfg.num_days + 1).astype(int)))
    timestamp = T0 + day * DAY + r.integers(0, DAY, n)
    order = np.argsort(timestamp, kind="stable")
    day, timestamp = day[order], timestamp[order]
    user = _sample_by_weight(r, np.arange(cfg.num_users), activity, n)
    interest = r.random(n) < cfg.interest_exposure
    gumbel = -np.log(-np.log(r.random((n, cfg.num_categories))))
    wanted = np.argmax(2.0 * taste_category[user] + gumbel, axis=1)
    item = np.empty(n, np.int64)
    for rows, pool in ((day < cfg.train_days, np.flatnonzero(first_day == 0)),
                       (day >= cfg.train_days, np.arange(cfg.num_items))):
        take = rows & ~interest
        item[take] = _sample_by_weight(r, pool, popularity, take.sum())
        for c in range(cfg.num_categories):
            take = rows & interest & (wanted == c)
            members = pool[category[pool] == c]
            item[take] = _sample_by_weight(r, members if len(members) else pool, popularity,
                                           take.sum())

    r = rng["labels"]
    logit = cfg.base_logit + bias[item] + (
        cfg.category_weight * taste_category[user, category[item]]
        + cfg.visual_weight
        * (taste_colour[user, colour[item]] + taste_pattern[user, pattern[item]])
        / math.sqrt(2.0))
    p = 1.0 / (1.0 + np.exp(-logit))
    label = (r.random(n) < p) ^ (r.random(n) < cfg.label_noise)

    clicks, start, end = history_ranges(user, timestamp, label, cfg.max_history)

    return World(cfg, category, colour, pattern, family, popularity, bias, first_day, titles,
                 taste_category, taste_colour, taste_pattern, user, item, timestamp,
                 label.astype(np.int64), p, start, end, clicks)


def oracle_vectors(category, colour, pattern, config):
    """Unit vectors from the hidden attributes: [one-hot category, colour, pattern] / sqrt(3).

    Two items' dot product is the fraction of attributes they share. A stand-in
    for a perfect encoder, for tests and for upper bounds; models never get
    it unless asked.
    """
    vectors = np.concatenate([np.eye(config.num_categories)[category],
                              np.eye(config.num_colours)[colour],
                              np.eye(config.num_patterns)[pattern]], axis=1)
    return (vectors / np.sqrt(3.0)).astype(np.float32)


def triplets(world, split):
    """Pre-training triplets of `split` ('train' or 'test').

    Returns (positive items, hard-negative items, the Generator that renders
    this split's query images and texts, in order).
    """
    cfg = world.config
    rng = streams(cfg.seed)[f"pretrain/{split}"]
    if split == "train":
        released = np.flatnonzero(world.first_day == 0)
        positive = _sample_by_weight(rng, released, world.popularity, cfg.pretrain_train)
    else:
        positive = rng.choice(cfg.num_items, min(cfg.pretrain_test, cfg.num_items), replace=False)
    members = [np.flatnonzero(world.family == f) for f in range(world.family.max() + 1)]
    negative = np.array([
        rng.choice(members[world.family[i]][members[world.family[i]] != i]) for i in positive
    ], np.int64)
    return positive, negative, rng

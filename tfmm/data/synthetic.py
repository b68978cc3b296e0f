"""Writes a generated world (`tfmm.data.world`) as a tfmm data directory."""

import csv
import dataclasses
import os

import numpy as np
import tensorflow as tf

from tfmm.config import SettingsError
from tfmm.data import render, schema, world as world_lib
from tfmm.data.writer import DataDirWriter


def config_from_flags(preset, overrides):
    """The preset's WorldConfig with every non-None override applied."""
    fields = {f.name for f in dataclasses.fields(world_lib.WorldConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise SettingsError(f"unknown world knobs: {sorted(unknown)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(world_lib.PRESETS[preset], **changes).validate()


def _id(index):
    return int(index) + schema.FIRST_ID


def impression_records(world, rows, is_new):
    for i in rows:
        h = world.history(i)
        yield schema.example(
            ints={"user_id": _id(world.user[i]), "item_id": _id(world.item[i]),
                  "category_id": _id(world.category[world.item[i]]),
                  "timestamp": world.timestamp[i], "label": world.label[i],
                  "is_new_item": is_new[world.item[i]]},
            int_lists={"history_item_ids": world.item[h] + schema.FIRST_ID,
                       "history_category_ids": world.category[world.item[h]] + schema.FIRST_ID,
                       "history_timestamps": world.timestamp[h]},
        )


def catalogue_pngs(world):
    """Each item's catalogue image as PNG bytes, in item order."""
    rng = world_lib.streams(world.config.seed)["images"]
    for i in range(world.config.num_items):
        image = render.catalogue_image(rng, world.category[i], world.colour[i], world.pattern[i])
        yield tf.io.encode_png(image).numpy()


def item_records(world):
    for i, png in enumerate(catalogue_pngs(world)):
        yield schema.example(
            ints={"item_id": _id(i), "category_id": _id(world.category[i]),
                  "first_day": world.first_day[i]},
            strings={"title": world.titles[i].encode(), "image": png},
        )


def triplet_records(world, positive, negative, rng):
    for pos, neg in zip(positive, negative):
        attrs = (world.category[pos], world.colour[pos], world.pattern[pos])
        image = render.query_image(rng, *attrs)
        yield schema.triplet_example(tf.io.encode_jpeg(image, quality=90).numpy(),
                                     world_lib.query_text(rng, *attrs), _id(pos), _id(neg))


def write_world(world, out_dir, flag="out_dir"):
    """Writes `world` as a tfmm data directory at `out_dir` (atomically); a directory
    of user files there is refused, naming `flag`."""
    cfg = world.config
    days = (world.timestamp - world_lib.T0) // world_lib.DAY
    train_rows = np.flatnonzero(days < cfg.train_days)
    test_rows = np.flatnonzero(days >= cfg.train_days)
    is_new = np.ones(cfg.num_items, np.int64)
    is_new[world.item[train_rows]] = 0
    with DataDirWriter(out_dir, flag=flag) as w:
        w.write("impressions/train", impression_records(world, train_rows, is_new),
                len(train_rows), num_shards=cfg.train_shards)
        w.write("impressions/test", impression_records(world, test_rows, is_new), len(test_rows))
        w.write("items", item_records(world), cfg.num_items)
        for split in ("train", "test"):
            positive, negative, rng = world_lib.triplets(world, split)
            w.write(f"pretrain/{split}", triplet_records(world, positive, negative, rng),
                    len(positive))
        np.savez_compressed(
            w.path("truth.npz"),
            **{k: getattr(world, k) for k in (
                "category", "colour", "pattern", "family", "popularity", "bias", "first_day",
                "taste_category", "taste_colour", "taste_pattern")})
        w.finish({
            "source": "synthetic",
            "world": dataclasses.asdict(cfg),
            "vocab": {"num_items": cfg.num_items + schema.FIRST_ID,
                      "num_users": cfg.num_users + schema.FIRST_ID,
                      "num_categories": cfg.num_categories + schema.FIRST_ID},
            "max_history": cfg.max_history,
            "image_size": render.SIZE,
            "side_features": [],
            "train_days": cfg.train_days,
        })


def raw_ids(prefix, index):
    """A raw export's ids: the data directory's dense id behind a letter, e.g. 'i7'."""
    return [f"{prefix}{_id(i)}" for i in index]


def write_raw(world, raw_dir):
    """Writes `world` as the raw files `tfmm.data.prepare` reads (atomically).

    ``impressions.csv`` (user_id, item_id, label, timestamp), ``items.csv``
    (item_id, category_id, title, image) and ``images/<item_id>.png``; ids are
    the generated data directory's as strings (user 'u7', item 'i7', category
    'c7'). ``prepare.flags`` holds the `prepare` flags that split the days as
    the generated data directory does. Returns the path of ``prepare.flags``.
    """
    cfg = world.config
    with DataDirWriter(raw_dir, flag="raw_dir") as w:
        with open(w.path("impressions.csv"), "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["user_id", "item_id", "label", "timestamp"])
            out.writerows(zip(raw_ids("u", world.user), raw_ids("i", world.item),
                              world.label.tolist(), world.timestamp.tolist()))
        os.makedirs(w.path("images"))
        items = raw_ids("i", range(cfg.num_items))
        for item, png in zip(items, catalogue_pngs(world)):
            with open(w.path(os.path.join("images", f"{item}.png")), "wb") as f:
                f.write(png)
        with open(w.path("items.csv"), "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["item_id", "category_id", "title", "image"])
            out.writerows(zip(items, raw_ids("c", world.category), world.titles,
                              (f"{item}.png" for item in items)))
        root = os.path.abspath(raw_dir)
        with open(w.path("prepare.flags"), "w") as f:
            f.write(f"--impressions={root}/impressions.csv\n--items={root}/items.csv\n"
                    f"--images_dir={root}/images\n--max_history={cfg.max_history}\n"
                    # the generated test days: impressions from the first one on
                    f"--split_timestamp={world_lib.T0 + cfg.train_days * world_lib.DAY}\n")
        w.finish(None)
    return os.path.join(raw_dir, "prepare.flags")


def ensure_world(data_dir, preset):
    """`data_dir`, first generated from the `preset` world if it holds no data yet."""
    if not os.path.exists(os.path.join(data_dir, "metadata.json")):
        print(f"generating the {preset} world into {data_dir} ...", flush=True)
        write_world(world_lib.generate(world_lib.PRESETS[preset]), data_dir, "data_dir")
    return data_dir

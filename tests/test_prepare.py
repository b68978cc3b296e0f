"""Bring-your-own logs: `tfmm.data.prepare`."""

import csv
import filecmp
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.test_images import huge_png
from tfmm import data
from tfmm.data import schema
from tfmm.data.prepare import PrepareOptions, prepare

# user, item, label, timestamp, device
LOG = [
    ("alice", "i1", 1, 100, "ios"),
    ("alice", "i2", 0, 105, "ios"),
    ("bob", "i2", 1, 110, "web"),
    ("alice", "i3", 1, 120, "ios"),
    ("alice", "i4", 1, 120, "web"),   # same second: not in each other's history
    ("bob", "i1", 1, 130, "web"),
    ("alice", "i2", 1, 140, "ios"),
    ("alice", "i1", 0, 150, "ios"),
    ("bob", "i3", 0, 160, "web"),
    ("carol", "i2", 1, 170, "tv"),    # test only: an unknown user and device
    ("alice", "i4", 1, 180, "ios"),
    ("bob", "i4", 0, 190, "web"),
]
ITEMS = [("i1", "mug", "red mug"), ("i2", "mug", "blue mug"), ("i3", "lamp", "tall lamp"),
         ("i4", "lamp", "short lamp")]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = ("impressions-train.tfrecord", "impressions-test.tfrecord", "items.tfrecord")


def write_csv(path, header, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture
def inputs(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for item, _, _ in ITEMS:
        pixels = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
        (images / f"{item}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    log = write_csv(tmp_path / "impressions.csv",
                    ["user_id", "item_id", "label", "timestamp", "device"], LOG)
    items = write_csv(tmp_path / "items.csv", ["item_id", "category_id", "title"], ITEMS)
    return tmp_path, log, items, str(images)


def read_split(out, split, max_history=None):
    batches = list(data.impressions(out, split, batch_size=100, max_history=max_history))
    return ({k: np.concatenate([f[k].numpy() for f, _ in batches]) for k in batches[0][0]},
            np.concatenate([y.numpy() for _, y in batches]))


def vocab(out, name):
    with open(os.path.join(out, "vocab", f"{name}.txt")) as f:
        return {i + schema.FIRST_ID: line.strip() for i, line in enumerate(f)}


def test_histories_split_and_vocabularies(inputs):
    tmp, log, items, images = inputs
    out = str(tmp / "out")
    meta = prepare(PrepareOptions(log, items, out, images_dir=images, max_history=2,
                                  test_fraction=0.25))
    assert meta["counts"] == {"impressions/train": 9, "impressions/test": 3, "items": 4}
    assert meta["split_timestamp"] == 170 and meta["side_features"] == ["device"]
    assert meta["oov"] == {"test_users": 1, "test_user_impressions": 1,  # carol, once
                           "unknown_item_impressions": 0}
    users, item_names, devices = vocab(out, "users"), vocab(out, "items"), vocab(out, "side-device")
    assert sorted(users.values()) == ["alice", "bob"]

    rows = []
    for split in ("train", "test"):
        f, y = read_split(out, split)
        for i in range(len(y)):
            rows.append((users.get(f["user_id"][i], "?"), item_names[f["item_id"][i]], int(y[i]),
                         int(f["timestamp"][i]), devices.get(f["device"][i], "?"),
                         [item_names[h] for h in f["history_item_ids"][i][f["history_mask"][i]]],
                         int(f["is_new_item"][i])))
    assert [r[:5] for r in rows] == [
        (u if u != "carol" else "?", i, y, t, d if d != "tv" else "?") for u, i, y, t, d in LOG]
    for (user, item, _, ts, _, history, _), raw in zip(rows, LOG):
        earlier = [it for u, it, lab, t, _ in LOG if u == raw[0] and lab == 1 and t < ts]
        assert history == earlier[-2:], (raw, history)
    assert all(new == 0 for *_, new in rows)  # every item has training impressions

    catalogue = next(iter(data.items(out, batch_size=10)))
    assert catalogue["image"].shape == (4, 64, 64, 3)  # resized from 48x32
    cats = vocab(out, "categories")
    assert [cats[c] for c in catalogue["category_id"].numpy()] == [c for _, c, _ in ITEMS]


def test_parquet_input_gives_the_same_records(inputs):
    import pyarrow as pa  # a dependency: a broken install fails here, never skips
    import pyarrow.parquet as pq

    tmp, log, items, images = inputs
    prepare(PrepareOptions(log, items, str(tmp / "from_csv"), images_dir=images))
    table = pa.table({"user_id": [r[0] for r in LOG], "item_id": [r[1] for r in LOG],
                      "label": [r[2] for r in LOG], "timestamp": [r[3] for r in LOG],
                      "device": [r[4] for r in LOG]})
    pq.write_table(table, tmp / "impressions.parquet")
    prepare(PrepareOptions(str(tmp / "impressions.parquet"), items, str(tmp / "from_parquet"),
                           images_dir=images))
    for name in TABLES:
        assert filecmp.cmp(tmp / "from_csv" / name, tmp / "from_parquet" / name, shallow=False)


def test_parquet_whole_floats_are_integers_and_nan_is_named_at_its_row(inputs):
    import pyarrow as pa  # a dependency of tfmm: never skipped
    import pyarrow.parquet as pq

    tmp, log, items, images = inputs
    prepare(PrepareOptions(log, items, str(tmp / "from_csv"), images_dir=images))
    # pandas stores an integer column holding a missing value as float64
    columns = {"user_id": [r[0] for r in LOG], "item_id": [r[1] for r in LOG],
               "label": [float(r[2]) for r in LOG], "timestamp": [float(r[3]) for r in LOG],
               "device": [r[4] for r in LOG]}
    pq.write_table(pa.table(columns), tmp / "floats.parquet")
    prepare(PrepareOptions(str(tmp / "floats.parquet"), items, str(tmp / "from_floats"),
                           images_dir=images))
    for name in TABLES:
        assert filecmp.cmp(tmp / "from_csv" / name, tmp / "from_floats" / name, shallow=False)
    columns["label"][6] = float("nan")
    pq.write_table(pa.table(columns), tmp / "nan.parquet")
    with pytest.raises(ValueError, match=r"nan.parquet: row 7, column 'label': nan is not an "
                                         r"integer"):
        prepare(PrepareOptions(str(tmp / "nan.parquet"), items, str(tmp / "out"),
                               images_dir=images))


def test_integers_are_read_as_python_int_reads_them(inputs):
    tmp, log, items, images = inputs
    prepare(PrepareOptions(log, items, str(tmp / "plain"), images_dir=images))
    spelled = [(u, i, f" {y}", ("+{}" if k % 2 else "{} ").format(t), d)
               for k, (u, i, y, t, d) in enumerate(LOG)]
    log = write_csv(tmp / "spelled.csv", ["user_id", "item_id", "label", "timestamp", "device"],
                    spelled)
    prepare(PrepareOptions(log, items, str(tmp / "spelled"), images_dir=images))
    for name in TABLES:
        assert filecmp.cmp(tmp / "plain" / name, tmp / "spelled" / name, shallow=False)


def test_timestamps_may_span_all_of_int64(inputs):
    tmp, log, items, images = inputs
    prepare(PrepareOptions(log, items, str(tmp / "original"), images_dir=images))
    extreme = [("alice", "i1", 1, -2**63, "ios")] + LOG[1:-1] + [("bob", "i4", 0, 2**63 - 1, "web")]
    log = write_csv(tmp / "extreme.csv", ["user_id", "item_id", "label", "timestamp", "device"],
                    extreme)
    prepare(PrepareOptions(log, items, str(tmp / "extreme"), images_dir=images))
    for split in ("train", "test"):
        (original, _), (shifted, _) = (read_split(str(tmp / d), split)
                                       for d in ("original", "extreme"))
        np.testing.assert_array_equal(original["history_item_ids"], shifted["history_item_ids"])
    assert shifted["timestamp"][-1] == 2**63 - 1


def test_csv_is_utf8_with_or_without_a_byte_order_mark(inputs):
    tmp, log, items, images = inputs
    items_rows = [(i, c, t + " café") for i, c, t in ITEMS]
    items = write_csv(tmp / "items.csv", ["item_id", "category_id", "title"], items_rows)
    prepare(PrepareOptions(log, items, str(tmp / "plain"), images_dir=images))
    # Excel's "CSV UTF-8" starts every file with a byte order mark
    bom_log = write_csv(tmp / "bom-log.csv", ["user_id", "item_id", "label", "timestamp",
                                              "device"], LOG, encoding="utf-8-sig")
    bom_items = write_csv(tmp / "bom-items.csv", ["item_id", "category_id", "title"],
                          items_rows, encoding="utf-8-sig")
    prepare(PrepareOptions(bom_log, bom_items, str(tmp / "bom"), images_dir=images))
    for name in TABLES:
        assert filecmp.cmp(tmp / "plain" / name, tmp / "bom" / name, shallow=False)
    titles = next(iter(data.items(str(tmp / "bom"), batch_size=10)))["title"].numpy()
    assert [t.decode() for t in titles] == [t for _, _, t in items_rows]


def test_duplicate_impressions_are_counted_and_can_be_dropped(inputs):
    tmp, log, items, images = inputs
    meta = prepare(PrepareOptions(log, items, str(tmp / "original"), images_dir=images))
    assert meta["duplicates"] == {"impressions": 0, "dropped": False}
    rows = LOG + [LOG[0], LOG[4], LOG[0], ("alice", "i1", 1, 100, "web")]  # the last differs
    log = write_csv(tmp / "impressions.csv", ["user_id", "item_id", "label", "timestamp",
                                              "device"], rows)
    meta = prepare(PrepareOptions(log, items, str(tmp / "kept"), images_dir=images))
    assert meta["duplicates"] == {"impressions": 3, "dropped": False}
    assert sum(meta["counts"][f"impressions/{s}"] for s in ("train", "test")) == len(rows)
    meta = prepare(PrepareOptions(log, items, str(tmp / "dropped"), images_dir=images,
                                  drop_duplicates=True))
    assert meta["duplicates"] == {"impressions": 3, "dropped": True}
    assert sum(meta["counts"][f"impressions/{s}"] for s in ("train", "test")) == len(LOG) + 1
    with_web = write_csv(tmp / "with_web.csv", ["user_id", "item_id", "label", "timestamp",
                                                "device"], LOG + rows[-1:])
    prepare(PrepareOptions(with_web, items, str(tmp / "expected"), images_dir=images))
    for name in TABLES:
        assert filecmp.cmp(tmp / "expected" / name, tmp / "dropped" / name, shallow=False)


def test_image_paths_stay_inside_images_dir_unless_absolute_ones_are_allowed(inputs):
    tmp, log, items, images = inputs
    prepare(PrepareOptions(log, items, str(tmp / "by_id"), images_dir=images))
    header = ["item_id", "category_id", "title", "image"]
    os.mkdir(os.path.join(images, "sub"))
    rows = [(i, c, t, f"sub/../{i}.png") for i, c, t in ITEMS]  # ".." that stays inside is fine
    prepare(PrepareOptions(log, write_csv(tmp / "relative.csv", header, rows),
                           str(tmp / "relative"), images_dir=images))
    rows[1] = rows[1][:3] + (os.path.join(images, "i2.png"),)
    absolute = write_csv(tmp / "absolute.csv", header, rows)
    with pytest.raises(ValueError, match=r"absolute.csv: row 3, column 'image': image path "
                                         r"'/.*i2.png' is absolute; pass --absolute_image_paths"):
        prepare(PrepareOptions(log, absolute, str(tmp / "absolute"), images_dir=images))
    prepare(PrepareOptions(log, absolute, str(tmp / "absolute"), images_dir=images,
                           absolute_image_paths=True))
    for out in ("relative", "absolute"):
        assert filecmp.cmp(tmp / "by_id" / "items.tfrecord", tmp / out / "items.tfrecord",
                           shallow=False)


def _bad_inputs(tmp, case):
    log_rows, item_rows = list(LOG), list(ITEMS)
    log_header = ["user_id", "item_id", "label", "timestamp", "device"]
    item_header, items_encoding = ["item_id", "category_id", "title"], "utf-8"
    if case == "missing column":
        log_header, log_rows = log_header[:2] + log_header[3:], [r[:2] + r[3:] for r in LOG]
    elif case == "wrong type":
        log_rows[1] = ("alice", "i2", 0, "noon", "ios")
    elif case == "bad label":
        log_rows[4] = ("alice", "i4", 2, 120, "web")
    elif case == "unknown item":
        log_rows[5] = ("bob", "i9", 1, 130, "web")
    elif case == "duplicate id":
        item_rows.append(("i2", "mug", "again"))
    elif case == "short row":
        log_rows[2] = ("bob", "i2", 1)
    elif case == "huge timestamp":
        log_rows[3] = ("alice", "i3", 1, 2**63, "ios")
    elif case == "header only":
        log_rows = []
    elif case == "blank line":
        log_rows[2] = ()
    elif case == "latin-1":
        item_rows[0] = ("i1", "mug", "red\nmug")  # a quoted line break: rows are not lines
        item_rows[2] = ("i3", "lamp", "tall lampe à pied")
        items_encoding = "latin-1"
    elif case in ("image leaves images_dir", "image absolute"):
        item_header.append("image")
        item_rows = [r + (f"{r[0]}.png",) for r in item_rows]
        bad = "../images/../i2.png" if case == "image leaves images_dir" else "/tmp/i2.png"
        item_rows[1] = item_rows[1][:3] + (bad,)
    elif case == "item id leaves images_dir":
        item_rows.append(("../i1", "mug", "sneaky"))
    log = write_csv(tmp / "impressions.csv", log_header, log_rows)
    items = write_csv(tmp / "items.csv", item_header, item_rows, encoding=items_encoding)
    return log, items


@pytest.mark.parametrize("case, message", [
    ("missing column", r"impressions.csv: missing column\(s\) \['label'\]"),
    ("wrong type", r"impressions.csv: row 3, column 'timestamp': 'noon' is not an integer"),
    ("bad label", r"impressions.csv: row 6, column 'label': 2 is not 0 or 1"),
    ("unknown item", r"impressions.csv: row 7, column 'item_id': 'i9' is not in .*items.csv"),
    ("duplicate id", r"items.csv: row 6: duplicate item_id 'i2' \(first at .*items.csv: row 3\)"),
    ("short row", r"impressions.csv: row 4: 3 fields, the header has 5"),
    ("huge timestamp", r"impressions.csv: row 5, column 'timestamp': '9223372036854775808' is "
                       r"outside the int64 range"),
    ("header only", r"impressions.csv: no data rows"),
    ("blank line", r"impressions.csv: row 4: 0 fields, the header has 5"),
    ("latin-1", r"items.csv: row 4: byte 0xe0 is not UTF-8; save the file as UTF-8"),
    ("image leaves images_dir", r"items.csv: row 3, column 'image': image path "
                                r"'../images/../i2.png' leaves --images_dir="),
    ("image absolute", r"items.csv: row 3, column 'image': image path '/tmp/i2.png' is "
                       r"absolute; pass --absolute_image_paths"),
    ("item id leaves images_dir", r"items.csv: row 6: image path '../i1.png' leaves "
                                  r"--images_dir="),
])
def test_bad_input_names_file_row_and_field_and_keeps_old_output(inputs, case, message):
    tmp, log, items, images = inputs
    out = tmp / "out"
    prepare(PrepareOptions(log, items, str(out), images_dir=images))
    before = {p: (out / p).read_bytes() for p in os.listdir(out) if (out / p).is_file()}
    log, items = _bad_inputs(tmp, case)
    with pytest.raises(ValueError, match=message):
        prepare(PrepareOptions(log, items, str(out), images_dir=images))
    assert {p: (out / p).read_bytes() for p in os.listdir(out) if (out / p).is_file()} == before
    assert sorted(os.listdir(tmp)) == ["images", "impressions.csv", "items.csv", "out"]


def test_undecodable_image_fails_mid_write_without_damage(inputs):
    tmp, log, items, images = inputs
    out = tmp / "out"
    prepare(PrepareOptions(log, items, str(out), images_dir=images))
    before = (out / "impressions-train.tfrecord").read_bytes()
    with open(os.path.join(images, "i3.png"), "wb") as f:
        f.write(b"\x89PNG not really")
    with pytest.raises(ValueError,
                       match=r"i3.png \(item 'i3', .*items.csv: row 4\): does not decode"):
        prepare(PrepareOptions(log, items, str(out), images_dir=images))
    assert (out / "impressions-train.tfrecord").read_bytes() == before
    assert not [p for p in os.listdir(tmp) if ".tmp-" in p]


def test_an_image_over_the_pixel_limit_is_named_before_it_is_decoded(inputs):
    tmp, log, items, images = inputs
    out = tmp / "out"
    prepare(PrepareOptions(log, items, str(out), images))
    before = {p: (out / p).read_bytes() for p in os.listdir(out) if (out / p).is_file()}
    (tmp / "images" / "i3.png").write_bytes(huge_png())  # 49 kB, 1.2 GB decoded
    with pytest.raises(ValueError, match=re.escape(
            f"{images}/i3.png (item 'i3', {items}: row 4): the image is 20000x20000 pixels, "
            "over the limit of 50,000,000 (tfmm.data.images.MAX_PIXELS); downscale it.")):
        prepare(PrepareOptions(log, items, str(out), images))
    assert {p: (out / p).read_bytes() for p in os.listdir(out) if (out / p).is_file()} == before
    assert not [p for p in os.listdir(tmp) if ".tmp-" in p]


def test_unknown_items_can_map_to_oov(inputs):
    tmp, _, items, _ = inputs
    log, _ = _bad_inputs(tmp, "unknown item")
    meta = prepare(PrepareOptions(log, items, str(tmp / "out"), unknown_items="oov"))
    assert meta["oov"]["unknown_item_impressions"] == 1
    f, _ = read_split(str(tmp / "out"), "train")
    assert (f["item_id"] == schema.OOV_ID).sum() == 1


@pytest.mark.slow
def test_cli_reports_bad_input_in_one_line_and_keeps_old_output(inputs):
    tmp, log, items, images = inputs
    out = tmp / "out"
    cmd = [sys.executable, "-m", "tfmm.data.prepare", f"--impressions={log}", f"--items={items}",
           f"--images_dir={images}", f"--out_dir={out}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    write_csv(log, ["user_id", "item_id", "label", "timestamp", "device"], LOG + LOG[:2])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "duplicates {'dropped': False, 'impressions': 2}" in proc.stdout
    assert ("out of vocabulary: 0 test users not in training (0 test impressions, user id 1), "
            "0 impressions of items not in --items (item id 1)") in proc.stdout  # bob at 190
    assert "2 impressions repeat an earlier one in every column; kept (--drop_duplicates " \
           "drops them)." in proc.stdout
    before = json.loads((out / "metadata.json").read_text())
    assert before["duplicates"] == {"impressions": 2, "dropped": False}

    write_csv(log, ["user_id", "item_id", "label", "timestamp", "device"],
              LOG[:5] + [("bob", "i1", 1, 10**30, "web")])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"{log}: row 7, column 'timestamp': '{10**30}' is outside the int64 range.")
    assert json.loads((out / "metadata.json").read_text()) == before

    # A full disk: the process may write 2 KB (its writes past that fail with EFBIG).
    write_csv(log, ["user_id", "item_id", "label", "timestamp", "device"], LOG)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                          preexec_fn=_disk_limit(2048))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.fullmatch(
        rf"{out}: cannot write (impressions/train|impressions/test|items) \(File too large\); "
        rf"{out} is left as it was\.", proc.stderr.strip().splitlines()[-1]), proc.stderr
    assert json.loads((out / "metadata.json").read_text()) == before
    assert sorted(os.listdir(tmp)) == sorted(["impressions.csv", "items.csv", "images", "out"])


def _disk_limit(size):
    """preexec_fn of a process whose files cannot grow past `size` bytes: its writes fail
    with EFBIG, as on a full disk (SIGXFSZ ignored, so the write returns the error)."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def write_parquet(path, columns, compression="snappy"):
    import pyarrow as pa  # a dependency: a broken install fails here, never skips
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, compression=compression)
    return str(path)


def records(out, table):
    """The raw tf.train.Examples of a table, as {feature: python value} dicts."""
    meta = schema.read_metadata(out)
    spec = schema.item_spec() if table == "items" else schema.triplet_spec()
    return [{k: v.numpy() for k, v in tf.io.parse_single_example(r, spec).items()}
            for r in tf.data.TFRecordDataset(schema.files(out, meta, table))]


def test_items_may_lack_images_and_titles_and_parquet_is_known_by_name_or_content(inputs):
    tmp, log, _, images = inputs
    # Parquet nulls and empty strings are both "none"
    columns = {"item_id": ["i1", "i2", "i3", "i4"], "category_id": ["mug", "mug", "lamp", "lamp"],
               "title": ["red mug", "blue mug", None, ""],
               "image": ["i1.png", None, "", "i4.png"]}
    items = write_parquet(tmp / "items.parquet.snappy", columns)
    meta = prepare(PrepareOptions(log, items, str(tmp / "out"), images_dir=images))
    assert meta["missing"] == {"images": 2, "titles": 2}
    written = records(str(tmp / "out"), "items")
    png = {i: (tmp / "images" / f"{i}.png").read_bytes() for i in ("i1", "i4")}
    assert [r["image"] for r in written] == [png["i1"], b"", b"", png["i4"]]
    assert [r["title"] for r in written] == [b"red mug", b"blue mug", b"", b""]
    batch = next(iter(data.items(str(tmp / "out"), batch_size=10)))
    assert batch["has_image"].numpy().tolist() == [True, False, False, True]
    assert not batch["image"].numpy()[1:3].any()  # zeros where there is none

    # Any codec; by content when the name says nothing, or by a .pq name.
    for name, codec in (("x.brotli", "brotli"), ("items.pq", "zstd"), ("i.parquet.gz", "gzip")):
        prepare(PrepareOptions(log, write_parquet(tmp / name, columns, codec),
                               str(tmp / name.replace(".", "_")), images_dir=images))
        assert filecmp.cmp(tmp / "out" / "items.tfrecord",
                           tmp / name.replace(".", "_") / "items.tfrecord", shallow=False)

    # A named file that is not there is a typo, not a missing image.
    columns["image"][1] = "i9.png"
    items = write_parquet(tmp / "items.parquet.snappy", columns)
    with pytest.raises(ValueError, match=r"items.parquet.snappy: row 2, column 'image': image "
                                         r"'i9.png' not found \(looked for .*images/i9.png\)"):
        prepare(PrepareOptions(log, items, str(tmp / "out"), images_dir=images))
    (tmp / "bad.parquet").write_text("item_id\ni1\n")
    with pytest.raises(ValueError, match=r"bad.parquet: not a readable Parquet file"):
        prepare(PrepareOptions(log, str(tmp / "bad.parquet"), str(tmp / "out")))


def test_items_without_an_image_column_may_lack_files_but_not_all_of_them(inputs):
    tmp, log, items, images = inputs
    os.remove(os.path.join(images, "i2.png"))
    meta = prepare(PrepareOptions(log, items, str(tmp / "out"), images_dir=images))
    assert meta["missing"] == {"images": 1, "titles": 0}
    assert [r["image"] == b"" for r in records(str(tmp / "out"), "items")] == [
        False, True, False, False]
    meta = prepare(PrepareOptions(log, items, str(tmp / "no_dir")))
    assert meta["missing"] == {"images": 4, "titles": 0}
    for name in os.listdir(images):
        os.remove(os.path.join(images, name))
    with pytest.raises(ValueError, match=r"items.csv: no item has an image in --images_dir="):
        prepare(PrepareOptions(log, items, str(tmp / "out"), images_dir=images))


def read_triplets(out, split):
    t = next(iter(data.triplets(out, split, batch_size=100)))
    names = vocab(out, "items")
    return [(q.decode(), bool(has), names[p], names[n]) for q, has, p, n in zip(
        t["query_text"].numpy(), t["has_query_image"].numpy(), t["positive_item_id"].numpy(),
        t["negative_item_id"].numpy())], t["query_image"].numpy()


def test_pairs_file_split_by_time_with_given_or_mined_negatives(inputs):
    tmp, log, items, images = inputs
    query = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    (tmp / "images" / "q.png").write_bytes(tf.io.encode_png(query).numpy())
    header = ["query_text", "query_image", "item_id", "timestamp", "negative_item_id"]
    rows = [("mug", "", "i2", 175, ""), ("red cup", "", "i1", 100, ""),
            ("", "q.png", "i3", 180, "i1"), ("lamp", "q.png", "i4", 120, "")]
    pairs = write_csv(tmp / "pairs.csv", header, rows, encoding="utf-8-sig")
    meta = prepare(PrepareOptions(log, items, str(tmp / "out"), images_dir=images,
                                  test_fraction=0.25, pairs=pairs))
    assert meta["split_timestamp"] == 170  # the impressions' split, for the pairs too
    assert meta["pairs"] == {"source": pairs, "skipped_unknown": 0, "train": 2, "test": 2,
                             "mined_negatives": 3, "seed": 0}
    assert meta["counts"]["pretrain/train"] == 2 and meta["counts"]["pretrain/test"] == 2
    # in time order; mined negatives are the positive's category's other item
    train, train_images = read_triplets(str(tmp / "out"), "train")
    assert train == [("red cup", False, "i1", "i2"), ("lamp", True, "i4", "i3")]
    np.testing.assert_array_equal(train_images[1], query)
    assert not train_images[0].any()
    assert read_triplets(str(tmp / "out"), "test")[0] == [("mug", False, "i2", "i1"),
                                                          ("", True, "i3", "i1")]

    # Without timestamps: file order, the last --test_fraction of the rows are test.
    # An unknown item fails, or with --unknown_items=oov its pair is skipped and counted.
    rows = [r[:3] + r[4:] for r in rows] + [("vase", "", "i9", "")]
    pairs = write_csv(tmp / "pairs.csv", header[:3] + header[4:], rows)
    with pytest.raises(ValueError, match=r"pairs.csv: row 6, column 'item_id': 'i9' is not in "
                                         r".*items.csv \(1 such rows; --unknown_items=oov "
                                         r"skips those pairs\)"):
        prepare(PrepareOptions(log, items, str(tmp / "out"), images_dir=images, pairs=pairs))
    meta = prepare(PrepareOptions(log, items, str(tmp / "out"), images_dir=images,
                                  test_fraction=0.25, pairs=pairs, unknown_items="oov"))
    assert meta["pairs"]["skipped_unknown"] == 1
    assert [t[2] for t in read_triplets(str(tmp / "out"), "train")[0]] == ["i2", "i1", "i3"]
    assert [t[2] for t in read_triplets(str(tmp / "out"), "test")[0]] == ["i4"]


def test_records_with_images_are_serialised_in_runs_of_bounded_bytes(inputs, monkeypatch):
    from tfmm.data import tables as module

    tmp, log, items, images = inputs
    sizes = [10, 20, 30, None, 5, 50, 1]
    paths = []
    for k, size in enumerate(sizes):
        paths.append(None if size is None else str(tmp / f"f{k}"))
        if size is not None:
            (tmp / f"f{k}").write_bytes(b"x" * size)
    monkeypatch.setattr(module, "IMAGE_BYTES_PER_CHUNK", 30)
    # Up to 30 bytes of files a run; a file alone past it is a run of its own.
    assert [list(r) for r in module.image_chunks(range(7), paths)] == [
        [0, 1], [2, 3], [4], [5], [6]]
    monkeypatch.setattr(module, "RECORDS_PER_CHUNK", 1)
    assert [list(r) for r in module.image_chunks(np.array([3, 4]), paths)] == [[3], [4]]

    # The catalogue and pairs with query photos are the same records in runs of any size.
    (tmp / "images" / "q.png").write_bytes((tmp / "images" / "i1.png").read_bytes())
    pairs = write_csv(tmp / "pairs.csv", ["query_image", "item_id", "timestamp"],
                      [("q.png", "i2", 100), ("i3.png", "i1", 120), ("q.png", "i4", 195)])
    monkeypatch.setattr(module, "IMAGE_BYTES_PER_CHUNK", 1)  # one image a run
    prepare(PrepareOptions(log, items, str(tmp / "small-runs"), images_dir=images, pairs=pairs))
    monkeypatch.undo()
    prepare(PrepareOptions(log, items, str(tmp / "out"), images_dir=images, pairs=pairs))
    for table in ("items", "pretrain-train", "pretrain-test"):
        assert filecmp.cmp(tmp / "out" / f"{table}.tfrecord",
                           tmp / "small-runs" / f"{table}.tfrecord", shallow=False), table


@pytest.mark.parametrize("rows, message", [
    ([("mug", "i1", "i1")], r"pairs.csv: row 2, column 'negative_item_id': 'i1' is the pair's "
                            r"own item_id"),
    ([("mug", "i1", ""), ("", "i2", "")], r"pairs.csv: row 3: no query: both 'query_text' and "
                                          r"'query_image' are empty"),
    ([("mug", "i1", "i7")], r"pairs.csv: row 2, column 'negative_item_id': 'i7' is not in"),
])
def test_bad_pairs_are_named_by_row(inputs, rows, message):
    tmp, log, items, _ = inputs
    pairs = write_csv(tmp / "pairs.csv", ["query_text", "item_id", "negative_item_id"],
                      rows + [("lamp", "i3", "")] * 3)
    with pytest.raises(ValueError, match=message):
        prepare(PrepareOptions(log, items, str(tmp / "out"), pairs=pairs))


def test_mined_negatives_share_the_category_and_are_never_the_positive():
    from tfmm.data.pairs import hard_negatives

    # ids 2..7: categories 10, 10, 10, 11, 11, 12 (12 has no other item)
    category_of = np.array([0, 0, 10, 10, 10, 11, 11, 12])
    positive = np.repeat([2, 3, 5, 7], 300)
    negative = hard_negatives(positive, category_of, np.random.default_rng(0))
    assert (negative != positive).all()
    for p, others in ((2, {3, 4}), (3, {2, 4}), (5, {6}), (7, {2, 3, 4, 5, 6})):
        assert set(negative[positive == p]) == others  # every other member, uniformly drawn
    np.testing.assert_array_equal(
        negative, hard_negatives(positive, category_of, np.random.default_rng(0)))


def test_mined_negatives_drawn_per_pair_do_not_depend_on_the_other_pairs():
    """`PairDraws`: each pair's negative is a function of the seed and its key alone, so
    a pipeline meeting the pairs in any order and batches draws the same ones."""
    from tfmm.data.pairs import HardNegatives, PairDraws

    category_of = np.array([0, 0, 10, 10, 10, 11, 11, 12])
    negatives = HardNegatives(category_of)
    positive = np.repeat([2, 3, 5, 7], 300)
    keys = np.stack([positive, np.arange(len(positive)) * 7919 - 500], 1)  # any int64s
    negative = negatives(positive, PairDraws(0, keys))
    assert (negative != positive).all()
    for p, others in ((2, {3, 4}), (3, {2, 4}), (5, {6}), (7, {2, 3, 4, 5, 6})):
        drawn = negative[positive == p]
        assert set(drawn) == others
        counts = np.unique(drawn, return_counts=True)[1]  # about uniform: 300 over the others
        assert counts.min() > 300 / len(others) * 0.7, counts
    order = np.random.default_rng(1).permutation(len(positive))
    np.testing.assert_array_equal(negatives(positive[order], PairDraws(0, keys[order])),
                                  negative[order])
    np.testing.assert_array_equal(negatives(positive[:5], PairDraws(0, keys[:5])), negative[:5])
    assert (negatives(positive, PairDraws(1, keys)) != negative).mean() > 0.3  # the seed counts


# The log plus test-split clicks: alice i4@180 -> i1@185 (a test pair), bob i1@130 (train)
# -> i3@195 (test: no pair across the split), carol i2@170 -> i2@200 (one item: no pair).
CLICKS = LOG + [("alice", "i1", 1, 185, "ios"), ("bob", "i3", 1, 195, "web"),
                ("carol", "i2", 1, 200, "tv")]


@pytest.mark.parametrize("window, max_gap, train, test", [
    (1, None, [("i1", "i3"), ("i3", "i4"), ("i2", "i1"), ("i4", "i2")], [("i4", "i1")]),
    # two clicks ahead adds i1 -> i4 and i3 -> i2; a gap of 19 keeps only i3 -> i4 (both at 120)
    (2, None, [("i1", "i3"), ("i1", "i4"), ("i3", "i4"), ("i2", "i1"), ("i3", "i2"),
               ("i4", "i2")], [("i4", "i1")]),
    (2, 19, [("i3", "i4")], [("i4", "i1")]),
])
def test_pairs_from_clicks_stay_within_their_split(inputs, window, max_gap, train, test):
    tmp, _, items, images = inputs
    log = write_csv(tmp / "clicks.csv", ["user_id", "item_id", "label", "timestamp", "device"],
                    CLICKS)
    out = str(tmp / "out")
    meta = prepare(PrepareOptions(log, items, out, images_dir=images, split_timestamp=170,
                                  pairs_from="clicks", pair_window=window, pair_max_gap=max_gap))
    assert meta["pairs"] == {"source": "clicks", "window": window, "max_gap": max_gap,
                             "train": len(train), "test": len(test),
                             "mined_negatives": len(train) + len(test), "seed": 0}
    names = vocab(out, "items")
    other = {"i1": "i2", "i2": "i1", "i3": "i4", "i4": "i3"}  # the same category's other item
    for split, expected in (("train", train), ("test", test)):
        # the query is the first item, by id: no image or title of its own (pre-training
        # reads the catalogue's); the negative from the positive's category
        got = [(names[r["query_item_id"]], r["query_image"], r["query_text"],
                names[r["positive_item_id"]], names[r["negative_item_id"]])
               for r in records(out, f"pretrain/{split}")]
        assert got == [(a, b"", b"", b, other[b]) for a, b in expected]


@pytest.mark.slow
def test_cli_writes_pairs_and_missing_counts_in_its_line(inputs):
    tmp, _, _, images = inputs
    log = write_csv(tmp / "clicks.csv", ["user_id", "item_id", "label", "timestamp", "device"],
                    CLICKS)
    items = write_parquet(tmp / "items.parquet.snappy",
                          {"item_id": ["i1", "i2", "i3", "i4"], "title": ["a", "", "c", "d"],
                           "image": ["i1.png", "", "i3.png", "i4.png"]})
    cmd = [sys.executable, "-m", "tfmm.data.prepare", f"--impressions={log}", f"--items={items}",
           f"--images_dir={images}", f"--out_dir={tmp / 'out'}", "--split_timestamp=170"]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # quiet by default
    proc = subprocess.run(cmd + ["--pairs_from=clicks"], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "items without {'images': 1, 'titles': 1}, pairs {'max_gap': None, " \
           "'mined_negatives': 5, 'seed': 0, 'source': 'clicks', 'test': 1, 'train': 4, " \
           "'window': 1}" in proc.stdout
    assert len(list(data.triplets(str(tmp / "out"), "train"))) == 1  # one batch of 4

    proc = subprocess.run(cmd + ["--pairs_from=clicks", f"--pairs={log}"], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"--pairs={log} and --pairs_from=clicks: pass one of them."


def reference_records(log, items, max_history, split_timestamp, drop_duplicates=False):
    """The impressions and vocabularies `prepare` must write, straight from the rows:
    (train features, test features, {vocab name: raw ids by dense id - 2})."""
    def dense(values):
        return {v: k + schema.FIRST_ID for k, v in enumerate(sorted(set(values)))}

    item_id, category_id = dense(i for i, _ in items), dense(c for _, c in items)
    category_of = {item_id[i]: category_id[c] for i, c in items}
    if drop_duplicates:
        log = [r for k, r in enumerate(log) if r not in log[:k]]
    order = sorted(range(len(log)), key=lambda k: log[k][3])
    train = [k for k in order if log[k][3] < split_timestamp]
    test = [k for k in order if log[k][3] >= split_timestamp]
    vocabs = {"users": dense(log[k][0] for k in train), "items": item_id,
              "categories": category_id, "side-device": dense(log[k][4] for k in train)}
    trained = {item_id.get(log[k][1], schema.OOV_ID) for k in train}

    def features(k):
        user, item, label, t, device = log[k]
        item = item_id.get(item, schema.OOV_ID)
        clicks = sorted((log[j][3], j) for j in range(len(log))
                        if log[j][0] == user and log[j][2] == 1 and log[j][3] < t)
        history = [item_id.get(log[j][1], schema.OOV_ID) for _, j in clicks][-max_history:]
        return {"user_id": [vocabs["users"].get(user, schema.OOV_ID)], "item_id": [item],
                "category_id": [category_of.get(item, schema.OOV_ID)], "timestamp": [t],
                "label": [label], "is_new_item": [int(item not in trained)],
                "device": [vocabs["side-device"].get(device, schema.OOV_ID)],
                "history_item_ids": history,
                "history_category_ids": [category_of.get(h, schema.OOV_ID) for h in history],
                "history_timestamps": [t for t, _ in clicks][-max_history:]}

    return ([features(k) for k in train], [features(k) for k in test],
            {name: sorted(v, key=v.get) for name, v in vocabs.items()})


def parsed(out, table):
    """Each record of a table as {feature: list of values}, in file order."""
    meta = schema.read_metadata(out)
    examples = [tf.train.Example.FromString(r.numpy()) for r in
                tf.data.TFRecordDataset(schema.files(out, meta, table))]
    return [{k: list(f.int64_list.value) or list(f.bytes_list.value)
             for k, f in e.features.feature.items()} for e in examples]


@pytest.mark.parametrize("drop_duplicates", [False, True])
def test_records_and_vocabularies_equal_a_row_by_row_reference(tmp_path, drop_duplicates):
    rng = np.random.default_rng(7)
    items = [(f"item {k}, \"{chr(0xe9) * (k % 3)}\"", f"c{k % 4}") for k in range(12)]
    users = [f"user-{k}" for k in range(9)]
    log = [(users[rng.integers(0, 6 if t < 150 else 9)],  # users 6..8 only in test: OOV
            items[rng.integers(0, 12)][0] if rng.random() > 0.05 else "unknown",
            int(rng.random() < 0.4), int(t), ["ios", "web", "tv"][rng.integers(0, 3)])
           for t in rng.integers(0, 200, 400)]
    log += [log[k] for k in rng.integers(0, len(log), 30)]  # exact duplicates, anywhere
    path = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "label", "timestamp", "device"],
                     log)
    items_path = write_csv(tmp_path / "items.csv", ["item_id", "category_id"], items)
    out = str(tmp_path / "out")
    meta = prepare(PrepareOptions(path, items_path, out, max_history=4, split_timestamp=150,
                                  unknown_items="oov", drop_duplicates=drop_duplicates))
    train, test, vocabs = reference_records(log, items, 4, 150, drop_duplicates)
    assert parsed(out, "impressions/train") == train
    assert parsed(out, "impressions/test") == test
    for name, raw in vocabs.items():
        assert list(vocab(out, name).values()) == raw, name
    # Users and their impressions, each counted as what it is: 3 users, many impressions.
    unseen = {r[0] for r in log if r[3] >= 150} - {r[0] for r in log if r[3] < 150}
    assert meta["oov"]["test_users"] == len(unseen) == 3
    assert meta["oov"]["test_user_impressions"] == sum(
        r["user_id"] == [schema.OOV_ID] for r in test) > 3
    assert meta["oov"]["unknown_item_impressions"] == sum(
        r["item_id"] == [schema.OOV_ID] for r in train + test) > 0
    assert meta["duplicates"]["impressions"] == len(log) - len(set(log)) > 0


def test_pairs_from_clicks_equal_a_row_by_row_reference(tmp_path):
    rng = np.random.default_rng(3)
    items = [(f"i{k}", f"c{k % 3}", f"title {k}") for k in range(9)]
    log = [(f"u{rng.integers(0, 5)}", f"i{rng.integers(0, 9)}", int(rng.random() < 0.6),
            int(t), "d") for t in rng.integers(0, 100, 200)]
    path = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "label", "timestamp", "device"],
                     log)
    items_path = write_csv(tmp_path / "items.csv", ["item_id", "category_id", "title"], items)
    out = str(tmp_path / "out")
    prepare(PrepareOptions(path, items_path, out, split_timestamp=70, pairs_from="clicks"))
    # Consecutive clicks of a user (ties in file order), in one split, of two items;
    # written in time order of the second click.
    clicks = sorted((u, t, k) for k, (u, _, label, t, _) in enumerate(log) if label)
    pairs = sorted((b[1], b[2], a[2]) for a, b in zip(clicks, clicks[1:])
                   if a[0] == b[0] and (a[1] >= 70) == (b[1] >= 70)
                   and log[a[2]][1] != log[b[2]][1])
    names, category = vocab(out, "items"), {i: c for i, c, _ in items}
    got = parsed(out, "pretrain/train") + parsed(out, "pretrain/test")
    assert [(names[r["query_item_id"][0]], names[r["positive_item_id"][0]]) for r in got] == [
        (log[a][1], log[b][1]) for _, b, a in pairs]
    assert {(*r["query_image"], *r["query_text"]) for r in got} == {(b"", b"")}
    for r in got:
        positive, negative = (names[r[k][0]] for k in ("positive_item_id", "negative_item_id"))
        assert negative != positive and category[negative] == category[positive]

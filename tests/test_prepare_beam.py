"""`tfmm.data.prepare --runner=...`: the Beam pipeline gives the local path's output."""

import collections
import filecmp
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("apache_beam")

from tfmm import data
from tfmm.data import schema
from tfmm.data import world as world_lib
from tfmm.data.prepare import PrepareOptions, prepare
from tfmm.data.synthetic import write_raw
from tests.test_prepare import CLICKS, ITEMS, LOG, ROOT, _bad_inputs, write_csv

HEADER = ["user_id", "item_id", "label", "timestamp", "device"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
           PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))


def prepare_beam(*args, **kwargs):
    """`prepare` with ``--runner=DirectRunner``."""
    return prepare(PrepareOptions(*args, runner="DirectRunner", **kwargs))


def tables(out):
    """Each table's records as a multiset of parsed examples and one of their bytes."""
    meta = schema.read_metadata(out)
    parsed, raw = {}, {}
    for table in meta["files"]:
        examples, raw[table] = collections.Counter(), collections.Counter()
        for record in tf.data.TFRecordDataset(schema.files(out, meta, table)):
            raw[table][record.numpy()] += 1
            features = tf.train.Example.FromString(record.numpy()).features.feature
            examples[tuple(sorted((k, tuple(v.int64_list.value) or tuple(v.bytes_list.value))
                                  for k, v in features.items()))] += 1
        parsed[table] = examples
    return meta, parsed, raw


def assert_same(local_out, beam_out, differ=("files",)):
    """The same records, vocabularies and metadata but for the fields `differ`."""
    local_meta, local_tables, local_bytes = tables(local_out)
    beam_meta, beam_tables, beam_bytes = tables(beam_out)
    assert beam_tables == local_tables
    # Row by row (schema.example) in the pipeline, in bulk (schema.examples) locally.
    assert beam_bytes == local_bytes
    assert {k: v for k, v in beam_meta.items() if k not in differ + ("runner",)} == \
        {k: v for k, v in local_meta.items() if k not in differ}
    assert beam_meta["runner"] == "DirectRunner"
    names = sorted(os.listdir(os.path.join(local_out, "vocab")))
    assert sorted(os.listdir(os.path.join(beam_out, "vocab"))) == names
    for name in names:
        assert filecmp.cmp(os.path.join(local_out, "vocab", name),
                           os.path.join(beam_out, "vocab", name), shallow=False), name
    return beam_meta


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw") / "tiny"
    flagfile = write_raw(world_lib.generate(world_lib.PRESETS["tiny"]), raw)
    with open(flagfile) as f:
        flags = dict(line.strip().lstrip("-").split("=", 1) for line in f if line.strip())
    return (flags.pop("impressions"), flags.pop("items"),
            dict(images_dir=flags.pop("images_dir"), max_history=int(flags.pop("max_history")),
                 split_timestamp=int(flags.pop("split_timestamp")), **flags))


@pytest.mark.slow  # tens of seconds or more: the full suite runs it, the fast loop not
def test_tiny_world_gives_the_local_vocabularies_and_examples(tiny_raw, tmp_path):
    log, items, kwargs = tiny_raw
    # Click pairs too: the same pairs and mined negatives, whatever order the pipeline
    # meets them in.
    kwargs = dict(kwargs, pairs_from="clicks", pair_window=2)
    prepare(PrepareOptions(log, items, str(tmp_path / "local"), **kwargs))
    meta = prepare_beam(log, items, str(tmp_path / "beam"), **kwargs,
                        beam_args=("--direct_num_workers=1",))
    assert_same(tmp_path / "local", tmp_path / "beam")
    assert meta["counts"]["impressions/train"] > 0 and meta["counts"]["impressions/test"] > 0
    assert meta["counts"]["pretrain/train"] > 1000 and meta["counts"]["pretrain/test"] > 100
    assert meta["pairs"]["mined_negatives"] == sum(meta["counts"][f"pretrain/{s}"]
                                                   for s in ("train", "test"))
    # The readers take the Beam directory as it is.
    for split in ("train", "test"):
        labels = np.concatenate([y.numpy() for _, y in data.impressions(
            str(tmp_path / "beam"), split, batch_size=512, max_history=kwargs["max_history"])])
        local = np.concatenate([y.numpy() for _, y in data.impressions(
            str(tmp_path / "local"), split, batch_size=512, max_history=kwargs["max_history"])])
        assert len(labels) == meta["counts"][f"impressions/{split}"]
        assert labels.sum() == local.sum()
    assert sum(1 for _ in data.items(str(tmp_path / "beam"), batch_size=64).unbatch()) == \
        meta["counts"]["items"]


@pytest.fixture
def inputs(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for item, _, _ in ITEMS[:3]:  # i4 has no image
        pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        (images / f"{item}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    items = write_csv(tmp_path / "items.csv", ["item_id", "category_id", "title"],
                      ITEMS[:3] + [("i4", "lamp", "")])
    return tmp_path, items, str(images)


# Duplicates (rows 1 and 13; a click tie at 120), an unknown item, and a test-only user
# (carol, twice: one user, two impressions).
MORE = LOG + [("alice", "i1", 1, 100, "ios"), ("bob", "i9", 1, 125, "web"),
              ("bob", "i1", 1, 120, "tv"), ("alice", "i1", 1, 100, "ios"),
              ("carol", "i3", 0, 195, "tv")]


@pytest.mark.parametrize("kwargs", [
    dict(test_fraction=0.25, max_history=2, unknown_items="oov"),
    dict(test_fraction=0.4, max_history=3, unknown_items="oov", drop_duplicates=True),
    dict(split_timestamp=150, unknown_items="oov", images_dir=None),
])
def test_log_in_shards_gives_the_local_output_of_the_whole_log(inputs, kwargs):
    tmp, items, images = inputs
    log = write_csv(tmp / "log.csv", HEADER, MORE)
    write_csv(tmp / "part-0.csv", HEADER, MORE[:7])
    write_csv(tmp / "part-1.csv", HEADER, MORE[7:])
    kwargs = dict(dict(images_dir=images), **kwargs)
    prepare(PrepareOptions(log, items, str(tmp / "local"), **kwargs))
    prepare_beam(str(tmp / "part-*.csv"), items, str(tmp / "beam"), **kwargs)
    meta = assert_same(tmp / "local", tmp / "beam", differ=("files", "inputs"))
    assert meta["inputs"]["impressions"] == str(tmp / "part-*.csv")
    assert meta["duplicates"]["impressions"] == 2 and meta["oov"]["unknown_item_impressions"] == 1
    assert meta["missing"] == {"images": 1 if kwargs["images_dir"] else 4, "titles": 1}
    assert meta["side_features"] == ["device"]
    assert meta["oov"]["test_users"] == 1 and meta["oov"]["test_user_impressions"] == 2


def pairs_file(tmp, images, timestamps=True):
    """Query texts and photos, given and mined negatives, an unknown item."""
    rng = np.random.default_rng(1)
    for name in ("q1.png", "q2.png"):
        pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        (tmp / "images" / name).write_bytes(tf.io.encode_png(pixels).numpy())
    header = ["query_text", "query_image", "item_id", "timestamp", "negative_item_id"]
    rows = [("mug", "", "i2", 175, ""), ("red cup", "", "i1", 100, ""),
            ("", "q1.png", "i3", 180, "i1"), ("lamp", "q2.png", "i4", 120, ""),
            ("vase", "", "i9", 130, ""), ("mug", "q2.png", "i2", 175, ""),
            ("cup", "q1.png", "i1", 110, "i3")]
    if not timestamps:
        header, rows = header[:3] + header[4:], [r[:3] + r[4:] for r in rows]
    return write_csv(tmp / "pairs.csv", header, rows)


@pytest.mark.parametrize("case", [
    "clicks", pytest.param("clicks, window 2, gap 19, duplicates dropped", marks=pytest.mark.slow),
    "file", pytest.param("file without timestamps", marks=pytest.mark.slow)])
def test_pairs_give_the_local_records(inputs, case):
    tmp, items, images = inputs
    write_csv(tmp / "part-0.csv", HEADER, CLICKS[:8] + MORE[12:14])
    write_csv(tmp / "part-1.csv", HEADER, CLICKS[8:])
    log = write_csv(tmp / "log.csv", HEADER, CLICKS[:8] + MORE[12:14] + CLICKS[8:])
    kwargs = dict(images_dir=images, split_timestamp=170, unknown_items="oov", seed=3)
    if case.startswith("clicks"):
        kwargs.update(pairs_from="clicks")
        if "window 2" in case:
            kwargs.update(pair_window=2, pair_max_gap=19, drop_duplicates=True)
    else:
        kwargs.update(pairs=pairs_file(tmp, images, timestamps="without" not in case),
                      test_fraction=0.3)
    local = prepare(PrepareOptions(log, items, str(tmp / "local"), **kwargs))
    prepare_beam(str(tmp / "part-*.csv"), items, str(tmp / "beam"), **kwargs)
    meta = assert_same(tmp / "local", tmp / "beam", differ=("files", "inputs"))
    assert meta["pairs"] == local["pairs"] and meta["pairs"]["seed"] == 3
    assert meta["counts"]["pretrain/train"] > 0 and meta["counts"]["pretrain/test"] > 0
    if case.startswith("file"):
        assert meta["pairs"]["skipped_unknown"] == 1 and meta["pairs"]["mined_negatives"] == 4


@pytest.mark.parametrize("case", ["no test click pairs",
                                  pytest.param("bad pair row", marks=pytest.mark.slow),
                                  "bad query photo"])
def test_bad_pairs_give_the_local_error_and_keep_old_output(inputs, case):
    tmp, items, images = inputs
    out = tmp / "out"
    log = write_csv(tmp / "impressions.csv", HEADER, CLICKS)
    prepare(PrepareOptions(log, items, str(out), images_dir=images))
    before = {p: (out / p).read_bytes() for p in os.listdir(out) if (out / p).is_file()}
    kwargs = dict(images_dir=images, split_timestamp=170)
    if case == "no test click pairs":
        kwargs.update(pairs_from="clicks", split_timestamp=186)
    else:
        # i9 is unknown: an error without --unknown_items=oov
        kwargs.update(pairs=pairs_file(tmp, images))
        if case == "bad query photo":
            kwargs.update(unknown_items="oov")
            (tmp / "images" / "q2.png").write_bytes(b"not a png")
    with pytest.raises(ValueError) as expected:
        prepare(PrepareOptions(log, items, str(tmp / "local"), **kwargs))
    with pytest.raises(ValueError) as got:
        prepare_beam(log, items, str(out), **kwargs)
    assert str(got.value) == str(expected.value)
    assert {"no test click pairs": "no test pairs", "bad pair row": "'i9' is not in",
            "bad query photo": "q2.png"}[case] in str(got.value)
    assert {p: (out / p).read_bytes() for p in os.listdir(out) if (out / p).is_file()} == before


# One of each kind: a log file's, an unknown item (counted over the log), an items file's,
# an image path's, an empty split (from the global timestamp counts).
@pytest.mark.parametrize("case", ["wrong type", "unknown item", "duplicate id",
                                  "image leaves images_dir", "empty split"])
def test_bad_input_gives_the_local_error_and_keeps_old_output(inputs, case):
    tmp, items, images = inputs
    out = tmp / "out"
    prepare(PrepareOptions(write_csv(tmp / "impressions.csv", HEADER, LOG), items, str(out),
                           images_dir=images))
    before = {p: (out / p).read_bytes() for p in os.listdir(out) if (out / p).is_file()}
    log, items = _bad_inputs(tmp, "unknown item" if case == "empty split" else case)
    kwargs = dict(images_dir=images, unknown_items="oov" if case == "empty split" else "error",
                  split_timestamp=10**6 if case == "empty split" else None)
    with pytest.raises(ValueError) as expected:
        prepare(PrepareOptions(log, items, str(tmp / "local"), **kwargs))
    with pytest.raises(ValueError) as got:
        prepare_beam(log, items, str(out), **kwargs)
    assert str(got.value) == str(expected.value)
    assert {p: (out / p).read_bytes() for p in os.listdir(out) if (out / p).is_file()} == before
    assert not [p for p in os.listdir(tmp) if ".tmp-" in p]


def test_an_item_in_two_files_is_named_with_both_rows(inputs):
    tmp, _, images = inputs
    write_csv(tmp / "items-0.csv", ["item_id", "category_id", "title"], ITEMS)
    write_csv(tmp / "items-1.csv", ["item_id", "category_id", "title"], [("i2", "mug", "again")])
    log = write_csv(tmp / "impressions.csv", HEADER, LOG)
    with pytest.raises(ValueError, match=r"items-1.csv: row 2: duplicate item_id 'i2' \(first "
                                         r"at .*items-0.csv: row 3\)"):
        prepare_beam(log, str(tmp / "items-*.csv"), str(tmp / "out"))


def test_without_a_checksum_module_it_names_the_extra(inputs, monkeypatch):
    tmp, items, images = inputs
    for module in ("crcmod", "google_crc32c", "snappy"):
        monkeypatch.setitem(sys.modules, module, None)  # not installed
    with pytest.raises(ValueError, match=r'crcmod .* not installed: pip install -e "\.\[beam\]"'):
        prepare_beam(write_csv(tmp / "impressions.csv", HEADER, LOG), items, str(tmp / "out"))
    assert sorted(os.listdir(tmp)) == ["images", "impressions.csv", "items.csv"]


def run_cli(*args, block_beam=False):
    # A user without the beam extra: apache_beam cannot be imported.
    code = ("import runpy, sys; sys.modules['apache_beam'] = None; sys.argv[0] = 'prepare'; "
            "runpy.run_module('tfmm.data.prepare', run_name='__main__')") if block_beam else None
    command = [sys.executable] + (["-c", code] if code else ["-m", "tfmm.data.prepare"])
    return subprocess.run(command + list(args), env=ENV, cwd=ROOT, capture_output=True,
                          text=True)


@pytest.mark.slow
def test_cli_passes_pipeline_options_and_names_the_extra_without_beam(inputs):
    tmp, items, images = inputs
    log = write_csv(tmp / "impressions.csv", HEADER, LOG)
    common = [f"--impressions={log}", f"--items={items}", f"--images_dir={images}",
              f"--out_dir={tmp / 'out'}"]
    done = run_cli(*common, "--runner=DirectRunner", "--", "--direct_num_workers=1",
                   "--direct_running_mode=in_memory")
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp / 'out'}: " in done.stdout
    assert schema.read_metadata(tmp / "out")["runner"] == "DirectRunner"
    # Quiet by default: none of Beam's Python INFO lines ("I1130 12:00:00.1 140 x.py:449] ...").
    assert not re.search(r"^I\d{4} [\d:.]+ +\d+ \S+\.py:\d+\]", done.stderr, re.M), (
        done.stderr[-2000:])

    refused = run_cli(*common, "--runner=DirectRunner", block_beam=True)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        '--runner=DirectRunner needs Apache Beam, an extra of tfmm: pip install -e ".[beam]"')
    assert "Traceback" not in refused.stderr
    stray = run_cli(*common, "--", "--direct_num_workers=1")
    assert stray.returncode == 1 and "pipeline options need --runner" in stray.stderr
    clicks = write_csv(tmp / "clicks.csv", HEADER, CLICKS)
    pairs = run_cli(f"--impressions={clicks}", *common[1:], "--split_timestamp=170",
                    "--runner=DirectRunner", "--pairs_from=clicks")
    assert pairs.returncode == 0, pairs.stderr
    assert "pairs {'max_gap': None, 'mined_negatives': 5, " in pairs.stdout

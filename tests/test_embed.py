import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from tests.test_ctr import blank_content
from tests.test_images import huge_png
from tfmm.data import reader, schema
from tfmm.export import export_saved_model
from tfmm.index import open_index
from tfmm.pretrain import PretrainConfig, run
from tfmm.serving.encoding import (Encoder, IndexSink, PartSink, claim_dir, embed_catalogue,
                                   job_manifest)
from tfmm.towers import text_tower

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLANK = (5, 17, 100)  # items whose image is removed
ITEMS = 240  # the tiny world's


@pytest.fixture(scope="module")
def world(tiny_dir, tmp_path_factory):
    """The tiny world with three items without an image, its items named "sku-<k>" by a
    vocabulary, and an untrained SCL encoder's export and index from pre-training."""
    out = tmp_path_factory.mktemp("embed")
    data_dir = str(out / "data")
    shutil.copytree(tiny_dir, data_dir)
    blank_content(data_dir, images=BLANK)
    os.makedirs(f"{data_dir}/vocab", exist_ok=True)
    with open(f"{data_dir}/vocab/items.txt", "w") as f:
        f.writelines(f"sku-{k}\n" for k in range(ITEMS))
    result = run(PretrainConfig(data_dir=data_dir, model_dir=str(out / "model"),
                                export_dir=str(out / "export"), index=str(out / "pre.db"),
                                objective="random", epochs=0, queue_size=0, triplet_weight=0.0,
                                dim=8, verbose=0))
    assert result["items_without_content"] == len(BLANK)
    pre = open_index(str(out / "pre.db"))
    ids = pre.ids()
    return {"data_dir": data_dir, "export": result["export_path"], "ids": ids,
            "vectors": pre.get(ids)[0], "catalogue": pre.catalogue()}


def with_content():
    return np.setdiff1d(np.arange(2, 2 + ITEMS), BLANK)


def assert_same_as_pretraining(world, ids, vectors):
    order = np.argsort(ids)
    ids, vectors = np.asarray(ids)[order], np.asarray(vectors)[order]
    np.testing.assert_array_equal(ids, world["ids"])
    np.testing.assert_allclose(vectors, world["vectors"], atol=1e-6)


def read_parts(path):
    table = pq.read_table(path)
    raw = table.column("item_id").to_pylist()
    assert len(raw) == len(set(raw)), "an item written twice"
    ids = np.array([int(r.removeprefix("sku-")) + schema.FIRST_ID for r in raw])
    return ids, np.stack(table.column("vector").to_numpy(zero_copy_only=False))


def test_the_job_fills_the_index_as_pretraining_did(world, store_spec):
    assert world["ids"].tolist() == with_content().tolist()
    encoder = Encoder(world["export"])
    job = job_manifest(encoder, world["data_dir"])
    result = embed_catalogue(encoder, world["data_dir"],
                             IndexSink(store_spec, encoder.dim, job["catalogue"]),
                             batch_size=64, verbose=0)
    assert result == {"items": ITEMS, "embedded": ITEMS - 3, "without_content": 3,
                      "already_done": 0}
    index = open_index(store_spec)
    assert index.catalogue() == world["catalogue"]
    assert_same_as_pretraining(world, index.ids(), index.get(index.ids())[0])


def test_parquet_parts_by_raw_id_and_a_rerun_embeds_only_missing_parts(world, tmp_path):
    encoder = Encoder(world["export"])
    job = job_manifest(encoder, world["data_dir"])
    out = str(tmp_path / "vectors")

    def embed(part_size=100):
        sink = PartSink(out, world["data_dir"], job, part_size)
        return embed_catalogue(encoder, world["data_dir"], sink, batch_size=64, verbose=0)

    assert embed()["embedded"] == ITEMS - 3
    assert sorted(os.listdir(out)) == ["_embed.json", "part-00000.parquet",
                                       "part-00001.parquet", "part-00002.parquet"]
    assert_same_as_pretraining(world, *read_parts(out))
    # Part 0 holds catalogue positions 0-99: item ids 2-101, of which 5, 17 and 100 have
    # no image; part 1 ids 102-201.
    first, _ = read_parts(f"{out}/part-00000.parquet")
    assert sorted(first.tolist()) == [i for i in range(2, 102) if i not in BLANK]
    # As a killed run leaves it: a part missing, another half-written.
    os.remove(f"{out}/part-00001.parquet")
    with open(f"{out}/part-00002.parquet.tmp-99999", "wb") as f:
        f.write(b"PAR1")
    rerun = embed()
    assert rerun == {"items": ITEMS, "embedded": 100, "without_content": 3,
                     "already_done": ITEMS - 3 - 100}
    assert sorted(os.listdir(out))[-1] == "part-00002.parquet"
    assert_same_as_pretraining(world, *read_parts(out))
    with pytest.raises(ValueError, match="holds the vectors of another embedding job .* "
                                         "differs in layout"):
        embed(part_size=50)


def test_items_without_a_title_are_counted_for_a_text_encoder(world, tmp_path):
    data_dir = str(tmp_path / "data")
    shutil.copytree(world["data_dir"], data_dir)
    blank_content(data_dir, titles=(3, 4))
    tower = text_tower(["red", "blue", "mug", "lamp"], dim=4)
    encoder = Encoder(export_saved_model(tower, str(tmp_path / "text"), "vector"))
    assert (encoder.modality, encoder.image_size) == ("text", None)
    sink = IndexSink(str(tmp_path / "v.db"), 4, schema.catalogue_fingerprint(data_dir))
    result = embed_catalogue(encoder, data_dir, sink, batch_size=100, verbose=0)
    assert (result["embedded"], result["without_content"]) == (ITEMS - 2, 2)
    titles = {int(b["item_id"]): b["title"] for b in reader.items(data_dir, 1).unbatch()
              .as_numpy_iterator()}
    index = open_index(str(tmp_path / "v.db"))
    ids = index.ids()
    assert ids.tolist() == [i for i in range(2, 2 + ITEMS) if i not in (3, 4)]
    np.testing.assert_allclose(index.get(ids)[0],
                               tower(np.array([titles[i] for i in ids], object)).numpy(),
                               atol=1e-6)


def test_an_image_over_the_pixel_limit_is_named_before_it_is_decoded(world, tmp_path):
    """A data directory written past `prepare`'s check (an older tfmm, another writer)."""
    data_dir = str(tmp_path / "data")
    shutil.copytree(world["data_dir"], data_dir)
    path = os.path.join(data_dir, "items.tfrecord")
    records = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    records[7].features.feature["image"].bytes_list.value[0] = huge_png()  # item 9
    with tf.io.TFRecordWriter(path) as w:
        for example in records:
            w.write(example.SerializeToString())
    sink = IndexSink(str(tmp_path / "v.db"), 8, world["catalogue"])
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: record 7, image: the image is 20000x20000 pixels, over the limit of "
            "50,000,000 (tfmm.data.images.MAX_PIXELS); downscale it.")):
        embed_catalogue(Encoder(world["export"]), data_dir, sink, batch_size=16, verbose=0)
    assert sink.index.count() == 0


def test_the_reader_says_which_items_have_a_title(world):
    parse = reader.item_parser(world["data_dir"])
    for title, has_title in ((b" red mug ", True), (b"", False), (b" \t\n", False)):
        item = parse(tf.constant(schema.example(
            ints={"item_id": 2, "category_id": 2, "first_day": 0},
            strings={"title": title, "image": b""})))
        assert (bool(item["has_title"]), bool(item["has_image"])) == (has_title, False)


def cli(*args):
    return [sys.executable, "-m", "tfmm.serving.embed", *args]


def run_cli(*args, env=None):
    proc = subprocess.run(cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    return proc


def wait_for(proc, done, what):
    deadline = time.monotonic() + 120
    while not done():
        assert proc.poll() is None, f"the job ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} in 120 s"
        time.sleep(0.005)


@pytest.mark.slow
def test_a_job_killed_midway_is_finished_by_a_rerun(world, tmp_path):
    index_path, out = str(tmp_path / "v.db"), str(tmp_path / "vectors")
    base = [f"--encoder={world['export']}", f"--data_dir={world['data_dir']}",
            "--batch_size=1"]
    index = open_index(index_path, dim=8)  # opened here, to poll it
    for target, written in ((f"--index={index_path}", index.count),
                            (f"--out_dir={out}", lambda: os.path.isdir(out) and len(
                                [p for p in os.listdir(out) if p.endswith(".parquet")]))):
        args = base + [target] + (["--part_size=1"] if "out_dir" in target else [])
        job = subprocess.Popen(cli(*args), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        wait_for(job, written, "first write")
        job.send_signal(signal.SIGKILL)
        job.wait()
        assert 0 < written() < ITEMS - 3, "killed after the job ended"
        rerun = run_cli(*args)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "3 without an image skipped" in rerun.stdout
        if "out_dir" in target:
            assert "were done by an earlier run" in rerun.stdout
            assert_same_as_pretraining(world, *read_parts(out))
        else:
            assert_same_as_pretraining(world, index.ids(), index.get(index.ids())[0])


def test_beam_direct_runner_gives_the_same_vectors(world, tmp_path):
    from tfmm.serving import embed_beam

    encoder = Encoder(world["export"])
    job = job_manifest(encoder, world["data_dir"])
    index_path, out = str(tmp_path / "v.db"), str(tmp_path / "vectors")
    counts = embed_beam.run(encoder, world["data_dir"], job, ["--runner=DirectRunner"],
                            index=index_path, batch_size=16)
    assert counts == {"items": ITEMS, "embedded": ITEMS - 3, "without_content": 3}
    index = open_index(index_path)
    assert index.catalogue() == world["catalogue"]
    assert_same_as_pretraining(world, index.ids(), index.get(index.ids())[0])
    # As a killed run leaves it: its claim (written first), Beam's temporary files.
    claim_dir(out, dict(job, layout="beam, 2 shards"))
    os.makedirs(f"{out}/beam-temp-part-0123")
    embed_beam.run(encoder, world["data_dir"], job, ["--runner=DirectRunner"], out_dir=out,
                   batch_size=16, shards=2)
    assert sorted(os.listdir(out)) == ["_embed.json", "part-00000-of-00002.parquet",
                                       "part-00001-of-00002.parquet"]
    assert_same_as_pretraining(world, *read_parts(out))


@pytest.mark.slow
def test_cli_errors_are_one_line(world, tmp_path):
    no_beam = tmp_path / "no_beam" / "apache_beam"
    no_beam.mkdir(parents=True)
    (no_beam / "__init__.py").write_text("raise ImportError('No module named apache_beam')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(no_beam.parent), ROOT]))
    base = [f"--encoder={world['export']}", f"--data_dir={world['data_dir']}"]
    other = open_index(str(tmp_path / "other.db"), dim=8)
    other.claim("another-catalogue")
    for args, message, environ in (
            ([f"--index={tmp_path}/v.db", "--runner=DirectRunner"],
             '--runner=DirectRunner needs Apache Beam, an extra of tfmm: '
             'pip install -e ".[beam]"', env),
            ([f"--index={tmp_path}/v.db", "--", "--direct_num_workers=2"],
             "unexpected arguments: ['--direct_num_workers=2'] (pipeline options need --runner)",
             None),
            ([f"--index={tmp_path}/other.db"], "holds vectors of another catalogue", None),
            ([f"--index={tmp_path}/v.db", f"--out_dir={tmp_path}/o"],
             "give one of --index (an index table) or --out_dir (Parquet files).", None)):
        proc = run_cli(*base, *args, env=environ)
        assert proc.returncode == 1, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert message in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(f"{tmp_path}/v.db")


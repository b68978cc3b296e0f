"""The tensorflow-datasets builders make the same world offline."""

import numpy as np
import tensorflow_datasets as tfds

from tfmm import data
from tfmm.data import schema
import tfmm.data.tfds_world  # noqa: F401  (registers the builders)


def test_tfds_builders_match_the_generated_directory(tiny_dir, tmp_path):
    out = tiny_dir
    meta = schema.read_metadata(out)
    for name, splits in (
            ("tfmm_world", {"train": "impressions/train", "test": "impressions/test"}),
            ("tfmm_world_items", {"train": "items"}),
            ("tfmm_world_pretrain", {"train": "pretrain/train", "test": "pretrain/test"})):
        builder = tfds.builder(f"{name}/tiny", data_dir=str(tmp_path / "tfds"))
        builder.download_and_prepare()
        for split, table in splits.items():
            assert builder.info.splits[split].num_examples == meta["counts"][table], (name, split)

    ours = next(iter(data.impressions(str(out), "test", batch_size=64)))[0]
    theirs = list(tfds.load("tfmm_world/tiny", split="test",
                            data_dir=str(tmp_path / "tfds")).take(64))
    for i, ex in enumerate(theirs):
        assert ex["timestamp"].numpy() == ours["timestamp"][i].numpy()
        length = ours["history_length"][i].numpy()
        np.testing.assert_array_equal(ex["history_item_ids"].numpy(),
                                      ours["history_item_ids"][i, :length].numpy())
    item = next(iter(tfds.load("tfmm_world_items/tiny", split="train",
                               data_dir=str(tmp_path / "tfds"))))
    first = next(iter(data.items(str(out), batch_size=1)))
    np.testing.assert_array_equal(item["image"].numpy(), first["image"][0].numpy())
    assert item["title"].numpy() == first["title"][0].numpy()

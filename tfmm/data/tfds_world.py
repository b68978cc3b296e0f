"""The synthetic world as tensorflow-datasets builders (made locally, no download).

    import tensorflow_datasets as tfds
    import tfmm.data.tfds_world  # registers the builders

    ds = tfds.load("tfmm_world/tiny", split="train")          # impressions
    items = tfds.load("tfmm_world_items/tiny", split="train")  # catalogue
    pairs = tfds.load("tfmm_world_pretrain/tiny", split="test")  # SCL triplets

Configs are the presets `tiny`, `small` and `large` of `tfmm.data.world`; for
other knobs pass ``config=WorldBuilderConfig(name=..., world=WorldConfig(...))``.
Each builder runs `tfmm.data.generate.write_world` into its download
directory and re-reads those TFRecords; the generating model is documented in
`tfmm.data.world`. tfmm's own pipelines read the TFRecord directory directly.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tfmm.data import schema, world as world_lib
from tfmm.data.synthetic import write_world


@dataclasses.dataclass(kw_only=True)
class WorldBuilderConfig(tfds.core.BuilderConfig):
    world: world_lib.WorldConfig = world_lib.PRESETS["small"]


_CONFIGS = [WorldBuilderConfig(name=name, description=f"The {name} preset world.", world=cfg)
            for name, cfg in world_lib.PRESETS.items()]


class _WorldBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared by the three tables of a world."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = _CONFIGS
    TABLES = {}  # split -> table in the tfmm data directory
    SPEC = {}  # feature -> (tfds feature, parse)

    def _info(self):
        return self.dataset_info_from_configs(
            description=world_lib.__doc__,
            features=tfds.features.FeaturesDict({k: f for k, (f, _) in self.SPEC.items()}),
            disable_shuffling=True,  # keep impressions in time order
        )

    def _split_generators(self, dl_manager):
        out = os.path.join(dl_manager.download_dir, f"tfmm_world-{self.builder_config.name}")
        if not os.path.exists(os.path.join(out, "metadata.json")):
            write_world(world_lib.generate(self.builder_config.world), out)
        meta = schema.read_metadata(out)
        return {split: self._generate_examples(schema.files(out, meta, table))
                for split, table in self.TABLES.items()}

    def _generate_examples(self, paths):
        for i, record in enumerate(tf.data.TFRecordDataset(paths).as_numpy_iterator()):
            feature = tf.train.Example.FromString(record).features.feature
            yield i, {k: parse(feature[k]) for k, (_, parse) in self.SPEC.items()}


def _int(f):
    return f.int64_list.value[0]


def _ints(f):
    return np.array(f.int64_list.value, np.int64)


def _text(f):
    return f.bytes_list.value[0].decode()


def _image(f):
    return tf.io.decode_image(f.bytes_list.value[0], channels=3).numpy()


_INT = tfds.features.Scalar(np.int64)
_IMAGE = tfds.features.Image(shape=(64, 64, 3))


class TfmmWorld(_WorldBuilder):
    """Impressions of the synthetic world; splits train and test (the last days)."""

    TABLES = {"train": "impressions/train", "test": "impressions/test"}
    SPEC = {**{k: (_INT, _int) for k in schema.IMPRESSION_SCALARS},
            **{k: (tfds.features.Sequence(np.int64), _ints) for k in schema.HISTORY_LISTS}}


class TfmmWorldItems(_WorldBuilder):
    """The catalogue of the synthetic world (one split, train)."""

    TABLES = {"train": "items"}
    SPEC = {**{k: (_INT, _int) for k in schema.ITEM_INTS},
            "title": (tfds.features.Text(), _text), "image": (_IMAGE, _image)}


class TfmmWorldPretrain(_WorldBuilder):
    """SCL pre-training triplets of the synthetic world; splits train and test."""

    TABLES = {"train": "pretrain/train", "test": "pretrain/test"}
    SPEC = {**{k: (_INT, _int) for k in schema.TRIPLET_INTS},
            "query_text": (tfds.features.Text(), _text), "query_image": (_IMAGE, _image)}

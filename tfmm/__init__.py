"""tfmm: multimodal item representations for TensorFlow CTR models.

Implements "Enhancing Taobao Display Advertising with Multimodal
Representations" (CIKM'24): semantic-aware contrastive pre-training, and the
SimTier and MAKE ways of feeding pre-trained vectors into an ID-based ranker.

What users import (loaded on first use, so ``import tfmm`` stays light):

- ``tfmm.layers``: `SimTierLayer`, `MAKEBlock`, `DINAttention`, `Dice`, `ShardedEmbedding`,
  `KnownIds`, `SimScore`, `VectorFeature`, for any Keras (or tf-keras/TFRS) model;
- `DINRanker` (`tfmm.ranker`), the ID-based DIN ranker with any method;
- `SCLModel` (`tfmm.scl`) with `MomentumQueueCallback`, and the towers
  `image_tower`, `text_tower` (`tfmm.towers`);
- `DenseGradientAdam`, `PerIdAdam`, `PerIdSGD` (`tfmm.optimizers`);
- ``tfmm.metrics``: `auc`, `gauc`, `logloss`, `acc_at_n`, ...;
- ``tfmm.index``: `open_index`, `SQLiteIndex`, `RedisIndex`;
- ``tfmm.export``: `export_saved_model`, `read_warmup`;
- ``tfmm.data``: readers of a data directory (`impressions`, `items`, `triplets`).

Every serialisable class is registered as ``tfmm>ClassName``
(`tfmm.keras_compat.register`).
"""

import importlib

__version__ = "0.1.0"

from tfmm import _startup

if _startup.running_cli():
    _startup.quiet_tensorflow()

_NAMES = {
    "DINRanker": "tfmm.ranker", "SCLModel": "tfmm.scl",
    "MomentumQueueCallback": "tfmm.momentum_queue", "image_tower": "tfmm.towers",
    "text_tower": "tfmm.towers", "DenseGradientAdam": "tfmm.optimizers",
    "PerIdAdam": "tfmm.optimizers", "PerIdSGD": "tfmm.optimizers",
    "open_index": "tfmm.index", "SQLiteIndex": "tfmm.index", "RedisIndex": "tfmm.index",
    "export_saved_model": "tfmm.export", "read_warmup": "tfmm.export",
}
_SUBMODULES = ("data", "export", "index", "layers", "metrics")
__all__ = sorted(_NAMES) + list(_SUBMODULES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"tfmm.{name}")
    raise AttributeError(f"module 'tfmm' has no attribute {name!r}")

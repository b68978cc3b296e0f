"""Keras layers for multimodal CTR models (Keras 3, or tf-keras/TFRS).

``TF_USE_LEGACY_KERAS=1`` before import selects tf-keras, as for ``tf.keras``.
"""

from tfmm.layers.dice import Dice
from tfmm.layers.din_attention import DINAttention
from tfmm.layers.known_ids import KnownIds
from tfmm.layers.make import MAKEBlock
from tfmm.layers.sharded_embedding import ShardedEmbedding
from tfmm.layers.simscore import SimScore
from tfmm.layers.simtier import SimTierLayer
from tfmm.layers.vector import VectorFeature

__all__ = ["DINAttention", "Dice", "KnownIds", "MAKEBlock", "ShardedEmbedding", "SimScore",
           "SimTierLayer", "VectorFeature"]

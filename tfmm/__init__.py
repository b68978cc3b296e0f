"""tfmm: multimodal item representations for TensorFlow CTR models.

Implements "Enhancing Taobao Display Advertising with Multimodal
Representations" (CIKM'24): semantic-aware contrastive pre-training, and the
SimTier and MAKE ways of feeding pre-trained vectors into an ID-based ranker.
"""

__version__ = "0.1.0"

from tfmm import _startup

if _startup.running_cli():
    _startup.quiet_tensorflow()

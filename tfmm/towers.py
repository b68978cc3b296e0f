"""Image and text towers: a backbone, a projection head, L2-normalised vectors (paper §3).

The image tower takes uint8 images ``[B, H, W, 3]`` (the catalogue's 64x64),
rescales them to [0, 1], resizes them to the backbone's input, and runs a
KerasHub backbone built from a config (no download) or, where weights can be
had, from a preset (e.g. ``"clip_vit_base_patch16"`` for the paper's CLIP-O
row). The text tower uses only standard TensorFlow ops (``TextVectorization``,
an embedding and masked mean pooling), so it runs in any TF Serving build.
Both end in a two-layer projection head and ``UnitNormalization``.
"""

import keras
import keras_hub

# Small backbones that train in minutes on 2 CPU cores, from config.
BACKBONES = {
    "resnet_tiny": dict(input_conv_filters=[64], input_conv_kernel_sizes=[3],
                        stackwise_num_filters=[64, 64, 128], stackwise_num_blocks=[1, 1, 1],
                        stackwise_num_strides=[1, 2, 2], block_type="basic_block"),
    "resnet_small": dict(input_conv_filters=[64], input_conv_kernel_sizes=[3],
                         stackwise_num_filters=[64, 128, 256], stackwise_num_blocks=[2, 2, 2],
                         stackwise_num_strides=[1, 2, 2], block_type="basic_block"),
}


def vision_backbone(name, image_size):
    """A KerasHub backbone: a config name of BACKBONES, or a KerasHub preset."""
    if name in BACKBONES:
        return keras_hub.models.ResNetBackbone(**BACKBONES[name],
                                               image_shape=(image_size, image_size, 3))
    try:
        return keras_hub.models.Backbone.from_preset(name)
    except Exception as e:  # presets need their weights: network or a local copy
        raise ValueError(f"backbone={name!r} is neither one of {sorted(BACKBONES)} nor a "
                         f"KerasHub preset that can be loaded here ({e}).") from e


def _projection(x, dim, name):
    x = keras.layers.Dense(dim, activation="relu", name=f"{name}_projection_hidden")(x)
    x = keras.layers.Dense(dim, name=f"{name}_projection")(x)
    return keras.layers.UnitNormalization(name=f"{name}_normalize")(x)


def image_tower(backbone="resnet_tiny", dim=128, input_size=64, image_size=32, name="image_tower"):
    """uint8 images [B, input_size, input_size, 3] -> unit vectors [B, dim]."""
    if dim < 1:
        raise ValueError(f"image_tower: dim={dim} must be >= 1.")
    images = keras.Input((input_size, input_size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(images)
    if image_size != input_size:
        x = keras.layers.Resizing(image_size, image_size, name="resize")(x)
    features = vision_backbone(backbone, image_size)(x)
    if len(features.shape) == 4:
        pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    else:  # token sequences (ViT-like backbones)
        pooled = keras.layers.GlobalAveragePooling1D(name="pool")(features)
    return keras.Model(images, _projection(pooled, dim, "image"), name=name)


def text_tower(vocabulary, dim=128, embedding_dim=64, max_tokens=8, name="text_tower"):
    """strings [B] -> unit vectors [B, dim]; `vocabulary` is a list of words."""
    if not vocabulary:
        raise ValueError("text_tower: empty vocabulary.")
    texts = keras.Input((), dtype="string", name="text")
    tokens = keras.layers.TextVectorization(
        vocabulary=list(vocabulary), output_mode="int", output_sequence_length=max_tokens,
        standardize="lower_and_strip_punctuation", name="tokenize")(texts)
    embedded = keras.layers.Embedding(len(vocabulary) + 2, embedding_dim, mask_zero=True,
                                      name="token_embedding")(tokens)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(embedded)
    return keras.Model(texts, _projection(pooled, dim, "text"), name=name)


def vocabulary_of(texts, max_size=20_000):
    """Words of `texts` by frequency (ties alphabetical), for `text_tower`."""
    counts = {}
    for text in texts:
        for word in text.lower().split():
            counts[word] = counts.get(word, 0) + 1
    return sorted(counts, key=lambda w: (-counts[w], w))[:max_size]

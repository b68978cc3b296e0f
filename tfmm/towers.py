"""Image and text towers: a backbone, a projection head, L2-normalised vectors (paper §3).

The image tower takes uint8 images ``[B, H, W, 3]`` (the catalogue's 64x64),
rescales them, resizes them to the backbone's input, and runs a KerasHub
backbone built from a config (no download) or loaded from a preset: a
KerasHub preset name (e.g. ``"clip_vit_base_patch16"``, the paper's CLIP-O
row; needs network) or a local preset directory. A preset's image converter
sets the size and normalisation; a two-tower preset (CLIP) gives its vision
encoder. The text tower uses only standard TensorFlow ops
(``TextVectorization``, an embedding and masked mean pooling), so it runs in
any TF Serving build; `preset_text_tower` runs a preset's text encoder on its
own tokenizer, whose TensorFlow path needs tensorflow-text ops.
Both end in a two-layer projection head and ``UnitNormalization``;
`centred` adds a last step that subtracts the catalogue's mean vector.
"""

import os

import keras
import keras_hub
import tensorflow as tf

from tfmm.keras_compat import register

# Small backbones that train in minutes on 2 CPU cores, from config.
BACKBONES = {
    "resnet_tiny": dict(input_conv_filters=[64], input_conv_kernel_sizes=[3],
                        stackwise_num_filters=[64, 64, 128], stackwise_num_blocks=[1, 1, 1],
                        stackwise_num_strides=[1, 2, 2], block_type="basic_block"),
    "resnet_small": dict(input_conv_filters=[64], input_conv_kernel_sizes=[3],
                         stackwise_num_filters=[64, 128, 256], stackwise_num_blocks=[2, 2, 2],
                         stackwise_num_strides=[1, 2, 2], block_type="basic_block"),
}


# Preset handles other than built-in names and directories (KerasHub's from_preset).
_PRESET_SCHEMES = ("kaggle://", "hf://", "gs://", "modelscope://")


class BackboneError(ValueError):
    """A backbone name that is no config or preset, or a preset that does not load."""


def is_preset(name):
    """Whether `name` is a KerasHub preset: a built-in name, a handle or a directory."""
    return (name in keras_hub.models.Backbone.presets or name.startswith(_PRESET_SCHEMES)
            or os.path.isdir(name))


def check_backbone(name):
    """Raises BackboneError unless `name` is a config name of BACKBONES or a preset
    (not loaded yet)."""
    if name not in BACKBONES and not is_preset(name):
        raise BackboneError(f"backbone={name!r} is neither a config name {sorted(BACKBONES)}, "
                            "a KerasHub preset name nor a preset directory.")


def _load(what, loader, preset):
    try:
        return loader(preset)
    except Exception as e:  # network, a partial directory, a class that does not fit...
        reason = (str(e).splitlines() or [""])[0].split(". ")[0]
        reason = reason if len(reason) <= 120 else reason[:117] + "..."
        local = os.path.isdir(preset)
        where = ("the preset directory" if local else "the KerasHub preset") + (
            "" if what == "backbone" else f"'s {what}")
        hint = "" if local else " (offline? built-in presets download their weights)"
        raise BackboneError(f"backbone={preset!r}: {where} could not be loaded{hint}: "
                            f"{type(e).__name__}: {reason}") from None


def preset_encoder(preset, part):
    """A preset's backbone; of a two-tower preset (CLIP), its `part` ("vision" or "text")."""
    check_backbone(preset)
    backbone = _load("backbone", keras_hub.models.Backbone.from_preset, preset)
    return getattr(backbone, f"{part}_encoder", backbone)


def vision_backbone(name, image_size):
    """A KerasHub backbone: a config name of BACKBONES, or a preset's (vision) encoder."""
    if name in BACKBONES:
        return keras_hub.models.ResNetBackbone(**BACKBONES[name],
                                               image_shape=(image_size, image_size, 3))
    return preset_encoder(name, "vision")


def _image_converter(preset):
    """The preset's image converter, or None when it was saved without one."""
    try:
        return keras_hub.layers.ImageConverter.from_preset(preset)
    except FileNotFoundError:
        return None


@register
class TokenMean(keras.layers.Layer):
    """The mean of the real (unmasked) tokens, [B, T, d] -> [B, d]; zeros for a text
    without any (an item without a title), where Keras' GlobalAveragePooling1D
    divides 0 by 0 and the NaN poisons the whole batch's loss."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, mask=None):
        if mask is None:
            return keras.ops.mean(inputs, axis=1)
        mask = keras.ops.expand_dims(keras.ops.cast(mask, inputs.dtype), 2)
        return (keras.ops.sum(inputs * mask, axis=1)
                / keras.ops.maximum(keras.ops.sum(mask, axis=1), 1.0))

    def compute_mask(self, inputs, mask=None):
        return None


def _projection(x, dim, name):
    x = keras.layers.Dense(dim, activation="relu", name=f"{name}_projection_hidden")(x)
    x = keras.layers.Dense(dim, name=f"{name}_projection")(x)
    return keras.layers.UnitNormalization(name=f"{name}_normalize")(x)


@register
class Centring(keras.layers.Layer):
    """``(x - mean) / |x - mean|``: unit vectors re-centred on a fixed mean.

    A contrastive tower whose pairs barely tell items apart (an item and the
    next one a user clicked) leaves every vector in a narrow cone: cosines of
    0.97 to 1 between unrelated items. Whatever order the cosines carry,
    similarity tiers of a fixed width (`tfmm.layers.SimTierLayer`) then see
    one tier. Subtracting the catalogue's mean spreads the cone over the
    sphere; a vector equal to the mean becomes zero.

    Args:
        mean: the vector to subtract, length d.
    """

    def __init__(self, mean, **kwargs):
        super().__init__(**kwargs)
        self.mean = [float(m) for m in mean]
        if not self.mean:
            raise ValueError("Centring: mean is empty.")
        self.offset = self.add_weight(name="mean", shape=(len(self.mean),), trainable=False,
                                      initializer=keras.initializers.Constant(self.mean))

    def call(self, inputs):
        return tf.math.l2_normalize(inputs - keras.ops.cast(self.offset, inputs.dtype), axis=-1)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean}


def centred(tower, mean):
    """`tower` followed by `Centring(mean)`, a model with the same inputs and name."""
    if len(mean) != tower.output.shape[-1]:
        raise ValueError(f"centred: mean has {len(mean)} values, the tower's vectors "
                         f"{tower.output.shape[-1]}.")
    return keras.Model(tower.input, Centring(mean, name="centre")(tower.output), name=tower.name)


def image_tower(backbone="resnet_tiny", dim=128, input_size=64, image_size=32, name="image_tower",
                freeze_backbone=False):
    """uint8 images [B, input_size, input_size, 3] -> unit vectors [B, dim].

    A preset backbone takes its image converter's size and normalisation
    (`image_size` then applies only when the preset has neither a converter
    size nor a fixed input shape); `freeze_backbone` keeps its weights as loaded.
    """
    if dim < 1:
        raise ValueError(f"image_tower: dim={dim} must be >= 1.")
    encoder = vision_backbone(backbone, image_size)
    scale, offset, resize = 1.0 / 255.0, 0.0, {}
    if backbone not in BACKBONES:
        converter = _image_converter(backbone)
        size = ((converter and converter.image_size)
                or tuple(getattr(encoder, "image_shape", None) or (None, None))[:2])
        image_size = size[0] if None not in size else image_size
        if converter:
            scale = 1.0 if converter.scale is None else converter.scale
            offset = 0.0 if converter.offset is None else converter.offset
            resize = dict(interpolation=converter.interpolation, antialias=converter.antialias)
    encoder.trainable = not freeze_backbone
    images = keras.Input((input_size, input_size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(scale, offset, name="rescale")(images)
    if image_size != input_size:
        x = keras.layers.Resizing(image_size, image_size, name="resize", **resize)(x)
    # CLIP's vision encoder takes {"images": ...}; ResNet a tensor.
    features = encoder({next(iter(encoder.input)): x} if isinstance(encoder.input, dict) else x)
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
    pooled = TokenMean(name="pool")(embedded)
    return keras.Model(texts, _projection(pooled, dim, "text"), name=name)


class _Tokenize(keras.layers.Layer):
    """strings [B] -> token ids and padding mask [B, length], as a preset's preprocessor
    makes them (its lowercasing, start and end tokens, length)."""

    def __init__(self, tokenizer, length, lower=False, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.packer = keras_hub.layers.StartEndPacker(
            start_value=tokenizer.start_token_id, end_value=tokenizer.end_token_id,
            pad_value=getattr(tokenizer, "pad_token_id", 0), sequence_length=length,
            return_padding_mask=True)
        self.length = length
        self.lower = lower

    def call(self, texts):
        ids, mask = self.packer(self.tokenizer(tf.strings.lower(texts) if self.lower else texts))
        return tf.cast(ids, "int32"), mask

    def compute_output_spec(self, texts):
        shape = (texts.shape[0], self.length)
        return keras.KerasTensor(shape, "int32"), keras.KerasTensor(shape, "bool")


def preset_text_tower(preset, dim=128, name="text_tower", freeze_backbone=False):
    """strings [B] -> unit vectors [B, dim] by a preset's text encoder and tokenizer.

    The tokenizer's graph (KerasHub's BytePairTokenizer for CLIP) runs
    tensorflow-text's RegexSplitWithOffsets: the model trains and predicts
    here, but a TF Serving build without tensorflow-text ops cannot run its
    SavedModel.
    """
    if dim < 1:
        raise ValueError(f"preset_text_tower: dim={dim} must be >= 1.")
    encoder = preset_encoder(preset, "text")
    if not isinstance(encoder.input, dict) or "token_ids" not in encoder.input:
        raise BackboneError(f"backbone={preset!r} has no text encoder (a model of token_ids).")
    tokenizer = _load("tokenizer", keras_hub.tokenizers.Tokenizer.from_preset, preset)
    try:  # CLIP's preprocessor (a CausalLMPreprocessor) lowercases and sets the length
        preprocessor = keras_hub.models.CausalLMPreprocessor.from_preset(preset)
    except (FileNotFoundError, ValueError):  # none, or of another kind: the defaults
        preprocessor = None
    length = getattr(preprocessor, "sequence_length", None) or encoder.max_sequence_length
    encoder.trainable = not freeze_backbone
    texts = keras.Input((), dtype="string", name="text")
    ids, mask = _Tokenize(tokenizer, length, getattr(preprocessor, "to_lower", False),
                          name="tokenize")(texts)
    inputs = {"token_ids": ids, "padding_mask": mask}
    features = encoder({k: v for k, v in inputs.items() if k in encoder.input})
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(features, mask=mask)
    return keras.Model(texts, _projection(pooled, dim, "text"), name=name)


def vocabulary_of(texts, max_size=20_000):
    """Words of `texts` by frequency (ties alphabetical), for `text_tower`."""
    counts = {}
    for text in texts:
        for word in text.lower().split():
            counts[word] = counts.get(word, 0) + 1
    return sorted(counts, key=lambda w: (-counts[w], w))[:max_size]

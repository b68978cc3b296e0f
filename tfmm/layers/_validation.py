"""Shape checks shared by the layers: errors name the layer, the argument and
the shape that was expected, at trace time, before any op runs."""

import tensorflow as tf


def static_shape(x):
    shape = x.shape if hasattr(x, "shape") else x
    return tuple(tf.TensorShape(shape).as_list())


def check_rank(layer, arg, x, ranks, expected):
    shape = static_shape(x)
    if len(shape) not in ranks:
        raise ValueError(
            f"{layer}: `{arg}` must have shape {expected}, got shape {shape}."
        )
    return shape


def check_dim(layer, arg, shape, axis, want, expected):
    got = shape[axis]
    if got is not None and want is not None and got != want:
        raise ValueError(
            f"{layer}: `{arg}` must have shape {expected} with "
            f"{'last dim' if axis == -1 else f'dim {axis}'} {want}, got shape {shape}."
        )


def check_defined(layer, arg, shape, expected):
    if shape[-1] is None:
        raise ValueError(
            f"{layer}: the last dim of `{arg}` must be known, expected {expected}, "
            f"got shape {shape}."
        )


def check_target_history(layer, target, history, target_name="target",
                         history_name="history"):
    """Checks target [B, d] or [B, C, d] against history [B, L, d]."""
    t = check_rank(layer, target_name, target, (2, 3), "[B, d] or [B, C, d]")
    h = check_rank(layer, history_name, history, (3,), "[B, L, d]")
    check_dim(layer, history_name, h, -1, t[-1], f"[B, L, {t[-1]}]")
    check_dim(layer, history_name, h, 0, t[0], f"[{t[0]}, L, d]")
    return t, h


def mask_weights(layer, mask, history, dtype=tf.float32):
    """Returns the history mask as a [B, L] float tensor of 0/1 (1 = real item).

    ``history`` is ``[B, L, d]`` or ``[B, C, L, d]``. ``mask=None`` means every
    position is real; a numeric mask counts non-zero entries as real.
    """
    h = static_shape(history)
    b, length = h[0], h[-2]
    if mask is None:
        shape = tf.shape(history)
        return tf.ones(tf.stack([shape[0], shape[-2]]), dtype)
    expected = f"[B, L] = [{b}, {length}]"
    m = check_rank(layer, "mask", mask, (2,), expected)
    check_dim(layer, "mask", m, 1, length, expected)
    check_dim(layer, "mask", m, 0, b, expected)
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
        mask = tf.not_equal(mask, tf.zeros_like(mask))
    return tf.cast(mask, dtype)


def similarity(target, history, kind):
    """s = target · history for every (candidate, history item) pair.

    target [B, d] -> [B, L]; target [B, C, d] -> [B, C, L] as one batched
    matmul, so the history is never copied per candidate.
    """
    target = tf.cast(target, tf.float32)
    history = tf.cast(history, tf.float32)
    if kind == "cosine":
        target = tf.math.l2_normalize(target, axis=-1)
        history = tf.math.l2_normalize(history, axis=-1)
    if target.shape.rank == 2:
        return tf.einsum("bd,bld->bl", target, history)
    return tf.einsum("bcd,bld->bcl", target, history)


def broadcast_history_mask(weights, target_rank):
    """[B, L] mask -> [B, L] or [B, 1, L] to line up with the scores."""
    return weights if target_rank == 2 else weights[:, None, :]


def check_embeddings_and_vectors(layer, target_emb, history_emb, target_vec, history_vec):
    """Checks ID embeddings and multimodal vectors of one target/history pair.

    Returns the target's static shape.
    """
    t, h = check_target_history(layer, target_emb, history_emb, "target_emb", "history_emb")
    tv, hv = check_target_history(layer, target_vec, history_vec, "target_vec", "history_vec")
    if len(tv) != len(t):
        raise ValueError(f"{layer}: `target_vec` {tv} must have the rank of `target_emb` {t}.")
    check_dim(layer, "history_vec", hv, 1, h[1], f"[B, {h[1]}, d]")
    return t

"""Renders catalogue and "seen by a user" images of synthetic items (NumPy only).

An item's look is (shape, colour, pattern). The catalogue image shows the shape
on a white background with small position/scale jitter. A query image is the
same item photographed by a user: rotated, re-scaled and shifted, under other
lighting, among clutter, with sensor noise; its colour and pattern are kept.
"""

import numpy as np

SIZE = 64

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross", "hexagon",
          "star", "crescent", "ellipse", "semicircle", "frame")
PATTERNS = ("solid", "hstripes", "vstripes", "diagonal", "dots", "checker", "grid",
            "concentric")
# Hues spread evenly, then interleaved so that small palettes stay distinct.
_HUE_ORDER = (0, 6, 3, 9, 1, 7, 4, 10, 2, 8, 5, 11)
COLOURS = tuple(_HUE_ORDER)


def colour_rgb(colour):
    """RGB in [0, 1] of palette entry `colour` (12 hues, fairly saturated)."""
    h = _HUE_ORDER[colour] / 12.0
    s, v = 0.85, 0.9
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _grid():
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    return (x + 0.5) / SIZE * 2.0 - 1.0, (y + 0.5) / SIZE * 2.0 - 1.0


_X, _Y = _grid()


def shape_mask(shape, u, v):
    """Inside-mask of `shape` in object coordinates (radius about 0.7)."""
    r = 0.7
    rad = np.hypot(u, v)
    if shape == "circle":
        return rad < r
    if shape == "square":
        return np.maximum(abs(u), abs(v)) < 0.8 * r
    if shape == "triangle":
        return (v < 0.5 * r) & (v > 2.0 * abs(u) - 1.1 * r)
    if shape == "diamond":
        return abs(u) + abs(v) < r
    if shape == "ring":
        return (rad < r) & (rad > 0.5 * r)
    if shape == "cross":
        return ((abs(u) < 0.3 * r) & (abs(v) < r)) | ((abs(v) < 0.3 * r) & (abs(u) < r))
    if shape == "hexagon":
        return (np.maximum(abs(u), abs(0.5 * u + 0.866 * v)).clip(abs(0.5 * u - 0.866 * v))
                < 0.85 * r)
    if shape == "star":
        return rad < r * (0.6 + 0.4 * np.cos(5.0 * np.arctan2(v, u)))
    if shape == "crescent":
        return (rad < r) & (np.hypot(u - 0.35 * r, v) > 0.75 * r)
    if shape == "ellipse":
        return (u / r) ** 2 + (v / (0.55 * r)) ** 2 < 1.0
    if shape == "semicircle":
        return (rad < r) & (v > -0.1 * r)
    if shape == "frame":
        m = np.maximum(abs(u), abs(v))
        return (m < 0.8 * r) & (m > 0.5 * r)
    raise ValueError(f"unknown shape {shape!r}")


def pattern_mask(pattern, u, v):
    """Where the pattern's darker shade shows, in object coordinates."""
    f = 6.0 * np.pi
    if pattern == "solid":
        return np.zeros_like(u, bool)
    if pattern == "hstripes":
        return np.sin(f * v) > 0.3
    if pattern == "vstripes":
        return np.sin(f * u) > 0.3
    if pattern == "diagonal":
        return np.sin(f * (u + v) / 1.4) > 0.3
    if pattern == "dots":
        return (np.cos(f * u) > 0.5) & (np.cos(f * v) > 0.5)
    if pattern == "checker":
        return (np.sin(0.6 * f * u) > 0) ^ (np.sin(0.6 * f * v) > 0)
    if pattern == "grid":
        return (np.cos(f * u) > 0.8) | (np.cos(f * v) > 0.8)
    if pattern == "concentric":
        return np.sin(f * np.hypot(u, v)) > 0.3
    raise ValueError(f"unknown pattern {pattern!r}")


def _draw(shape, colour, pattern, scale, angle, dx, dy):
    """Item colour layer and its alpha for one pose."""
    c, s = np.cos(angle), np.sin(angle)
    x, y = (_X - dx) / scale, (_Y - dy) / scale
    u, v = c * x + s * y, -s * x + c * y
    inside = shape_mask(SHAPES[shape], u, v)
    base = colour_rgb(colour)
    rgb = np.where(pattern_mask(PATTERNS[pattern], u, v)[..., None], 0.45 * base, base)
    return rgb, inside


def catalogue_image(rng, shape, colour, pattern):
    """The seller's picture: white background, small position/scale jitter."""
    rgb, inside = _draw(shape, colour, pattern, scale=rng.uniform(0.85, 1.05), angle=0.0,
                        dx=rng.uniform(-0.08, 0.08), dy=rng.uniform(-0.08, 0.08))
    img = np.where(inside[..., None], rgb, 1.0)
    return _to_uint8(img)


def query_image(rng, shape, colour, pattern):
    """The same item as a user photographs it: pose, light, clutter and noise change."""
    background = rng.uniform(0.55, 0.95) * np.ones(3) + rng.uniform(-0.08, 0.08, 3)
    img = np.broadcast_to(background, (SIZE, SIZE, 3)).copy()
    for _ in range(rng.integers(1, 4)):  # clutter: grey blobs of other things
        cx, cy, rad = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.08, 0.25)
        blob = np.hypot(_X - cx, _Y - cy) < rad
        img[blob] = rng.uniform(0.2, 0.8)
    rgb, inside = _draw(shape, colour, pattern, scale=rng.uniform(0.6, 1.1),
                        angle=rng.uniform(-np.pi / 9, np.pi / 9),
                        dx=rng.uniform(-0.25, 0.25), dy=rng.uniform(-0.25, 0.25))
    light = rng.uniform(0.75, 1.2) * (1.0 + rng.uniform(-0.15, 0.15) * _X)
    img = np.where(inside[..., None], rgb * light[..., None], img)
    img += rng.normal(0.0, 0.04, img.shape)
    return _to_uint8(img)


def _to_uint8(img):
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)

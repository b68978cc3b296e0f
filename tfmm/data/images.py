"""Image sizes read from file headers, so that no decoder allocates an image's pixels first.

A decoder allocates what the header declares: a 20000 x 20000 PNG of 1.2 MB
decodes to 1.2 GB of RGB (the encoder service peaked at 1.96 GB on one).
`too_many_pixels` reads the width and height of the formats TensorFlow's
``decode_image`` takes (PNG, JPEG, GIF, BMP, WebP) and refuses more than
`MAX_PIXELS`; `tfmm.data.prepare`, the data readers' record check and the
encoder service call it before they decode.

Example:

>>> png = bytes.fromhex("89504e470d0a1a0a0000000d49484452") + (20000).to_bytes(4, "big") * 2
>>> image_size(png)
(20000, 20000)
>>> print(too_many_pixels(png))  # doctest: +NORMALIZE_WHITESPACE
the image is 20000x20000 pixels, over the limit of 50,000,000
(tfmm.data.images.MAX_PIXELS); downscale it
"""

import struct

# 50 megapixels (a 48-megapixel photo passes): 150 MB decoded as RGB, and a resize in
# float32 takes 600 MB more; every tower here reads 224 x 224 pixels or fewer.
MAX_PIXELS = 50_000_000

# JPEG start-of-frame markers (C0-CF but C4: Huffman tables, C8: reserved, CC: arithmetic).
_JPEG_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data):
    i = 2  # after the start of image
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker in _JPEG_FRAMES:
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        else:
            i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def _webp_size(data):
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: a 3-byte frame tag and the start code, then 14-bit sizes
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # lossless: a signature byte, then 14 bits each of size - 1
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: the canvas, 24 bits each of size - 1
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def image_size(data):
    """(width, height) that the header of PNG, JPEG, GIF, BMP or WebP bytes declares;
    None for other bytes or a header cut short (a decoder then says what is wrong)."""
    data = memoryview(data).cast("B")
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data[:2] == b"BM":
            if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 header: 16-bit sizes
                return struct.unpack("<HH", data[18:22])
            width, height = struct.unpack("<ii", data[18:26])  # height < 0: top-down rows
            return abs(width), abs(height)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
    except struct.error:  # cut short
        return None
    return None


def too_many_pixels(data, limit=None):
    """Why image `data` must not be decoded: its header declares more than `limit`
    (default `MAX_PIXELS`) pixels; None when it does not."""
    limit = MAX_PIXELS if limit is None else limit
    size = image_size(data)
    if size is None or size[0] * size[1] <= limit:
        return None
    return (f"the image is {size[0]}x{size[1]} pixels, over the limit of {limit:,} "
            "(tfmm.data.images.MAX_PIXELS); downscale it")

"""Image sizes from headers (the pixel limit before decoding), against TensorFlow's decoder."""

import io
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image  # matplotlib's dependency: it writes the formats TF only reads

from tfmm.data import images


def _encoded(fmt, width, height, **options):
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, options", [
    ("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("GIF", {}), ("BMP", {}),
    ("WEBP", {}), ("WEBP", {"lossless": True}), ("WEBP", {"exif": b"Exif\x00\x00"}),  # VP8X
])
@pytest.mark.parametrize("width, height", [(7, 5), (300, 41)])
def test_header_sizes_are_what_the_decoder_makes(fmt, options, width, height):
    data = _encoded(fmt, width, height, **options)
    decoded = tf.io.decode_image(data, channels=3, expand_animations=False)
    assert images.image_size(data) == (width, height) == tuple(decoded.shape[1::-1])


def test_a_jpeg_with_exif_and_a_top_down_bmp():
    exif = Image.Exif()
    exif[0x010E] = "x" * 5000  # a long APP1 segment before the frame header
    buffer = io.BytesIO()
    Image.new("RGB", (33, 17)).save(buffer, "JPEG", exif=exif)
    assert images.image_size(buffer.getvalue()) == (33, 17)
    bmp = bytearray(_encoded("BMP", 9, 4))
    bmp[22:26] = (-4).to_bytes(4, "little", signed=True)  # rows stored top-down
    assert images.image_size(bytes(bmp)) == (9, 4)


def huge_png(width=20000, height=20000):
    """A valid PNG of `width` x `height` black pixels, 1 bit each: 49 kB for 20000 x 20000,
    which TensorFlow decodes to 1.2 GB of RGB."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    deflate = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte "none", then the row's bits
    rows = b"".join([deflate.compress(row) for _ in range(height)] + [deflate.flush()])
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows)
            + chunk(b"IEND", b""))


def test_the_huge_png_is_a_valid_image():
    small = huge_png(20, 9)  # the same kind of file, small enough to decode here
    decoded = tf.io.decode_image(small, channels=3, expand_animations=False).numpy()
    assert decoded.shape == (9, 20, 3) and not decoded.any()
    assert images.image_size(huge_png()) == (20000, 20000)


def _png_header(width, height):
    return (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + width.to_bytes(4, "big")
            + height.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00")


def test_the_limit_is_read_from_the_header_alone():
    header = _png_header(20000, 20000)  # a header is all it takes: nothing is decoded
    assert images.too_many_pixels(header) == (
        "the image is 20000x20000 pixels, over the limit of 50,000,000 "
        "(tfmm.data.images.MAX_PIXELS); downscale it")
    assert images.too_many_pixels(_png_header(10000, 5000)) is None  # 50,000,000: at the limit
    assert images.too_many_pixels(_png_header(10000, 5001)) is not None
    assert images.too_many_pixels(_encoded("PNG", 300, 41), limit=12_000) is not None
    for unknown in (b"", b"not an image", header[:20], b"\xff\xd8\xff\xe0\x00"):
        assert images.image_size(unknown) is None and images.too_many_pixels(unknown) is None

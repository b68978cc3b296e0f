"""An exported encoder as a callable, and a whole catalogue embedded with it.

`Encoder` wraps the encoder's SavedModel (``python -m tfmm.train
--task=pretrain --export_dir=...``): image or text in, whichever its
``serving_default`` takes, or both (``--objective=image_title
--index_vector=fused``: an item needs one of the two). The near-line
service (`tfmm.serving.encoder`) feeds
it new-item events; the batch job (`embed_catalogue`, ``python -m
tfmm.serving.embed``) every item of a data directory, into an `IndexSink` or a
`PartSink` (Parquet parts by raw item id).
"""

import contextlib
import glob
import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf

from tfmm import data, outputs
from tfmm.data import schema
from tfmm.data.images import too_many_pixels
from tfmm.export import latest_version
from tfmm.index import files, open_index
from tfmm.serving.events import BadEvent

MANIFEST = "_embed.json"


class Encoder:
    """An exported encoder's ``serving_default``: `content` makes its input from a
    new-item event, a call embeds a batch of inputs. ``modality`` is "image",
    "text", or "fused" (inputs ``image`` and ``text``: an input is a pair).

    Args:
        path: the SavedModel (a version dir or a base dir).
    """

    def __init__(self, path):
        self.path = latest_version(path)
        signatures = tf.saved_model.load(self.path).signatures
        if "serving_default" not in signatures:
            raise ValueError(f"{self.path} is not an encoder export: it has no serving_default "
                             "signature.")
        self._serve = signatures["serving_default"]
        inputs = self._serve.structured_input_signature[1]
        outputs = self._serve.structured_outputs
        kinds = {name: _kind(spec) for name, spec in inputs.items()}
        out = next(iter(outputs.values())) if len(outputs) == 1 else None
        fused = sorted(kinds.items()) == [("image", "image"), ("text", "text")]
        if not (out is not None and out.shape.rank == 2 and (len(kinds) == 1 and None not in
                                                              kinds.values() or fused)):
            raise ValueError(
                f"{self.path} is not an encoder export: its serving_default takes "
                f"{', '.join(sorted(inputs))} and returns {', '.join(sorted(outputs))}; an "
                "encoder takes one uint8 [n, h, w, 3] image or string [n] text input (or both, "
                "named image and text) and returns [n, d] vectors.")
        self.modality = "fused" if fused else next(iter(kinds.values()))
        self.input_name = None if fused else next(iter(inputs))
        image = inputs.get("image") if fused else next(iter(inputs.values()))
        self.image_size = tuple(image.shape[1:3]) if self.modality != "text" else None
        self.dim = int(out.shape[-1])

    def content(self, event):
        """The model input of one event; BadEvent when it has none or it does not decode.

        A fused encoder's input is (image, title): zeros for an event without an
        image, b"" for one without a title, as `tfmm.data.items` gives them."""
        if self.modality == "fused":
            if not (event["image"] or event["title"]):
                raise BadEvent(f"item {event['item_id']}: the encoder embeds images and "
                               "titles; the event has neither.")
            image = (self._image(event) if event["image"]
                     else np.zeros(self.image_size + (3,), np.uint8))
            return image, event["title"] or b""
        if self.modality == "text":
            if not event["title"]:
                raise BadEvent(f"item {event['item_id']}: the encoder embeds titles; "
                               "the event has none.")
            return event["title"]
        return self._image(event)

    def _image(self, event):
        if not event["image"]:
            raise BadEvent(f"item {event['item_id']}: the encoder embeds images; "
                           "the event has none.")
        too_large = too_many_pixels(event["image"])
        if too_large:  # before a decoder allocates them
            raise BadEvent(f"item {event['item_id']}: {too_large}.")
        try:
            image = tf.io.decode_image(event["image"], channels=3, expand_animations=False)
        except tf.errors.OpError as e:  # pure decoding: any failure is the content's
            raise BadEvent(f"item {event['item_id']}: the image does not decode "
                           f"({e.message.splitlines()[0]}).") from None
        if tuple(image.shape[:2]) != self.image_size:
            image = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, self.image_size)),
                                             0, 255), tf.uint8)
        return image.numpy()

    def __call__(self, contents):
        """Vectors [n, dim] of model inputs built by `content`."""
        if self.modality == "fused":
            images, titles = zip(*contents)
            inputs = {"image": np.stack(images), "text": np.array(titles, object)}
        else:
            inputs = {self.input_name: np.stack(contents) if self.modality == "image"
                      else np.array(contents, object)}
        out = self._serve(**{k: tf.constant(v) for k, v in inputs.items()})
        return next(iter(out.values())).numpy()



def has_content(modality, batch):
    """Which items of a `tfmm.data.items` batch (NumPy arrays) an encoder of
    `modality` (`Encoder.modality`) embeds."""
    if modality == "fused":
        return batch["has_image"] | batch["has_title"]
    return batch["has_image"] if modality == "image" else batch["has_title"]


def item_inputs(modality, batch, rows):
    """The inputs (as `Encoder.content` makes them) of an encoder of `modality` for
    the items `rows` (a mask) of a `tfmm.data.items` batch (NumPy arrays)."""
    if modality == "fused":
        return list(zip(batch["image"][rows], batch["title"][rows]))
    return batch["image" if modality == "image" else "title"][rows]


def _kind(spec):
    """"image" for a uint8 [n, h, w, 3] input, "text" for a string [n] one, else None."""
    if (spec.dtype == tf.uint8 and spec.shape.rank == 4 and spec.shape[-1] == 3
            and None not in spec.shape[1:3]):
        return "image"
    return "text" if spec.dtype == tf.string and spec.shape.rank == 1 else None


class IndexSink:
    """Vectors into an index table, claimed for the catalogue; one put per batch."""

    def __init__(self, spec, dim, catalogue):
        self.index = open_index(spec, dim=dim)
        self.index.claim(catalogue)

    def done(self, positions):
        return np.zeros(len(positions), bool)

    def write(self, positions, ids, vectors):
        if len(ids):
            self.index.put(ids, vectors)

    def advance(self, seen):
        pass

    def finish(self, seen):
        self.index.close()

    def __str__(self):
        return repr(self.index)


class PartSink:
    """Vectors into Parquet parts by raw id: part N holds the items with content at
    catalogue positions [N * part_size, (N + 1) * part_size)."""

    def __init__(self, out_dir, data_dir, manifest, part_size):
        self.out_dir, self.part_size = out_dir, part_size
        self.raw = schema.raw_ids(data_dir)
        claim_dir(out_dir, dict(manifest, layout=f"local parts of {part_size} items"),
                  inputs=(data_dir,))
        for path in glob.glob(os.path.join(out_dir, "part-*.parquet.tmp-*")):
            os.remove(path)  # a killed run's half-written part
        self.buffered = {}  # part -> [(ids, vectors)]
        self.next_part = 0  # the first part not flushed yet

    def path(self, part):
        return os.path.join(self.out_dir, f"part-{part:05d}.parquet")

    def done(self, positions):
        parts = positions // self.part_size
        complete = {p: os.path.exists(self.path(p)) for p in np.unique(parts).tolist()}
        return np.array([complete[p] for p in parts.tolist()], bool)

    def write(self, positions, ids, vectors):
        parts = positions // self.part_size
        for p in np.unique(parts).tolist():
            self.buffered.setdefault(p, []).append((ids[parts == p], vectors[parts == p]))

    def advance(self, seen):
        """Flushes the parts whose positions all lie below `seen`."""
        while (self.next_part + 1) * self.part_size <= seen:
            self._flush()

    def finish(self, seen):
        self.advance(seen)
        if self.next_part * self.part_size < seen:
            self._flush()

    def _flush(self):
        part = self.buffered.pop(self.next_part, [])
        if not os.path.exists(self.path(self.next_part)):
            ids = np.concatenate([i for i, _ in part]) if part else np.zeros(0, np.int64)
            vectors = np.concatenate([v for _, v in part]) if part else np.zeros((0, 0))
            files.write_vectors(self.path(self.next_part),
                                [self.raw[i - schema.FIRST_ID] for i in ids.tolist()], vectors)
        self.next_part += 1

    def __str__(self):
        return f"{self.out_dir}/part-*.parquet"


def claim_dir(out_dir, manifest, inputs=()):
    """Records the job `manifest` describes in `out_dir`; ValueError if it holds another's,
    or is or holds one of `inputs` or the encoder, or user files (`tfmm.outputs`)."""
    path = os.path.join(out_dir, MANIFEST)
    outputs.check_output_dir(out_dir, "out_dir", (*inputs, manifest["encoder"]),
                             owned=lambda d: os.path.exists(path))
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            held = json.load(f)
        if held != manifest:
            changed = sorted(k for k in set(held) | set(manifest)
                             if held.get(k) != manifest.get(k))
            raise ValueError(f"{out_dir} holds the vectors of another embedding job ({path} "
                             f"differs in {', '.join(changed)}); use another directory.")
        return
    with files.replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def job_manifest(encoder, data_dir):
    """What a Parquet directory records of its job (`claim_dir`)."""
    return {"catalogue": schema.catalogue_fingerprint(data_dir),
            "encoder": os.path.abspath(encoder.path), "modality": encoder.modality,
            "dim": encoder.dim}


def embed_catalogue(encoder, data_dir, sink, batch_size=256, verbose=1):
    """Embeds every item of `data_dir` with content for `encoder` into `sink` (an
    `IndexSink` or a `PartSink`), `batch_size` items per model call; `verbose`: 1
    shows a progress bar on stderr, 0 none.

    Returns {"items", "embedded", "without_content", "already_done"}: catalogue
    items, items embedded now, items skipped for lack of content, and items
    with content in parts a killed run had completed.
    """
    total = schema.read_metadata(data_dir)["vocab"]["num_items"] - schema.FIRST_ID
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the summary
        bar = keras.utils.Progbar(total, verbose=verbose, unit_name="item",
                                  stateful_metrics=["embedded", "without content"])
    seen = embedded = without = already = 0
    for batch in data.items(data_dir, batch_size, image_size=encoder.image_size):
        batch = {k: v.numpy() for k, v in batch.items()}
        ids, has = batch["item_id"], has_content(encoder.modality, batch)
        positions = np.arange(seen, seen + len(ids))
        todo = has & ~sink.done(positions)
        if todo.any():
            sink.write(positions[todo], ids[todo],
                       encoder(item_inputs(encoder.modality, batch, todo)))
        seen += len(ids)
        sink.advance(seen)
        embedded, without = embedded + int(todo.sum()), without + int((~has).sum())
        already += int((has & ~todo).sum())
        with contextlib.redirect_stdout(sys.stderr):
            bar.update(seen, [("embedded", embedded), ("without content", without)],
                       finalize=seen == total)
    sink.finish(seen)
    return {"items": seen, "embedded": embedded, "without_content": without,
            "already_done": already}



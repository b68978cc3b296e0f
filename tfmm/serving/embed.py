r"""Catalogue embedding as a batch job: every item of a data dir -> exported encoder -> vectors.

    python -m tfmm.serving.embed --encoder=runs/small/export/encoder \
        --data_dir=data/small --index=runs/small/index/vectors.db      # or --index=redis://...
    python -m tfmm.serving.embed ... --out_dir=runs/small/vectors      # Parquet by raw item id
    python -m tfmm.serving.embed ... --runner=DirectRunner [-- --direct_num_workers=2]

embeds every item of ``--data_dir``'s catalogue that has content for the
encoder (an image, or a non-blank title: whichever its signature takes, see
`tfmm.serving.encoding.Encoder`); items without are skipped and counted. The
vectors go to an index table, claimed for the catalogue as pre-training's and
the near-line encoder's writes are, in one put per batch; or to Parquet files
of ``item_id`` (the raw id) and ``vector``, the format of ``python -m
tfmm.index export``, which ``pyarrow.parquet.read_table(out_dir)`` reads whole.

A rerun after a kill finishes the job, with no item missing or repeated:

- index: puts are keyed by item id, so the rerun embeds every item again and
  overwrites what the killed run wrote (the index may hold another encoder's
  vectors, so nothing present is taken as done);
- Parquet, locally: ``part-NNNNN.parquet`` holds the items at catalogue
  positions [N * part_size, (N + 1) * part_size) that have content, and appears
  whole (written beside and renamed); a rerun skips the parts that exist and
  embeds the rest. ``_embed.json`` records the catalogue, the encoder and the
  layout, and a run of another job into the same directory is refused. One job
  per directory at a time.

With ``--runner`` the job is an Apache Beam pipeline (``pip install -e
".[beam]"``; `tfmm.serving.embed_beam`): Beam's RunInference feeds the encoder,
and the arguments after ``--`` are the runner's pipeline options, as
``python -m tfmm.data.prepare`` takes them (e.g. ``-- --direct_num_workers=2``,
or Dataflow's ``--project``, ``--region``, ``--temp_location``).

As a library: ``embed(EmbedOptions(encoder=..., data_dir=..., index=...))``, the
options being the flags of the same names.
"""

import dataclasses
import sys
from typing import Optional

from absl import flags

from tfmm import cli
from tfmm.config import SettingsError
from tfmm.index import redact
from tfmm.serving.encoding import Encoder, IndexSink, PartSink, embed_catalogue, job_manifest

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class EmbedOptions:
    """What `embed` embeds and where: the fields are the CLI's flags of the same names;
    `beam_args` are the pipeline options of `runner`."""

    encoder: str
    data_dir: str
    index: Optional[str] = None
    out_dir: Optional[str] = None
    batch_size: int = 256
    part_size: int = 100_000
    shards: int = 4
    runner: Optional[str] = None
    beam_args: tuple = ()

    def validate(self):
        """Returns the options; SettingsError names the first bad one."""
        if bool(self.index) == bool(self.out_dir):
            raise SettingsError("give one of --index (an index table) or --out_dir (Parquet "
                                "files).")
        for name in ("batch_size", "part_size", "shards"):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name}={getattr(self, name)} must be >= 1.")
        return self


def embed(options, announce=None, verbose=0):
    """Embeds every item of ``options.data_dir`` with ``options.encoder`` into the index or
    the Parquet directory; with ``options.runner``, as a Beam pipeline (`embed_beam`, the
    ``beam`` extra).

    `announce`, when given, is called with one line naming the job before it starts;
    `verbose` shows a progress bar (local job). Returns the counts ``items``,
    ``embedded``, ``without_content`` (and locally ``already_done``) and the encoder's
    ``modality``. SettingsError names a bad option; ValueError or OSError another
    catalogue's index or directory, or bad records.
    """
    options.validate()
    try:
        encoder = Encoder(options.encoder)
    except (OSError, ValueError) as e:
        raise SettingsError(f"--encoder={options.encoder}: {e}") from None
    try:
        job = job_manifest(encoder, options.data_dir)
    except (OSError, ValueError) as e:  # no data dir, no metadata.json
        raise SettingsError(f"--data_dir={options.data_dir}: {e}") from None
    announce = announce or (lambda line: None)
    what = f"{encoder.modality} -> {encoder.dim}-d"
    if options.runner:
        from tfmm.serving import embed_beam  # the beam extra

        target = redact(options.index) if options.index else options.out_dir
        announce(f"embedding {options.data_dir} with {encoder.path} ({what}) into {target} on "
                 f"{options.runner}")
        result = embed_beam.run(encoder, options.data_dir, job,
                                [f"--runner={options.runner}", *options.beam_args],
                                index=options.index, out_dir=options.out_dir,
                                batch_size=options.batch_size, shards=options.shards)
    else:
        sink = (IndexSink(options.index, encoder.dim, job["catalogue"]) if options.index else
                PartSink(options.out_dir, options.data_dir, job, options.part_size))
        announce(f"embedding {options.data_dir} with {encoder.path} ({what}) into {sink}")
        result = embed_catalogue(encoder, options.data_dir, sink, options.batch_size,
                                 verbose=verbose)
    return dict(result, modality=encoder.modality)


def define_flags():
    """The CLI's flags: `EmbedOptions`' fields, with its defaults."""
    o = EmbedOptions
    flags.DEFINE_string("encoder", None, "The encoder's SavedModel (a version dir, or a base "
                        "dir: its latest version).")
    flags.DEFINE_string("data_dir", None, "The data directory whose items are embedded.")
    flags.DEFINE_string("index", o.index, "Write to this index table: a SQLite file or a "
                        "redis:// URL.")
    flags.DEFINE_string("out_dir", o.out_dir, "Or write Parquet files (item_id: the raw id, "
                        "vector) to this directory.")
    flags.DEFINE_integer("batch_size", o.batch_size, "Items embedded (and put) in one batch.")
    flags.DEFINE_integer("part_size", o.part_size, "Local Parquet output: catalogue items per "
                         "part file, the unit a rerun skips.")
    flags.DEFINE_integer("shards", o.shards, "Beam Parquet output: number of files.")
    cli.define_runner_flag()


def main(argv):
    beam_args = cli.pipeline_options(argv)
    for name in ("encoder", "data_dir"):
        if not FLAGS[name].value:
            cli.fail(f"--{name} is required.")
    options = EmbedOptions(beam_args=beam_args, **{
        f.name: FLAGS[f.name].value for f in dataclasses.fields(EmbedOptions) if f.name in FLAGS})
    options.validate()
    if options.runner:
        cli.require_extra("beam", f"--runner={options.runner}")
    result = embed(options, announce=lambda line: print(line, flush=True),
                   verbose=1 if sys.stderr.isatty() else 0)
    done = f", {result['already_done']} were done by an earlier run" \
        if result.get("already_done") else ""
    content = {"image": "an image", "text": "a title", "fused": "an image or a title"}[
        result["modality"]]
    print(f"embedded {result['embedded']} of {result['items']} items{done}; "
          f"{result['without_content']} without {content} skipped", flush=True)


if __name__ == "__main__":
    define_flags()
    # Another catalogue's index or directory, bad records: one line.
    cli.run(main, positional=True, errors=(ValueError, OSError))

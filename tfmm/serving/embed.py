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
"""

import sys

from absl import app, flags

from tfmm import _startup
from tfmm.index import redact
from tfmm.serving.encoding import Encoder, IndexSink, PartSink, embed_catalogue, job_manifest

FLAGS = flags.FLAGS
flags.DEFINE_string("encoder", None, "The encoder's SavedModel (a version dir, or a base dir: "
                    "its latest version).")
flags.DEFINE_string("data_dir", None, "The data directory whose items are embedded.")
flags.DEFINE_string("index", None, "Write to this index table: a SQLite file or a redis:// URL.")
flags.DEFINE_string("out_dir", None, "Or write Parquet files (item_id: the raw id, vector) "
                    "to this directory.")
flags.DEFINE_integer("batch_size", 256, "Items embedded (and put) in one batch.")
flags.DEFINE_integer("part_size", 100_000, "Local Parquet output: catalogue items per part "
                     "file, the unit a rerun skips.")
flags.DEFINE_integer("shards", 4, "Beam Parquet output: number of files.")
flags.DEFINE_string("runner", None, "Run as an Apache Beam pipeline on this runner "
                    "(DirectRunner, DataflowRunner, FlinkRunner, ...).")


def main(argv):
    if len(argv) > 1 and not FLAGS.runner:
        sys.exit(f"unexpected arguments: {argv[1:]} (pipeline options need --runner)")
    for name in ("encoder", "data_dir"):
        if not FLAGS[name].value:
            sys.exit(f"--{name} is required.")
    if bool(FLAGS.index) == bool(FLAGS.out_dir):
        sys.exit("give one of --index (an index table) or --out_dir (Parquet files).")
    for name in ("batch_size", "part_size", "shards"):
        if FLAGS[name].value < 1:
            sys.exit(f"--{name}={FLAGS[name].value} must be >= 1.")
    if FLAGS.runner:
        _startup.quiet_logging()  # Beam logs every step at INFO
        try:
            import apache_beam  # noqa: F401
        except ImportError:
            sys.exit(f"--runner={FLAGS.runner} needs Apache Beam, which is not installed: "
                     'pip install -e ".[beam]"')
        from tfmm.serving import embed_beam
    try:
        encoder = Encoder(FLAGS.encoder)
    except (OSError, ValueError) as e:
        sys.exit(f"--encoder={FLAGS.encoder}: {e}")
    try:
        job = job_manifest(encoder, FLAGS.data_dir)
    except (OSError, ValueError) as e:  # no data dir, no metadata.json
        sys.exit(f"--data_dir={FLAGS.data_dir}: {e}")
    what = f"{encoder.modality} -> {encoder.dim}-d"
    try:
        if FLAGS.runner:
            target = redact(FLAGS.index) if FLAGS.index else FLAGS.out_dir
            print(f"embedding {FLAGS.data_dir} with {encoder.path} ({what}) into {target} on "
                  f"{FLAGS.runner}", flush=True)
            result = embed_beam.run(encoder, FLAGS.data_dir, job,
                                    [f"--runner={FLAGS.runner}", *argv[1:]],
                                    index=FLAGS.index, out_dir=FLAGS.out_dir,
                                    batch_size=FLAGS.batch_size, shards=FLAGS.shards)
        else:
            sink = (IndexSink(FLAGS.index, encoder.dim, job["catalogue"]) if FLAGS.index else
                    PartSink(FLAGS.out_dir, FLAGS.data_dir, job, FLAGS.part_size))
            print(f"embedding {FLAGS.data_dir} with {encoder.path} ({what}) into {sink}",
                  flush=True)
            result = embed_catalogue(encoder, FLAGS.data_dir, sink, FLAGS.batch_size,
                                     verbose=1 if sys.stderr.isatty() else 0)
    except (OSError, ValueError) as e:  # another catalogue's index or directory, bad records
        sys.exit(str(e))
    done = f", {result['already_done']} were done by an earlier run" \
        if result.get("already_done") else ""
    content = {"image": "an image", "text": "a title", "fused": "an image or a title"}[
        encoder.modality]
    print(f"embedded {result['embedded']} of {result['items']} items{done}; "
          f"{result['without_content']} without {content} skipped", flush=True)


if __name__ == "__main__":
    app.run(main)

"""Your own vectors into an index table, and an index back out, by raw item id.

    python -m tfmm.index import --data_dir=DIR --vectors=FILE [--ids=IDS] --index=PATH|redis://...
    python -m tfmm.index export --data_dir=DIR --index=PATH|redis://... --out=FILE [--ids=IDS]

Raw ids are those of the logs ``--data_dir`` was prepared from (its
``vocab/items.txt``; a generated world's items are named by their dense ids).
FILE is Parquet (``item_id`` and a list column ``vector``, or one column per
component), CSV (``item_id`` and a ``vector`` cell like ``"0.1 0.2"`` or
``"[0.1, 0.2]"``, or one column per component) or ``.npy`` [n, d] with
``--ids`` (a text file, one raw id a line, or a ``.npy`` of them); see
`tfmm.index.files`. An import is all or nothing: every row is checked (width,
NaN/Inf, unknown and duplicate ids, the index's width and catalogue) before
one atomic write, and the index is claimed for ``--data_dir``'s catalogue, as
the encoder's writes are. Vectors are scaled to unit length (``--nonormalize``
takes unit vectors only). An export writes every vector, as of one moment,
through a temporary file renamed into place.
"""

import redis
from absl import flags

from tfmm import cli
from tfmm.index import files, redact

FLAGS = flags.FLAGS
COMMANDS = {"import": ("vectors",), "export": ("out",)}


def define_flags():
    flags.DEFINE_string("data_dir", None, "The data directory whose catalogue the vectors "
                        "describe (its vocabulary maps raw ids to dense ids).")
    flags.DEFINE_string("index", None, "Index table: a SQLite file or a redis:// URL.")
    flags.DEFINE_string("vectors", None, "import: the vector file (Parquet, CSV or .npy).")
    flags.DEFINE_string("out", None, "export: the file to write (.parquet, .csv or .npy).")
    flags.DEFINE_string("ids", None, "With .npy vectors: their raw item ids in row order, one a "
                        "line in a text file, or a .npy array.")
    flags.DEFINE_string("vector_column", "vector", "import: the column holding whole vectors; "
                        "without it, every column but item_id is one component.")
    flags.DEFINE_enum("unknown", "error", ["error", "skip"], "import: a raw id not in the "
                      "vocabulary fails the import, or is skipped and counted.")
    flags.DEFINE_bool("normalize", True, "import: scale vectors to unit length (the rankers "
                      "compare dot products of unit vectors); --nonormalize refuses others.")


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        cli.fail(f"usage: python -m tfmm.index import|export --data_dir=... --index=...; "
                 f"got {argv[1:]} (--help lists the flags).")
    command = argv[1]
    for name in ("data_dir", "index", *COMMANDS[command]):
        if not FLAGS[name].value:
            cli.fail(f"--{name} is required for {command}.")
    for other, names in COMMANDS.items():
        for name in names:
            if other != command and FLAGS[name].present:
                cli.fail(f"--{name} is for {other}, not {command}.")
    try:
        if command == "import":
            result = files.import_vectors(FLAGS.index, FLAGS.data_dir, FLAGS.vectors,
                                          FLAGS.ids, FLAGS.vector_column, FLAGS.unknown,
                                          FLAGS.normalize)
        else:
            count = files.export_vectors(FLAGS.index, FLAGS.data_dir, FLAGS.out, FLAGS.ids)
    except redis.RedisError as e:  # e.g. a put over the server's query buffer limit
        cli.fail(f"{redact(FLAGS.index)}: {e}")
    if command == "import":
        skipped = f", skipped {result['skipped']} unknown ids" if result["skipped"] else ""
        print(f"imported {result['items']} {result['dim']}-d vectors from {FLAGS.vectors} "
              f"into {result['index']} (version {result['version']}){skipped}")
    else:
        print(f"exported {count} vectors from {redact(FLAGS.index)} to {FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    # Bad input or an unreachable index: one line.
    cli.run(main, positional=True, errors=(ValueError, OSError))

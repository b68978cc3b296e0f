"""Generates a synthetic Taobao-like world as a tfmm data directory.

    python -m tfmm.data.generate --world=tiny --seed=0 --out_dir=data/tiny
    python -m tfmm.data.generate --world=tiny --raw_dir=raw/tiny   # as your own logs

`--world` picks a preset (tiny: seconds, for tests; small: the default main
job; large: >= 1M impressions and >= 50k items, for benchmarks); any knob flag
overrides it. The generating model is described in `tfmm.data.world`.

`--raw_dir` writes the same world as raw files instead of (or besides) a data
directory: ``impressions.csv``, ``items.csv`` and ``images/``, with string ids
(`tfmm.data.synthetic.write_raw`), for the own-data path on a world whose
truth is known; ``python -m tfmm.data.prepare --flagfile=<raw_dir>/prepare.flags
--out_dir=DIR`` turns them into a data directory with the generated one's
impressions, histories and train/test days (no triplets).
"""

import dataclasses
import time

from absl import flags

from tfmm import cli, outputs
from tfmm.data import schema, world as world_lib
from tfmm.data.synthetic import config_from_flags, write_raw, write_world

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_enum("world", "small", list(world_lib.PRESETS), "Preset world size.")
    flags.DEFINE_string("out_dir", None, "Data directory to write (replaced atomically; one "
                        "holding files tfmm did not write is refused).")
    flags.DEFINE_string("raw_dir", None, "Directory to write the world to as raw CSV files and "
                        "PNG images, the input of tfmm.data.prepare (replaced atomically).")
    for field in dataclasses.fields(world_lib.WorldConfig):
        define = flags.DEFINE_integer if field.type in ("int", int) else flags.DEFINE_float
        define(field.name, None, "World knob (default: the preset's). See tfmm.data.world.")


def main(argv):
    del argv
    if not (FLAGS.out_dir or FLAGS.raw_dir):
        cli.fail("--out_dir or --raw_dir is required.")
    knobs = {f.name: FLAGS[f.name].value for f in dataclasses.fields(world_lib.WorldConfig)}
    cfg = config_from_flags(FLAGS.world, knobs)
    for flag in ("out_dir", "raw_dir"):  # before the world is made
        if FLAGS[flag].value:
            outputs.check_output_dir(FLAGS[flag].value, flag)
    start = time.time()
    world = world_lib.generate(cfg)
    if FLAGS.out_dir:
        write_world(world, FLAGS.out_dir)
        meta = schema.read_metadata(FLAGS.out_dir)
        print(f"wrote {FLAGS.out_dir} in {time.time() - start:.1f}s: {meta['counts']}")
    if FLAGS.raw_dir:
        flagfile = write_raw(world, FLAGS.raw_dir)
        print(f"wrote {FLAGS.raw_dir}; prepare it with: python -m tfmm.data.prepare "
              f"--flagfile={flagfile} --out_dir=DIR")


if __name__ == "__main__":
    define_flags()
    cli.run(main, errors=(ValueError, OSError))  # a directory of user files, a full disk

"""Generates a synthetic Taobao-like world as a tfmm data directory.

    python -m tfmm.data.generate --world=tiny --seed=0 --out_dir=data/tiny

`--world` picks a preset (tiny: seconds, for tests; small: the default main
job; large: >= 1M impressions and >= 50k items, for benchmarks); any knob flag
overrides it. The generating model is described in `tfmm.data.world`.
"""

import dataclasses
import time

from absl import app, flags

from tfmm.data import world as world_lib

FLAGS = flags.FLAGS
flags.DEFINE_enum("world", "small", sorted(world_lib.PRESETS), "Preset world size.")
flags.DEFINE_string("out_dir", None, "Directory to write (replaced atomically).")
for _field in dataclasses.fields(world_lib.WorldConfig):
    _define = flags.DEFINE_integer if _field.type in ("int", int) else flags.DEFINE_float
    _define(_field.name, None, "World knob (default: the preset's). See tfmm.data.world.")

from tfmm.data import schema  # noqa: E402
from tfmm.data.synthetic import config_from_flags, write_world  # noqa: E402


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.out_dir:
        raise app.UsageError("--out_dir is required.")
    knobs = {f.name: FLAGS[f.name].value for f in dataclasses.fields(world_lib.WorldConfig)}
    try:
        cfg = config_from_flags(FLAGS.world, knobs)
    except ValueError as e:
        raise app.UsageError(str(e))
    start = time.time()
    world = world_lib.generate(cfg)
    write_world(world, FLAGS.out_dir)
    meta = schema.read_metadata(FLAGS.out_dir)
    print(f"wrote {FLAGS.out_dir} in {time.time() - start:.1f}s: {meta['counts']}")


if __name__ == "__main__":
    app.run(main)

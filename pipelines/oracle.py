"""How much do the pictures drive clicks in a world? Oracle AUCs on its test days.

    python -m pipelines.oracle --world=small

The visual oracle scores an impression with the hidden logit it knows
(category, colour and pattern tastes; no item bias); the category oracle
knows only the category term. Their AUC gap is what visual semantics can add;
with --visual_weight=0 the gap must be zero.
"""

import dataclasses

from absl import flags

from tfmm import cli
from tfmm.data import world as world_lib

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_enum("world", "small", list(world_lib.PRESETS), "Preset world.")
    flags.DEFINE_list("visual_weights", ["1.0", "0.0"], "Visual-taste weights to compare.")
    flags.DEFINE_integer("seed", 0, "World seed.")


def main(argv):
    del argv
    print(f"world {FLAGS.world}, seed {FLAGS.seed}: oracle AUC on the test days")
    print("visual_weight  visual oracle  category oracle  gap")
    for weight in map(float, FLAGS.visual_weights):
        cfg = dataclasses.replace(world_lib.PRESETS[FLAGS.world], visual_weight=weight,
                                  seed=FLAGS.seed)
        visual, category = world_lib.generate(cfg).oracle_aucs()
        print(f"{weight:13.2f}  {visual:13.4f}  {category:15.4f}  {visual - category:+.4f}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)

"""Regenerates the paper's CTR results on a synthetic world as a Markdown report with plots.

    python -m pipelines.paper --world=small --out_dir=results/paper

- Table 3: the six methods (and SimTier+MAKE with MAKE fine-tuned), GAUC and
  AUC, mean ± std over --seeds, and relative to the ID ranker of each seed.
- Fig. 3: test GAUC after each epoch of the ID ranker and of the
  multimodal-only model (MAKE alone), --fig3_epochs each.
- Fig. 6(a): Acc@1 of encoders pre-trained for --encoder_epochs (0: the
  random tower) against the test GAUC of a SimTier ranker on their vectors.
- Fig. 6(b): relative AUC and LogLoss gains of SimTier+MAKE over ID per item
  frequency group (1 = rarest), averaged over the seeds.
- Fig. 6(c): SimTier+MAKE relative to ID after 0…E epochs of MAKE
  pre-training (0: trained jointly with the ranker).
- Control: the same world with visual_weight=0 (clicks ignore what items look
  like): multimodal methods must not gain; a gain would mean label leakage.

Every run keeps its model directory under --runs_dir and is reused when the
pipeline is run again, so a killed pipeline resumes where it stopped.
"""

import dataclasses
import os
import time

from absl import flags

from pipelines.runs import (NAMES, Runs, frequency_gains, line_plot, method_table, pipeline_dir,
                            write_report)
from tfmm import cli, ctr, outputs, pretrain
from tfmm.data import world as world_lib
from tfmm.data.synthetic import write_world

FLAGS = flags.FLAGS


def define_flags():
    cli.define_data_flags("Data directory (default data/<world>).")
    flags.DEFINE_string("out_dir", "results/paper", "Report: report.md, report.json, PNG plots.")
    flags.DEFINE_string("runs_dir", "runs/paper", "Model directories of every run (reused).")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Ranker seeds of Table 3, Fig. 6(b) and the "
                      "control.")
    flags.DEFINE_integer("pretrain_epochs", pretrain.PretrainConfig.epochs,
                         "SCL epochs of the encoder behind Table 3.")
    flags.DEFINE_list("encoder_epochs", ["0", "1", "2", "4"], "SCL epochs of Fig. 6(a)'s "
                      "encoders.")
    flags.DEFINE_integer("make_epochs", ctr.CTRConfig.make_epochs,
                         "MAKE pre-training epochs in Table 3.")
    flags.DEFINE_bool("make_target_in_mlp", ctr.CTRConfig.make_target_in_mlp, "MAKE's MLP also "
                      "reads the target vector (tfmm.ctr.CTRConfig); false: v_MAKE alone (paper "
                      "eq. 4). Runs of each setting are kept apart under --runs_dir.")
    flags.DEFINE_list("make_sweep", ["0", "1", "2", "3", "4"], "MAKE epochs of Fig. 6(c).")
    flags.DEFINE_integer("fig3_epochs", 4, "Epochs of Fig. 3's models.")
    flags.DEFINE_integer("batch_size", ctr.CTRConfig.batch_size, "Ranker batch size.")
    flags.DEFINE_list("methods", ["id", "vector", "simscore", "simtier", "make", "simtier_make",
                                  "simtier_make_ft"], "Table 3's rows (simtier_make_ft: MAKE "
                      "fine-tuned); id and simtier_make are needed for Fig. 6(b).")
    flags.DEFINE_list("control_methods", ["id", "simtier"], "The control's rows (id first).")
    flags.DEFINE_list("sections", ["table3", "fig3", "fig6a", "fig6c", "control"],
                      "What to run (Fig. 6(b) comes with table3).")


def table3(runs, data_dir, seeds, tag, methods):
    """Rows of Table 3, their summary, the raw results by method and the encoder's Acc@1."""
    vectors, encoder, index = runs.encoder(data_dir, FLAGS.pretrain_epochs, tag)
    results = runs.methods(data_dir, vectors, index, tag, seeds, methods)
    lines, summary = method_table(results)
    return lines, summary, results, encoder["acc@1"]


def command_flags():
    """The flags that reproduce this report: the world, seeds and output, and any non-default."""
    names = ["world", "seeds", "out_dir"] + [
        k for k in ("data_dir", "pretrain_epochs", "make_epochs", "make_target_in_mlp", "methods",
                    "sections", "make_sweep", "fig3_epochs", "batch_size")
        if FLAGS[k].value != FLAGS[k].default]

    def text(v):
        return ",".join(v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else v

    return " ".join(f"--{k}={text(FLAGS[k].value)}" for k in names)


def main(argv):
    del argv
    start = time.time()
    unknown = [m for m in FLAGS.methods + FLAGS.control_methods if m not in NAMES]
    if unknown or not {"id", "simtier_make"} <= set(FLAGS.methods):
        cli.fail(f"--methods={','.join(FLAGS.methods)}: want some of {list(NAMES)}, id and "
                 "simtier_make among them.")
    out = FLAGS.out_dir
    try:  # a folder of user files: refused before a world is made
        outputs.check_output_dir(out, "out_dir", owned=pipeline_dir)
    except ValueError as e:
        cli.fail(str(e))
    data_dir = cli.data_dir()
    outputs.claim_dir(out, "out_dir", owned=pipeline_dir, command="pipelines.paper")
    seeds = [int(s) for s in FLAGS.seeds]
    runs = Runs(FLAGS.runs_dir, FLAGS.batch_size, FLAGS.make_epochs, FLAGS.make_target_in_mlp,
                # Exactly --pretrain_epochs (Fig. 6a sweeps them): no minimum of steps.
                pretrain_settings={"momentum": 0.99, "min_steps": 0})
    ranker = runs.ranker
    vectors, encoder, index = runs.encoder(data_dir, FLAGS.pretrain_epochs, "main")
    acc = encoder["acc@1"]
    make_input = ("v_MAKE and the target vector" if FLAGS.make_target_in_mlp
                  else "v_MAKE alone (eq. 4)")
    report, lines = {"world": FLAGS.world, "seeds": seeds}, [
        f"# The paper's CTR results on the `{FLAGS.world}` world", "",
        f"Image encoder: SCL, {FLAGS.pretrain_epochs} epochs, Acc@1 {acc:.4f}. Rankers: one "
        f"epoch, batch {FLAGS.batch_size}; MAKE pre-trained {FLAGS.make_epochs} epochs and "
        f"frozen unless noted, its MLP reading {make_input}. Relative columns: mean ± std "
        "over seeds of each seed's change against the ID ranker of the same seed.", ""]

    parts = {}  # computed longest-MAKE first (its epoch weights serve the shorter runs)
    if "fig3" in FLAGS.sections:
        n = FLAGS.fig3_epochs
        id_run = ranker(data_dir, vectors, index, "main", "id", seeds[0], epochs=n)
        mm_run = ranker(data_dir, vectors, index, "main", "make", seeds[0], make_epochs=n)
        id_g = [e["gauc"] for e in id_run["epochs"]]
        mm_g = [e["gauc"] for e in mm_run["make"]["epochs"]]
        epochs = list(range(1, n + 1))
        line_plot(os.path.join(out, "fig3.png"), "Fig. 3: test GAUC by training epoch", "epoch",
                  "test GAUC", {"ID": (epochs, id_g), "MM only (MAKE)": (epochs, mm_g)})
        report["fig3"] = {"id_gauc": id_g, "mm_gauc": mm_g}
        parts["fig3"] = [
            "## Fig. 3: ID vs multimodal-only over epochs", "", "![fig3](fig3.png)", "",
            "| Epoch | " + " | ".join(map(str, epochs)) + " |",
            "| --- |" + " --- |" * n,
            "| ID GAUC | " + " | ".join(f"{g:.4f}" for g in id_g) + " |",
            "| MM-only GAUC | " + " | ".join(f"{g:.4f}" for g in mm_g) + " |", ""]

    if "fig6a" in FLAGS.sections:
        points = []
        for e in map(int, FLAGS.encoder_epochs):
            vecs, m, idx = runs.encoder(data_dir, e, "main")
            a = m["acc@1"]
            tag = "main" if e == FLAGS.pretrain_epochs else f"fig6a-e{e}"
            points.append((e, a, ranker(data_dir, vecs, idx, tag, "simtier", seeds[0])["gauc"]))
        line_plot(os.path.join(out, "fig6a.png"), "Fig. 6(a): pre-training vs CTR", "Acc@1",
                  "SimTier ranker test GAUC",
                  {"encoders": ([p[1] for p in points], [p[2] for p in points])})
        report["fig6a"] = [{"scl_epochs": e, "acc@1": a, "gauc": g} for e, a, g in points]
        parts["fig6a"] = [
            "## Fig. 6(a): encoder Acc@1 vs ranker GAUC", "", "![fig6a](fig6a.png)", "",
            "| SCL epochs | Acc@1 | SimTier GAUC |", "| --- | --- | --- |"]
        parts["fig6a"] += [f"| {e} | {a:.4f} | {g:.4f} |" for e, a, g in points] + [""]

    if "fig6c" in FLAGS.sections:
        base = ranker(data_dir, vectors, index, "main", "id", seeds[0])
        sweep = sorted(map(int, FLAGS.make_sweep), reverse=True)  # longest first: shared weights
        swept = {e: ranker(data_dir, vectors, index, "main", "simtier_make", seeds[0],
                           make_epochs=e) for e in sweep}
        sweep = sorted(sweep)
        g = [100 * (swept[e]["gauc"] - base["gauc"]) / base["gauc"] for e in sweep]
        a = [100 * (swept[e]["auc"] - base["auc"]) / base["auc"] for e in sweep]
        line_plot(os.path.join(out, "fig6c.png"), "Fig. 6(c): MAKE pre-training epochs",
                  "MAKE pre-training epochs (0: joint)", "SimTier+MAKE vs ID (%)",
                  {"GAUC": (sweep, g), "AUC": (sweep, a)})
        report["fig6c"] = {"make_epochs": sweep, "gauc_rel_pct": g, "auc_rel_pct": a}
        parts["fig6c"] = ["## Fig. 6(c): MAKE pre-training epochs", "", "![fig6c](fig6c.png)", "",
                  "| MAKE epochs | GAUC vs ID | AUC vs ID |", "| --- | --- | --- |"]
        parts["fig6c"] += [f"| {e} | {x:+.2f}% | {y:+.2f}% |" for e, x, y in zip(sweep, g, a)]
        parts["fig6c"].append("")

    if "table3" in FLAGS.sections:
        rows, summary, results, _ = table3(runs, data_dir, seeds, "main", FLAGS.methods)
        b_lines, b = frequency_gains(results, os.path.join(out, "fig6b.png"),
                                     "Fig. 6(b): gains over ID by item training frequency")
        report.update(table3=summary, fig6b=b)
        parts["table3"] = [f"## Table 3 (seeds {FLAGS.seeds})", ""] + rows + [
            "", "## Fig. 6(b): gains by item frequency group", "", "![fig6b](fig6b.png)", ""
        ] + b_lines + [""]

    if "control" in FLAGS.sections:
        control_dir = data_dir.rstrip("/") + "-visual0"
        if not os.path.exists(os.path.join(control_dir, "metadata.json")):
            print(f"generating the {FLAGS.world} world with visual_weight=0 ...", flush=True)
            config = dataclasses.replace(world_lib.PRESETS[FLAGS.world], visual_weight=0.0)
            write_world(world_lib.generate(config), control_dir)
        rows, summary, _, control_acc = table3(runs, control_dir, seeds, "control",
                                               FLAGS.control_methods)
        report["control"] = summary
        parts["control"] = ["## Control: visual_weight=0 (clicks ignore appearance)", "",
                            f"Encoder Acc@1 {control_acc:.4f} on this world.", ""] + rows + [""]

    for name in ("table3", "fig3", "fig6a", "fig6c", "control"):
        lines += parts.get(name, [])
    elapsed = time.time() - start
    lines += [f"The {len(runs.seconds)} runs behind this report took "
              f"{sum(runs.seconds.values()) / 60:.1f} min of training and evaluation on "
              f"{os.cpu_count()} CPUs (this invocation: {elapsed / 60:.1f} min; finished runs "
              f"under {FLAGS.runs_dir} are reused). Command: `python -m pipelines.paper "
              f"{command_flags()}`"]
    write_report(out, lines, report)


if __name__ == "__main__":
    define_flags()
    cli.run(main)

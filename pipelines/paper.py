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
import json
import os
import time

from absl import app, flags

from tfmm import ctr, pretrain

flags.DEFINE_enum("world", "small", ["tiny", "small", "large"], "World (generated if missing).")
flags.DEFINE_string("data_dir", None, "Data directory (default data/<world>).")
flags.DEFINE_string("out_dir", "results/paper", "Report: report.md, report.json, PNG plots.")
flags.DEFINE_string("runs_dir", "runs/paper", "Model directories of every run (reused).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Ranker seeds of Table 3, Fig. 6(b) and the control.")
flags.DEFINE_integer("pretrain_epochs", pretrain.PretrainConfig.epochs,
                     "SCL epochs of the encoder behind Table 3.")
flags.DEFINE_list("encoder_epochs", ["0", "1", "2", "4"], "SCL epochs of Fig. 6(a)'s encoders.")
flags.DEFINE_integer("make_epochs", ctr.CTRConfig.make_epochs,
                     "MAKE pre-training epochs in Table 3.")
flags.DEFINE_bool("make_target_in_mlp", ctr.CTRConfig.make_target_in_mlp, "MAKE's MLP also reads the target vector "
                  "(tfmm.ctr.CTRConfig); false: v_MAKE alone (paper eq. 4). Runs of each "
                  "setting are kept apart under --runs_dir.")
flags.DEFINE_list("make_sweep", ["0", "1", "2", "3", "4"], "MAKE epochs of Fig. 6(c).")
flags.DEFINE_integer("fig3_epochs", 4, "Epochs of Fig. 3's models.")
flags.DEFINE_integer("batch_size", ctr.CTRConfig.batch_size, "Ranker batch size.")
flags.DEFINE_list("methods", ["id", "vector", "simscore", "simtier", "make", "simtier_make",
                                "simtier_make_ft"], "Table 3's rows (simtier_make_ft: MAKE "
                  "fine-tuned); id and simtier_make are needed for Fig. 6(b).")
flags.DEFINE_list("control_methods", ["id", "simtier"], "The control's rows (id first).")
flags.DEFINE_list("sections", ["table3", "fig3", "fig6a", "fig6c", "control"],
                  "What to run (Fig. 6(b) comes with table3).")
FLAGS = flags.FLAGS

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tfmm.data import schema, world as world_lib  # noqa: E402
from tfmm.data.synthetic import ensure_world, write_world  # noqa: E402
from tfmm.index import open_index  # noqa: E402

RUN_SECONDS = {}  # model directory -> its train_seconds, each run counted once
NAMES = {"id": "ID (DIN)", "vector": "Vector", "simscore": "SimScore", "simtier": "SimTier",
         "make": "MAKE", "simtier_make": "SimTier+MAKE",
         "simtier_make_ft": "SimTier+MAKE, MAKE fine-tuned"}


def encoder(data_dir, epochs, tag):
    """(vectors, acc@1) of an image encoder after `epochs` of SCL (0: untrained), cached."""
    runs = os.path.join(FLAGS.runs_dir, tag, f"encoder-e{epochs}")
    index = os.path.join(runs, "vectors.db")
    metrics_path = os.path.join(runs, "metrics.json")
    if not os.path.exists(metrics_path):
        print(f"[{tag}] pre-training the encoder for {epochs} epoch(s) ...", flush=True)
        if os.path.exists(index):  # a half-written run: start over
            os.remove(index)
        pretrain.run(pretrain.PretrainConfig(
            data_dir=data_dir, model_dir=runs, index=index, epochs=epochs,
            objective="scl" if epochs else "random", momentum=0.99, verbose=0))
    with open(metrics_path) as f:
        m = json.load(f)
    acc, RUN_SECONDS[runs] = m["acc@1"], m["train_seconds"]
    meta = schema.read_metadata(data_dir)
    return open_index(index).snapshot(meta["vocab"]["num_items"]), acc, index


def ranker(data_dir, vectors, index, tag, model, seed, make_epochs=None, epochs=1, **kw):
    """The metrics of one ranker run (read back when it already finished)."""
    make_epochs = FLAGS.make_epochs if make_epochs is None else make_epochs
    name = f"{model}-s{seed}-e{epochs}" + (f"-make{make_epochs}" if "make" in model else "")
    name += "-ft" if kw.get("make_trainable") else ""
    eq4 = "-eq4" if "make" in model and not FLAGS.make_target_in_mlp else ""
    name += eq4
    model_dir = os.path.join(FLAGS.runs_dir, tag, name)
    path = os.path.join(model_dir, "metrics.json")
    if not os.path.exists(path):
        print(f"[{tag}] {name} ...", flush=True)
        ctr.run(ctr.CTRConfig(
            data_dir=data_dir, model_dir=model_dir, index=index, model=model, seed=seed,
            epochs=epochs, make_epochs=make_epochs, batch_size=FLAGS.batch_size,
            make_dir=os.path.join(FLAGS.runs_dir, tag, f"make-s{seed}{eq4}"),
            make_target_in_mlp=FLAGS.make_target_in_mlp, verbose=0, **kw),
            vectors=None if model == "id" else vectors)
    with open(path) as f:
        result = json.load(f)
    RUN_SECONDS[model_dir] = result["train_seconds"]
    print(f"[{tag}] {name}: gauc {result['gauc']:.4f} auc {result['auc']:.4f}", flush=True)
    return result


def mean_std(x):
    x = np.asarray(x, np.float64)
    return f"{x.mean():.4f} ± {x.std():.4f}"


def relative(x, base):
    """Per-seed relative change in %, as 'mean ± std'."""
    r = 100.0 * (np.asarray(x) - np.asarray(base)) / np.asarray(base)
    return f"{r.mean():+.2f}% ± {r.std():.2f}", float(r.mean())


def table3(data_dir, seeds, tag, methods):
    """Rows of Table 3 and the raw results by method."""
    vectors, acc, index = encoder(data_dir, FLAGS.pretrain_epochs, tag)
    results = {}
    for seed in seeds:
        for method in methods:
            key, kw = (method, {}) if method != "simtier_make_ft" else (
                method, {"model": "simtier_make", "make_trainable": True})
            results.setdefault(key, []).append(
                ranker(data_dir, vectors, index, tag, kw.pop("model", method), seed, **kw))
    base = {m: [r[m] for r in results["id"]] for m in ("gauc", "auc")}
    lines = ["| Method | GAUC | vs ID | AUC | vs ID |", "| --- | --- | --- | --- | --- |"]
    summary = {}
    for method, runs in results.items():
        g, a = [r["gauc"] for r in runs], [r["auc"] for r in runs]
        (gr, grm), (ar, arm) = relative(g, base["gauc"]), relative(a, base["auc"])
        lines.append(f"| {NAMES[method]} | {mean_std(g)} | {gr} | {mean_std(a)} | {ar} |")
        summary[method] = {"gauc": g, "auc": a, "gauc_rel_pct": grm, "auc_rel_pct": arm,
                           "new_item_auc": [r["new_items"]["auc"] for r in runs]}
    return lines, summary, results, acc


def fig6b(results, out):
    """Relative AUC gain and LogLoss reduction per frequency group over ID (mean over seeds)."""
    def per_group(method, key):
        return np.array([[g[key] for g in r["frequency_groups"]] for r in results[method]])

    auc_id, ll_id = per_group("id", "auc"), per_group("id", "logloss")
    gains = {}
    for method in ("simtier_make", "simtier"):
        if method in results:
            gains[method] = (
                (100.0 * (per_group(method, "auc") - auc_id) / auc_id).mean(axis=0),
                (100.0 * (ll_id - per_group(method, "logloss")) / ll_id).mean(axis=0))
    groups = np.arange(1, auc_id.shape[1] + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, (k, label) in zip(axes, enumerate(("AUC gain", "LogLoss reduction"))):
        for i, (method, values) in enumerate(gains.items()):
            ax.bar(groups + (i - 0.5) * 0.4, values[k], 0.4, label=NAMES[method])
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set(xlabel="item frequency group (1 = rarest)", title=label, xticks=groups)
        ax.legend()
    axes[0].set_ylabel("relative to ID (%)")
    fig.suptitle("Fig. 6(b): gains over ID by item training frequency")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fig6b.png"), dpi=120)
    plt.close(fig)
    impressions = [g["impressions"] for g in results["id"][0]["frequency_groups"]]
    names = [NAMES[m] for m in gains]
    lines = ["| Group | Test impressions | " + " | ".join(
        f"{n}: AUC gain | {n}: LogLoss reduction" for n in names) + " |",
        "| --- | --- |" + " --- | --- |" * len(names)]
    for j, (g, n) in enumerate(zip(groups, impressions)):
        lines.append(f"| {g} | {n} | " + " | ".join(
            f"{a[j]:+.2f}% | {ll[j]:+.2f}%" for a, ll in gains.values()) + " |")
    return lines, {"impressions": impressions, **{
        m: {"auc_gain_pct": a.tolist(), "logloss_reduction_pct": ll.tolist()}
        for m, (a, ll) in gains.items()}}


def command_flags():
    """The flags that reproduce this report: the world, seeds and output, and any non-default."""
    names = ["world", "seeds", "out_dir"] + [
        k for k in ("data_dir", "pretrain_epochs", "make_epochs", "make_target_in_mlp", "methods",
                    "sections", "make_sweep", "fig3_epochs", "batch_size")
        if FLAGS[k].value != FLAGS[k].default]

    def text(v):
        return ",".join(v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else v

    return " ".join(f"--{k}={text(FLAGS[k].value)}" for k in names)


def line_plot(path, title, xlabel, ylabel, series):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o", label=label)
        if all(isinstance(v, int) for v in x):
            ax.set_xticks(x)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    start = time.time()
    unknown = [m for m in FLAGS.methods + FLAGS.control_methods if m not in NAMES]
    if unknown or not {"id", "simtier_make"} <= set(FLAGS.methods):
        raise app.UsageError(f"--methods={','.join(FLAGS.methods)}: want some of "
                             f"{list(NAMES)}, id and simtier_make among them.")
    out = FLAGS.out_dir
    os.makedirs(out, exist_ok=True)
    seeds = [int(s) for s in FLAGS.seeds]
    data_dir = ensure_world(FLAGS.data_dir or os.path.join("data", FLAGS.world), FLAGS.world)
    vectors, acc, index = encoder(data_dir, FLAGS.pretrain_epochs, "main")
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
        parts["fig3"] = ["## Fig. 3: ID vs multimodal-only over epochs", "", "![fig3](fig3.png)", "",
                  "| Epoch | " + " | ".join(map(str, epochs)) + " |",
                  "| --- |" + " --- |" * n,
                  "| ID GAUC | " + " | ".join(f"{g:.4f}" for g in id_g) + " |",
                  "| MM-only GAUC | " + " | ".join(f"{g:.4f}" for g in mm_g) + " |", ""]

    if "fig6a" in FLAGS.sections:
        points = []
        for e in map(int, FLAGS.encoder_epochs):
            vecs, a, idx = encoder(data_dir, e, "main")
            tag = "main" if e == FLAGS.pretrain_epochs else f"fig6a-e{e}"
            points.append((e, a, ranker(data_dir, vecs, idx, tag, "simtier", seeds[0])["gauc"]))
        line_plot(os.path.join(out, "fig6a.png"), "Fig. 6(a): pre-training vs CTR", "Acc@1",
                  "SimTier ranker test GAUC",
                  {"encoders": ([p[1] for p in points], [p[2] for p in points])})
        report["fig6a"] = [{"scl_epochs": e, "acc@1": a, "gauc": g} for e, a, g in points]
        parts["fig6a"] = ["## Fig. 6(a): encoder Acc@1 vs ranker GAUC", "", "![fig6a](fig6a.png)", "",
                  "| SCL epochs | Acc@1 | SimTier GAUC |", "| --- | --- | --- |"]
        parts["fig6a"] += [f"| {e} | {a:.4f} | {g:.4f} |" for e, a, g in points] + [""]

    if "fig6c" in FLAGS.sections:
        base = ranker(data_dir, vectors, index, "main", "id", seeds[0])
        sweep = sorted(map(int, FLAGS.make_sweep), reverse=True)  # longest first: shared weights
        runs = {e: ranker(data_dir, vectors, index, "main", "simtier_make", seeds[0],
                          make_epochs=e) for e in sweep}
        sweep = sorted(sweep)
        g = [100 * (runs[e]["gauc"] - base["gauc"]) / base["gauc"] for e in sweep]
        a = [100 * (runs[e]["auc"] - base["auc"]) / base["auc"] for e in sweep]
        line_plot(os.path.join(out, "fig6c.png"), "Fig. 6(c): MAKE pre-training epochs",
                  "MAKE pre-training epochs (0: joint)", "SimTier+MAKE vs ID (%)",
                  {"GAUC": (sweep, g), "AUC": (sweep, a)})
        report["fig6c"] = {"make_epochs": sweep, "gauc_rel_pct": g, "auc_rel_pct": a}
        parts["fig6c"] = ["## Fig. 6(c): MAKE pre-training epochs", "", "![fig6c](fig6c.png)", "",
                  "| MAKE epochs | GAUC vs ID | AUC vs ID |", "| --- | --- | --- |"]
        parts["fig6c"] += [f"| {e} | {x:+.2f}% | {y:+.2f}% |" for e, x, y in zip(sweep, g, a)]
        parts["fig6c"].append("")

    if "table3" in FLAGS.sections:
        rows, summary, results, _ = table3(data_dir, seeds, "main", FLAGS.methods)
        b_lines, b = fig6b(results, out)
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
        rows, summary, _, control_acc = table3(control_dir, seeds, "control",
                                               FLAGS.control_methods)
        report["control"] = summary
        parts["control"] = ["## Control: visual_weight=0 (clicks ignore appearance)", "",
                            f"Encoder Acc@1 {control_acc:.4f} on this world.", ""] + rows + [""]

    for name in ("table3", "fig3", "fig6a", "fig6c", "control"):
        lines += parts.get(name, [])
    elapsed = time.time() - start
    lines += [f"The {len(RUN_SECONDS)} runs behind this report took "
              f"{sum(RUN_SECONDS.values()) / 60:.1f} min of training and evaluation on "
              f"{os.cpu_count()} CPUs (this invocation: {elapsed / 60:.1f} min; finished runs "
              f"under {FLAGS.runs_dir} are reused). Command: `python -m pipelines.paper "
              f"{command_flags()}`"]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)

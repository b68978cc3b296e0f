"""What the report pipelines share: encoder and ranker runs kept under one
directory (a finished run is read back, not trained again), the method table
against the ID ranker, the gains by item-frequency group and line plots."""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from tfmm import ctr, outputs, pretrain
from tfmm.data import schema
from tfmm.index import open_index

NAMES = {"id": "ID (DIN)", "vector": "Vector", "simscore": "SimScore", "simtier": "SimTier",
         "make": "MAKE", "simtier_make": "SimTier+MAKE",
         "simtier_make_ft": "SimTier+MAKE, MAKE fine-tuned"}


class Runs:
    """Encoder and ranker runs under `runs_dir`/<tag>/, each reused once it has finished.

    `pretrain_settings` and `ctr_settings` are `PretrainConfig` / `CTRConfig`
    fields given to every encoder / ranker run; `seconds` maps each run's
    directory to its train_seconds (each run counted once).
    """

    def __init__(self, runs_dir, batch_size, make_epochs, make_target_in_mlp,
                 pretrain_settings=None, ctr_settings=None):
        self.runs_dir, self.batch_size, self.make_epochs = runs_dir, batch_size, make_epochs
        self.make_target_in_mlp = make_target_in_mlp
        self.pretrain_settings = pretrain_settings or {}
        self.ctr_settings = ctr_settings or {}
        self.seconds = {}

    def encoder(self, data_dir, epochs, tag):
        """(vectors, metrics, index) of an encoder after `epochs` of SCL (0: untrained)."""
        runs = os.path.join(self.runs_dir, tag, f"encoder-e{epochs}")
        index = os.path.join(runs, "vectors.db")
        metrics_path = os.path.join(runs, "metrics.json")
        if not os.path.exists(metrics_path):
            print(f"[{tag}] pre-training the encoder for {epochs} epoch(s) ...", flush=True)
            if os.path.exists(index):  # a half-written run: start over
                os.remove(index)
            pretrain.run(pretrain.PretrainConfig(
                data_dir=data_dir, model_dir=runs, index=index, epochs=epochs,
                objective="scl" if epochs else "random", verbose=0,
                **self.pretrain_settings))
        with open(metrics_path) as f:
            m = json.load(f)
        self.seconds[runs] = m["train_seconds"]
        meta = schema.read_metadata(data_dir)
        return open_index(index).snapshot(meta["vocab"]["num_items"]), m, index

    def ranker(self, data_dir, vectors, index, tag, model, seed, make_epochs=None, epochs=1,
               **kw):
        """The metrics of one ranker run (read back when it already finished)."""
        make_epochs = self.make_epochs if make_epochs is None else make_epochs
        name = f"{model}-s{seed}-e{epochs}" + (f"-make{make_epochs}" if "make" in model else "")
        name += "-ft" if kw.get("make_trainable") else ""
        eq4 = "-eq4" if "make" in model and not self.make_target_in_mlp else ""
        name += eq4
        model_dir = os.path.join(self.runs_dir, tag, name)
        path = os.path.join(model_dir, "metrics.json")
        if not os.path.exists(path):
            print(f"[{tag}] {name} ...", flush=True)
            ctr.run(ctr.CTRConfig(
                data_dir=data_dir, model_dir=model_dir, index=index, model=model, seed=seed,
                epochs=epochs, make_epochs=make_epochs, batch_size=self.batch_size,
                make_dir=os.path.join(self.runs_dir, tag, f"make-s{seed}{eq4}"),
                make_target_in_mlp=self.make_target_in_mlp, verbose=0,
                **self.ctr_settings, **kw),
                vectors=None if model == "id" else vectors)
        with open(path) as f:
            result = json.load(f)
        self.seconds[model_dir] = result["train_seconds"]
        result["model_dir"] = model_dir
        print(f"[{tag}] {name}: gauc {result['gauc']:.4f} auc {result['auc']:.4f}", flush=True)
        return result

    def methods(self, data_dir, vectors, index, tag, seeds, methods):
        """{method: [metrics of each seed]}; ``simtier_make_ft`` is SimTier+MAKE with
        MAKE fine-tuned."""
        results = {}
        for seed in seeds:
            for method in methods:
                key, kw = (method, {}) if method != "simtier_make_ft" else (
                    method, {"model": "simtier_make", "make_trainable": True})
                results.setdefault(key, []).append(self.ranker(
                    data_dir, vectors, index, tag, kw.pop("model", method), seed, **kw))
        return results


def mean_std(x, signed=False):
    x = np.asarray(x, np.float64)
    return f"{x.mean():{'+' if signed else ''}.4f} ± {x.std():.4f}"


def relative(x, base):
    """Per-seed relative change in %, as 'mean ± std'."""
    r = 100.0 * (np.asarray(x) - np.asarray(base)) / np.asarray(base)
    return f"{r.mean():+.2f}% ± {r.std():.2f}", float(r.mean())


def method_table(results, paired=False):
    """Markdown rows of GAUC and AUC by method against ID (in `results`), and their summary.

    `paired`: instead of the relative and AUC columns, each seed's GAUC minus the ID
    ranker's of the same seed (mean and min over seeds) and, where a residual-MAKE run
    recorded the same run without MAKE's head (``make.without_make``), what the head adds
    to its GAUC. The summary has both (``gauc_delta``, ``make_head``: per seed).
    """
    base = {m: [r[m] for r in results["id"]] for m in ("gauc", "auc")}
    lines = (["| Method | GAUC | ΔGAUC vs ID, mean | ΔGAUC vs ID, min | MAKE's head |",
              "| --- | --- | --- | --- | --- |"] if paired else
             ["| Method | GAUC | vs ID | AUC | vs ID |", "| --- | --- | --- | --- | --- |"])
    summary = {}
    for method, runs in results.items():
        g, a = [r["gauc"] for r in runs], [r["auc"] for r in runs]
        (gr, grm), (ar, arm) = relative(g, base["gauc"]), relative(a, base["auc"])
        delta = (np.asarray(g) - np.asarray(base["gauc"])).tolist()
        summary[method] = {"gauc": g, "auc": a, "gauc_rel_pct": grm, "auc_rel_pct": arm,
                           "gauc_delta": delta,
                           "new_item_auc": [r["new_items"]["auc"] for r in runs]}
        if all("without_make" in r.get("make", {}) for r in runs):
            summary[method]["make_head"] = [r["gauc"] - r["make"]["without_make"]["gauc"]
                                            for r in runs]
        if paired:
            head = summary[method].get("make_head")
            lines.append(f"| {NAMES[method]} | {mean_std(g)} | {np.mean(delta):+.4f} | "
                         f"{np.min(delta):+.4f} | "
                         f"{'–' if head is None else mean_std(head, signed=True)} |")
        else:
            lines.append(f"| {NAMES[method]} | {mean_std(g)} | {gr} | {mean_std(a)} | {ar} |")
    return lines, summary


def frequency_gains(results, path, title):
    """Relative AUC gain and LogLoss reduction over ID per item-frequency group (mean over
    seeds) of SimTier+MAKE and SimTier, plotted to `path`; Markdown rows and the numbers."""
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
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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


def pipeline_dir(directory):
    """Whether a pipeline wrote `directory` (`tfmm.outputs`): it is marked, or was written
    before the marker: a report (report.json) or a work directory (inputs.json)."""
    return outputs.written_by_tfmm(directory) or any(
        os.path.exists(os.path.join(directory, name)) for name in ("report.json", "inputs.json"))


def write_report(out, lines, report):
    """`report.md` (the lines) and `report.json` in `out`; prints the lines."""
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("\n".join(lines))

"""The never-hurts check on your own data: does adding your item vectors to the ID
ranker cost anything, and are they worth more than noise?

    python -m pipelines.never_hurts --data_dir=data/mine --index=runs/mine/index/vectors.db \\
        [--seeds=0,1,2] [--methods=simtier,make,simtier_make]

For each of ``--seeds`` it trains the ID ranker (the baseline), each of
``--methods`` on the vectors of ``--index`` (yours: filled by ``--task=pretrain``,
``--task=ctr`` or ``python -m tfmm.index import``), and each of them again on a
random control: unit random vectors (seed `RANDOM_SEED`) for exactly the items
your index holds, of the same width, written once to
``<runs_dir>/random/vectors.db`` as an import writes (`tfmm.index.open_index`,
``claim``, one ``put``). MAKE is pre-trained once per vectors and seed and
shared by ``make`` and ``simtier_make``.

The report (``--out_dir``/report.md and report.json) leads with the encoder's
checks as the user's rankers recorded them (metrics.json's ``encoder``: the
index's record, the label-free check on the vectors, a warning or None) and
the random control's label-free value beside them, then
per vectors source a table of GAUC and ΔGAUC against the ID ranker of the same
seed (mean and min over seeds) and, for residual MAKE, what MAKE's head adds to
the same run (metrics.json's ``make.without_make``). A method **never hurts**
when its mean ΔGAUC on the random control is at least ``-tolerance``; a line
per method says whether your vectors beat the random control (paired by seed).
Two runs of one configuration differ by about ±0.002 GAUC from float rounding
(oneDNN), hence the pairing by seed and ``--tolerance``.

Finished runs under ``--runs_dir`` are reused (a killed report resumes; more
``--seeds`` or ``--methods`` add runs); it remembers the data directory, the
index's vectors and the ranker settings, and refuses others (use a fresh
``--runs_dir``).
"""

import contextlib
import hashlib
import os
import time

import numpy as np
from absl import flags

from pipelines.runs import NAMES, Runs, method_table, pipeline_dir, write_report
from tfmm import cli, ctr, encoder_checks, jobs, outputs
from tfmm.config import SettingsError
from tfmm.data import schema
from tfmm.index import is_empty, local_index, open_index, redact, remove_files

FLAGS = flags.FLAGS
RANDOM_SEED = 0  # the random control's vectors: the same for every run and seed
# What the runs under --runs_dir depend on, beside the data and the index's vectors.
SETTINGS = ("batch_size", "make_epochs", "embedding_dim", "make_integration", "start_as_id")
SOURCES = {"user": "your index", "random": "random control"}


def define_flags():
    cli.define_data_flags("Your tfmm data directory (python -m tfmm.data.prepare).",
                          generates=False)
    flags.DEFINE_string("index", None, "Your filled index table of item vectors: a SQLite file "
                        "or a redis:// URL.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Ranker seeds; each method is compared with "
                      "the ID ranker of the same seed.")
    flags.DEFINE_list("methods", ["simtier", "make", "simtier_make"], "Multimodal rankers "
                      "checked (any of tfmm.ctr's models); the ID ranker always runs.")
    flags.DEFINE_string("runs_dir", None, "Every run, reused (default "
                        "runs/<data directory's name>/never_hurts).")
    flags.DEFINE_string("out_dir", None, "Report: report.md and report.json (default "
                        "results/never_hurts/<data directory's name>).")
    flags.DEFINE_float("tolerance", 0.002, "A method never hurts when its mean GAUC change "
                       "against ID on the random control is at least -tolerance.")
    flags.DEFINE_integer("batch_size", ctr.CTRConfig.batch_size, "Ranker batch size.")
    flags.DEFINE_integer("make_epochs", ctr.CTRConfig.make_epochs, "MAKE pre-training epochs.")
    flags.DEFINE_integer("embedding_dim", ctr.CTRConfig.embedding_dim, "Ranker id embedding "
                         "width.")
    flags.DEFINE_enum("make_integration", ctr.CTRConfig.make_integration,
                      ["residual", "concat"], "How MAKE joins the ranker (tfmm.ctr.CTRConfig).")
    flags.DEFINE_bool("start_as_id", ctr.CTRConfig.start_as_id, "Multimodal rankers start as "
                      "the ID ranker of their seed (tfmm.ctr.CTRConfig).")


def fill_command(data_dir, index):
    return (f"python -m tfmm.train --task=pretrain --data_dir={data_dir} --index={index} "
            f"(or --task=ctr, which pre-trains into an empty index), or python -m tfmm.index "
            f"import --data_dir={data_dir} --vectors=FILE --index={index}")


def user_vectors(index, data_dir, num_items):
    """(ids, dim, fingerprint) of the user's index, refused in one line when it is empty,
    missing or holds another catalogue's vectors. Writes nothing."""
    shown = redact(index)
    if is_empty(index):
        raise SettingsError(f"--index={shown} holds no vectors; fill it first: "
                            f"{fill_command(data_dir, shown)}.")
    with contextlib.closing(open_index(index)) as held:
        theirs, ours = held.catalogue(), schema.catalogue_fingerprint(data_dir)
        if theirs not in (None, ours):
            raise SettingsError(f"--index={shown} holds vectors of another catalogue "
                                f"({theirs}, not {ours} of {data_dir}).")
        ids = held.ids()
        table = held.snapshot(num_items).table
    fingerprint = hashlib.sha256(ids.tobytes() + np.ascontiguousarray(table).tobytes())
    return ids, table.shape[1], fingerprint.hexdigest()[:16]


def random_index(path, ids, dim, data_dir, source):
    """The random control at `path`: unit random vectors for exactly `ids`, written once
    (one put, as ``python -m tfmm.index import`` writes) and kept while they are these ids."""
    if os.path.exists(path):
        with contextlib.closing(open_index(path)) as held:
            if held.dim == dim and np.array_equal(held.ids(), ids):
                return path
        remove_files(path)  # a half-made control (killed before its put)
    vectors = np.random.default_rng(RANDOM_SEED).standard_normal((len(ids), dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with contextlib.closing(open_index(path, dim=dim)) as index:
        index.claim(schema.catalogue_fingerprint(data_dir))
        index.describe({"source": "random unit vectors", "seed": RANDOM_SEED,
                        "items_of": source})
        index.put(ids, vectors)
    return path


def value_lines(values):
    """`values` (a dict, nested or not) as Markdown list lines ``key: value``."""
    lines = []
    for key, value in values.items():
        if isinstance(value, dict):
            lines += [f"- {key}:"] + ["  " + line for line in value_lines(value)]
        else:
            lines.append(f"- {key}: {f'{value:.4f}' if isinstance(value, float) else value}")
    return lines


def encoder_lines(by_source):
    """The report's lead: the encoder's checks as the user's rankers recorded them
    (metrics.json's ``encoder``, `tfmm.encoder_checks`), the random control's label-free
    value beside them; lines and the user's checks (None where not recorded)."""
    recorded = {source: next((r["encoder"] for runs in results.values() for r in runs
                              if r.get("encoder") is not None), None)
                for source, results in by_source.items()}
    checks = recorded["user"]
    if checks is None:
        return ["The encoder's checks were not recorded in your rankers' metrics.json "
                "(runs made before tfmm recorded them)."], None
    lines = ["As your rankers printed and recorded them (metrics.json, `encoder`):", ""]
    lines += [f"    {line}" for line in encoder_checks.lines(checks)] + [""] + value_lines(checks)
    control = (recorded["random"] or {}).get("snapshot", {}).get(encoder_checks.KEY)
    if control is not None:
        lines += ["", f"The random control's vectors on the label-free check: "
                  f"{encoder_checks.KEY} {control:.4f}."]
    return lines, checks


def verdicts(summaries, tolerance):
    """Per method: whether the random control stays within `tolerance` of ID, and how the
    user's vectors compare with the random control (paired by seed); lines and numbers."""
    lines, numbers = [], {}
    for method in summaries["random"]:
        if method == "id":
            continue
        delta = np.asarray(summaries["random"][method]["gauc_delta"])
        hurts = delta.mean() < -tolerance
        gain = (np.asarray(summaries["user"][method]["gauc"])
                - np.asarray(summaries["random"][method]["gauc"]))
        numbers[method] = {"never_hurts": not hurts, "random_delta_mean": float(delta.mean()),
                           "random_delta_min": float(delta.min()),
                           "user_minus_random": gain.tolist()}
        verdict = (f"**HURTS**: on random vectors {delta.mean():+.4f} GAUC against ID "
                   f"(mean; min {delta.min():+.4f}), below -{tolerance:g}" if hurts else
                   f"never hurts: on random vectors {delta.mean():+.4f} GAUC against ID "
                   f"(mean; min {delta.min():+.4f}), not below -{tolerance:g}")
        worth = ("beat" if gain.mean() > tolerance else "are below" if gain.mean() < -tolerance
                 else f"are within ±{tolerance:g} of")
        lines.append(f"- {NAMES[method]}: {verdict}. Your vectors {worth} the random control: "
                     f"{gain.mean():+.4f} GAUC (mean of each seed's difference; min "
                     f"{gain.min():+.4f}).")
    return lines, numbers


def main(argv):
    del argv
    start = time.time()
    unknown = [m for m in FLAGS.methods if m not in NAMES]
    methods = [m for m in dict.fromkeys(FLAGS.methods) if m != "id"]
    if unknown or not methods:
        cli.fail(f"--methods={','.join(FLAGS.methods)}: want one or more of "
                 f"{[m for m in NAMES if m != 'id']}.")
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        seeds = []
    if not seeds:
        cli.fail(f"--seeds={','.join(FLAGS.seeds)}: want one or more integers.")
    data_dir = cli.data_dir(generate=False)
    if not os.path.exists(os.path.join(data_dir, "metadata.json")):
        cli.fail(f"--data_dir={data_dir} holds no tfmm data (no metadata.json); prepare it with "
                 "python -m tfmm.data.prepare.")
    if not FLAGS.index:
        cli.fail("--index is required: your filled index table (a SQLite file or a redis:// "
                 "URL).")
    name = os.path.basename(os.path.normpath(data_dir))
    runs_dir = FLAGS.runs_dir or cli.runs(data_dir, "never_hurts")
    out = FLAGS.out_dir or os.path.join("results", "never_hurts", name)
    given = [data_dir, local_index(FLAGS.index)]
    for path, flag in ((runs_dir, "runs_dir"), (out, "out_dir")):  # before anything is written
        outputs.check_output_dir(path, flag, given, pipeline_dir)
    meta = schema.read_metadata(data_dir)
    ids, dim, fingerprint = user_vectors(FLAGS.index, data_dir, meta["vocab"]["num_items"])

    settings = {k: FLAGS[k].value for k in SETTINGS}
    outputs.claim_dir(runs_dir, "runs_dir", given, pipeline_dir, "pipelines.never_hurts")
    # Its runs are of one data dir, index and settings: others are refused, as a job's are.
    inputs = {"data_dir": os.path.abspath(data_dir),
              "catalogue": schema.catalogue_fingerprint(data_dir),
              "index": redact(FLAGS.index), "index_vectors": fingerprint, **settings}
    jobs.check_dir(runs_dir, inputs, "runs_dir")
    jobs.claim_dir(runs_dir, inputs)
    control = random_index(os.path.join(runs_dir, "random", "vectors.db"), ids, dim, data_dir,
                           redact(FLAGS.index))
    runs = Runs(runs_dir, FLAGS.batch_size, FLAGS.make_epochs, ctr.CTRConfig.make_target_in_mlp,
                ctr_settings=dict(embedding_dim=FLAGS.embedding_dim,
                                  make_integration=FLAGS.make_integration,
                                  start_as_id=FLAGS.start_as_id))
    # The rankers read their vectors from the index, as --task=ctr does.
    results = {"id": runs.methods(data_dir, None, "", "id", seeds, ["id"])["id"]}
    by_source = {source: {**results, **runs.methods(data_dir, None, index, source, seeds,
                                                     methods)}
                 for source, index in (("user", FLAGS.index), ("random", control))}

    head, encoder = encoder_lines(by_source)
    lines = [f"# Never hurts: multimodal rankers on `{name}` against the ID ranker", "",
             "## Encoder", ""] + head
    summaries = {}
    for source, source_results in by_source.items():
        table, summaries[source] = method_table(source_results, paired=True)
        lines += ["", f"## Rankers on {SOURCES[source]}"
                  + (f" ({redact(FLAGS.index)})" if source == "user" else
                     f" (unit random vectors, seed {RANDOM_SEED}, for the same {len(ids)} "
                     f"items, {dim}-d)"), ""] + table
    verdict_lines, verdict = verdicts(summaries, FLAGS.tolerance)
    lines += ["", "## Verdict", ""] + verdict_lines + [
        "", f"GAUC: mean ± std over seeds {','.join(map(str, seeds))}; ΔGAUC: each seed's "
        "GAUC minus the ID ranker's of the same seed; MAKE's head: the run's GAUC minus the "
        "same run without MAKE's head (residual MAKE). Two runs of one configuration differ "
        "by about ±0.002 GAUC from float rounding (oneDNN), so only changes paired by seed "
        f"and beyond --tolerance={FLAGS.tolerance:g} count; with few seeds, read a verdict "
        "near the line as noise.",
        "", f"Rankers: one epoch, batch {FLAGS.batch_size}, MAKE pre-trained "
        f"{FLAGS.make_epochs} epoch(s) ({FLAGS.make_integration}). The {len(runs.seconds)} runs "
        f"took {sum(runs.seconds.values()) / 60:.1f} min of training and evaluation (this "
        f"invocation: {(time.time() - start) / 60:.1f} min); finished runs under {runs_dir} "
        "are reused."]
    report = {"data_dir": os.path.abspath(data_dir), "index": redact(FLAGS.index),
              "random_index": control, "random_seed": RANDOM_SEED, "items": len(ids),
              "dim": dim, "seeds": seeds, "tolerance": FLAGS.tolerance, "settings": settings,
              "encoder": encoder, **summaries, "verdict": verdict,
              "runs": {source: {m: [r["model_dir"] for r in rs] for m, rs in res.items()}
                       for source, res in by_source.items()}}
    outputs.claim_dir(out, "out_dir", given, pipeline_dir, "pipelines.never_hurts")
    write_report(out, lines, report)


if __name__ == "__main__":
    define_flags()
    cli.run(main, errors=(ValueError, OSError))  # bad input or settings: one line, not a trace

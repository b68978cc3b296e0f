"""MovieLens end to end: ratings and movies (optionally posters and plots) to a
report of the encoder's checks and ID vs SimTier vs SimTier+MAKE, like results/paper/.

    python -m pipelines.movielens --ratings=ml-latest-small/ratings.csv \\
        --movies=ml-latest-small/movies.csv [--posters_dir=posters | --posters=posters.csv] \\
        [--plots=plots.csv] --out_dir=results/movielens [--work_dir=runs/movielens] \\
        [--seeds=0,1,2]
    python -m pipelines.movielens --ratings=ml-100k/u.data --movies=ml-100k/u.item ...

The files, as GroupLens publishes them (https://grouplens.org/datasets/movielens/,
e.g. https://files.grouplens.org/datasets/movielens/ml-latest-small.zip):

- ml-latest-small, ml-latest, ml-20m, ml-25m, ml-32m: ``ratings.csv``
  (``userId,movieId,rating,timestamp``) and ``movies.csv``
  (``movieId,title,genres``; genres pipe-separated, titles with commas quoted),
  UTF-8.
- ml-1m: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) and
  ``movies.dat`` (``MovieID::Title::Genres``), no header, Latin-1
  (``--dat_encoding``; ml-10m's files have the same layout).
- ml-100k: ``u.data`` (tab-separated ``user id, item id, rating, timestamp``; its
  ``u1.base`` ... ``ub.test`` splits too) and ``u.item`` (``|``-separated: movie
  id, title, release date, video release date, IMDb URL, then 19 genre flags in
  ``u.genre``'s order; the ``unknown`` genre counts as none), no header, Latin-1.

On a machine with internet, tensorflow-datasets can fetch them instead:
``--tfds=latest-small`` (or ``25m``, ``20m``, ``1m``) loads
``movielens/<version>-ratings`` and ``movielens/<version>-movies`` and writes
them as GroupLens CSV files under ``--work_dir``/tfds/, read as above. Offline,
this is tested only on ``tfds.testing.mock_data`` (TFDS's own feature spec,
random values), never on the real download.

Optional content:

- ``--posters_dir``: ``<movieId>.jpg``, ``.jpeg`` or ``.png`` (any size);
  movies without one have no image (their vectors are flagged missing in CTR).
- ``--posters``: instead, a UTF-8 CSV naming each movie's poster file:
  ``movieId,poster``, or ``title,year,poster`` matched to the movies' titles
  and years (case, accents, punctuation, a trailing article as in ``American
  President, The`` and an alternative title in parentheses aside). A poster is
  a path relative to the CSV's folder, an absolute one or a ``file://`` URL
  (download web posters first); rows naming no movie are counted.
- ``--plots``: a UTF-8 CSV ``movieId,plot``; plots of movies not in
  ``--movies`` are skipped (counted).

The steps, each reused when it has finished (a killed run resumes):

1. Convert (``--work_dir``/raw/): a rating >= ``--click_rating`` (default 4.0)
   is a click (label 1), a lower one a non-click (label 0); the impression log
   is ``user_id,item_id,label,timestamp``. An item's category is its first genre
   (``--category=all``: its whole genre set, e.g. ``Comedy|Romance``); its
   title is the movie title, then its genres as words (``--genres_in_title``),
   then its plot. The text tower reads a title's first 8 words.
2. `tfmm.data.prepare` as ``python -m tfmm.data.prepare ... --pairs_from=clicks``
   does it, in this process (``--work_dir``/data/):
   the latest ``--test_fraction`` of ratings are the test split; a user's click
   and their next click make a pre-training pair.
3. SCL pre-training on those pairs (``--pretrain_epochs``; the image tower with
   ``--posters_dir``, else the text tower, or ``--modality``) into an index,
   next to the untrained tower (0 epochs) for comparison.
4. Rankers (``--methods``, ID first) for each of ``--seeds``.
5. ``--out_dir``/report.md, report.json and gains.png: first the encoder's
   checks (Acc@N on the test pairs and the label-free same-genre neighbours
   check, each for the trained and the untrained tower and by chance, and
   whether training beat the untrained tower), then GAUC and AUC per method and
   seed, relative to ID, the cold-start rows (test impressions of movies with
   no training impression) and the gains by item frequency.

``--work_dir`` remembers the inputs and settings it was made with and refuses
others (start a fresh one); ``--seeds`` and ``--methods`` may change.
"""

import json
import os
import time

import numpy as np
from absl import flags

from pipelines.movielens_data import convert, export_tfds, image_source
from pipelines.runs import (NAMES, Runs, frequency_gains, mean_std, method_table, pipeline_dir,
                            write_report)
from tfmm import cli, ctr, encoder_checks, outputs, pretrain
from tfmm.config import SettingsError
from tfmm.data import schema
from tfmm.data.prepare import PrepareOptions, prepare, summary

FLAGS = flags.FLAGS

# Everything the work directory's contents depend on; --seeds and --methods add runs.
SETTINGS = ("click_rating", "category", "genres_in_title", "test_fraction", "max_history",
            "pair_window", "pair_max_gap", "modality", "pretrain_epochs", "dim",
            "pretrain_batch_size", "queue_size", "image_size", "center_vectors", "batch_size",
            "make_epochs", "embedding_dim")


def define_flags():
    flags.DEFINE_string("ratings", None, "ratings.csv (userId,movieId,rating,timestamp), "
                        "ratings.dat (UserID::MovieID::Rating::Timestamp) or ML-100K's u.data.")
    flags.DEFINE_string("movies", None, "movies.csv (movieId,title,genres), movies.dat "
                        "(MovieID::Title::Genres) or ML-100K's u.item.")
    flags.DEFINE_string("tfds", None, "Instead of --ratings/--movies: fetch "
                        "movielens/<this>-ratings and -movies with tensorflow-datasets (needs "
                        "internet), e.g. latest-small.")
    flags.DEFINE_string("posters_dir", None, "Optional posters: <movieId>.jpg|.jpeg|.png.")
    flags.DEFINE_string("posters", None, "Optional posters named by a CSV: movieId,poster or "
                        "title,year,poster (files relative to the CSV or absolute).")
    flags.DEFINE_string("plots", None, "Optional plot texts: a CSV movieId,plot.")
    flags.DEFINE_string("dat_encoding", "latin-1", "Encoding of the files without a header "
                        "(.dat, u.data, u.item; GroupLens's are Latin-1).")
    flags.DEFINE_float("click_rating", 4.0, "Ratings at or above it are clicks (label 1), lower "
                       "ones non-clicks (label 0).")
    flags.DEFINE_enum("category", "first", ["first", "all"], "An item's category: its first "
                      "genre, or its whole genre set.")
    flags.DEFINE_bool("genres_in_title", True, "Append the genres as words to the title.")
    flags.DEFINE_string("out_dir", "results/movielens", "Report: report.md, report.json, "
                        "gains.png.")
    flags.DEFINE_string("work_dir", "runs/movielens", "Converted files, the data directory and "
                        "every run (reused).")
    flags.DEFINE_float("test_fraction", PrepareOptions.test_fraction, "Latest fraction of "
                       "ratings used for test.")
    flags.DEFINE_integer("max_history", PrepareOptions.max_history, "Longest click history "
                         "kept.")
    flags.DEFINE_integer("pair_window", PrepareOptions.pair_window, "Pair each click with this "
                         "many of the user's next clicks.")
    flags.DEFINE_integer("pair_max_gap", None, "The most seconds between a pair's two clicks "
                         "(default: any).")
    flags.DEFINE_enum("modality", None, ["image", "text"], "Encoder tower (default: image with "
                      "--posters_dir or --posters, else text).")
    flags.DEFINE_integer("pretrain_epochs", pretrain.PretrainConfig.epochs, "SCL epochs.")
    flags.DEFINE_integer("dim", pretrain.PretrainConfig.dim, "Item vector width.")
    flags.DEFINE_integer("pretrain_batch_size", pretrain.PretrainConfig.batch_size,
                         "SCL batch size.")
    flags.DEFINE_integer("queue_size", pretrain.PretrainConfig.queue_size, "SCL's MoCo queue "
                         "(0: in-batch negatives only); a multiple of --pretrain_batch_size.")
    flags.DEFINE_integer("image_size", pretrain.PretrainConfig.image_size, "Image tower input "
                         "size.")
    flags.DEFINE_bool("center_vectors", None, "Centre the encoder's vectors (pre-training's "
                      "--center_vectors; default: the library's, on for these click pairs, "
                      "which leave them in a narrow cone, DECISIONS.md).")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Ranker seeds.")
    flags.DEFINE_list("methods", ["id", "simtier", "simtier_make"], "Rankers, id first (any of "
                      "tfmm.ctr's models).")
    flags.DEFINE_integer("batch_size", ctr.CTRConfig.batch_size, "Ranker batch size.")
    flags.DEFINE_integer("make_epochs", ctr.CTRConfig.make_epochs, "MAKE pre-training epochs.")
    flags.DEFINE_integer("embedding_dim", ctr.CTRConfig.embedding_dim, "Ranker id embedding "
                         "width.")


def prepare_options(raw, data_dir):
    """How the converted files in `raw` are prepared into `data_dir`."""
    images_dir, absolute = image_source(FLAGS.posters_dir, FLAGS.posters)
    return PrepareOptions(
        impressions=os.path.join(raw, "impressions.csv"), items=os.path.join(raw, "items.csv"),
        out_dir=data_dir, images_dir=images_dir, absolute_image_paths=absolute,
        test_fraction=FLAGS.test_fraction, max_history=FLAGS.max_history, pairs_from="clicks",
        pair_window=FLAGS.pair_window, pair_max_gap=FLAGS.pair_max_gap)


def prepare_command(options):
    """The command that prepares as `options` (of `prepare_options`) do."""
    args = [f"--impressions={options.impressions}", f"--items={options.items}",
            f"--out_dir={options.out_dir}", f"--test_fraction={options.test_fraction}",
            f"--max_history={options.max_history}", "--pairs_from=clicks",
            f"--pair_window={options.pair_window}"]
    if options.pair_max_gap is not None:
        args.append(f"--pair_max_gap={options.pair_max_gap}")
    if options.images_dir:
        args.append(f"--images_dir={options.images_dir}")
    if options.absolute_image_paths:
        args.append("--absolute_image_paths")
    return " ".join(["python -m tfmm.data.prepare", *args])


def prepared(work, ratings, movies):
    """The data directory under `work`, converted and prepared unless it already was with
    these inputs and settings; and the conversion's counts."""
    inputs = {"ratings": ratings, "movies": movies, "posters_dir": FLAGS.posters_dir,
              "posters": FLAGS.posters, "plots": FLAGS.plots}
    record = {"inputs": {k: v and os.path.abspath(v) for k, v in inputs.items()},
              "sizes": {k: os.path.getsize(v) for k, v in inputs.items()
                        if v and os.path.isfile(v)},
              "settings": {k: FLAGS[k].value for k in SETTINGS}}
    path, data_dir = os.path.join(work, "inputs.json"), os.path.join(work, "data")
    if os.path.exists(os.path.join(data_dir, "metadata.json")):
        with open(path) as f:
            old = json.load(f)
        changed = [k for part in ("inputs", "sizes", "settings")
                   for k in set(old[part]) | set(record[part])
                   if old[part].get(k) != record[part].get(k)]
        if changed:
            raise SettingsError(f"--work_dir={work} was made with other inputs or settings "
                                f"({', '.join(sorted(set(changed)))}); use a fresh --work_dir.")
        return data_dir, old["counts"]
    raw = os.path.join(work, "raw")
    print(f"converting {ratings} and {movies} ...", flush=True)
    record["counts"] = convert(ratings, movies, FLAGS.plots, raw, FLAGS.click_rating,
                               FLAGS.category, FLAGS.genres_in_title, FLAGS.dat_encoding,
                               FLAGS.posters)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    options = prepare_options(raw, data_dir)
    print(prepare_command(options), flush=True)
    try:
        meta = prepare(options)
    except (ValueError, OSError) as e:
        raise ValueError(f"tfmm.data.prepare: {e}") from None
    print(summary(meta, options), flush=True)
    return data_dir, record["counts"]


def encoder_lines(trained, untrained):
    """The report's lead: the encoder's Acc@N and label-free check next to its untrained
    tower's and chance's, and whether training moved the label-free check."""
    key = encoder_checks.KEY
    pairs = trained.get("test_pairs", 0)
    # A random ranking puts a query's own positive among the top N of `pairs` with N / pairs.
    chance = {f"acc@{n}": min(n, pairs) / pairs for n in (1, 5) if pairs}
    chance[key] = trained.get(f"{key}_chance")
    lines = ["| Encoder | Acc@1 | Acc@5 | same-category neighbours@10 |",
             "| --- | --- | --- | --- |"]
    for name, m in (("untrained tower", untrained),
                    (f"SCL, {FLAGS.pretrain_epochs} epoch(s)", trained), ("chance", chance)):
        cells = ["n/a" if m.get(k) is None else f"{m[k]:.4f}" for k in ("acc@1", "acc@5", key)]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    if trained.get(key) is not None:
        change = trained[key] - untrained[key]
        lines += ["", f"Same-category neighbours over {trained['neighbours_items']} movies with "
                  "content: " + (f"training moved them {change:+.4f} from the untrained tower."
                                 if change > 0 else
                                 f"**the trained encoder is no better than its untrained tower** "
                                 f"({change:+.4f}); its vectors tell the rankers no more than "
                                 "untrained features of the same content.")]
    return lines


def main(argv):
    del argv
    start = time.time()
    work, out = FLAGS.work_dir, FLAGS.out_dir
    given = [FLAGS.ratings, FLAGS.movies, FLAGS.posters_dir, FLAGS.posters, FLAGS.plots]
    for path, flag in ((work, "work_dir"), (out, "out_dir")):  # before anything is written
        outputs.check_output_dir(path, flag, given, pipeline_dir)
    if FLAGS.tfds:
        if FLAGS.ratings or FLAGS.movies:
            raise ValueError(f"--tfds={FLAGS.tfds} and --ratings/--movies: pass one source.")
    elif not (FLAGS.ratings and FLAGS.movies):
        raise ValueError("--ratings and --movies are required (or --tfds).")
    else:
        ratings, movies = FLAGS.ratings, FLAGS.movies
    if FLAGS.posters_dir and not os.path.isdir(FLAGS.posters_dir):
        raise ValueError(f"--posters_dir={FLAGS.posters_dir}: not a directory.")
    if FLAGS.posters_dir and FLAGS.posters:
        raise ValueError(f"--posters_dir={FLAGS.posters_dir} and --posters={FLAGS.posters}: "
                         "pass one of them.")
    if not FLAGS.methods or FLAGS.methods[0] != "id" or \
            any(m not in NAMES for m in FLAGS.methods):
        raise ValueError(f"--methods={','.join(FLAGS.methods)}: want id first, then any of "
                         f"{list(NAMES)}.")
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        raise ValueError(f"--seeds={','.join(FLAGS.seeds)}: want integers.") from None
    modality = FLAGS.modality or ("image" if FLAGS.posters_dir or FLAGS.posters else "text")
    outputs.claim_dir(work, "work_dir", given, pipeline_dir, "pipelines.movielens")
    if FLAGS.tfds:
        paths = export_tfds(FLAGS.tfds, os.path.join(work, "tfds"))
        ratings, movies = paths["ratings"], paths["movies"]
    data_dir, counts = prepared(work, ratings, movies)
    meta = schema.read_metadata(data_dir)

    runs = Runs(os.path.join(work, "runs"), FLAGS.batch_size, FLAGS.make_epochs,
                ctr.CTRConfig.make_target_in_mlp,
                pretrain_settings=dict(modality=modality, dim=FLAGS.dim,
                                       batch_size=FLAGS.pretrain_batch_size,
                                       queue_size=FLAGS.queue_size, image_size=FLAGS.image_size,
                                       center_vectors=FLAGS.center_vectors),
                ctr_settings=dict(embedding_dim=FLAGS.embedding_dim))
    _, untrained, _ = runs.encoder(data_dir, 0, modality)
    vectors, encoder, index = runs.encoder(data_dir, FLAGS.pretrain_epochs, modality)
    results = runs.methods(data_dir, vectors, index, modality, seeds, FLAGS.methods)
    table, summary = method_table(results)
    outputs.claim_dir(out, "out_dir", given, pipeline_dir, "pipelines.movielens")
    gains_lines, gains = frequency_gains(results, os.path.join(out, "gains.png"),
                                         "MovieLens: gains over ID by item training frequency")

    n = meta["counts"]
    blank = (f" {meta['missing']['images']} movies have no poster: they get no vector (the "
             "rankers flag it missing), and a pair whose first movie has none has a blank "
             "query image." if modality == "image" and meta["missing"]["images"] else "")
    lines = [
        "# MovieLens: ID vs SimTier vs SimTier+MAKE", "", "## Encoder", ""] + encoder_lines(
        encoder, untrained) + [
        "", f"Pre-trained on {encoder['source']}: {meta['pairs']['train']} training and "
        f"{meta['pairs']['test']} test click pairs (a user's click and their next click), "
        "Acc@N on the test pairs." + blank, "", "## Data", "",
        f"{counts['ratings']} ratings of {counts['movies']} movies ({os.path.abspath(ratings)}); "
        f"a rating >= {FLAGS.click_rating:g} is a click: {counts['clicks']} clicks "
        f"({100 * counts['clicks'] / max(counts['ratings'], 1):.1f}%). Train / test "
        f"impressions {n['impressions/train']} / {n['impressions/test']} (the latest "
        f"{FLAGS.test_fraction:g} of ratings are test); "
        f"{meta['vocab']['num_users'] - schema.FIRST_ID} training users. Movies without a "
        f"poster: {meta['missing']['images']}"
        + (f" ({counts['posters_unknown_movies']} rows of {FLAGS.posters} named no movie)"
           if "posters" in counts else "")
        + f"; with a plot: {counts['plots']}. Category: "
        f"{'first genre' if FLAGS.category == 'first' else 'genre set'} "
        f"({meta['vocab']['num_categories'] - schema.FIRST_ID} categories).",
        "", f"## Rankers (seeds {','.join(FLAGS.seeds)})", "",
        f"One epoch each, batch {FLAGS.batch_size}; MAKE pre-trained {FLAGS.make_epochs} "
        "epochs. Relative columns: mean ± std over seeds of each seed's change against the "
        "ID ranker of the same seed.", ""] + table + [
        "", "| Method | Seed | GAUC | AUC |", "| --- | --- | --- | --- |"]
    lines += [f"| {NAMES[m]} | {s} | {r['gauc']:.4f} | {r['auc']:.4f} |"
              for m, rs in results.items() for s, r in zip(seeds, rs)]
    cold = results["id"][0]["new_items"]["impressions"]
    lines += ["", "## Cold start", "",
              f"The {cold} test impressions of movies with no training impression.", "",
              "| Method | AUC | GAUC |", "| --- | --- | --- |"]
    lines += [f"| {NAMES[m]} | {mean_std([r['new_items']['auc'] for r in rs])} | "
              f"{mean_std([r['new_items'].get('gauc', np.nan) for r in rs])} |"
              for m, rs in results.items()]
    lines += ["", "## Gains by item frequency group", "", "![gains](gains.png)", ""] + gains_lines
    lines += ["", f"The {len(runs.seconds)} runs behind this report took "
              f"{sum(runs.seconds.values()) / 60:.1f} min of training and evaluation "
              f"(this invocation: {(time.time() - start) / 60:.1f} min); finished runs under "
              f"{work} are reused. The data directory came from "
              f"`{prepare_command(prepare_options(os.path.join(work, 'raw'), data_dir))}`."]
    report = {
        "inputs": {"ratings": ratings, "movies": movies, "posters_dir": FLAGS.posters_dir,
                   "posters": FLAGS.posters, "plots": FLAGS.plots},
        "settings": {k: FLAGS[k].value for k in SETTINGS}, "modality": modality,
        "seeds": seeds, "counts": counts, "data": {k: meta[k] for k in
                                                   ("counts", "vocab", "missing", "pairs")},
        "encoder": {"trained": encoder, "untrained": untrained},
        "methods": summary, "runs": {m: [r["model_dir"] for r in rs] for m, rs in results.items()},
        "cold_start": {m: [r["new_items"] for r in rs] for m, rs in results.items()},
        "frequency_groups": gains}
    write_report(out, lines, report)


if __name__ == "__main__":
    define_flags()
    cli.run(main, errors=(ValueError, OSError))  # bad input or settings: one line, not a trace

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipelines import movielens_data

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


def write_movielens(root, users=40, movies=30, ratings=600, seed=0):
    """A tiny export in ml-latest-small's format: quoted titles with commas, multi-genre
    movies, one without genres, the last five movies rated only late (cold start), posters
    for even movieIds (also named by title and year in posters.csv), plots for some."""
    rng = np.random.default_rng(seed)
    root.mkdir()
    genres = {}
    with open(root / "movies.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["movieId", "title", "genres"])
        for m in range(1, movies + 1):
            g = list(rng.choice(GENRES, size=1 + m % 3, replace=False)) if m != 7 else []
            genres[m] = g
            title = f"Movie {m}, The ({1980 + m})" if m % 4 == 0 else f"Movie {m} ({1980 + m})"
            w.writerow([m, title, "|".join(g) or "(no genres listed)"])
    taste = rng.choice(GENRES, size=users + 1)
    with open(root / "ratings.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        for _ in range(ratings):
            u = int(rng.integers(1, users + 1))
            t = int(rng.integers(1_000_000_000, 1_000_900_000))
            m = int(rng.integers(1, movies - 4)) if t < 1_000_800_000 else \
                int(rng.integers(1, movies + 1))
            liked = taste[u] in genres[m]
            rating = float(np.clip(rng.normal(4.3 if liked else 2.8, 0.8), 0.5, 5.0))
            w.writerow([u, m, f"{round(rating * 2) / 2:g}", t])
    posters = root / "posters"
    posters.mkdir()
    import tensorflow as tf

    for m in range(2, movies + 1, 2):
        colour = [40 * GENRES.index(genres[m][0]) if genres[m] else 0, 255 - 8 * m, 128]
        pixels = np.broadcast_to(np.array(colour, np.uint8), (16, 16, 3))
        (posters / f"{m}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    with open(root / "posters.csv", "w", newline="") as f:
        csv.writer(f).writerows([["title", "year", "poster"]] + [
            [f"The Movie {m}" if m % 4 == 0 else f"Movie {m}", 1980 + m, f"posters/{m}.png"]
            for m in range(2, movies + 1, 2)])
    with open(root / "plots.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["movieId", "plot"])
        w.writerows([[m, f"A story, of {' and '.join(genres[m]) or 'nothing'}."]
                     for m in range(1, movies + 1, 3)] + [[999, "not in movies.csv"]])
    return root


def test_conversion_by_hand(tmp_path):
    (tmp_path / "movies.csv").write_text(
        "movieId,title,genres\n"
        '1,"Toy Story (1995)",Adventure|Animation|Children\n'
        '2,"American President, The (1995)",Comedy|Drama|Romance\n'
        "3,Unknown Film (2001),(no genres listed)\n", encoding="utf-8")
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "1,1,4.0,964982703\n1,2,3.5,964981247\n2,3,5.0,964982224\n2,1,0.5,964983815\n")
    (tmp_path / "plots.csv").write_text("\ufeffmovieId,plot\n2,\"A widowed  president\n"
                                        'falls in love.\"\n42,unknown\n', encoding="utf-8")
    movies = movielens_data.read_movies(str(tmp_path / "movies.csv"))
    plots, unknown = movielens_data.read_plots(str(tmp_path / "plots.csv"), movies)
    assert plots == {"2": "A widowed president falls in love."} and unknown == 1
    assert list(movielens_data.item_rows(movies, plots)) == [
        ("1", "Adventure", "Toy Story (1995) Adventure Animation Children"),
        ("2", "Comedy", "American President, The (1995) Comedy Drama Romance A widowed "
                        "president falls in love."),
        ("3", "(no genres listed)", "Unknown Film (2001)")]
    assert [r[1] for r in movielens_data.item_rows(movies, {}, "all", False)] == [
        "Adventure|Animation|Children", "Comedy|Drama|Romance", "(no genres listed)"]
    assert list(movielens_data.impression_rows(str(tmp_path / "ratings.csv"), movies, 4.0)) == [
        ("1", "1", 1, 964982703), ("1", "2", 0, 964981247), ("2", "3", 1, 964982224),
        ("2", "1", 0, 964983815)]
    assert [r[2] for r in movielens_data.impression_rows(str(tmp_path / "ratings.csv"), movies,
                                                    3.5)] == [1, 1, 1, 0]

    # ml-1m: '::'-separated, Latin-1, no header.
    (tmp_path / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Cité des enfants perdus, La (1995)::Adventure|Sci-Fi\n".encode("latin-1"))
    (tmp_path / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::978302109\n")
    dat = movielens_data.read_movies(str(tmp_path / "movies.dat"))
    assert dat == {"1": ("Toy Story (1995)", ["Animation", "Children's", "Comedy"]),
                   "2": ("Cité des enfants perdus, La (1995)", ["Adventure", "Sci-Fi"])}
    assert list(movielens_data.impression_rows(str(tmp_path / "ratings.dat"), dat, 4.0)) == [
        ("1", "1", 1, 978300760), ("1", "2", 0, 978302109)]


def u_item_line(movie, title, genres, date="01-Jan-1995"):
    flags = ["1" if g in genres else "0" for g in movielens_data.ML100K_GENRES]
    return "|".join([movie, title, date, "", f"http://us.imdb.com/M/title-exact?{movie}"]
                    + flags) + "\n"


def test_ml100k_files_by_hand(tmp_path):
    # ML-100K: u.item '|'-separated with 19 genre flags, u.data tab-separated; Latin-1.
    (tmp_path / "u.item").write_bytes((
        u_item_line("1", "Toy Story (1995)", {"Animation", "Children's", "Comedy"})
        + u_item_line("2", "City of Lost Children, The (1995)", {"Adventure", "Sci-Fi"})
        + u_item_line("3", "Cité des enfants perdus, La (1995)", {"Drama"})
        + u_item_line("267", "unknown", {"unknown"}, date="")).encode("latin-1"))
    (tmp_path / "u.data").write_text("196\t1\t3\t881250949\n186\t2\t4\t891717742\n"
                                     "\n22\t267\t5\t878887116\n")
    movies = movielens_data.read_movies(str(tmp_path / "u.item"))
    assert movies == {"1": ("Toy Story (1995)", ["Animation", "Children's", "Comedy"]),
                      "2": ("City of Lost Children, The (1995)", ["Adventure", "Sci-Fi"]),
                      "3": ("Cité des enfants perdus, La (1995)", ["Drama"]),
                      "267": ("unknown", [])}  # the 'unknown' genre is none
    assert [r[1] for r in movielens_data.item_rows(movies, {})] == [
        "Animation", "Adventure", "Drama", "(no genres listed)"]
    assert list(movielens_data.impression_rows(str(tmp_path / "u.data"), movies, 4.0)) == [
        ("196", "1", 0, 881250949), ("186", "2", 1, 891717742), ("22", "267", 1, 878887116)]
    # Its train/test splits have u.data's layout.
    (tmp_path / "u1.base").write_text("196\t1\t4\t881250949\n")
    assert list(movielens_data.impression_rows(str(tmp_path / "u1.base"), movies, 4.0)) == [
        ("196", "1", 1, 881250949)]


@pytest.mark.parametrize("name, content, error", [
    ("u.item", "1|Toy Story (1995)|01-Jan-1995\n",
     r"u.item: line 1: 3 '\|'-separated fields, want 24 \(movieId, title, release date, "
     r"video release date, IMDb URL, unknown, ...\)"),
    ("u.item", u_item_line("1", "A (2000)", set()).replace("|0|0\n", "|0|2\n"),
     r"u.item: row 1: genre flag 'Western' is '2', want 0 or 1"),
    ("u.data", "1::1::5::978300760\n",
     r"u.data: line 1: 1 tab-separated fields, want 4 \(userId, movieId, rating, timestamp\)"),
    ("ratings.txt", "1,1,5,978300760\n",
     r"ratings.txt: expected a .csv, .dat \(ML-1M\) or ML-100K u.data/u.item file"),
])
def test_ml100k_errors_name_file_and_line(tmp_path, name, content, error):
    (tmp_path / name).write_text(content, encoding="latin-1")
    movies = {"1": ("A (2000)", ["Drama"])}
    with pytest.raises(ValueError, match=error):
        if name.endswith(".item"):
            movielens_data.read_movies(str(tmp_path / name))
        else:
            list(movielens_data.impression_rows(str(tmp_path / name), movies, 4.0))


def write_png(path, colour):
    import tensorflow as tf

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(np.full((8, 8, 3), colour, np.uint8)).numpy())
    return path


def test_posters_by_movie_id_or_by_title_and_year(tmp_path):
    (tmp_path / "movies.csv").write_text(
        "movieId,title,genres\n"
        '1,Toy Story (1995),Animation\n'
        '2,"American President, The (1995)",Comedy|Drama\n'
        '3,"City of Lost Children, The (Cité des enfants perdus, La) (1995)",Sci-Fi\n'
        '4,Heat (1995),Action\n5,Chasing Amy (1997),Comedy\n6,Chasing Amy (1997),Comedy\n'
        '7,Heat (1972),Drama\n', encoding="utf-8")
    movies = movielens_data.read_movies(str(tmp_path / "movies.csv"))
    art = tmp_path / "art"
    files = {k: write_png(art / "p" / f"{k}.png", 30 * k) for k in range(1, 8)}

    # By id: a path relative to the CSV, an absolute one, a file:// URL; an empty cell is no
    # poster; an unknown movie is counted.
    (art / "by_id.csv").write_text(
        f"movieId,poster\n1,p/1.png\n2,{files[2]}\n3,file://{files[3]}\n4,\n99,p/4.png\n")
    posters, unknown = movielens_data.read_posters(str(art / "by_id.csv"), movies)
    assert posters == {"1": str(files[1]), "2": str(files[2]), "3": str(files[3])}
    assert unknown == 1

    # By title and year: case, accents, punctuation, the article and an alternative title
    # aside; a title listed twice (ML-100K has such) gives both movies the poster; the
    # year tells Heat (1995) from Heat (1972).
    (art / "by_title.csv").write_text(
        "title,year,poster\n"
        "TOY STORY,1995,p/1.png\n"
        "The American President,1995,p/2.png\n"
        "La cite des enfants perdus,1995,p/3.png\n"
        "Heat,1972,p/7.png\n"
        "Chasing Amy,1997,p/5.png\n"
        "Toy Story,1999,p/6.png\n", encoding="utf-8")
    posters, unknown = movielens_data.read_posters(str(art / "by_title.csv"), movies)
    assert posters == {"1": str(files[1]), "2": str(files[2]), "3": str(files[3]),
                       "7": str(files[7]), "5": str(files[5]), "6": str(files[5])}
    assert unknown == 1

    # Converted and prepared: the catalogue holds each matched poster, the others none.
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(
            f"{u},{m},{4 + (u + m) % 2},{1000 + 10 * u + m}\n"
            for u in range(1, 5) for m in range(1, 8)))
    raw = tmp_path / "raw"
    counts = movielens_data.convert(str(tmp_path / "ratings.csv"), str(tmp_path / "movies.csv"),
                                    None, str(raw), 4.0, "first", True, "latin-1",
                                    str(art / "by_title.csv"))
    assert counts == dict(counts, posters=6, posters_unknown_movies=1)
    from tfmm import data
    from tfmm.data.prepare import PrepareOptions, prepare

    images_dir, absolute = movielens_data.image_source(posters=str(art / "by_title.csv"))
    assert (images_dir, absolute) == (str(art), True)
    prepare(PrepareOptions(str(raw / "impressions.csv"), str(raw / "items.csv"),
                           str(tmp_path / "data"), images_dir=images_dir,
                           absolute_image_paths=absolute))
    items = next(iter(data.items(str(tmp_path / "data"), batch_size=10, image_size=8)))
    names = (tmp_path / "data" / "vocab" / "items.txt").read_text().split()
    colour = {names[i - 2]: int(image[0, 0, 0]) if has else None for i, image, has in zip(
        items["item_id"].numpy(), items["image"].numpy(), items["has_image"].numpy())}
    assert colour == {"1": 30, "2": 60, "3": 90, "4": None, "5": 150, "6": 150, "7": 210}
    assert movielens_data.image_source(posters_dir="posters") == ("posters", False)


@pytest.mark.parametrize("content, error", [
    ("movieId,poster\n1,p/1.png\n1,p/1.png\n",
     r"posters.csv: row 3: movieId '1' again \(first at row 2\)"),
    ("title,year,poster\nToy Story,1995,p/1.png\ntoy story!,1995,p/1.png\n",
     r"posters.csv: row 3: title 'toy story!' of 1995 again \(first at row 2\)"),
    ("title,year,poster\nToy Story,ninety-five,p/1.png\n",
     r"posters.csv: row 2: year 'ninety-five' is not a number"),
    ("movieId,poster\n1,https://example.com/1.jpg\n",
     r"posters.csv: row 2: poster 'https://example.com/1.jpg' is a URL; download the posters"),
    ("movieId,poster\n1,p/9.png\n",
     r"posters.csv: row 2: poster 'p/9.png' not found \(looked for .*/p/9.png\)"),
    ("movie,poster\n1,p/1.png\n",
     r"posters.csv: row 1: want columns movieId,poster or title,year,poster; it has "
     r"movie,poster"),
    ("movieId,poster\n2,p/1.png\n",
     r"posters.csv: no row gives a poster of a movie of .*movies.csv"),
])
def test_bad_posters_files_name_file_and_row(tmp_path, content, error):
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Animation\n")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4,5\n")
    write_png(tmp_path / "p" / "1.png", 0)
    (tmp_path / "posters.csv").write_text(content)
    with pytest.raises(ValueError, match=error):
        movielens_data.convert(str(tmp_path / "ratings.csv"), str(tmp_path / "movies.csv"),
                               None, str(tmp_path / "raw"), 4.0, "first", True, "latin-1",
                               str(tmp_path / "posters.csv"))


@pytest.mark.parametrize("content, error", [
    ("userId,movieId,stars,timestamp\n1,1,4,5\n", r"ratings.csv: row 1: no column 'rating'"),
    ("userId,movieId,rating,timestamp\n1,1,4,5\n1,9,4,6\n",
     r"ratings.csv: row 3: movieId '9' is not in the movies file"),
    ("userId,movieId,rating,timestamp\n1,1,four,5\n",
     r"ratings.csv: row 2: rating 'four' or timestamp '5' is not a number"),
])
def test_conversion_errors_name_file_and_row(tmp_path, content, error):
    (tmp_path / "ratings.csv").write_text(content)
    movies = {"1": ("A (2000)", ["Drama"])}
    with pytest.raises(ValueError, match=error):
        list(movielens_data.impression_rows(str(tmp_path / "ratings.csv"), movies, 4.0))


@pytest.mark.slow  # builds TFDS's mock data
def test_tfds_export_writes_grouplens_csv(tmp_path):
    # Offline: TFDS's mock data follows the real builder's features (random values).
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        paths = movielens_data.export_tfds("latest-small", str(tmp_path))
    movies = list(csv.reader(open(paths["movies"])))
    ratings = list(csv.reader(open(paths["ratings"])))
    assert movies[0] == ["movieId", "title", "genres"] and len(movies) == 5
    assert ratings[0] == ["userId", "movieId", "rating", "timestamp"] and len(ratings) == 5
    genres = {"Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
              "Drama", "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery",
              "Romance", "Sci-Fi", "Thriller", "Unknown", "War", "Western", "(no genres listed)"}
    assert all(set(m[2].split("|")) <= genres for m in movies[1:] if m[2])
    assert len(movielens_data.read_movies(paths["movies"])) == 4
    assert all(float(r[2]) >= 0 and int(r[3]) >= 0 for r in ratings[1:])


def run_pipeline(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.movielens", *args],
                          capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items()  # the CLI's own quiet start
                               if k != "TF_CPP_MIN_LOG_LEVEL"})


@pytest.mark.slow  # runs the pipeline: prepare, pre-training, rankers
def test_pipeline_on_a_tiny_export(tmp_path):
    ml = write_movielens(tmp_path / "ml-latest-small")
    out, work = tmp_path / "report", tmp_path / "work"
    args = [f"--ratings={ml}/ratings.csv", f"--movies={ml}/movies.csv",
            f"--posters={ml}/posters.csv", f"--plots={ml}/plots.csv", f"--out_dir={out}",
            f"--work_dir={work}", "--seeds=0", "--pretrain_epochs=1", "--make_epochs=1",
            "--dim=8", "--pretrain_batch_size=16", "--queue_size=0", "--image_size=16",
            "--batch_size=64", "--embedding_dim=8", "--test_fraction=0.2"]
    proc = run_pipeline(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.load(open(out / "report.json"))
    assert list(report["methods"]) == ["id", "simtier", "simtier_make"]
    assert report["modality"] == "image" and report["counts"]["plots"] == 10
    assert report["counts"]["plots_unknown_movies"] == 1
    assert report["data"]["missing"]["images"] == 15  # odd movieIds have no poster
    assert report["counts"] == dict(report["counts"], posters=15, posters_unknown_movies=0)
    clicks = sum(int(float(r["rating"]) >= 4.0)
                 for r in csv.DictReader(open(ml / "ratings.csv")))
    assert report["counts"] == dict(report["counts"], ratings=600, clicks=clicks)
    assert report["data"]["pairs"]["train"] > 0 and report["data"]["pairs"]["test"] > 0
    for method, dirs in report["runs"].items():
        metrics = json.load(open(os.path.join(dirs[0], "metrics.json")))
        assert report["methods"][method]["gauc"] == [metrics["gauc"]]
        assert report["methods"][method]["auc"] == [metrics["auc"]]
        assert report["cold_start"][method] == [metrics["new_items"]]
    assert report["cold_start"]["id"][0]["impressions"] > 0
    encoder = json.load(open(work / "runs" / "image" / "encoder-e1" / "metrics.json"))
    assert report["encoder"]["trained"]["acc@1"] == encoder["acc@1"]
    assert "neighbours_same_category@10_untrained" in encoder
    md = open(out / "report.md").read()
    g = report["methods"]["simtier"]["gauc"][0]
    assert f"| SimTier | 0 | {g:.4f} |" in md and "| SimTier+MAKE |" in md
    # The report leads with the encoder's checks: trained, untrained and by chance.
    key = "neighbours_same_category@10"
    untrained = json.load(open(work / "runs" / "image" / "encoder-e0" / "metrics.json"))
    pairs = encoder["test_pairs"]
    assert md.split("\n")[2:8] == [
        "## Encoder", "", "| Encoder | Acc@1 | Acc@5 | same-category neighbours@10 |",
        "| --- | --- | --- | --- |",
        f"| untrained tower | {untrained['acc@1']:.4f} | {untrained['acc@5']:.4f} | "
        f"{untrained[key]:.4f} |",
        f"| SCL, 1 epoch(s) | {encoder['acc@1']:.4f} | {encoder['acc@5']:.4f} | "
        f"{encoder[key]:.4f} |"]
    assert f"| chance | {1 / pairs:.4f} | {min(5, pairs) / pairs:.4f} | " \
           f"{encoder[key + '_chance']:.4f} |" in md
    assert md.index("## Encoder") < md.index("## Data") < md.index("## Rankers")
    assert "## Cold start" in md
    assert open(out / "gains.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # Run again: everything is reused; other settings on the same work dir are refused.
    again = run_pipeline(*args)
    assert again.returncode == 0 and "training the" not in again.stdout + again.stderr
    assert "converting" not in again.stdout
    assert json.load(open(out / "report.json"))["methods"] == report["methods"]
    other = run_pipeline(*args, "--click_rating=3.5")
    assert other.returncode == 1 and other.stderr.strip().splitlines() == [
        f"--work_dir={work} was made with other inputs or settings (click_rating); use a "
        "fresh --work_dir."]


@pytest.mark.slow  # runs the pipeline's prepare
def test_prepare_errors_come_through_in_one_line(tmp_path):
    ml = write_movielens(tmp_path / "ml")
    empty = tmp_path / "no-posters"
    empty.mkdir()
    proc = run_pipeline(f"--ratings={ml}/ratings.csv", f"--movies={ml}/movies.csv",
                        f"--posters_dir={empty}", f"--work_dir={tmp_path / 'work'}",
                        f"--out_dir={tmp_path / 'out'}")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"tfmm.data.prepare: {tmp_path}/work/raw/items.csv: no item has an image in "
        f"--images_dir={empty} (looked for <item_id>.png, .jpg, .jpeg)."]
    assert not (tmp_path / "out").exists()

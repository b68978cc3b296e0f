import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipelines import movielens_data

pytestmark = pytest.mark.slow  # runs the pipeline: prepare, pre-training, rankers

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


def write_movielens(root, users=40, movies=30, ratings=600, seed=0):
    """A tiny export in ml-latest-small's format: quoted titles with commas, multi-genre
    movies, one without genres, the last five movies rated only late (cold start), posters
    for even movieIds, plots for some."""
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


def test_pipeline_on_a_tiny_export(tmp_path):
    ml = write_movielens(tmp_path / "ml-latest-small")
    out, work = tmp_path / "report", tmp_path / "work"
    args = [f"--ratings={ml}/ratings.csv", f"--movies={ml}/movies.csv",
            f"--posters_dir={ml}/posters", f"--plots={ml}/plots.csv", f"--out_dir={out}",
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
    assert "## Cold start" in md and f"| SCL, 1 epoch(s) | {encoder['acc@1']:.4f} |" in md
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

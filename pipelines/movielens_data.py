"""MovieLens files as GroupLens publishes them, converted to the raw files
`python -m tfmm.data.prepare` reads (`pipelines.movielens` is the recipe).
"""

import csv
import os

NO_GENRES = "(no genres listed)"


def _rows(path, columns, encoding="latin-1"):
    """(spreadsheet row number, {column: value}) of a GroupLens CSV or ``::`` .dat file.

    A .dat file has no header: its fields are `columns` in order.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found.")
    if path.endswith(".dat"):
        with open(path, encoding=encoding, newline="") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                fields = line.split("::")
                if len(fields) != len(columns):
                    raise ValueError(f"{path}: line {n}: {len(fields)} '::'-separated fields, "
                                     f"want {len(columns)} ({'::'.join(columns)}).")
                yield n, dict(zip(columns, fields))
        return
    if not path.endswith(".csv"):
        raise ValueError(f"{path}: expected a .csv or .dat file.")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            missing = [c for c in columns if c not in (header or [])]
            if missing:
                raise ValueError(f"{path}: row 1: no column {missing[0]!r} (want "
                                 f"{','.join(columns)}).")
            at = [header.index(c) for c in columns]
            for n, row in enumerate(reader, 2):
                if len(row) != len(header):
                    raise ValueError(f"{path}: row {n}: {len(row)} fields, the header has "
                                     f"{len(header)}.")
                yield n, {c: row[i] for c, i in zip(columns, at)}
        except (csv.Error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: row {reader.line_num}: {e}.") from None


def read_movies(path, encoding="latin-1"):
    """{movieId: (title, [genres])} of movies.csv or movies.dat."""
    columns = ("movieId", "title", "genres")
    movies = {}
    for n, row in _rows(path, columns, encoding):
        movie = row["movieId"]
        if not movie.strip():
            raise ValueError(f"{path}: row {n}: empty movieId.")
        if movie in movies:
            raise ValueError(f"{path}: row {n}: duplicate movieId {movie!r}.")
        genres = [g for g in row["genres"].split("|") if g and g != NO_GENRES]
        movies[movie] = (row["title"].strip(), genres)
    if not movies:
        raise ValueError(f"{path}: no movies.")
    return movies


def read_plots(path, movies):
    """{movieId: plot} of a movieId,plot CSV, and how many named no movie of `movies`."""
    plots, unknown = {}, 0
    for n, row in _rows(path, ("movieId", "plot")):
        movie = row["movieId"]
        if movie in plots:
            raise ValueError(f"{path}: row {n}: duplicate movieId {movie!r}.")
        if movie not in movies:
            unknown += 1
            continue
        plots[movie] = " ".join(row["plot"].split())
    return plots, unknown


def item_rows(movies, plots, category="first", genres_in_title=True):
    """Rows (item_id, category_id, title) of prepare's items file."""
    for movie, (title, genres) in movies.items():
        cat = (genres[:1] if category == "first" else ["|".join(genres)]) if genres else []
        words = [title] + (genres if genres_in_title else []) + [plots.get(movie, "")]
        yield movie, (cat[0] if cat else NO_GENRES), " ".join(w for w in words if w)


def impression_rows(path, movies, click_rating, encoding="latin-1"):
    """Rows (user_id, item_id, label, timestamp) of prepare's impressions file, streamed."""
    columns = ("userId", "movieId", "rating", "timestamp")
    for n, row in _rows(path, columns, encoding):
        if row["movieId"] not in movies:
            raise ValueError(f"{path}: row {n}: movieId {row['movieId']!r} is not in the "
                             "movies file.")
        try:
            rating, timestamp = float(row["rating"]), int(row["timestamp"])
        except ValueError:
            raise ValueError(f"{path}: row {n}: rating {row['rating']!r} or timestamp "
                             f"{row['timestamp']!r} is not a number.") from None
        yield row["userId"], row["movieId"], int(rating >= click_rating), timestamp


def convert(ratings, movies_path, plots_path, out, click_rating, category, genres_in_title,
            encoding):
    """Writes `out`/items.csv and `out`/impressions.csv; returns counts for the report."""
    movies = read_movies(movies_path, encoding)
    plots, unknown_plots = read_plots(plots_path, movies) if plots_path else ({}, 0)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "items.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "category_id", "title"])
        w.writerows(item_rows(movies, plots, category, genres_in_title))
    counts = {"movies": len(movies), "plots": len(plots), "plots_unknown_movies": unknown_plots,
              "ratings": 0, "clicks": 0}
    with open(os.path.join(out, "impressions.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "label", "timestamp"])
        for row in impression_rows(ratings, movies, click_rating, encoding):
            w.writerow(row)
            counts["ratings"] += 1
            counts["clicks"] += row[2]
    return counts


def export_tfds(version, out):
    """movielens/<version>-ratings and -movies from tensorflow-datasets as GroupLens CSVs."""
    import tensorflow_datasets as tfds

    paths = {t: os.path.join(out, f"{t}.csv") for t in ("ratings", "movies")}
    if all(map(os.path.exists, paths.values())):
        return paths
    os.makedirs(out, exist_ok=True)
    movies, info = tfds.load(f"movielens/{version}-movies", split="train", with_info=True)
    names = info.features["movie_genres"].feature.names
    with open(paths["movies"] + ".tmp", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["movieId", "title", "genres"])
        for m in tfds.as_numpy(movies):
            w.writerow([m["movie_id"].decode(), m["movie_title"].decode(),
                        "|".join(names[g] for g in m["movie_genres"])])
    with open(paths["ratings"] + ".tmp", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        for r in tfds.as_numpy(tfds.load(f"movielens/{version}-ratings", split="train")):
            w.writerow([r["user_id"].decode(), r["movie_id"].decode(),
                        f"{r['user_rating']:g}", int(r["timestamp"])])
    for path in paths.values():
        os.replace(path + ".tmp", path)
    return paths

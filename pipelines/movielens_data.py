"""MovieLens files as GroupLens publishes them, converted to the raw files
`python -m tfmm.data.prepare` reads (`pipelines.movielens` is the recipe).
"""

import csv
import os
import re
import unicodedata
import urllib.parse

NO_GENRES = "(no genres listed)"
# ML-100K's u.item: these fields, then one 0/1 flag per genre of u.genre, in its order.
ML100K_ITEM = ("movieId", "title", "release date", "video release date", "IMDb URL")
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")
NOT_A_GENRE = (NO_GENRES, "unknown")  # how ml-latest and ML-100K mark a movie without one


def separator(path):
    """None for a CSV file with a header; else the field separator of a headerless
    GroupLens file: ``::`` (ML-1M/10M ``.dat``), a tab (ML-100K ``u.data`` and its
    ``.base``/``.test`` splits), ``|`` (ML-100K ``u.item``)."""
    for suffixes, sep in (((".csv",), None), ((".dat",), "::"),
                          ((".data", ".base", ".test"), "\t"), ((".item",), "|")):
        if path.endswith(suffixes):
            return sep
    raise ValueError(f"{path}: expected a .csv, .dat (ML-1M) or ML-100K u.data/u.item file.")


def _rows(path, columns, encoding="latin-1"):
    """(spreadsheet row number, {column: value}) of a GroupLens CSV or headerless file.

    A headerless file (`separator`) has `columns` as its fields, in order.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found.")
    sep = separator(path)
    if sep is not None:
        shown = repr(sep) if sep != "\t" else "tab"
        with open(path, encoding=encoding, newline="") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                fields = line.split(sep)
                if len(fields) != len(columns):
                    raise ValueError(f"{path}: line {n}: {len(fields)} {shown}-separated fields, "
                                     f"want {len(columns)} ({', '.join(columns[:6])}"
                                     f"{', ...' if len(columns) > 6 else ''}).")
                yield n, dict(zip(columns, fields))
        return
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
    """{movieId: (title, [genres])} of movies.csv, movies.dat or ML-100K's u.item."""
    item = separator(path) == "|"
    columns = ML100K_ITEM + ML100K_GENRES if item else ("movieId", "title", "genres")
    movies = {}
    for n, row in _rows(path, columns, encoding):
        movie = row["movieId"]
        if not movie.strip():
            raise ValueError(f"{path}: row {n}: empty movieId.")
        if movie in movies:
            raise ValueError(f"{path}: row {n}: duplicate movieId {movie!r}.")
        if item:
            bad = [g for g in ML100K_GENRES if row[g] not in ("0", "1")]
            if bad:
                raise ValueError(f"{path}: row {n}: genre flag {bad[0]!r} is "
                                 f"{row[bad[0]]!r}, want 0 or 1.")
            genres = [g for g in ML100K_GENRES if row[g] == "1"]
        else:
            genres = row["genres"].split("|")
        movies[movie] = (row["title"].strip(), [g for g in genres if g and g not in NOT_A_GENRE])
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


# Articles a title may end with, as MovieLens writes them ("American President, The").
ARTICLES = ("the", "a", "an", "la", "le", "les", "l'", "il", "el", "los", "las", "lo", "gli",
            "der", "die", "das", "det", "den", "de", "een", "het")


def title_key(title, year):
    """(title, year) as matching compares them: case, accents, punctuation and where an
    article stands (``American President, The`` = ``The American President``) aside."""
    text = "".join(c for c in unicodedata.normalize("NFKD", title.strip())
                   if not unicodedata.combining(c)).casefold()
    text = re.sub(r"^a\.k\.a\.\s*", "", text)
    head, comma, article = text.rpartition(", ")
    if comma and article in ARTICLES:
        text = f"{article} {head}"
    return " ".join(re.findall(r"\w+", text)), year


def movie_title_keys(title):
    """The `title_key`s a MovieLens title is known by: ``City of Lost Children, The (Cité
    des enfants perdus, La) (1995)`` by its title with and without the alternative in
    parentheses and by the alternative alone, each with the year (None without one)."""
    dated = re.fullmatch(r"(.*?)\s*\((\d{4})(?:[-\u2013]\d*)?\)\s*", title)
    name, year = (dated.group(1), int(dated.group(2))) if dated else (title, None)
    names = [name, re.sub(r"\s*\([^()]*\)", "", name), *re.findall(r"\(([^()]*)\)", name)]
    return {k for k in (title_key(n, year) for n in names) if k[0]}


def _poster_file(cell, root, where):
    """The absolute path of a poster cell: a path (relative to `root`) or a file:// URL."""
    if re.match(r"[a-z][a-z0-9+.-]*://", cell, re.I) and not cell.lower().startswith("file://"):
        raise ValueError(f"{where}: poster {cell!r} is a URL; download the posters and list "
                         "their files (paths relative to the posters file, or absolute).")
    if cell.lower().startswith("file://"):
        cell = urllib.parse.unquote(urllib.parse.urlparse(cell).path)
    path = os.path.abspath(os.path.join(root, cell))
    if not os.path.isfile(path):
        raise ValueError(f"{where}: poster {cell!r} not found (looked for {path}).")
    return path


def read_posters(path, movies):
    """{movieId: absolute poster file} of a posters CSV, and how many of its rows named no
    movie of `movies`.

    Its columns: ``movieId`` (or ``movie_id``) and ``poster``; or ``title``, ``year`` and
    ``poster``, matched to the movies' titles and years (`movie_title_keys`; movies listed
    twice under one title and year both get it). A poster is a file path, relative to the
    CSV's folder or absolute, or a ``file://`` URL; an empty cell: none.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found.")
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f), None) or []
    by_id = next((c for c in ("movieId", "movie_id") if c in header), None)
    if not by_id and not {"title", "year"} <= set(header):
        raise ValueError(f"{path}: row 1: want columns movieId,poster or title,year,poster; "
                         f"it has {','.join(header)}.")
    titles = {}
    if not by_id:
        for movie, (title, _) in movies.items():
            for key in movie_title_keys(title):
                titles.setdefault(key, []).append(movie)
    root, posters, seen, unknown = os.path.dirname(os.path.abspath(path)), {}, {}, 0
    for n, row in _rows(path, (by_id, "poster") if by_id else ("title", "year", "poster")):
        if by_id:
            key, what = row[by_id], f"{by_id} {row[by_id]!r}"
            named = [key] if key in movies else []
        else:
            year = row["year"].strip()
            if year and not year.isdigit():
                raise ValueError(f"{path}: row {n}: year {row['year']!r} is not a number.")
            key, what = title_key(row["title"], int(year) if year else None), \
                f"title {row['title']!r} of {year or 'no year'}"
            named = titles.get(key, [])
        if key in seen:
            raise ValueError(f"{path}: row {n}: {what} again (first at row {seen[key]}).")
        seen[key] = n
        unknown += not named
        cell = row["poster"].strip()
        if named and cell:
            poster = _poster_file(cell, root, f"{path}: row {n}")
            posters.update((m, poster) for m in named if m not in posters)
    return posters, unknown


def image_source(posters_dir=None, posters=None):
    """prepare's ``images_dir`` and ``absolute_image_paths`` for the posters: a directory of
    ``<movieId>.jpg|.jpeg|.png``, or a `read_posters` CSV (`convert` then names each poster
    in items.csv by its absolute path)."""
    if posters:
        return os.path.dirname(os.path.abspath(posters)), True
    return posters_dir, False


def item_rows(movies, plots, category="first", genres_in_title=True, posters=None):
    """Rows (item_id, category_id, title) of prepare's items file; with `posters` (the
    `read_posters` of the movies), also each one's image file ("": none)."""
    for movie, (title, genres) in movies.items():
        cat = (genres[:1] if category == "first" else ["|".join(genres)]) if genres else []
        words = [title] + (genres if genres_in_title else []) + [plots.get(movie, "")]
        row = movie, (cat[0] if cat else NO_GENRES), " ".join(w for w in words if w)
        yield row if posters is None else (*row, posters.get(movie, ""))


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
            encoding, posters_path=None):
    """Writes `out`/items.csv and `out`/impressions.csv; returns counts for the report.

    With `posters_path` (`read_posters`), items.csv has an ``image`` column of absolute
    paths (prepare reads them with ``--absolute_image_paths``).
    """
    movies = read_movies(movies_path, encoding)
    plots, unknown_plots = read_plots(plots_path, movies) if plots_path else ({}, 0)
    posters, unknown_posters = read_posters(posters_path, movies) if posters_path else (None, 0)
    if posters == {}:
        raise ValueError(f"{posters_path}: no row gives a poster of a movie of {movies_path}.")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "items.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "category_id", "title"] + ["image"] * (posters is not None))
        w.writerows(item_rows(movies, plots, category, genres_in_title, posters))
    counts = {"movies": len(movies), "plots": len(plots), "plots_unknown_movies": unknown_plots,
              "ratings": 0, "clicks": 0}
    if posters is not None:
        counts.update(posters=len(posters), posters_unknown_movies=unknown_posters)
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

import multiprocessing

import numpy as np
import pytest

from tfmm.index import SQLiteIndex


def test_put_get_versions_and_missing(tmp_path):
    index = SQLiteIndex(tmp_path / "index.db", dim=3)
    v1 = index.put([5, 7], [[1, 2, 3], [4, 5, 6]])
    v2 = index.put([7, 9], [[0, 0, 1], [1, 1, 1]])
    assert (v1, v2) == (1, 2)
    vectors, found = index.get([9, 5, 8, 7])
    np.testing.assert_array_equal(found, [True, True, False, True])
    np.testing.assert_array_equal(vectors, [[1, 1, 1], [1, 2, 3], [0, 0, 0], [0, 0, 1]])
    version, updated = index.versions([5, 7, 8])
    np.testing.assert_array_equal(version, [1, 2, 0])
    assert updated[0] <= updated[1] and np.isnan(updated[2])
    np.testing.assert_array_equal(index.ids(), [5, 7, 9])
    snap = index.snapshot(num_items=9)  # id 9 is outside this vocabulary
    np.testing.assert_array_equal(np.flatnonzero(snap.present), [5, 7])
    # Reopening finds the dimension and the data.
    again = SQLiteIndex(tmp_path / "index.db")
    assert again.dim == 3 and again.get([5])[1].all()


@pytest.mark.parametrize("ids, vectors, message", [
    ([1, 2], [[1, 2, 3], [np.nan, 0, 0]], "item 2 has NaN or Inf"),
    ([1, 2], [[1, 2, 3], [np.inf, 0, 0]], "item 2 has NaN or Inf"),
    ([1], [[1, 2]], r"must be \[n, 3\]"),
    ([1, 2], [[1, 2, 3]], "2 ids but 1 vectors"),
    ([1, 1], [[1, 2, 3], [1, 2, 3]], "duplicate item ids"),
])
def test_bad_vectors_are_rejected_and_nothing_is_written(tmp_path, ids, vectors, message):
    index = SQLiteIndex(tmp_path / "index.db", dim=3)
    index.put([1], [[9, 9, 9]])
    with pytest.raises(ValueError, match=message):
        index.put(ids, vectors)
    np.testing.assert_array_equal(index.ids(), [1])
    np.testing.assert_array_equal(index.get([1])[0], [[9, 9, 9]])


def test_dimension_is_fixed(tmp_path):
    SQLiteIndex(tmp_path / "index.db", dim=3)
    with pytest.raises(ValueError, match="holds 3-d vectors, asked for 4"):
        SQLiteIndex(tmp_path / "index.db", dim=4)
    with pytest.raises(ValueError, match="needs `dim`"):
        SQLiteIndex(tmp_path / "new.db")


def _writer(path, start):
    index = SQLiteIndex(path)
    for k in range(20):
        ids = np.arange(start + k * 10, start + k * 10 + 10)
        index.put(ids, np.tile(ids[:, None], (1, 4)).astype("float32"))


def test_concurrent_writers_and_readers_see_whole_puts(tmp_path):
    path = str(tmp_path / "index.db")
    SQLiteIndex(path, dim=4)
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(path, s)) for s in (0, 10_000)]
    for w in writers:
        w.start()
    reader = SQLiteIndex(path)
    while any(w.is_alive() for w in writers):
        ids = reader.ids()
        vectors, found = reader.get(ids)
        assert found.all()
        np.testing.assert_array_equal(vectors[:, 0], ids)  # never a torn row
        assert len(ids) % 10 == 0  # never a partial put
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert len(reader.ids()) == 400


def test_an_index_belongs_to_one_catalogue(tmp_path):
    index = SQLiteIndex(tmp_path / "v.db", dim=2)
    index.claim("abc")
    index.claim("abc")  # the same catalogue again is fine
    with pytest.raises(ValueError, match=r"v.db holds vectors of another catalogue \(abc, not xyz\)"):
        SQLiteIndex(tmp_path / "v.db").claim("xyz")

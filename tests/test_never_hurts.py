import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipelines.never_hurts import random_index
from tfmm import encoder_checks
from tfmm.data import schema
from tfmm.index import open_index

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def user_index(data_dir, path, dim=8):
    """A user's index: unit vectors for every other item of `data_dir`; returns the ids."""
    num_items = schema.read_metadata(data_dir)["vocab"]["num_items"]
    ids = np.arange(schema.FIRST_ID, num_items, 2)
    vectors = np.random.default_rng(5).standard_normal((len(ids), dim))
    with contextlib.closing(open_index(path, dim=dim)) as index:
        index.claim(schema.catalogue_fingerprint(data_dir))
        index.put(ids, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    return ids


def pipeline(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.never_hurts", *args],
                          capture_output=True, text=True, env=ENV)


def test_random_control_holds_the_users_ids_as_unit_vectors(tiny_dir, tmp_path):
    ids = user_index(tiny_dir, str(tmp_path / "user.db"))
    path = str(tmp_path / "random" / "vectors.db")
    assert random_index(path, ids, 8, tiny_dir, "user.db") == path
    with contextlib.closing(open_index(path)) as index:
        assert index.dim == 8 and np.array_equal(index.ids(), ids)
        vectors, found = index.get(ids)
        assert found.all()
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
        with contextlib.closing(open_index(str(tmp_path / "user.db"))) as user:
            assert np.abs(vectors - user.get(ids)[0]).max() > 0.5  # not the user's vectors
        assert index.catalogue() == schema.catalogue_fingerprint(tiny_dir)
        version = index.versions(ids)[0]
    # Written once: a second call keeps it; other ids replace it.
    random_index(path, ids, 8, tiny_dir, "user.db")
    with contextlib.closing(open_index(path)) as index:
        np.testing.assert_array_equal(index.versions(ids)[0], version)
    random_index(path, ids[:5], 8, tiny_dir, "user.db")
    with contextlib.closing(open_index(path)) as index:
        assert np.array_equal(index.ids(), ids[:5])


@pytest.mark.parametrize("empty", [True, False])
def test_an_empty_or_missing_index_is_refused_and_nothing_written(tiny_dir, tmp_path, empty):
    index = str(tmp_path / "vectors.db")
    if empty:
        open_index(index, dim=8).close()
    proc = pipeline(f"--data_dir={tiny_dir}", f"--index={index}",
                    f"--runs_dir={tmp_path}/runs", f"--out_dir={tmp_path}/report")
    assert proc.returncode == 1
    message = proc.stderr.strip()
    assert "\n" not in message and message.startswith(f"--index={index} holds no vectors")
    assert f"python -m tfmm.index import --data_dir={tiny_dir}" in message
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "report")
    assert os.path.exists(index) == empty


@pytest.mark.slow  # trains 5 rankers and MAKE twice (about a minute on 2 cores)
def test_never_hurts_report_on_tiny(tiny_dir, tmp_path):
    index = str(tmp_path / "user.db")
    ids = user_index(tiny_dir, index)
    with contextlib.closing(open_index(index)) as held:
        held.describe({"source": "a test import", "items": len(ids)})
    out, runs_dir = tmp_path / "report", tmp_path / "runs"
    args = [f"--data_dir={tiny_dir}", f"--index={index}", "--seeds=0",
            "--methods=make,simtier_make", f"--runs_dir={runs_dir}", f"--out_dir={out}",
            "--batch_size=256", "--make_epochs=1", "--embedding_dim=4"]
    proc = pipeline(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(out / "report.json"))
    md = open(out / "report.md").read()

    def metrics(model_dir):
        with open(os.path.join(model_dir, "metrics.json")) as f:
            return json.load(f)

    # One ID run per seed, the baseline of both sources.
    assert report["runs"]["user"]["id"] == report["runs"]["random"]["id"]
    base = metrics(report["runs"]["user"]["id"][0])
    assert base["model"] == "id"
    verdicts, make_dirs = report["verdict"], {}
    for source, index_of in (("user", index), ("random", report["random_index"])):
        for method in ("make", "simtier_make"):
            m = metrics(report["runs"][source][method][0])
            assert m["model"] == method and m["config"]["index"] == index_of
            row = report[source][method]
            delta, head = m["gauc"] - base["gauc"], m["gauc"] - m["make"]["without_make"]["gauc"]
            assert row["gauc"] == [m["gauc"]]
            assert row["gauc_delta"] == [pytest.approx(delta, abs=1e-12)]
            assert row["make_head"] == [pytest.approx(head, abs=1e-12)]
            name = {"make": "MAKE", "simtier_make": "SimTier+MAKE"}[method]
            assert (f"| {name} | {m['gauc']:.4f} ± 0.0000 | {delta:+.4f} | {delta:+.4f} | "
                    f"{head:+.4f} ± 0.0000 |") in md
            make_dirs.setdefault(source, set()).add(m["config"]["make_dir"])
            if source == "random":
                assert verdicts[method]["never_hurts"] == (delta >= -0.002)
                assert verdicts[method]["random_delta_mean"] == pytest.approx(delta, abs=1e-12)
                user_gauc = metrics(report["runs"]["user"][method][0])["gauc"]
                assert verdicts[method]["user_minus_random"] == [
                    pytest.approx(user_gauc - m["gauc"], abs=1e-12)]
                assert (f"- {name}: " + ("never hurts" if delta >= -0.002 else "**HURTS**")) in md
    # MAKE pre-trained once per source and seed, shared by make and simtier_make.
    assert all(len(d) == 1 for d in make_dirs.values()) and make_dirs["user"] != make_dirs["random"]

    # The random control: exactly the user's ids, unit vectors of the same width.
    with contextlib.closing(open_index(report["random_index"])) as control:
        assert control.dim == 8 and np.array_equal(control.ids(), ids)
        np.testing.assert_allclose(np.linalg.norm(control.get(ids)[0], axis=1), 1, atol=1e-6)

    # The encoder's checks as the user's rankers recorded them, the random control's beside.
    checks = metrics(report["runs"]["user"]["make"][0])["encoder"]
    assert report["encoder"] == checks and checks["recorded"]["source"] == "a test import"
    assert all(f"    {line}\n" in md for line in encoder_checks.lines(checks))
    control = metrics(report["runs"]["random"]["make"][0])["encoder"]
    assert control["recorded"]["source"] == "random unit vectors"
    assert (f"{encoder_checks.KEY} {control['snapshot'][encoder_checks.KEY]:.4f}."
            in md.split("## Rankers")[0])

    # A rerun trains nothing: every finished run is read back.
    finished = sorted(runs_dir.rglob("metrics.json"))
    assert len(finished) == 5
    mtimes = [p.stat().st_mtime_ns for p in finished]
    again = pipeline(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training the" not in again.stdout and "pre-training MAKE" not in again.stdout
    assert [p.stat().st_mtime_ns for p in finished] == mtimes
    assert json.load(open(out / "report.json"))["user"] == report["user"]

    # Other ranker settings in the same --runs_dir: refused, naming them.
    other = pipeline(*[a for a in args if not a.startswith("--batch_size")])
    assert other.returncode == 1
    assert other.stderr.strip().endswith("(batch_size); use a fresh --runs_dir.")

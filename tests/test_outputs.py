"""No command replaces or writes into a directory of user files (tfmm.outputs).

Each command that writes a directory, given one that is or holds its input or a
non-empty folder tfmm did not write, is refused in one line and every file
there stays as it was; given its own earlier output, it writes again.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tfmm import outputs
from tfmm.data import world as world_lib
from tfmm.data.prepare import PrepareOptions, prepare
from tfmm.data.synthetic import write_raw, write_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def tree(root):
    """Every file under `root` with its bytes."""
    root = os.fspath(root)
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(root) for f in names}


def refused(cmd, cwd=ROOT):
    """The one line a refused command prints (exit 1, no traceback)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=cwd)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr.strip()


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """The tiny world as a user's export: impressions.csv, items.csv, images/."""
    root = tmp_path_factory.mktemp("raw") / "mydata"
    write_raw(world_lib.generate(world_lib.PRESETS["tiny"]), root)
    os.remove(root / outputs.MARKER)  # the user's own folder, as they made it
    return root


@pytest.fixture
def mydata(raw, tmp_path):
    """A fresh copy of the user's folder, and its contents."""
    copy = tmp_path / "mydata"
    shutil.copytree(raw, copy)
    return copy, tree(copy)


def foreign(tmp_path):
    """A non-empty folder of the user's that no command reads."""
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "todo.txt").write_text("buy milk\n")
    (folder / "sub" / "metadata.json").write_text('{"mine": true}')
    return folder, tree(folder)


def test_the_rule(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "log.csv").write_text("x\n")
    check = outputs.check_output_dir
    for out, inputs, message in [
            (data, [data / "log.csv"], "holds the input"),
            (tmp_path, [data / "images"], "holds the input"),
            (data / "images", [data / "images"], "is the input"),
            (data, [], "is a non-empty directory tfmm did not write"),
            (data / "log.csv", [], "is a file, not a directory")]:
        with pytest.raises(ValueError, match=f"^--out_dir={out} {message}"):
            check(str(out), "out_dir", [str(i) for i in inputs])
    os.symlink(data, tmp_path / "link")  # the same folder by another name
    with pytest.raises(ValueError, match="holds the input"):
        check(str(tmp_path / "link"), "out_dir", [str(data / "log.csv")])
    # Fine: a new or empty directory, one inside an input's folder, tfmm's own.
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty", data / "images" / "out"):
        check(str(out), "out_dir", [str(data / "log.csv"), str(data / "images")])
    outputs.mark(str(data))
    check(str(data), "out_dir")
    assert outputs.written_by_tfmm(str(data))
    legacy = tmp_path / "legacy"  # a data directory written before the marker
    legacy.mkdir()
    (legacy / "metadata.json").write_text(json.dumps({"format": "tfmm-logs/1"}))
    check(str(legacy), "out_dir")


@pytest.mark.slow
def test_prepare_into_the_folder_of_its_inputs_is_refused_and_deletes_nothing(mydata, tmp_path):
    folder, before = mydata
    cmd = [sys.executable, "-m", "tfmm.data.prepare", "--impressions=mydata/impressions.csv",
           "--items=mydata/items.csv", "--images_dir=mydata/images"]
    assert refused(cmd + ["--out_dir=mydata"], cwd=tmp_path) == (
        "--out_dir=mydata holds the input mydata/impressions.csv; an output directory must "
        "not hold what the command reads: choose another --out_dir.")
    notes, notes_before = foreign(tmp_path)
    assert refused(cmd + ["--out_dir=notes"], cwd=tmp_path) == (
        "--out_dir=notes is a non-empty directory tfmm did not write; its files are left "
        "alone: give a new or empty --out_dir.")
    assert tree(folder) == before and tree(notes) == notes_before
    assert sorted(os.listdir(tmp_path)) == ["mydata", "notes"]  # no temporary directory


def test_prepare_library_and_beam_refuse_and_rerun_into_their_own_output(mydata, tmp_path):
    folder, before = mydata
    inputs = [str(folder / "impressions.csv"), str(folder / "items.csv")]
    for runner in (None, "DirectRunner"):
        for out in (folder, folder / "images"):
            with pytest.raises(ValueError, match=f"^--out_dir={out} (holds|is) the input"):
                prepare(PrepareOptions(*inputs, str(out), str(folder / "images"),
                                       runner=runner))
    notes, notes_before = foreign(tmp_path)
    with pytest.raises(ValueError, match="non-empty directory tfmm did not write"):
        prepare(PrepareOptions(str(folder / "impressions*.csv"), inputs[1], str(notes),
                               runner="DirectRunner"))  # a pattern
    assert tree(folder) == before and tree(notes) == notes_before
    out = tmp_path / "prepared"
    first = prepare(PrepareOptions(*inputs, str(out), str(folder / "images")))
    assert prepare(PrepareOptions(*inputs, str(out), str(folder / "images"),
                                  max_history=3)) != first
    assert json.load(open(out / outputs.MARKER)) == {"written_by": "tfmm"}


@pytest.mark.slow
def test_generate_refuses_user_folders_and_replaces_its_own(tmp_path):
    notes, before = foreign(tmp_path)
    cmd = [sys.executable, "-m", "tfmm.data.generate", "--world=tiny", "--num_users=30"]
    for flag in ("out_dir", "raw_dir"):
        assert refused(cmd + [f"--{flag}={notes}"]) == (
            f"--{flag}={notes} is a non-empty directory tfmm did not write; its files are left "
            f"alone: give a new or empty --{flag}.")
    assert tree(notes) == before
    world = world_lib.generate(world_lib.PRESETS["tiny"])
    for write in (write_world, write_raw):
        write(world, tmp_path / write.__name__)
        write(world, tmp_path / write.__name__)  # its own: replaced


def test_a_world_is_never_generated_over_a_users_data_dir(tmp_path):
    from tfmm.data.synthetic import ensure_world

    notes, before = foreign(tmp_path)
    with pytest.raises(ValueError, match=f"^--data_dir={notes} is a non-empty directory"):
        ensure_world(str(notes), "tiny")
    assert tree(notes) == before


def test_embed_refuses_its_inputs_and_user_folders(tiny_dir, tmp_path):
    from tfmm.serving.encoding import claim_dir

    encoder = tmp_path / "encoder"
    (encoder / "1").mkdir(parents=True)
    manifest = {"catalogue": "0123", "encoder": str(encoder), "modality": "image", "dim": 8}
    notes, notes_before = foreign(tmp_path)
    data_before = tree(tiny_dir)
    for out, message in ((tiny_dir, "is the input"), (tmp_path, "holds the input"),
                         (notes, "is a non-empty directory tfmm did not write")):
        with pytest.raises(ValueError, match=f"^--out_dir={out} {message}"):
            claim_dir(str(out), manifest, inputs=(tiny_dir,))
    assert tree(tiny_dir) == data_before and tree(notes) == notes_before
    claim_dir(str(tmp_path / "vectors"), manifest, inputs=(tiny_dir,))
    claim_dir(str(tmp_path / "vectors"), manifest, inputs=(tiny_dir,))  # its own: a rerun


def test_an_export_base_holds_versions_only(tiny_dir, tmp_path):
    from tfmm import ctr
    from tfmm.config import SettingsError
    from tfmm.export import export_saved_model
    from tfmm.towers import text_tower

    notes, before = foreign(tmp_path)
    tower = text_tower(["red", "mug"], dim=4)
    with pytest.raises(ValueError, match=f"^--export_dir={notes} is a non-empty directory"):
        export_saved_model(tower, str(notes), "vector")
    assert tree(notes) == before
    base = tmp_path / "export"
    assert export_saved_model(tower, str(base), "vector") == str(base / "1")
    assert export_saved_model(tower, str(base), "vector") == str(base / "2")
    for export_dir, message in ((tiny_dir, "is the input"), (notes, "is a non-empty")):
        with pytest.raises(SettingsError, match=f"^--export_dir={export_dir} {message}"):
            ctr.CTRConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "m"), model="id",
                          export_dir=str(export_dir)).validate()


def test_index_export_never_replaces_a_users_file_or_an_input(tiny_dir, tmp_path):
    from tfmm.index import SQLiteIndex
    from tfmm.index.files import export_vectors
    from tfmm.data import schema

    index = SQLiteIndex(tmp_path / "index.db", dim=3)
    index.claim(schema.catalogue_fingerprint(tiny_dir))
    index.put([2, 3], np.eye(2, 3))
    index.close()
    spec = str(tmp_path / "index.db")
    mine = tmp_path / "items.csv"
    mine.write_text("item_id,title\n7,red mug\n")
    before = tree(tmp_path)
    for out, ids, message in [
            (mine, None, f"--out={mine} is a file tfmm did not write"),
            (os.path.join(tiny_dir, "v.csv"), None, "lies in the input"),
            (tmp_path / "v.npy", mine, f"--ids={mine} is a file tfmm did not write"),
            (tmp_path, None, "unknown format")]:
        with pytest.raises(ValueError, match=message):
            export_vectors(spec, tiny_dir, str(out), ids and str(ids))
    assert tree(tmp_path) == before and not os.path.exists(os.path.join(tiny_dir, "v.csv"))
    for name, ids in (("v.parquet", None), ("v.csv", None), ("v.npy", "ids.txt")):
        for _ in range(2):  # a rerun replaces its own export
            assert export_vectors(spec, tiny_dir, str(tmp_path / name),
                                  ids and str(tmp_path / ids)) == 2


@pytest.mark.slow
def test_a_pipelines_report_dir_of_user_files_is_refused(tmp_path):
    notes, before = foreign(tmp_path)
    assert refused([sys.executable, "-m", "pipelines.paper", f"--out_dir={notes}"]) == (
        f"--out_dir={notes} is a non-empty directory tfmm did not write; its files are left "
        "alone: give a new or empty --out_dir.")
    assert tree(notes) == before
    from pipelines.runs import pipeline_dir

    for committed in ("results/paper", "results/paper-eq4"):  # reports from before the marker
        assert pipeline_dir(os.path.join(ROOT, committed))

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # trains models or runs the CLIs



def test_paper_report_on_tiny(tiny_dir, tmp_path):
    data_dir = tiny_dir
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "pipelines.paper", f"--data_dir={data_dir}",
           f"--out_dir={out}", f"--runs_dir={tmp_path}/runs", "--seeds=0,1",
           "--methods=id,simtier_make", "--sections=table3,fig3,fig6c", "--pretrain_epochs=1",
           "--make_epochs=1", "--make_sweep=0,1", "--fig3_epochs=2", "--batch_size=256"]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(out / "report.json"))
    table = report["table3"]
    assert table["id"]["gauc_rel_pct"] == 0.0 and len(table["simtier_make"]["gauc"]) == 2
    mm, base = table["simtier_make"], table["id"]
    expected = 100 * sum((m - b) / b for m, b in zip(mm["gauc"], base["gauc"])) / 2
    assert abs(mm["gauc_rel_pct"] - expected) < 1e-9
    assert len(report["fig3"]["id_gauc"]) == len(report["fig3"]["mm_gauc"]) == 2
    assert report["fig6c"]["make_epochs"] == [0, 1]
    assert len(report["fig6b"]["simtier_make"]["auc_gain_pct"]) == 8
    for name in ("fig3", "fig6b", "fig6c"):
        assert open(out / f"{name}.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(out / "report.md").read()
    assert "| SimTier+MAKE |" in md and "![fig3](fig3.png)" in md
    # The report names the flags that reproduce it, the non-default ones included.
    assert "--methods=id,simtier_make --sections=table3,fig3,fig6c" in md

    # A second run reuses every finished run: nothing is trained again.
    again = subprocess.run(cmd, capture_output=True, text=True,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert again.returncode == 0 and "training the" not in again.stdout
    assert json.load(open(out / "report.json"))["table3"] == table

"""benchmarks/gpu.sh, the GPU run: its parts' time limits, and the whole run on tiny sizes
(on CPU), every part's figures in the one JSON."""

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from benchmarks import gpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Writes {"figures": {"argv": [...]}} to its --json (the last argument) and prints "ran".
FAKE = ("import json, sys; print('ran'); json.dump({'figures': {'argv': sys.argv[1:]}}, "
        "open(sys.argv[-1].split('=', 1)[1], 'w'))")


def test_a_part_runs_its_commands_in_turn_and_reads_the_last_ones_figures(tmp_path):
    first = [sys.executable, "-c", "print('first')"]
    last = [sys.executable, "-c", FAKE, "--x=1"]
    result = gpu.run_part([first, last], time.monotonic() + 60, str(tmp_path / "p.json"))
    assert result["status"] == "ok"
    assert result["output"] == "first\nran\n"
    assert result["figures"] == {"argv": ["--x=1", f"--json={tmp_path / 'p.json'}"]}
    assert result["commands"][1].endswith(f"--x=1 --json={tmp_path / 'p.json'}")
    assert result["info_lines"] == 0


def test_a_part_stops_at_its_deadline_with_its_children_and_a_failure_stops_the_rest(tmp_path):
    # The part's child starts a grandchild that would outlive it; both go at the deadline.
    marker = tmp_path / "late"
    (tmp_path / "late.py").write_text(f"import time\ntime.sleep(3)\nopen({str(marker)!r}, 'w')\n")
    (tmp_path / "part.py").write_text(
        "import subprocess, sys, time\nprint('started', flush=True)\n"
        f"subprocess.Popen([sys.executable, {str(tmp_path / 'late.py')!r}])\ntime.sleep(30)\n")
    start = time.monotonic()
    result = gpu.run_part([[sys.executable, str(tmp_path / "part.py")]], start + 1,
                          str(tmp_path / "p.json"))
    assert result["status"] == "timed out" and result["output"] == "started\n"
    assert time.monotonic() - start < 10 and "figures" not in result
    time.sleep(4)
    assert not marker.exists()  # the grandchild was killed with the part

    failing = [sys.executable, "-c", "import sys; print('I0101 12:00:00.0 x.cc:1] info', "
               "file=sys.stderr); sys.exit(3)"]
    result = gpu.run_part([failing, [sys.executable, "-c", FAKE]], time.monotonic() + 60,
                          str(tmp_path / "q.json"))
    assert result["status"] == "failed (exit status 3)" and "figures" not in result
    assert result["info_lines"] == 1 and "x.cc:1] info" in result["stderr"]
    assert not (tmp_path / "q.json").exists()  # the benchmark after the failure never ran


def test_the_full_run_fits_its_budget_and_tiny_runs_the_same_parts(tmp_path):
    full, tiny = gpu.parts(False, str(tmp_path)), gpu.parts(True, str(tmp_path))
    assert [p[0] for p in full] == [p[0] for p in tiny]
    assert gpu.FULL_BUDGET_S <= 8 * 60 - 20  # what the device information takes, and a margin
    names = [name for name, _, _ in full]
    assert names[:4] == ["ctr_step", "ctr_step_xla", "ctr_step_mixed", "ctr_step_xla_mixed"]
    for name, _, commands in full[:4]:
        argv = commands[-1]
        assert f"--jit_compile={'xla' in name}" in argv
        assert f"--mixed_precision={'mixed' in name}" in argv


# What each part's printed output says (the benchmarks' smoke checks).
EXPECTED = {
    "ctr_step": ["Adam with Adam", "examples/s", "with Keras 3's Adam"],
    "ctr_step_xla": ["jit_compile=True, mixed_precision=False", "Adam with Adam"],
    "ctr_step_mixed": ["jit_compile=False, mixed_precision=True", "Adam with Adam"],
    "ctr_step_xla_mixed": ["jit_compile=True, mixed_precision=True", "Adam with Adam"],
    "predictor_latency": ["like for like", "NOT like for like", "p99", "index SQLite"],
    "moco_queue": ["queue cost / matmul"],
    "retrieval": ["bare chunked products", "x the products"],
    "embed": ["local, batches of 32: 240 items", "DirectRunner, batches of 32: 240 items",
              "batches of 16 events: 240 items", "local / near-line"],
}


def leaves(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from leaves(v)
    elif isinstance(x, list):
        for v in x:
            yield from leaves(v)
    else:
        yield x


@pytest.mark.slow
def test_gpu_script_tiny_writes_every_parts_figures(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--tiny", f"--out={out}"], cwd=REPO,
                          env=dict(os.environ, PYTHON=sys.executable), capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["tiny"] is True and results["device"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", results["environment"]["tf_version"])
    assert set(results["parts"]) == set(EXPECTED)
    for name, part in results["parts"].items():
        assert part["status"] == "ok", (name, part.get("stderr"))
        assert part["info_lines"] == 0, (name, part.get("stderr"))
        module = name.split("_xla")[0].split("_mixed")[0]
        assert f"-m benchmarks.{module} " in part["commands"][-1] and "--json=" in \
            part["commands"][-1]
        for text in EXPECTED[name]:
            assert text in part["output"], (name, part["output"])
        # Numbers (a difference of two timings may be negative on tiny sizes), and versions.
        numbers = [v for v in leaves(part["figures"]) if not isinstance(v, str)]
        assert numbers and all(isinstance(v, (int, float)) and math.isfinite(v)
                               for v in numbers), name

    parts = results["parts"]
    for name in ("ctr_step", "ctr_step_xla", "ctr_step_mixed", "ctr_step_xla_mixed"):
        fig = parts[name]["figures"]
        models = re.search(r"--models=(\S+)", parts[name]["commands"][-1]).group(1).split(",")
        assert sorted(fig["examples_per_s"]) == sorted(models)
        assert min(fig["examples_per_s"].values()) > 0
        rate = fig["examples_per_s"]
        assert fig["ratios"]["id_dense_adam/deepctr"] == pytest.approx(
            rate["id_dense_adam"] / rate["deepctr"])
    assert "id/deepctr" in parts["ctr_step"]["figures"]["ratios"]

    predictor = parts["predictor_latency"]["figures"]
    assert {"id [rank], index -: predict, 1 thread", "simtier_make [rank], index SQLite:   "
            "model call"} <= set(predictor["rows"])
    for row in predictor["rows"].values():
        assert 0 < row["p50_ms"] <= row["p99_ms"]
    for versus in predictor["versus_deepctr"].values():
        assert versus["ratio_p50"] == pytest.approx(
            versus["tfmm"]["p50_ms"] / versus["DeepCTR (200 rows a request)"]["p50_ms"])

    moco = parts["moco_queue"]["figures"]
    assert moco["queue_cost_over_matmul"] == pytest.approx(
        moco["queue_cost_ms"] / moco["matmul_and_grad_ms"])
    retrieval = parts["retrieval"]["figures"]
    assert retrieval["acc_at_n_over_bare"] == pytest.approx(
        retrieval["acc_at_n_s"] / retrieval["bare_products_s"])
    assert parts["embed"]["figures"]["items"] == {"local": 240, "directrunner": 240,
                                                  "nearline": 240}

"""The package: quiet command-line start-up, and the public surface users import."""

import os
import subprocess
import sys

import pytest

from tfmm import _startup

NOISE = ("I0000", "oneDNN", "cuInit", "absl::InitializeLog")


@pytest.mark.parametrize("argv, expected", [
    (["python", "-m", "tfmm.train", "--task=ctr"], True),
    (["python", "-u", "-m", "tfmm.data.generate"], True),
    (["python", "-m", "pipelines.paper"], True),
    (["python", "-m", "pytest", "-m", "tfmm.x"], False),  # a marker expression, not a tool
    (["python", "-m", "pytest", "tests"], False),
    (["python", "script.py"], False),
    (["python", "-m"], False),
])
def test_running_cli(argv, expected):
    assert _startup.running_cli(argv) is expected


def _generate(tmp_path, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    run = subprocess.run([sys.executable, "-m", "tfmm.data.generate", "--world=tiny",
                          "--num_users=30", f"--out_dir={tmp_path / 'w'}", *extra],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    return run.stdout + run.stderr


@pytest.mark.slow
def test_cli_is_quiet_by_default_and_verbose_on_request(tmp_path):
    quiet = _generate(tmp_path)
    assert "wrote" in quiet
    assert not [line for line in quiet.splitlines() if any(n in line for n in NOISE)], quiet
    # The same lines that the quiet run hid (TensorFlow on x86 Linux always notes oneDNN).
    assert "I0000" in _generate(tmp_path, "--verbose")


@pytest.mark.slow
def test_a_users_log_level_does_not_bring_the_start_up_lines_back():
    """A user's TF_CPP_MIN_LOG_LEVEL governs TensorFlow's later lines; the start-up
    notices, which no level reaches, stay hidden unless --verbose."""
    def encoder(level, *flags):  # refused at once, after TensorFlow loaded
        run = subprocess.run([sys.executable, "-m", "tfmm.serving.encoder", *flags],
                             capture_output=True, text=True,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL=level))
        assert run.returncode == 1 and run.stderr.strip().endswith("--encoder is required.")
        return run.stderr

    start_up = ("I0000", "oneDNN", "absl::InitializeLog", "cudart_stub")
    for level in ("3", "0"):
        stderr = encoder(level)
        assert not [line for line in stderr.splitlines() if any(n in line for n in start_up)], \
            stderr
    assert "oneDNN custom operations" in encoder("3", "--verbose")


def test_the_public_surface_resolves_and_stays_lazy():
    import tfmm
    from tfmm.ranker import DINRanker

    for name in tfmm.__all__:
        assert getattr(tfmm, name) is not None, name
    assert tfmm.DINRanker is DINRanker and tfmm.layers.SimTierLayer.__name__ == "SimTierLayer"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tfmm.nope
    code = "import sys, tfmm; print('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True).stdout.strip() == "False"

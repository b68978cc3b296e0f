"""The same layer tests, plus a TFRS model, under tf-keras (TF_USE_LEGACY_KERAS=1)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from tfmm.keras_compat import LEGACY

pytestmark = pytest.mark.slow  # trains models or runs the CLIs

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(LEGACY, reason="this is the Keras 3 run's way into tf-keras")
def test_layer_suite_and_tfrs_model_pass_under_tf_keras():
    # The modules marked `keras` test what subclasses or builds Keras objects (the
    # serialization and docstring ones iterate tfmm.layers.__all__); data tests do
    # not depend on the Keras flavour.
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-m", "keras",
         "tests"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,  # hangs only
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert re.search(r"\d+ passed", summary), summary
    assert not re.search(r"failed|skipped|error", summary), summary
    # The TFRS test itself ran (it is only collected under tf-keras).
    assert "PASSED tests/legacy/test_tfrs_model.py::" in proc.stdout

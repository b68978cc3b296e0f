"""The docstring examples of the layers and the ranker run, and print what they show."""

import doctest
import importlib

import pytest

import tfmm.layers

pytestmark = pytest.mark.keras  # rerun under tf-keras by tests/test_tf_keras.py

# Every public layer's module, and the other modules with examples.
MODULES = sorted({getattr(tfmm.layers, name).__module__ for name in tfmm.layers.__all__}) + [
    "tfmm.ranker", "tfmm.data.images", "tfmm.encoder_checks"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), verbose=False,
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no runnable example"
    assert result.failed == 0

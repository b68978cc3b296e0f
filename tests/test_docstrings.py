"""The docstring examples of the layers and the ranker run, and print what they show."""

import doctest
import importlib

import pytest

MODULES = ["tfmm.layers.dice", "tfmm.layers.din_attention", "tfmm.layers.known_ids",
           "tfmm.layers.make", "tfmm.layers.simscore", "tfmm.layers.simtier",
           "tfmm.layers.sharded_embedding", "tfmm.layers.vector", "tfmm.ranker",
           "tfmm.data.images", "tfmm.encoder_checks"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), verbose=False,
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no runnable example"
    assert result.failed == 0

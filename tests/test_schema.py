"""The record format: bulk serialisation equals the one-record reference."""

import numpy as np
import pytest

from tfmm.data import schema


@pytest.mark.parametrize("gather_bytes", [schema.GATHER_BYTES, 1, 5000])
def test_examples_are_byte_for_byte_those_of_example(monkeypatch, gather_bytes):
    # Laid out a row at a time (1), some rows at a time (5000) or all at once.
    monkeypatch.setattr(schema, "GATHER_BYTES", gather_bytes)
    rng = np.random.default_rng(0)
    n = 500
    edges = np.array([0, 1, 127, 128, 2**14 - 1, 2**14, 2**35, 2**63 - 1, -1, -128, -2**63])
    ints = {"user_id": rng.choice(edges, n), "label": rng.integers(0, 2, n),
            "a": rng.integers(-300, 300, n), "zz": rng.integers(0, 10**12, n),
            "\u00e9t\u00e9": rng.integers(0, 5, n)}  # keys sort by their UTF-8 bytes
    lengths = rng.integers(0, 30, n)
    lengths[:10] = 0  # empty lists
    ends = np.cumsum(lengths)
    values = {"history_a": rng.choice(edges, ends[-1]), "b_list": rng.integers(0, 200, ends[-1])}
    long_key = "k" * 200  # a key longer than one varint byte
    strings = {"title": [rng.bytes(int(k)) for k in rng.integers(0, 300, n)],
               long_key: [b""] * n}
    got = schema.examples(ints=ints, strings=strings, int_lists={
        k: (schema.Varints(v), ends - lengths, ends) for k, v in values.items()})
    assert len(got) == n
    for i in range(n):
        assert got[i] == schema.example(
            ints={k: v[i] for k, v in ints.items()},
            int_lists={k: v[ends[i] - lengths[i]:ends[i]] for k, v in values.items()},
            strings={k: v[i] for k, v in strings.items()}), i


def test_example_lists_may_be_any_slices_of_the_varints():
    values = np.array([5, 300, -7, 2**40, 0])
    starts, ends = np.array([3, 0, 1, 2]), np.array([5, 2, 1, 5])  # overlapping, empty
    got = schema.examples(ints={"x": np.arange(4)},
                          int_lists={"h": (schema.Varints(values), starts, ends)})
    assert got == [schema.example(ints={"x": i}, int_lists={"h": values[s:e]})
                   for i, (s, e) in enumerate(zip(starts, ends))]
    assert schema.examples(ints={"x": np.zeros(0, np.int64)}) == []

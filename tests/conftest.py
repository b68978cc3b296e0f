import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The `tiny` synthetic world's data directory, generated once per session and
    shared: a test that changed it would fail the session (checked at the end)."""
    import hashlib

    from tfmm.data import world as world_lib
    from tfmm.data.synthetic import write_world

    out = tmp_path_factory.mktemp("worlds") / "tiny"
    write_world(world_lib.generate(world_lib.PRESETS["tiny"]), out)

    def digest():
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file()}

    before = digest()
    yield str(out)
    assert digest() == before, f"a test changed the shared tiny world {out}"


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global seeds (Python, NumPy, TensorFlow), so its
    draws do not depend on which tests ran before it in its worker."""
    from tfmm.keras_compat import keras

    keras.utils.set_random_seed(0)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def unit(x):
    """L2-normalises the last axis (as the pre-trained vectors are)."""
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    except FileNotFoundError as e:  # never a skip: CI installs redis-server
        pytest.fail(str(e))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """URL of an empty database on the private server (restarted if a test stopped it)."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture(params=["sqlite", "redis"])
def store_spec(request, tmp_path):
    """Where a new, empty index or event queue lives, on each backend: a SQLite
    file, or an empty database of the private Redis server."""
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    return request.getfixturevalue("redis_url")

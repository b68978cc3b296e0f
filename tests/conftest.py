import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest


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


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def unit(x):
    """L2-normalises the last axis (as the pre-trained vectors are)."""
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class RedisServer:
    """A private redis-server on a free loopback port (tests never share the default 6379),
    also on the socket ``<workdir>/redis.sock``; with `password`, it requires it."""

    def __init__(self, workdir, password=None):
        import shutil
        import socket

        self.binary = shutil.which("redis-server")
        if self.binary is None:
            # Never a skip: CI installs it (.ci/run, `make system-packages`) so these tests run.
            pytest.fail("redis-server is not installed; run `make system-packages` "
                        "(apt-get install redis-server).")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.workdir = str(workdir)
        self.socket = os.path.join(self.workdir, "redis.sock")
        self.password = password
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None
        self.start()

    def start(self):
        import subprocess
        import time

        import redis

        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.workdir, "--unixsocket", self.socket,
             *(("--requirepass", self.password) if self.password else ())],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, password=self.password)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.025)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def flush(self):
        import redis

        redis.Redis(port=self.port, password=self.password).flushall()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
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

"""A private redis-server for the tests and the benchmarks (no pytest needed)."""

import os


class RedisServer:
    """A private redis-server on a free loopback port (tests never share the default 6379),
    also on the socket ``<workdir>/redis.sock``; with `password`, it requires it."""

    def __init__(self, workdir, password=None):
        import shutil
        import socket

        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise FileNotFoundError("redis-server is not installed; run `make system-packages` "
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

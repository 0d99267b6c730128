"""A private redis-server as a child process (for ``hetis up`` and the tests)."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time


def redacted(url: str) -> str:
    """A Redis URL fit to print: its password replaced by ***."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: SIGTERM the child when its parent dies, even by SIGKILL (no orphan redis)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class RedisProcess:
    """Start ``redis-server`` on a free loopback port; ``url`` is its address.

    Persistence is off unless ``dir`` is given (then RDB snapshots go there, so a
    restarted redis on the same dir keeps its data). With ``password`` (``hetis up``
    always gives one) the server runs with ``requirepass`` and protected mode on, and
    ``url`` carries the password (``redis://:PASSWORD@127.0.0.1:PORT/0``), which is how
    every service takes it: another local user cannot read or forge the membership.
    """

    def __init__(self, port: int | None = None, dir: str | None = None,
                 password: str | None = None, host: str = "127.0.0.1"):
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found on PATH: run `make install`, or install it "
                               "with your package manager (Debian/Ubuntu: apt-get install redis-server)")
        self.port = port or free_port()
        self.dir = dir or tempfile.mkdtemp(prefix="hetis-redis-")
        args = [exe, "--port", str(self.port), "--bind", host, "--dir", self.dir,
                "--save", "" if dir is None else "1 1", "--appendonly", "no",
                "--protected-mode", "yes" if password else "no", "--loglevel", "warning"]
        # the password goes in on stdin as a config line, never on the command line (ps)
        self.proc = subprocess.Popen([*args, *(["-"] if password else [])],
                                     stdin=subprocess.PIPE if password else subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=_die_with_parent)
        if password:
            self.proc.stdin.write(f'requirepass "{password}"\n'.encode())
            self.proc.stdin.close()
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}{host}:{self.port}/0"
        self._wait_ready()

    def _wait_ready(self, timeout: float = 10.0) -> None:
        import redis
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err.strip()}")
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "RedisProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

"""Shared fixtures: real `seeder run` processes on loopback, always cleaned up.

    def test_x(seeder_proc):
        s = seeder_proc(max_upload_rate="4MiB")   # started, /healthz answers
        s.url, s.token, s.data_dir
        s.restart()                                # same data dir, same port

`seeder` is a ready-made default instance for tests that need just one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

PUSH_TOKEN = "test-push-token"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_READY = "seeder listening on "


class SeederProcess:
    """One `seeder run` subprocess; its stdout and stderr go to files beside the data dir."""

    def __init__(
        self,
        data_dir: Path,
        token: str = PUSH_TOKEN,
        max_upload_rate: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = data_dir
        self.token = token
        self.max_upload_rate = max_upload_rate
        self.extra_args = extra_args
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.seeder-{self._starts}.log"

    def log(self) -> str:
        """Everything the current (or last) process wrote, for assertion messages."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = START_TIMEOUT) -> SeederProcess:
        """Start on `self.port` (0 on first start: the OS picks) and wait for /healthz."""
        assert self.proc is None, "already running"
        self._starts += 1
        cmd = [
            sys.executable,
            "-m",
            "seeder.cli",
            "run",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--data-dir",
            str(self.data_dir),
            "--push-token",
            self.token,
            *self.extra_args,
        ]
        if self.max_upload_rate is not None:
            cmd += ["--max-upload-rate", self.max_upload_rate]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDER_")}
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"seeder exited at start:\n{self.log()}")
            if self.port == 0:
                for line in self.log().splitlines():
                    if line.startswith(_READY):
                        self.port = int(line.rsplit(":", 1)[1])
            if self.port and self._healthy():
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"seeder did not become healthy in {timeout}s:\n{self.log()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the process and wait for it (SIGKILL after STOP_TIMEOUT); its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        return proc.returncode

    def kill(self) -> None:
        """Die at once, like a crash or a power cut, as far as a process can."""
        self.stop(signal.SIGKILL)

    def restart(self, hard: bool = False) -> SeederProcess:
        """Stop (SIGKILL if `hard`) and start again on the same data dir and port."""
        self.stop(signal.SIGKILL if hard else signal.SIGTERM)
        return self.start()


SeederFactory = Callable[..., SeederProcess]


@pytest.fixture
def seeder_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeederFactory]:
    """Factory starting seeders: `seeder_proc(token=..., max_upload_rate=..., data_dir=...)`."""
    started: list[SeederProcess] = []

    def factory(
        token: str = PUSH_TOKEN,
        max_upload_rate: str | None = None,
        data_dir: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> SeederProcess:
        if data_dir is None:
            data_dir = tmp_path_factory.mktemp("seeder") / "data"
        s = SeederProcess(data_dir, token, max_upload_rate, extra_args)
        started.append(s)
        return s.start()

    try:
        yield factory
    finally:
        for s in started:
            s.stop()


@pytest.fixture
def seeder(seeder_proc: SeederFactory) -> SeederProcess:
    """A running seeder with the default token and no rate cap."""
    return seeder_proc()

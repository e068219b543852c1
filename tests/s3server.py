"""Real S3-protocol servers on loopback for the tests, each a separate process: moto's server
(conformance: pagination, multipart, ranges, conditional create) and localbucket (keeps its data
on disk, so it can be killed and started again)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "incstore-test", "AWS_SECRET_ACCESS_KEY": "incstore-test",
               "AWS_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def available(kind: str) -> bool:
    # run as modules of this interpreter: a console script may not be on PATH (pyenv shims
    # are only made by a rehash)
    return importlib.util.find_spec("moto.server" if kind == "moto" else kind) is not None


@dataclass
class S3Server:
    kind: str  # "moto" or "localbucket"
    data: Path | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> S3Server:
        if self.kind == "moto":
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        else:
            assert self.data is not None
            self.data.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "localbucket", "--host", "127.0.0.1", "--port",
                   str(self.port), str(self.data)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return self
            except urllib.error.HTTPError:
                return self  # it answers
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.kind} did not start on {self.endpoint}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def create_bucket(self, name: str) -> str:
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        urllib.request.urlopen(req, timeout=10)
        return name



__all__ = ["CREDENTIALS", "S3Server", "available", "free_port"]

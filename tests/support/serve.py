"""`mist serve` started as a user starts it, in its own process on a free 127.0.0.1 port, for the service's tests,
the Ray scenario and the service benchmark."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MIST = [sys.executable, "-c", "import sys; from mist.faces.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`mist serve --data DATA` with the tiny model on the CPU (and `extra` options), its output in a log beside
    DATA; the constructor returns once /v1/health answers. `token`: the API token the server printed when it created
    it (on a data folder's first start), else the one given. Stop it with `stop()` (or `kill()`: SIGKILL)."""

    def __init__(self, data: Path, *extra: str, timeout: float = 300, token: str | None = None) -> None:
        from mist.faces.client import Client

        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data.parent / f"server-{self.port}.log"
        data.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [*MIST, "serve", "--data", str(data), "--port", str(self.port), "--model", "tiny-random",
                 "--device", "cpu", *extra], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        with Client(self.url) as client:
            while True:
                try:
                    client.health()
                    printed = [line for line in self.log.read_text().splitlines() if line.startswith("mist_")]
                    self.token = printed[0] if printed else self.token
                    return
                except Exception:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"mist serve did not start:\n{self.log.read_text()[-3000:]}") from None
                    time.sleep(0.1)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

"""A real local Ray cluster for tests and benchmarks: a head and worker nodes as separate processes (`ray start`), each
worker node declaring one unit of a custom resource that stands in for a GPU.

Ray's servers listen on every interface of the machine, so the cluster must run inside a private network namespace
whose only interface is loopback (`in_private_network` re-runs a command under `unshare --net`): nothing it starts can
reach, or be reached from, any other address. Stopping it kills the namespace's processes, never another Ray's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESOURCE = "mist_slot"
HOST_NETWORK = "MIST_TEST_HOST_NETNS"  # the network namespace a private one was made from
BIN = Path(sys.executable).parent


def private_network_problem() -> str | None:
    """Why commands cannot run in a private network namespace here, or None."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "--net", "--map-root-user", "ip", "link", "set", "lo", "up"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot make a private network namespace: {probe.stderr.strip()}"


def in_private_network(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run `command` in a new network namespace with only loopback (brought up first)."""
    script = 'ip link set lo up && exec "$@"'
    env = {**kwargs.pop("env", os.environ), HOST_NETWORK: os.readlink("/proc/self/ns/net")}
    return subprocess.run(["unshare", "--net", "--map-root-user", "sh", "-c", script, "sh", *command],
                          timeout=timeout, env=env, **kwargs)


class Cluster:
    """`ray start` head (no slot) plus `workers` nodes with one slot each, on 127.0.0.1; `stop()` ends them all."""

    def __init__(self, workers: int, port: int = 6379) -> None:
        if not in_own_network():
            raise RuntimeError("start the cluster in a private network namespace (see in_private_network)")
        self.address = f"127.0.0.1:{port}"
        self.temp = tempfile.mkdtemp(prefix="mr", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=80000000",
                  "--disable-usage-stats"]
        self._ray("start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={self.temp}",
                  f"--resources={json.dumps({RESOURCE: 0})}", *common)
        for _ in range(workers):
            self._ray("start", f"--address={self.address}", f"--resources={json.dumps({RESOURCE: 1})}", *common)

    def _ray(self, *args: str) -> None:
        subprocess.run([str(BIN / "ray"), *args], env=self.env, check=True, capture_output=True, timeout=300)

    def stop(self) -> None:
        """Kill every other process of this private network namespace: the cluster's, and nothing else on the machine
        (`ray stop` would stop every Ray process of the machine, another cluster's too)."""
        for pid in processes_in_this_network():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


def in_own_network() -> bool:
    """Whether this process runs in the private network namespace `in_private_network` made (not the one it was
    called from, which it records in HOST_NETWORK)."""
    host = os.environ.get(HOST_NETWORK)
    return host is not None and os.readlink("/proc/self/ns/net") != host


def processes_in_this_network() -> list[int]:
    """The other processes in this process's network namespace (only meaningful in a private one)."""
    own, pids = os.readlink("/proc/self/ns/net"), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if os.readlink(entry / "ns" / "net") == own:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def actor_pids(busy_only: bool = False) -> list[int]:
    """Processes of this network namespace's Mist Ray actors (their title is `ray::_ProtectActor...`), never another
    cluster's on the machine; with `busy_only`, those protecting."""
    pids = []
    for pid in processes_in_this_network():
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::_ProtectActor") and (not busy_only or ".protect" in title):
            pids.append(pid)
    return pids


def kill_a_busy_actor(driver: subprocess.Popen, timeout: float = 300) -> int:
    """SIGKILL one actor process in the middle of an image while `driver` runs; returns its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and driver.poll() is None:
        busy = actor_pids(busy_only=True)
        if busy:
            os.kill(busy[0], signal.SIGKILL)
            return busy[0]
        time.sleep(0.02)
    raise TimeoutError("no actor was seen protecting an image")

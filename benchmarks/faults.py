"""The HTTP service under faults: `mist serve` (tiny random model, 127.0.0.1 only) in its own process, broken on
purpose, and what is left afterwards counted.

    python benchmarks/faults.py [--only kill9,kill9-upload,kill9-zip,locked,read-only,disk-full,disk-full-output,
                                        quota,disconnect,disconnect-download]

Scenarios (each with a fresh data folder; every one is bounded and stops its server at the end):
- kill9: a job of several images; the server is killed with SIGKILL while the job is queued, mid-step, at the first
  image's last step (its PNG is written next), and after its first image is written; each time a new server starts
  on the same folder and the job is awaited.
- kill9-upload: SIGKILL while a client is halfway through sending a 3-image upload: after a restart no job and no
  file of it may exist.
- kill9-zip: SIGKILL while the server builds and sends the ZIP of a finished 8-image job: after a restart the ZIP
  downloads whole and no temporary file is left in the data folder.
- locked: another process holds the database's write lock (SQLite's BEGIN EXCLUSIVE) for 45 s, longer than
  SQLite's 30 s wait, while a job runs; /v1/health is polled meanwhile; the job must finish once the lock is
  released, and a job queued after it too.
- read-only: the data folder's file system (a tmpfs) became read-only between two runs of the server: the next
  start refuses in one line and changes nothing. (The kernel refuses to remount it under a running server;
  a database that refuses writes during a run is tested in tests/test_service.py.)
- disk-full: the data folder on a 1 MiB tmpfs (needs root to mount; skipped otherwise), a 2.4 MB upload.
- disk-full-output: the data folder on a small tmpfs that a filler file fills once the job is accepted: its outputs
  cannot be written; the job must end failed with the reason, leave no partial PNG, and a job after the filler is
  removed must run.
- quota: 200 submissions at once with one token whose limit is 5 queued jobs.
- disconnect: a client that sends half an upload and hangs up; the server must keep no folder of it and go on.
- disconnect-download: a client that reads the first bytes of a job's ZIP and hangs up; the server goes on and the
  ZIP downloads whole afterwards.

Each row says: jobs lost (accepted but gone or never finished), results lost (a protected PNG that was done, then
missing), wrong states (a finished job with an image not done, or an answer with the wrong status), unprotected
copies left (uploaded originals still on disk after their job ended). All four must be 0.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.serve import MIST, Server  # noqa: E402  (mist serve in its own process, as the tests start it)

SETTINGS = {"steps": 30, "input_size": 64}


def picture(n: int, side: int = 64) -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(n).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def client(server: Server):
    from mist.faces.client import Client

    return Client(server.url, token=server.token)


def submit(server: Server, images: int, seed: int = 0) -> str:
    import httpx

    files = [("images", (f"{n}.png", picture(seed + n), "image/png")) for n in range(images)]
    reply = httpx.post(f"{server.url}/v1/jobs", files=files, data={k: str(v) for k, v in SETTINGS.items()},
                       headers={"Authorization": f"Bearer {server.token}"}, timeout=60)
    reply.raise_for_status()
    return reply.json()["id"]


def leftovers(data: Path, job: str) -> int:
    """Uploaded originals of a finished job still on disk."""
    return sum(1 for folder in ("in", "masks", "files") for path in (data / "jobs" / job / folder).rglob("*")
               if path.is_file())


def check_done(server: Server, data: Path, job: str, written: set[str]) -> dict[str, int]:
    with client(server) as api:
        status = api.wait(job, poll_seconds=0.2, timeout=600)
    states = [image["state"] for image in status["images"]]
    outputs = {name for name in written if not (data / "jobs" / job / "out" / name).is_file()}
    return {"jobs lost": int(status["state"] != "done"), "results lost": len(outputs),
            "wrong states": sum(state != "done" for state in states), "copies left": leftovers(data, job)}


def zero() -> dict[str, int]:
    return {"jobs lost": 0, "results lost": 0, "wrong states": 0, "copies left": 0}


def wait_for(condition, seconds: float) -> bool:
    """Poll `condition` until it holds (True) or `seconds` passed (False): a hang guard, not a timing."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def temporary_files(data: Path) -> int:
    """Files an interrupted writer could leave: Mist's `.NAME.RANDOM.tmp` and anything named like a temporary."""
    return sum(1 for path in data.rglob("*") if path.is_file() and (path.name.endswith(".tmp")
                                                                     or path.name.startswith("tmp")))


def kill9(work: Path) -> dict[str, int]:
    total = zero()
    for stage in ("queued", "mid-step", "last step", "after an image"):
        data = work / stage.replace(" ", "-") / "data"
        server = Server(data)
        token = server.token
        job = submit(server, 3)
        with client(server) as api:
            if stage == "mid-step":
                deadline = time.monotonic() + 120
                while api.status(job)["images"][0]["step"] < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
            elif stage == "last step":
                wait_for(lambda job=job: api.status(job)["images"][0]["step"] >= SETTINGS["steps"] - 1, 300)
            elif stage == "after an image":
                deadline = time.monotonic() + 300
                while api.status(job)["images"][0]["state"] != "done" and time.monotonic() < deadline:
                    time.sleep(0.05)
        written = {path.name for path in (data / "jobs" / job / "out").glob("*.png")}
        server.kill()
        server = Server(data, token=token)
        try:
            for name, count in check_done(server, data, job, written).items():
                total[name] += count
            total["copies left"] += temporary_files(data)
        finally:
            server.stop()
    return total


def kill9_upload(work: Path) -> dict[str, int]:
    data = work / "data"
    server = Server(data)
    token = server.token
    body = b"".join(b"--x\r\nContent-Disposition: form-data; name=\"images\"; filename=\"%d.png\"\r\n\r\n%s\r\n"
                    % (n, picture(n, 300)) for n in range(3)) + b"--x--\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x"
                    b"\r\nAuthorization: Bearer " + token.encode() +
                    f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
        time.sleep(1)
        server.kill()
    with serving(data, token) as server:
        with client(server) as api:
            listed = api.server_status()["your_jobs"]
        folders = list((data / "jobs").iterdir()) if (data / "jobs").is_dir() else []
        result = zero()
        result["wrong states"] = listed
        result["copies left"] = len(folders) + temporary_files(data)
        return result


def download(server: Server, job: str) -> set[str]:
    """The names in the job's ZIP, downloaded whole."""
    import zipfile

    import httpx

    reply = httpx.get(f"{server.url}/v1/jobs/{job}/results", headers={"Authorization": f"Bearer {server.token}"},
                      timeout=120)
    reply.raise_for_status()
    return set(zipfile.ZipFile(io.BytesIO(reply.content)).namelist())


def finished_job(server: Server, images: int) -> str:
    job = submit(server, images)
    with client(server) as api:
        api.wait(job, poll_seconds=0.2, timeout=600)
    return job


def kill9_zip(work: Path) -> dict[str, int]:
    data = work / "data"
    server = Server(data)
    token = server.token
    job = finished_job(server, 8)
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(f"GET /v1/jobs/{job}/results HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}"
                    "\r\n\r\n".encode())
        raw.recv(64)  # the answer has begun
        server.kill()
    with serving(data, token) as server:
        result = zero()
        result["results lost"] = 8 - len(download(server, job))
        result["copies left"] = temporary_files(data)
        return result


def disconnect_download(work: Path) -> dict[str, int]:
    data = work / "data"
    with serving(data) as server:
        job = finished_job(server, 8)
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server.port)) as raw:
                raw.sendall(f"GET /v1/jobs/{job}/results HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            f"Authorization: Bearer {server.token}\r\n\r\n".encode())
                raw.recv(64)
        result = zero()
        result["results lost"] = 8 - len(download(server, job))
        second = submit(server, 1, seed=20)  # the server goes on
        for name, count in check_done(server, data, second, set()).items():
            result[name] += count
        result["copies left"] += temporary_files(data)
        return result


def healthy(server: Server) -> bool:
    import httpx

    return httpx.get(f"{server.url}/v1/health", timeout=30).status_code == 200


@contextlib.contextmanager
def serving(data: Path, token: str | None = None):
    """`mist serve` on `data` for the block's time (see tests/support/serve.py)."""
    server = Server(data, token=token)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def tmpfs(mount: Path, size: str):
    """A tmpfs of `size` mounted at `mount` (a new folder) for the block's time; yields False where it cannot be
    mounted (mounting needs root)."""
    mount.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                        capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", str(mount)], capture_output=True)


def job_ended(server: Server, job: str) -> dict:
    with client(server) as api:
        return api.wait(job, poll_seconds=0.2, timeout=600)


def read_only(work: Path) -> dict[str, int] | None:
    """A data folder on a file system that became read-only (a tmpfs remounted so between two runs of the server):
    the next start must refuse in one line, without a traceback, and leave the folder as it was. (Remounting it
    read-only under a running server is refused by the kernel while the database is open for writing; the store's
    refusals during a run are tested in tests/test_service.py, read-only among them.)"""
    mount = work / "data"
    with tmpfs(mount, "64m") as ok:
        if not ok:
            return None
        with serving(mount / "mist") as server:
            job = finished_job(server, 1)
        before = sorted(str(path) for path in mount.rglob("*"))
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        started = subprocess.run([*MIST, "serve", "--data", str(mount / "mist"), "--model", "tiny-random",
                                  "--device", "cpu", "--port", "1"], capture_output=True, text=True, timeout=300)
        lines = (started.stdout + started.stderr).strip().splitlines()
        print(f"  read-only: exit status {started.returncode}: {' | '.join(lines)}")
        result = zero()
        result["wrong states"] = int(started.returncode == 0 or len(lines) != 1 or "Traceback" in started.stderr)
        result["results lost"] = int(sorted(str(path) for path in mount.rglob("*")) != before
                                     or not (mount / "mist" / "jobs" / job / "out").is_dir())
        return result


def disk_full_output(work: Path) -> dict[str, int] | None:
    mount, filler = work / "data", work / "data" / "filler"
    with tmpfs(mount, "8m") as ok:
        if not ok:
            return None
        with serving(mount / "mist") as server:
            job = submit(server, 2)
            with open(filler, "wb") as fill:  # fill what is left, the job's outputs included
                with contextlib.suppress(OSError):
                    while True:
                        fill.write(b"\0" * 65536)
                        fill.flush()
            with client(server) as api:  # the job's images fail, or the queue cannot record it: not ready
                wait_for(lambda: api.status(job)["state"] != "running" or not healthy(server), 300)
                said = api.status(job)["state"], healthy(server)
            filler.unlink()  # space again: whatever could not be recorded is recorded now
            status = job_ended(server, job)
            print(f"  disk-full-output: with the disk full the job was {said[0]} and health "
                  f"{'ok' if said[1] else '503'}; it ended {status['state']} ({status.get('error') or 'no error'})")
            after = check_done(server, mount / "mist", submit(server, 1, seed=10), set())
        result = zero()
        result["wrong states"] = (int(status["state"] == "done" or not status.get("error"))
                                  + unreadable_pngs(mount / "mist" / "jobs" / job / "out"))
        result["jobs lost"] = after["jobs lost"]
        result["copies left"] = temporary_files(mount / "mist") + leftovers(mount / "mist", job)
        return result


def unreadable_pngs(folder: Path) -> int:
    """PNGs in `folder` that do not decode whole (a partial write left under the final name)."""
    from PIL import Image

    broken = 0
    for path in folder.rglob("*.png"):
        try:
            with Image.open(path) as picture:
                picture.load()
        except OSError:
            broken += 1
    return broken


def locked(work: Path) -> dict[str, int]:
    import httpx

    data = work / "data"
    with serving(data) as server:
        job = submit(server, 2)
        database = sqlite3.connect(data / "mist.db", timeout=60, isolation_level=None)
        database.execute("BEGIN EXCLUSIVE")
        unhealthy = 0
        try:
            end = time.monotonic() + 45
            while time.monotonic() < end:
                unhealthy += httpx.get(f"{server.url}/v1/health", timeout=30).status_code == 503
                time.sleep(0.5)
        finally:
            database.execute("COMMIT")
            database.close()
        second = submit(server, 1, seed=10)
        result = check_done(server, data, job, set())
        for name, count in check_done(server, data, second, set()).items():
            result[name] += count
        print(f"  locked: health said 503 in {unhealthy} of the polls while the database was locked")
        return result


def disk_full(work: Path) -> dict[str, int] | None:
    import httpx

    mount = work / "tiny"
    with tmpfs(mount, "1m") as ok:
        if not ok:
            return None
        with serving(mount / "data") as server:
            reply = httpx.post(f"{server.url}/v1/jobs", files=[("images", ("big.png", picture(1, 900), "image/png"))],
                               headers={"Authorization": f"Bearer {server.token}"}, timeout=60)
            jobs = list((mount / "data" / "jobs").glob("*")) if (mount / "data" / "jobs").is_dir() else []
            still_healthy = healthy(server)
        return {"jobs lost": 0, "results lost": 0,
                "wrong states": int(reply.status_code != 507 or "error" not in reply.json() or not still_healthy),
                "copies left": len(jobs)}


def quota(work: Path) -> dict[str, int]:
    import httpx

    data = work / "data"
    token = subprocess.run([sys.executable, "-c", "import sys; from mist.faces.cli import main; sys.exit(main())",
                            "serve", "token", "create", "limited", "--max-queued", "5", "--data", str(data)],
                           capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    with serving(data, token) as server:
        image = picture(0)

        def one(_: int) -> int:
            return httpx.post(f"{server.url}/v1/jobs", files=[("images", ("a.png", image, "image/png"))],
                              data={"steps": "1", "input_size": "32"}, timeout=120,
                              headers={"Authorization": f"Bearer {token}"}).status_code

        with ThreadPoolExecutor(50) as pool:
            codes = list(pool.map(one, range(200)))
        accepted = codes.count(201)
        print(f"  quota: {accepted} accepted, {codes.count(429)} refused with 429, "
              f"{sum(c >= 500 for c in codes)} server errors")
        return {"jobs lost": 0, "results lost": 0,
                "wrong states": int(accepted > 5) + sum(code not in (201, 429) for code in codes), "copies left": 0}


def disconnect(work: Path) -> dict[str, int]:

    data = work / "data"
    with serving(data) as server:
        body = b"--x\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n\r\n" + picture(0)[:500]
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x"
                        b"\r\nAuthorization: Bearer " + server.token.encode() +
                        f"\r\nContent-Length: {len(body) * 10}\r\n\r\n".encode() + body)
            time.sleep(1)
        time.sleep(2)
        job = submit(server, 1)  # the server goes on
        result = check_done(server, data, job, set())
        result["copies left"] += sum(1 for folder in (data / "jobs").iterdir() if folder.name != job)
        return result


SCENARIOS = {"kill9": kill9, "kill9-upload": kill9_upload, "kill9-zip": kill9_zip, "locked": locked,
             "read-only": read_only, "disk-full": disk_full, "disk-full-output": disk_full_output, "quota": quota,
             "disconnect": disconnect, "disconnect-download": disconnect_download}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios to run, comma-separated")
    args = parser.parse_args()
    rows = []
    for name in args.only.split(","):
        with tempfile.TemporaryDirectory(prefix=f"mist-faults-{name}-") as work:
            started = time.monotonic()
            result = SCENARIOS[name](Path(work))
            rows.append((name, result, time.monotonic() - started))
    print("\n| scenario | jobs lost | results lost | wrong states | unprotected copies left | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    failed = False
    for name, result, seconds in rows:
        if result is None:
            print(f"| {name} | skipped (cannot mount a tmpfs here) | | | | |")
            continue
        failed |= any(result.values())
        print(f"| {name} | {result['jobs lost']} | {result['results lost']} | {result['wrong states']} | "
              f"{result['copies left']} | {seconds:.0f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

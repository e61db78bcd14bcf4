"""A small Python client of `mist serve` (needs httpx: pip install 'mist-protect[serve]').

    from mist.faces.client import Client

    client = Client("http://127.0.0.1:8000", token="mist_...")
    paths = client.protect(["art/a.png", "art/b.jpg"], "protected/", steps=100, mode="fused")
    report = client.evaluate(["art/a.png"], ["protected/a.png"], "report/", strengths=(0.35,))

Settings are the ones `mist protect` takes, by name (`step_size=2`, `mode="textural"`); a `pathlib.Path` value is
uploaded as the file it names (`target=Path("pattern.png")`). An evaluation's are those of `mist evaluate`
(`purify="jpeg:75"`, `strengths=(0.25, 0.5)`, `lora=True`).
"""

from __future__ import annotations

import io
import os
import time
import zipfile
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from mist.common.files import write_atomic

FINISHED = ("done", "failed", "cancelled")


class ServiceError(Exception):
    """The server refused a request: `status` is the HTTP status, the message the server's one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Client:
    """Talks to one Mist server. `token`: the API token (None: only for a server started with --no-auth, from its own
    machine)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 120.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            message = body["error"] if isinstance(body, dict) and "error" in body else response.text
            raise ServiceError(response.status_code, message)
        return response

    def submit(self, images: Iterable[str | os.PathLike[str]], *, mask: str | os.PathLike[str] | None = None,
               masks: Iterable[str | os.PathLike[str]] = (), idempotency_key: str | None = None,
               metadata: str = "full", **settings: Any) -> dict[str, Any]:
        """Queue a job; returns its status (`["id"]` names it). `mask`: one mask for every image; `masks`: a mask
        per image, each named like its image. With `idempotency_key`, sending the same job again (after a timeout,
        say) returns the first one instead of queueing a second."""
        fields = _fields(settings)
        fields["metadata"] = metadata
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with ExitStack() as stack:
            def part(name: str, path: str | os.PathLike[str]) -> tuple[str, tuple[str, Any]]:
                return name, (Path(path).name, stack.enter_context(open(path, "rb")))

            files = [part("images", path) for path in images]
            files += [part("masks", path) for path in masks]
            if mask is not None:
                files.append(part("mask", mask))
            files += [part(name, value) for name, value in settings.items() if isinstance(value, Path)]
            return self._call("POST", "/v1/jobs", data=fields, files=files, headers=headers).json()

    def submit_evaluation(self, originals: Iterable[str | os.PathLike[str]],
                          protected: Iterable[str | os.PathLike[str]], *, idempotency_key: str | None = None,
                          **settings: Any) -> dict[str, Any]:
        """Queue an evaluation of the `protected` images against their `originals` (paired by file name, or by the
        source checksum a Mist output records); returns its status (`["id"]` names it)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with ExitStack() as stack:
            files = [(field, (Path(path).name, stack.enter_context(open(path, "rb"))))
                     for field, paths in (("originals", originals), ("protected", protected)) for path in paths]
            return self._call("POST", "/v1/evaluations", data=_fields(settings), files=files, headers=headers).json()

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, *, poll_seconds: float = 2.0, timeout: float | None = None,
             on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job is finished (done, failed or cancelled) and return its status; TimeoutError after
        `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if on_progress is not None:
                on_progress(status)
            if status["state"] in FINISHED:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {status['state']} after {timeout} s")
            time.sleep(poll_seconds)

    def download(self, job_id: str, folder: str | os.PathLike[str]) -> list[Path]:
        """Write a finished job's protected PNGs into `folder` (each atomically); returns their paths."""
        data = self._call("GET", f"/v1/jobs/{job_id}/results").content
        written = []
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in archive.namelist():
                relative = PurePosixPath(member)
                if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                    raise ServiceError(502, f"results of job {job_id}: unsafe name {member!r} in the archive")
                path = Path(folder, *relative.parts)
                write_atomic(path, archive.read(member))
                written.append(path)
        return written

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel an unfinished job (it stops at its next step); ServiceError 409 for a finished one, whose results
        are kept."""
        return self._call("POST", f"/v1/jobs/{job_id}/cancel").json()

    def resume(self, job_id: str) -> dict[str, Any]:
        """Queue a cancelled job again: what it finished is not redone. ServiceError 409 for a job not cancelled."""
        return self._call("POST", f"/v1/jobs/{job_id}/resume").json()

    def delete(self, job_id: str) -> None:
        """Delete a finished job and its results from the server; ServiceError 409 for an unfinished one."""
        self._call("DELETE", f"/v1/jobs/{job_id}")

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/v1/health").json()

    def server_status(self) -> dict[str, Any]:
        """The server's version, model name and queue length, and how many of this token's jobs are unfinished."""
        return self._call("GET", "/v1/status").json()

    def metrics(self) -> str:
        return self._call("GET", "/v1/metrics").text

    def protect(self, images: Iterable[str | os.PathLike[str]], output: str | os.PathLike[str], *,
                timeout: float | None = None, **settings: Any) -> list[Path]:
        """Submit, wait, download: the protected PNGs' paths in `output`. ServiceError if any image failed."""
        return self._finished(self.submit(images, **settings)["id"], output, timeout)

    def evaluate(self, originals: Iterable[str | os.PathLike[str]], protected: Iterable[str | os.PathLike[str]],
                 report: str | os.PathLike[str], *, timeout: float | None = None, **settings: Any) -> Path:
        """Submit an evaluation, wait, download its report into `report`: the path of its index.html."""
        self._finished(self.submit_evaluation(originals, protected, **settings)["id"], report, timeout)
        return Path(report, "index.html")

    def _finished(self, job_id: str, output: str | os.PathLike[str], timeout: float | None) -> list[Path]:
        """Wait for the job and download its results into `output`; ServiceError if it or any image failed."""
        status = self.wait(job_id, timeout=timeout)
        failed = [f"{image['name']}: {image['message']}" for image in status["images"] if image["state"] != "done"]
        if status["state"] != "done":
            raise ServiceError(500, f"job {job_id} {status['state']}: "
                                    f"{status.get('error') or '; '.join(failed) or 'no reason given'}")
        return self.download(job_id, output)


def _fields(settings: dict[str, Any]) -> dict[str, str]:
    """Settings as form fields: switches as true / false, a list as a comma list; files and None left out."""
    def word(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    return {name: word(value) for name, value in settings.items() if not isinstance(value, Path) and value is not None}

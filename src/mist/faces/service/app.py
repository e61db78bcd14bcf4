"""The HTTP API (FastAPI): submit jobs, follow them, download results, cancel; health and Prometheus metrics. A thin
layer over the store and the worker; the job runner is the one every face uses.

Every error is JSON `{"error": "one line"}` with a 4xx status naming the field or the file. Jobs are visible only to
the token that created them (another token's job is "not found", as if it did not exist).
"""

from __future__ import annotations

import errno
import functools
import io
import ipaddress
import logging
import shutil
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import (FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response,
                               StreamingResponse)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from mist.engine.config import ProtectConfig, steps_per_image, with_preset
from mist.engine.config import RUN_SETTINGS
from mist.runner.evaluation.settings import EVALUATION_OPTIONS
from mist.runner.work_limits import WorkLimits
from mist.runner.estimate import Estimate
from mist.runner import preflight
from mist.runner.offers import model_offer
from mist.common.files import write_zip
from mist.common.model_names import TEST_MODEL_STEPS, names_test_model
from mist.version import __version__
from mist.faces.service.apidocs import api_reference_html
from mist.faces.service.metrics import metrics_text
from mist.faces.service.store import (FINISHED, LOCAL_OWNER, DuplicateKey, JobRecord, JobStore, Limits, QueueFull,
                                      new_job_id)
from mist.faces.service.evaluations import parse_evaluation_settings, save_evaluation
from mist.faces.service.submit import (SubmitError, Upload, parse_settings, removed_on_failure, save_submission,
                                       uploads_by_field)
from mist.faces.service.layout import OUTPUT_FOLDER, job_folder
from mist.faces.service.worker import Worker, job_config

log = logging.getLogger(__name__)

_MAX_KEY = 200  # characters of an Idempotency-Key
def _field_names(flags: Iterable[str]) -> str:
    return ", ".join(f"`{flag.removeprefix('--')}`" for flag in flags)


SUBMIT_HELP = f"""A multipart form. Files: `images` (one or more), `mask` (one mask for every image: protection where
its red channel is 255), `masks` (a mask per image, named like its image), and a method's file parameter under its own
name (`target`). Settings: fields named like `mist protect`'s flags ({_field_names(
    s.flag for s in RUN_SETTINGS.values() if s.kind != "file" and not s.local)}, and the method's parameters such
as `mode`, `fused-weight`, `object`), or one JSON object in the field `settings`; `metadata`: `full` or `minimal`.
Header `Idempotency-Key`: a retried submission with the same key returns the first job (200). Answers 201 with the job's
status; 400 / 413 / 422 (a method the server's model cannot run) / 429 with `{{"error": "..."}}` naming the field
or file."""
EVALUATE_HELP = f"""Evaluate protected images as `mist evaluate` does (purifications, img2img mimicry at each strength,
LoRA if asked), as a job: queued with the protection jobs, followed, cancelled, resumed and deleted through
`/v1/jobs/{{id}}` like them (its status has `kind: evaluate` and `progress` in units of work). A multipart form. Files:
`originals` and `protected` (one or more each), paired by file name or by the source checksum a Mist output records.
Settings: fields named like `mist evaluate`'s flags ({_field_names(
    option.flag for option in EVALUATION_OPTIONS.values() if not option.local)}), or one JSON object in the field
`settings`.
The report (index.html, results.json, results.csv, pictures) is the job's result: `/v1/jobs/{{id}}/results` as a ZIP,
or one file by name (`/v1/jobs/{{id}}/results/results.json`). Header `Idempotency-Key` as for `POST /v1/jobs`."""
_FORM_FIELDS = 64  # text fields a submission may have
REPORT_FILES = {"index.html": "text/html; charset=utf-8", "results.json": "application/json",
                "results.csv": "text/csv; charset=utf-8"}  # an evaluation's files served one by one


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Service:
    """What the API serves from: the store, the data folder, the worker, and the access policy. `require_tokens`:
    every request needs a token (always so when the server listens beyond loopback); otherwise requests without one
    act as the local user, with `local_limits`."""

    store: JobStore
    data: Path
    worker: Worker
    require_tokens: bool
    local_limits: Limits
    retention_seconds: float
    model_name: str = ""
    work_limits: WorkLimits = WorkLimits()
    evaluates: bool = True  # False with a Ray pool: an evaluation needs a model in the server's own process


@dataclass(frozen=True)
class Caller:
    owner: str
    limits: Limits


def is_loopback(host: str) -> bool:
    """Whether `host` (what the server binds to) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _caller(request: Request) -> Caller:
    """Who sends the request: the token in its Authorization header, or the local user where that is allowed."""
    service: Service = request.app.state.service
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if header:
        token = service.store.token_for_secret(secret.strip()) if scheme.lower() == "bearer" else None
        if token is None:
            raise ApiError(401, "invalid or revoked token")
        return Caller(token.id, token.limits)
    if service.require_tokens:
        raise ApiError(401, "a token is required: send 'Authorization: Bearer <token>' (mist serve token create)")
    client = request.client.host if request.client else ""
    if not is_loopback(client):  # --no-auth is for this machine: a request from elsewhere (via a proxy) needs one
        raise ApiError(401, "a token is required from other machines: send 'Authorization: Bearer <token>'")
    return Caller(LOCAL_OWNER, service.local_limits)


Who = Annotated[Caller, Depends(_caller)]


def create_app(service: Service, *, manage_worker: bool = True) -> FastAPI:
    """The API over `service`; with `manage_worker` the worker starts and stops with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_worker:
            service.worker.start()
        yield
        if manage_worker:
            await run_in_threadpool(service.worker.stop)

    app = FastAPI(title="Mist", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Protect artworks from AI mimicry: submit images, follow the job, download the "
                              "protected PNGs. Authenticate with `Authorization: Bearer <token>`.")
    app.state.service = service

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:  # FastAPI's pages load their scripts from a CDN: see apidocs
        return HTMLResponse(api_reference_html(app.openapi()))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:  # every error has one shape
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server's log says more"},
                            status_code=500)

    _add_submit_route(app, service)
    _add_job_routes(app, service)
    _add_server_routes(app, service)
    return app


def _own_job(service: Service, job_id: str, who: Caller) -> JobRecord:
    """The caller's job `job_id`; 404 for a job that does not exist or is another caller's."""
    job = service.store.job(job_id) if job_id.isalnum() else None
    if job is None or job.owner != who.owner:
        raise ApiError(404, f"no job {job_id}")
    return job


def _admit(service: Service, who: Caller, key: str | None) -> dict[str, Any] | None:
    """The job this idempotency key already made (its status), or None if a new job may be queued; 429 when the
    caller has too many jobs queued or running."""
    if key is not None and (existing := service.store.job_for_key(who.owner, key)) is not None:
        return job_status(service, _own_job(service, existing, who))
    if service.store.count_jobs(who.owner) >= who.limits.max_queued:  # before reading the upload; add_job decides
        raise ApiError(429, str(QueueFull(who.limits.max_queued)))
    return None


def _accept(service: Service, who: Caller, key: str | None, kind: str, texts: dict[str, str],
            uploads: dict[str, list[Upload]]) -> tuple[dict[str, Any], bool]:
    """Check and store a submission of a job of `kind` and queue it; returns its status and whether it is new (the
    same key may have raced in from another request: that job stands)."""
    if sum(_size(upload.file) for group in uploads.values() for upload in group) > who.limits.max_upload_bytes:
        raise ApiError(413, f"upload: over this token's limit of {who.limits.max_upload_bytes} bytes")
    job_id = new_job_id()
    folder = job_folder(service.data, job_id)
    settings, metadata, images = (_protection if kind == "protect" else _evaluation)(service, who, folder, texts,
                                                                                     uploads)
    try:
        service.store.add_job(job_id, who.owner, settings, metadata, images, idempotency_key=key,
                              max_queued=who.limits.max_queued, kind=kind)
    except DuplicateKey as exc:
        _remove(folder)
        return job_status(service, _own_job(service, exc.job_id, who)), False
    except QueueFull as exc:
        _remove(folder)
        raise ApiError(429, str(exc)) from None
    return job_status(service, _own_job(service, job_id, who)), True


def _protection(service: Service, who: Caller, folder: Path, texts: dict[str, str],
                uploads: dict[str, list[Upload]]) -> tuple[dict[str, Any], str, list]:
    """A protection job's settings, metadata level and images, checked and written into `folder`."""
    settings, metadata = parse_settings(texts)
    if "steps" not in settings and names_test_model(service.model_name):
        settings["steps"] = TEST_MODEL_STEPS
    settings = with_preset(settings)  # stored spelt out: the limits and the progress read the steps a preset gives
    if problem := service.work_limits.problem(settings):
        raise ApiError(400, problem)
    submission = save_submission(folder, settings, metadata, uploads, who.limits.max_images)
    with removed_on_failure(folder):
        _refuse_for_model(service, job_config(submission.settings, folder), folder, submission.images)
    return submission.settings, submission.metadata_level, submission.images


def _refuse_for_model(service: Service, config: ProtectConfig, folder: Path, images: list) -> None:
    """422 naming the server's model (its file name) when it cannot run `config`'s method (a denoiser-side method on a
    family whose denoiser Mist does not run), 400 naming the image as the client named it when the model cannot take
    its processed size (`preflight.input_problem`). A model that cannot be found or read is left to the job to
    report."""
    models = service.worker.models
    try:
        refused = models.refusal(config)
    except (OSError, ValueError):  # ModelNotFoundError is an OSError
        return
    if refused is not None:
        raise ApiError(422, refused)
    side = functools.cache(lambda: models.side_multiple(config))
    for name, source, *_ in images:
        problem = preflight.input_problem(folder / source, config, side)
        if problem:
            raise ApiError(400, f"images: {name}: {problem.removeprefix(f'{folder / source}: ')}")


def _evaluation(service: Service, who: Caller, folder: Path, texts: dict[str, str],
                uploads: dict[str, list[Upload]]) -> tuple[dict[str, Any], str, list]:
    """An evaluation job's settings and pairs, checked and written into `folder`."""
    if not service.evaluates:
        raise ApiError(501, "evaluation: this server runs its jobs on a Ray cluster; an evaluation needs a server "
                            "with its own model (mist serve without --ray)")
    settings = parse_evaluation_settings(texts)
    if problem := service.work_limits.evaluation_problem(settings):
        raise ApiError(400, problem)
    submission = save_evaluation(folder, settings, uploads, who.limits.max_images, service.work_limits)
    return submission.settings, "full", submission.images


def _add_submit_route(app: FastAPI, service: Service) -> None:
    @app.post("/v1/jobs", status_code=201, summary="Submit images to protect", description=SUBMIT_HELP)
    async def submit(request: Request, who: Who) -> JSONResponse:
        return await _submitted(service, request, who, "protect")

    @app.post("/v1/evaluations", status_code=201, summary="Evaluate protected images against their originals",
              description=EVALUATE_HELP)
    async def evaluate(request: Request, who: Who) -> JSONResponse:
        return await _submitted(service, request, who, "evaluate")


async def _submitted(service: Service, request: Request, who: Caller, kind: str) -> JSONResponse:
    """Read a submission of a job of `kind` and queue it: 201 with its status, 200 for a retried one."""
    # Only the upload is read on the event loop; the checks, files and database work run in worker threads.
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= _MAX_KEY:
        raise ApiError(400, f"Idempotency-Key: must be 1 to {_MAX_KEY} characters")
    length = request.headers.get("content-length")
    if length is None:  # a chunked upload's size is known only once it has filled the disk
        raise ApiError(411, "upload: send a Content-Length header")
    if not length.isdigit() or int(length) > who.limits.max_upload_bytes:
        raise ApiError(413, f"upload: over this token's limit of {who.limits.max_upload_bytes} bytes")
    earlier = await run_in_threadpool(_admit, service, who, key)
    if earlier is not None:
        return JSONResponse(earlier, status_code=200)
    try:
        async with request.form(max_files=2 * who.limits.max_images + 8, max_fields=_FORM_FIELDS,
                                max_part_size=64 * 1024) as form:
            texts, uploads = uploads_by_field(form.multi_items())
            status, created = await run_in_threadpool(_accept, service, who, key, kind, texts, uploads)
    except MultiPartException as exc:
        raise ApiError(400, f"upload: {exc.message}") from None
    except StarletteHTTPException as exc:  # what Starlette makes of a body that is not multipart
        raise ApiError(exc.status_code, f"upload: {exc.detail}") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ApiError(507, "upload: the server's disk is full; nothing was kept, try again later") from None
    except SubmitError as exc:
        raise ApiError(exc.status, str(exc)) from None
    if not created:
        return JSONResponse(status, status_code=200)
    service.worker.wake()
    return JSONResponse(status, status_code=201, headers={"Location": f"/v1/jobs/{status['id']}"})


def _add_job_routes(app: FastAPI, service: Service) -> None:
    @app.get("/v1/jobs/{job_id}", summary="A job's state, per-image progress and ETA")
    def status(job_id: str, who: Who) -> dict[str, Any]:
        return job_status(service, _own_job(service, job_id, who))

    @app.get("/v1/jobs/{job_id}/results", summary="Every protected PNG of a finished job, as a ZIP file")
    def results(job_id: str, who: Who) -> StreamingResponse:
        job = _own_job(service, job_id, who)
        if job.state not in FINISHED:
            raise ApiError(409, f"job {job_id} is {job.state}: its results are ready when it is done")
        spool = tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024)
        write_zip(_result_files(service, job), spool)
        spool.seek(0)
        return StreamingResponse(_chunks(spool), media_type="application/zip",
                                 headers={"Content-Disposition": f'attachment; filename="mist-{job_id}.zip"'})

    @app.get("/v1/jobs/{job_id}/results/{name}", summary="One protected PNG, or one file of an evaluation's report "
                                                        "(index.html, results.json, results.csv)")
    def result(job_id: str, name: str, who: Who) -> FileResponse:
        job = _own_job(service, job_id, who)
        if job.kind == "evaluate" and job.state in FINISHED:
            path = job_folder(service.data, job_id) / OUTPUT_FOLDER / name
            if name in REPORT_FILES and path.is_file():
                return FileResponse(path, media_type=REPORT_FILES[name], filename=name)
            raise ApiError(404, f"job {job_id} has no report file {name!r} (files: {', '.join(REPORT_FILES)})")
        for image in job.images:
            path = job_folder(service.data, job_id) / image.output
            if job.kind == "protect" and Path(image.output).name == name and image.state == "done" and path.is_file():
                return FileResponse(path, media_type="image/png", filename=name)
        raise ApiError(404, f"job {job_id} has no protected image {name!r}")

    @app.post("/v1/jobs/{job_id}/resume", status_code=202, summary="Queue a cancelled job again",
              description="What the job finished before it was cancelled (protected images, an evaluation's "
                          "purifications and mimicry runs) is kept and not redone. Only a cancelled job can be "
                          "resumed (409 otherwise), until it expires.")
    def resume(job_id: str, who: Who) -> dict[str, Any]:
        job = _own_job(service, job_id, who)
        if job.state != "cancelled":
            raise ApiError(409, f"job {job_id} is {job.state}: only a cancelled job can be resumed")
        if not _inputs_kept(service, job):
            raise ApiError(409, f"job {job_id}: its uploads were deleted when it ended, it cannot be resumed")
        try:
            resumed = service.store.resume(job_id, who.owner, who.limits.max_queued)
        except QueueFull as exc:
            raise ApiError(429, str(exc)) from None
        if not resumed:  # deleted or resumed by a request racing this one
            raise ApiError(409, f"job {job_id} is no longer cancelled")
        service.worker.wake()
        return job_status(service, _own_job(service, job_id, who))

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202, summary="Cancel an unfinished job",
              description="The job stops at its next step; images already protected stay downloadable. A finished "
                          "job is left as it is (409): cancelling never deletes anything.")
    def cancel(job_id: str, who: Who) -> JSONResponse:
        job = _own_job(service, job_id, who)
        if job.state in FINISHED:
            raise ApiError(409, f"job {job_id} is {job.state}: there is nothing to cancel (its results are kept)")
        state = service.store.request_cancel(job_id, service.retention_seconds)
        service.worker.cancel_now(job_id)
        return JSONResponse({"id": job_id, "state": state, "cancel": True}, status_code=202)

    @app.delete("/v1/jobs/{job_id}", status_code=204, summary="Delete a finished job and its results",
                description="Only a finished job (done, failed or cancelled) can be deleted; an unfinished one is "
                            "refused (409): cancel it first.")
    def delete(job_id: str, who: Who) -> Response:
        job = _own_job(service, job_id, who)
        if job.state not in FINISHED:
            raise ApiError(409, f"job {job_id} is {job.state}: cancel it first (POST /v1/jobs/{job_id}/cancel), "
                                "then delete it")
        service.store.delete_job(job_id)
        _remove(job_folder(service.data, job_id))
        return Response(status_code=204)


def _add_server_routes(app: FastAPI, service: Service) -> None:
    @app.get("/v1/health", summary="Whether the server takes jobs: 200 ok, or 503 while its worker cannot (no "
                                   "token needed; why is in /v1/status)")
    def health() -> JSONResponse:
        if service.worker.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    @app.get("/v1/status", summary="The server's version, model, the methods its model runs (and why it cannot run "
                                   "the others), worker and queue, and the caller's own jobs")
    def server_status(who: Who) -> dict[str, Any]:
        offer = model_offer(service.worker.models)
        return {"version": __version__, "model": service.model_name, "methods": list(offer.methods),
                "methods_refused": offer.refused,
                "worker": "ready" if service.worker.ready else f"not ready: {service.worker.stats.fault or 'stopped'}",
                "queue_length": service.store.count_jobs(states=("queued",)),
                "your_jobs": service.store.count_jobs(who.owner)}

    @app.get("/v1/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def metrics(who: Who) -> PlainTextResponse:
        return PlainTextResponse(metrics_text(service.store, service.worker.stats),
                                 media_type="text/plain; version=0.0.4")


def _inputs_kept(service: Service, job: JobRecord) -> bool:
    """Whether the files of the job's unfinished images are still in its folder (a job cancelled by an earlier Mist
    had them deleted)."""
    folder = job_folder(service.data, job.id)
    return all((folder / image.source).is_file() for image in job.images if image.state != "done")


def _result_files(service: Service, job: JobRecord) -> list[tuple[Path, str]]:
    """What a finished job's ZIP holds, each (path, name in the archive): its protected PNGs, or an evaluation's
    report folder (without the units an unfinished one keeps); 404 when there is nothing."""
    folder = job_folder(service.data, job.id)
    if job.kind == "evaluate":
        report = folder / OUTPUT_FOLDER
        members = [(path, path.relative_to(report).as_posix()) for path in sorted(report.rglob("*"))
                   if path.is_file() and not path.relative_to(report).as_posix().startswith(".")]
        if not (report / "index.html").is_file():
            raise ApiError(404, f"job {job.id} has no report")
        return members
    members = [(folder / image.output, Path(image.output).relative_to(OUTPUT_FOLDER).as_posix())
               for image in job.images if image.state == "done" and (folder / image.output).is_file()]
    if not members:
        raise ApiError(404, f"job {job.id} has no protected image")
    return members


def job_status(service: Service, job: JobRecord) -> dict[str, Any]:
    """What GET /v1/jobs/{id} answers: the job's kind and state, its progress and the time left
    (`mist.runner.estimate`), and each image's state."""
    status: dict[str, Any] = {
        "id": job.id, "kind": job.kind, "state": job.state, "created": job.created, "started": job.started,
        "finished": job.finished, "expires": job.expires, "error": job.error,
        "settings": {name: value for name, value in job.settings.items() if not name.startswith("_")},
        "results_url": f"/v1/jobs/{job.id}/results",
    }
    status |= (_protection_progress if job.kind == "protect" else _evaluation_progress)(service, job)
    if job.state == "queued":
        status["queue_position"] = service.store.queue_position(job.id, job.created)
    return status


def _evaluation_progress(service: Service, job: JobRecord) -> dict[str, Any]:
    """An evaluation's units of work done (a purification, a mimicry run of the set), what was done last, the time
    left at the worker's smoothed time per unit, and each protected image with its report once done."""
    units = job.progress or {"done": 0, "total": 0, "doing": ""}
    total = max(1, int(units["total"]))
    estimate = Estimate([1] * total, job.seconds_per_step)
    for unit in range(min(int(units["done"]), total)):
        estimate.finished(unit)
    left = estimate.seconds_left()
    done = job.state == "done"
    return {
        "progress": 1.0 if done else round(estimate.fraction if units["total"] else 0.0, 4),
        "eta_seconds": None if job.state in FINISHED or left is None or not units["total"] else round(left, 1),
        "seconds_per_unit": job.seconds_per_step, "units": {"done": units["done"], "total": units["total"]},
        "doing": units["doing"],
        "images": [{"name": image.name, "state": image.state, "message": image.message,
                    "url": f"/v1/jobs/{job.id}/results/index.html" if image.state == "done" else None}
                   for image in job.images],
        "report_url": f"/v1/jobs/{job.id}/results/index.html" if done else None,
    }


def _protection_progress(service: Service, job: JobRecord) -> dict[str, Any]:
    """Each image's steps (its count known from the settings, block mode's tiles included) and the time left at the
    worker's smoothed time per step."""
    per_image = steps_per_image(int(job.settings.get("steps", ProtectConfig.steps)),
                                int(job.settings.get("block_num", ProtectConfig.block_num)), service.worker.batch_size)
    estimate = Estimate([per_image] * len(job.images), job.seconds_per_step)
    for position, image in enumerate(job.images):
        if image.state in ("done", "failed"):
            estimate.finished(position)
        else:
            estimate.step(position, image.step)
    left = estimate.seconds_left()
    return {
        "progress": round(estimate.fraction, 4),
        "eta_seconds": None if job.state in FINISHED or left is None else round(left, 1),
        "seconds_per_step": job.seconds_per_step,
        "images": [{"name": image.name, "state": image.state, "steps": per_image,
                    "step": per_image if image.state == "done" else min(image.step, per_image),
                    "message": image.message, "output": Path(image.output).name,
                    "url": f"/v1/jobs/{job.id}/results/{Path(image.output).name}" if image.state == "done" else None}
                   for position, image in enumerate(job.images)],
    }


def _size(file: Any) -> int:
    file.seek(0, io.SEEK_END)
    size = file.tell()
    file.seek(0)
    return size


def _chunks(file: Any, size: int = 1024 * 1024):
    with file:
        while chunk := file.read(size):
            yield chunk


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)

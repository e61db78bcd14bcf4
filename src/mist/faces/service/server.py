"""`mist serve`: put the store, the worker and the API together and serve them with uvicorn; and the token commands.

With SQLite (the default) one server owns a data folder: a lock file says so, and at start-up the jobs that were
running when the last server died are made claimable at once. With a shared PostgreSQL queue several servers run side by
side (their data folder shared too, e.g. over NFS), and a dead server's job is taken over when its lease runs out.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mist.runner.work_limits import WorkLimits
from mist.faces.service.app import Service, create_app, is_loopback
from mist.faces.service.store import JobStore, Limits, sqlite_url
from mist.faces.service.worker import Worker

log = logging.getLogger(__name__)

MB = 1024 * 1024


@dataclass(frozen=True)
class ServeOptions:
    data: Path
    host: str = "127.0.0.1"
    port: int = 8000
    database: str | None = None  # a SQLAlchemy URL; None: SQLite in the data folder
    retention_hours: float = 24.0
    model: str | None = None
    device: str | None = None
    low_memory: bool | None = None
    compile: bool = False
    ray: str | None = None
    ray_resource: str = "GPU"
    text_encoders: str = ""  # comma-separated: an SD 3.x or Flux single file's text encoder files, for every job
    no_auth: bool = False  # loopback only: requests from this machine need no token
    trusted_proxies: tuple[str, ...] = ()  # addresses whose X-Forwarded-For / Forwarded headers are believed
    local_limits: Limits = Limits()
    work_limits: WorkLimits = WorkLimits()  # compute one image of a job may ask for
    lease_seconds: float = 60.0


def open_store(data: Path, database: str | None) -> JobStore:
    """The store, in the data folder (created if missing) unless `database` names another; ValueError naming --data
    when the folder cannot be used.

    The folder holds uploads, results and the database with the token hashes: it is made private (mode 0700, which
    keeps other accounts out of everything inside it, whatever the files' own modes) and the database file 0600."""
    if data.exists() and not data.is_dir():
        raise ValueError(f"--data {data}: is a file, not a folder")
    mode = stat.S_IMODE(data.stat().st_mode) if data.is_dir() else None
    if mode is not None and mode & 0o077 and not (data / "mist.db").exists():
        # A folder of the user's, not one Mist made: its permissions are not Mist's to change.
        raise ValueError(f"--data {data}: other accounts can open this folder (mode {mode:o}); name a new folder, or "
                         f"make it private first (chmod 700 {data})")
    try:
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        data.chmod(0o700)
    except OSError as exc:
        raise ValueError(f"--data {data}: cannot create or protect the folder ({exc.strerror or exc})") from None
    store = JobStore(database or sqlite_url(data))
    for database_file in data.glob("mist.db*"):
        database_file.chmod(0o600)
    return store


@contextmanager
def sole_server(data: Path) -> Iterator[None]:
    """Hold the data folder's server lock (SQLite: one server per folder); ValueError if another server holds it."""
    fd = os.open(data / "server.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{data}: another mist serve is using this data folder") from None
        yield
    finally:
        os.close(fd)


def models_for(options: ServeOptions) -> Any:
    """What the worker runs jobs on: one model in this process, or a pool of Ray workers
    (`mist.runner.entrance.open_models`): ValueError("--device: ...") for a device this machine lacks, ("--compile:
    ...") where compiling is not possible, ("--text-encoders: ...") for text encoder files that cannot serve the
    model, ModelNotFoundError without a model, all before the server listens."""
    from mist.runner.entrance import open_models
    from mist.runner.flags import RUN_FLAGS, fields_as_flags

    with fields_as_flags(RUN_FLAGS):
        return open_models(options.model, options.device, options.low_memory, options.compile, options.ray,
                           options.ray_resource, text_encoders=options.text_encoders)


def build_service(options: ServeOptions, store: JobStore, models: Any) -> Service:
    """The service over `store` and the runner `models` opened for it (`models_for`); its model is named by its file
    or folder name (`model_label`), as outputs name it: where the server keeps it is not its clients' business."""
    from mist.models import model_label

    retention = options.retention_hours * 3600
    worker = Worker(store, options.data, models, retention_seconds=retention, lease_seconds=options.lease_seconds)
    return Service(store=store, data=options.data, worker=worker, require_tokens=not options.no_auth,
                   local_limits=options.local_limits, retention_seconds=retention,
                   model_name=model_label(models.where()), work_limits=options.work_limits, evaluates=not options.ray)


def serve(options: ServeOptions) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM: the running job stops at its next step and resumes next time)."""
    import uvicorn

    if options.no_auth and not is_loopback(options.host):
        raise ValueError(f"--no-auth: only on loopback (127.0.0.1); listening on {options.host} needs tokens")
    models = models_for(options)  # a device or model it cannot have is refused before anything is written
    store = open_store(options.data, options.database)
    if options.no_auth:
        print("mist serve: --no-auth: every program and account on this machine can submit, read and delete jobs "
              "without a token", flush=True)
    elif not any(token.revoked is None for token in store.tokens()):
        token, secret = store.create_token(_first_token_name(store), Limits())
        print(f"mist serve: created the API token {token.name!r}; it is shown only now, keep it (send it as "
              f"'Authorization: Bearer ...'; more with: mist serve token create NAME):\n{secret}", flush=True)
    with sole_server(options.data) if store.is_sqlite else nullcontext():
        if store.is_sqlite:
            released = store.release_leases()
            if released:
                log.warning("%d job(s) interrupted by the last server resume now", released)
        service = build_service(options, store, models)
        print(f"mist serve: http://{options.host}:{options.port}/docs  (data: {options.data}, model: "
              f"{service.model_name}{', tokens required' if service.require_tokens else ''})", flush=True)
        uvicorn.run(create_app(service), host=options.host, port=options.port, log_level="warning",
                    proxy_headers=bool(options.trusted_proxies), forwarded_allow_ips=list(options.trusted_proxies))
    store.close()
    return 0


def _first_token_name(store: JobStore) -> str:
    taken = {token.name for token in store.tokens()}
    return next(name for name in ("default", *(f"default-{n}" for n in range(2, 10**6))) if name not in taken)


def token_command(action: str, data: Path, database: str | None, name: str | None, limits: Limits) -> int:
    """`mist serve token create NAME | list | revoke NAME`."""
    store = open_store(data, database)
    try:
        if action == "create":
            token, secret = store.create_token(name or "", limits)
            print(f"token {token.name} ({token.id}) created; it is shown only now, keep it safe:\n{secret}")
        elif action == "list":
            for token in store.tokens():
                state = "revoked" if token.revoked else "active"
                print(f"{token.id}  {token.name:<24} {state:<8} max {token.limits.max_upload_bytes // MB} MB per "
                      f"upload, {token.limits.max_images} images per job, {token.limits.max_queued} jobs queued")
        else:
            token = store.revoke_token(name or "")
            print(f"token {token.name} ({token.id}) revoked")
    finally:
        store.close()
    return 0

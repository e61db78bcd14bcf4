"""The service's durable state: API tokens, jobs and their images, in a database (SQLAlchemy Core: SQLite by default,
PostgreSQL when several servers share one queue).

A job is claimed by one server at a time with a lease (`claim`, renewed by `renew`): a server that dies (kill -9)
stops renewing, and once the lease runs out another server, or the same one restarted, claims the job again. What
was finished is not redone: the job runner skips the outputs already complete on disk.

Every method opens its own short transaction, so the web server's threads and the worker thread can share a store.
Times are UNIX seconds (float).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import sqlalchemy as sa

JOB_KINDS = ("protect", "evaluate")  # what a job does: protect its images, or evaluate protected images
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = frozenset({"done", "failed", "cancelled"})
IMAGE_STATES = ("queued", "running", "done", "failed")
TOKEN_PREFIX = "mist_"
LOCAL_OWNER = "local"  # who owns the jobs sent without a token to a server that listens on loopback only

_meta = sa.MetaData()
tokens_table = sa.Table(
    "tokens", _meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("revoked", sa.Float),
    sa.Column("max_upload_bytes", sa.BigInteger, nullable=False),
    sa.Column("max_images", sa.Integer, nullable=False),
    sa.Column("max_queued", sa.Integer, nullable=False),
)
jobs_table = sa.Table(
    "jobs", _meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("owner", sa.String(32), nullable=False, index=True),
    sa.Column("idempotency_key", sa.String(200)),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("settings", sa.Text, nullable=False),  # JSON: ProtectConfig.of keywords, files relative to the job folder
    sa.Column("metadata_level", sa.String(16), nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("started", sa.Float),
    sa.Column("finished", sa.Float),
    sa.Column("expires", sa.Float, index=True),
    sa.Column("cancel", sa.Boolean, nullable=False, default=False),
    sa.Column("lease_owner", sa.String(64)),
    sa.Column("lease_until", sa.Float),
    sa.Column("seconds_per_step", sa.Float),  # an evaluation's: seconds per unit of work
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("kind", sa.String(16), nullable=False, server_default="protect"),
    sa.Column("progress", sa.Text),  # JSON {"done", "total", "doing"}: an evaluation's units of work
    sa.UniqueConstraint("owner", "idempotency_key", name="one_job_per_key"),
)
images_table = sa.Table(
    "images", _meta,
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),  # the file name it was uploaded with
    sa.Column("source", sa.Text, nullable=False),  # relative to the job's folder
    sa.Column("mask", sa.Text),
    sa.Column("output", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("message", sa.Text),
    sa.Column("step", sa.Integer, nullable=False, default=0),
    sa.Column("steps", sa.Integer, nullable=False, default=0),
)


@dataclass(frozen=True)
class Limits:
    """What one token may send: bytes per upload request, images per job, jobs queued or running at once."""

    max_upload_bytes: int = 200 * 1024 * 1024
    max_images: int = 100
    max_queued: int = 10

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a whole number >= 1, got {value!r}")


@dataclass(frozen=True)
class Token:
    id: str
    name: str
    created: float
    revoked: float | None
    limits: Limits


@dataclass(frozen=True)
class ImageRecord:
    idx: int
    name: str
    source: str
    mask: str | None
    output: str
    state: str
    message: str | None
    step: int
    steps: int


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str
    created: float
    state: str
    settings: dict[str, Any]
    metadata_level: str
    error: str | None
    started: float | None
    finished: float | None
    expires: float | None
    cancel: bool
    seconds_per_step: float | None
    attempts: int
    images: tuple[ImageRecord, ...]
    kind: str = "protect"
    progress: dict[str, Any] | None = None  # an evaluation's units of work: {"done", "total", "doing"}


class QueueFull(Exception):
    """The owner has as many jobs queued or running as its limit allows."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"too many jobs queued or running (this token's limit is {limit})")
        self.limit = limit


class DuplicateKey(Exception):
    """A job with this idempotency key exists already; `job_id` names it."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


def hash_token(secret: str) -> str:
    """How a token is stored: its SHA-256 (tokens are 256 random bits, so no salt or slow hash is needed)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def sqlite_url(data: Path) -> str:
    return f"sqlite:///{(data / 'mist.db').resolve()}"


class JobStore:
    """Tokens, jobs and images in the database at `url` (tables created if missing)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine = sa.create_engine(url, connect_args={"timeout": 30} if self.is_sqlite else {})
        if self.is_sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        _meta.create_all(self.engine)
        _add_new_columns(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- tokens ---------------------------------------------------------------------------------------------------

    def create_token(self, name: str, limits: Limits) -> tuple[Token, str]:
        """A new token named `name` (unique); returns it and its secret, which is shown once and stored hashed."""
        name = name.strip()
        if not name or len(name) > 200:
            raise ValueError("token name: must be 1 to 200 characters")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = Token(f"tok_{secrets.token_hex(6)}", name, time.time(), None, limits)
        try:
            with self.engine.begin() as db:
                db.execute(tokens_table.insert().values(
                    id=token.id, name=name, hash=hash_token(secret), created=token.created, revoked=None,
                    max_upload_bytes=limits.max_upload_bytes, max_images=limits.max_images,
                    max_queued=limits.max_queued))
        except sa.exc.IntegrityError:
            raise ValueError(f"token name: {name!r} is taken") from None
        return token, secret

    def tokens(self) -> list[Token]:
        with self.engine.connect() as db:
            rows = db.execute(tokens_table.select().order_by(tokens_table.c.created)).mappings().all()
        return [_token(row) for row in rows]

    def revoke_token(self, name_or_id: str) -> Token:
        """Revoke the token with this name or id; ValueError if there is none."""
        t = tokens_table.c
        with self.engine.begin() as db:
            row = db.execute(tokens_table.select().where(sa.or_(t.name == name_or_id, t.id == name_or_id))
                             ).mappings().first()
            if row is None:
                raise ValueError(f"no token named {name_or_id!r}")
            db.execute(tokens_table.update().where(t.id == row["id"]).values(revoked=row["revoked"] or time.time()))
        return self.token(row["id"])

    def token(self, token_id: str) -> Token:
        with self.engine.connect() as db:
            row = db.execute(tokens_table.select().where(tokens_table.c.id == token_id)).mappings().one()
        return _token(row)

    def token_for_secret(self, secret: str) -> Token | None:
        """The live (not revoked) token whose secret this is, or None."""
        with self.engine.connect() as db:
            row = db.execute(tokens_table.select().where(tokens_table.c.hash == hash_token(secret))).mappings().first()
        if row is None or row["revoked"] is not None:
            return None
        return _token(row)

    # -- jobs -----------------------------------------------------------------------------------------------------

    def add_job(self, job_id: str, owner: str, settings: dict[str, Any], metadata_level: str,
                images: Iterable[tuple[str, str, str | None, str]], idempotency_key: str | None = None,
                max_queued: int | None = None, kind: str = "protect") -> None:
        """Queue a job of `kind` (JOB_KINDS) whose files are already on disk; `images`: (name, source, mask, output)
        each, paths relative to the job's folder (an evaluation's: its protected images). Raises DuplicateKey when the
        owner already has a job with `idempotency_key`, and QueueFull when the owner already has `max_queued` jobs
        queued or running.

        The limit is checked by the insert itself (an INSERT ... SELECT that inserts nothing when the count is
        reached), so simultaneous submissions cannot pass it together: SQLite runs one writer at a time on the newest
        data, and on PostgreSQL the transaction first takes a lock of its own per owner."""
        j = jobs_table.c
        assert kind in JOB_KINDS
        values = dict(id=job_id, owner=owner, kind=kind, idempotency_key=idempotency_key, created=time.time(),
                      state="queued",
                      settings=json.dumps(settings, sort_keys=True), metadata_level=metadata_level, cancel=False,
                      attempts=0)
        with self.engine.begin() as db:
            try:
                if max_queued is None:
                    db.execute(jobs_table.insert().values(**values))
                else:
                    if db.dialect.name == "postgresql":
                        db.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:owner))"), {"owner": owner})
                    active = (sa.select(sa.func.count()).select_from(jobs_table)
                              .where(j.owner == owner, j.state.in_(["queued", "running"])).scalar_subquery())
                    row = sa.select(*[sa.literal(value, jobs_table.c[name].type).label(name)
                                      for name, value in values.items()]).where(active < max_queued)
                    db.execute(jobs_table.insert().from_select(list(values), row))
                    if db.execute(sa.select(j.id).where(j.id == job_id)).first() is None:  # rowcount: -1 on psycopg
                        raise QueueFull(max_queued)
            except sa.exc.IntegrityError:
                existing = self.job_for_key(owner, idempotency_key) if idempotency_key else None
                if existing is not None:
                    raise DuplicateKey(existing) from None
                raise
            db.execute(images_table.insert(), [
                {"job_id": job_id, "idx": idx, "name": name, "source": source, "mask": mask, "output": output,
                 "state": "queued", "step": 0, "steps": 0}
                for idx, (name, source, mask, output) in enumerate(images)])

    def job_for_key(self, owner: str, key: str) -> str | None:
        j = jobs_table.c
        with self.engine.connect() as db:
            return db.execute(sa.select(j.id).where(j.owner == owner, j.idempotency_key == key)).scalar()

    def job(self, job_id: str) -> JobRecord | None:
        with self.engine.connect() as db:
            row = db.execute(jobs_table.select().where(jobs_table.c.id == job_id)).mappings().first()
            if row is None:
                return None
            images = db.execute(images_table.select().where(images_table.c.job_id == job_id)
                                .order_by(images_table.c.idx)).mappings().all()
        return _job(row, images)

    def count_jobs(self, owner: str | None = None, states: Iterable[str] = ("queued", "running")) -> int:
        j = jobs_table.c
        query = sa.select(sa.func.count()).select_from(jobs_table).where(j.state.in_(list(states)))
        if owner is not None:
            query = query.where(j.owner == owner)
        with self.engine.connect() as db:
            return int(db.execute(query).scalar() or 0)

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """How many jobs and how many images there are in each state."""
        with self.engine.connect() as db:
            jobs = dict(db.execute(sa.select(jobs_table.c.state, sa.func.count()).group_by(jobs_table.c.state)).all())
            imgs = dict(db.execute(sa.select(images_table.c.state, sa.func.count())
                                   .group_by(images_table.c.state)).all())
        return ({state: jobs.get(state, 0) for state in JOB_STATES},
                {state: imgs.get(state, 0) for state in IMAGE_STATES})

    def queue_position(self, job_id: str, created: float) -> int:
        """How many queued or running jobs were created before this one."""
        j = jobs_table.c
        with self.engine.connect() as db:
            return int(db.execute(sa.select(sa.func.count()).select_from(jobs_table).where(
                j.state.in_(["queued", "running"]), j.created < created, j.id != job_id)).scalar() or 0)

    def claim(self, owner: str, lease_seconds: float) -> JobRecord | None:
        """Take the oldest job that is queued, or running under a lease that ran out (its server died), for `owner`;
        None when there is none. Two servers never get the same job: the claim is a conditional update."""
        j = jobs_table.c
        now = time.time()
        claimable = sa.or_(j.state == "queued", sa.and_(j.state == "running", j.lease_until < now))
        with self.engine.connect() as db:
            candidates = db.execute(sa.select(j.id).where(claimable).order_by(j.created).limit(8)).scalars().all()
        for job_id in candidates:
            with self.engine.begin() as db:
                taken = db.execute(jobs_table.update().where(j.id == job_id, claimable).values(
                    state="running", lease_owner=owner, lease_until=now + lease_seconds,
                    started=sa.func.coalesce(j.started, now), attempts=j.attempts + 1)).rowcount
            if taken:
                return self.job(job_id)
        return None

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend `owner`'s lease on a running job; False when it is no longer `owner`'s (then stop working on it)."""
        j = jobs_table.c
        with self.engine.begin() as db:
            return bool(db.execute(jobs_table.update().where(j.id == job_id, j.lease_owner == owner,
                                                             j.state == "running")
                                   .values(lease_until=time.time() + lease_seconds)).rowcount)

    def release_leases(self, owner: str | None = None) -> int:
        """Put running jobs back in the queue: those of `owner`, or all (a lone server starting up: whoever ran them
        is gone). Their images that were running are queued again at step 0 (the attack starts over; finished images
        stay done). Returns how many jobs."""
        j, i = jobs_table.c, images_table.c
        running = sa.select(j.id).where(j.state == "running")
        if owner is not None:
            running = running.where(j.lease_owner == owner)
        with self.engine.begin() as db:
            ids = db.execute(running).scalars().all()
            if not ids:
                return 0
            db.execute(images_table.update().where(i.job_id.in_(ids), i.state == "running").values(state="queued",
                                                                                                     step=0))
            return db.execute(jobs_table.update().where(j.id.in_(ids), j.state == "running").values(
                state="queued", lease_owner=None, lease_until=None)).rowcount

    def finish(self, job_id: str, owner: str, state: str, retention_seconds: float, error: str | None = None) -> bool:
        """Mark a job finished by its lease owner; its results are kept for `retention_seconds`."""
        assert state in FINISHED
        j = jobs_table.c
        now = time.time()
        with self.engine.begin() as db:
            return bool(db.execute(jobs_table.update().where(j.id == job_id, j.lease_owner == owner).values(
                state=state, finished=now, expires=now + retention_seconds, error=error, lease_until=None)).rowcount)

    def request_cancel(self, job_id: str, retention_seconds: float) -> str:
        """Cancel a job: a queued one at once, a running one at its next step (its server sees the flag). Returns
        the job's state afterwards."""
        j = jobs_table.c
        now = time.time()
        with self.engine.begin() as db:
            db.execute(jobs_table.update().where(j.id == job_id, j.state == "queued").values(
                state="cancelled", cancel=True, finished=now, expires=now + retention_seconds))
            db.execute(jobs_table.update().where(j.id == job_id, j.state == "running").values(cancel=True))
            return db.execute(sa.select(j.state).where(j.id == job_id)).scalar()

    def cancel_requested(self, job_id: str) -> bool:
        with self.engine.connect() as db:
            return bool(db.execute(sa.select(jobs_table.c.cancel).where(jobs_table.c.id == job_id)).scalar())

    def delete_job(self, job_id: str) -> None:
        with self.engine.begin() as db:
            db.execute(images_table.delete().where(images_table.c.job_id == job_id))
            db.execute(jobs_table.delete().where(jobs_table.c.id == job_id))

    def expired_jobs(self, now: float | None = None) -> list[str]:
        j = jobs_table.c
        with self.engine.connect() as db:
            return list(db.execute(sa.select(j.id).where(j.state.in_(list(FINISHED)), j.expires < (now or time.time())))
                        .scalars())

    def job_ids(self) -> set[str]:
        with self.engine.connect() as db:
            return set(db.execute(sa.select(jobs_table.c.id)).scalars())

    # -- progress -------------------------------------------------------------------------------------------------

    def set_images(self, job_id: str, indices: Iterable[int], **values: Any) -> None:
        i = images_table.c
        with self.engine.begin() as db:
            db.execute(images_table.update().where(i.job_id == job_id, i.idx.in_(list(indices))).values(**values))

    def set_progress(self, job_id: str, done: int, total: int, doing: str, seconds_per_step: float | None) -> None:
        """An evaluation's progress: `done` of `total` units of work, what runs now, the time per unit so far."""
        with self.engine.begin() as db:
            db.execute(jobs_table.update().where(jobs_table.c.id == job_id).values(
                progress=json.dumps({"done": done, "total": total, "doing": doing}),
                seconds_per_step=seconds_per_step))

    def resume(self, job_id: str, owner: str, max_queued: int) -> bool:
        """Queue `owner`'s cancelled job again (what it finished is kept and not redone); False if it is not
        cancelled. Raises QueueFull when the owner has `max_queued` jobs queued or running (checked by the update
        itself, as `add_job` does)."""
        j = jobs_table.c
        with self.engine.begin() as db:
            if db.dialect.name == "postgresql":
                db.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:owner))"), {"owner": owner})
            others = jobs_table.alias("others")
            active = (sa.select(sa.func.count()).select_from(others)
                      .where(others.c.owner == owner, others.c.state.in_(["queued", "running"])).scalar_subquery())
            resumed = db.execute(jobs_table.update().where(j.id == job_id, j.owner == owner, j.state == "cancelled",
                                                           active < max_queued).values(
                state="queued", cancel=False, finished=None, expires=None, error=None)).rowcount
            if not resumed and db.execute(sa.select(j.state).where(j.id == job_id)).scalar() == "cancelled":
                raise QueueFull(max_queued)
            if resumed:
                db.execute(images_table.update().where(images_table.c.job_id == job_id,
                                                       images_table.c.state != "done").values(
                    state="queued", step=0, message=None))
        return bool(resumed)

    def set_seconds_per_step(self, job_id: str, seconds: float) -> None:
        with self.engine.begin() as db:
            db.execute(jobs_table.update().where(jobs_table.c.id == job_id).values(seconds_per_step=seconds))


def new_job_id() -> str:
    return uuid.uuid4().hex


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    """WAL: readers never wait for the writer and a killed process loses no committed transaction; FULL sync: nor
    does a power cut."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _add_new_columns(engine: sa.Engine) -> None:
    """Bring a database made by an earlier Mist up to this schema: add the columns it lacks (with their defaults)."""
    present = {column["name"] for column in sa.inspect(engine).get_columns("jobs")}
    added = {"kind": "VARCHAR(16) NOT NULL DEFAULT 'protect'", "progress": "TEXT"}
    with engine.begin() as db:
        for name, declaration in added.items():
            if name not in present:
                db.execute(sa.text(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}"))


def _token(row: Any) -> Token:
    return Token(row["id"], row["name"], row["created"], row["revoked"],
                 Limits(row["max_upload_bytes"], row["max_images"], row["max_queued"]))


def _job(row: Any, images: Iterable[Any]) -> JobRecord:
    return JobRecord(
        id=row["id"], owner=row["owner"], created=row["created"], state=row["state"],
        settings=json.loads(row["settings"]), metadata_level=row["metadata_level"], error=row["error"],
        started=row["started"], finished=row["finished"], expires=row["expires"], cancel=bool(row["cancel"]),
        seconds_per_step=row["seconds_per_step"], attempts=row["attempts"], kind=row["kind"],
        progress=json.loads(row["progress"]) if row["progress"] else None,
        images=tuple(ImageRecord(r["idx"], r["name"], r["source"], r["mask"], r["output"], r["state"], r["message"],
                                 r["step"], r["steps"]) for r in images))

"""The service's worker: a thread that claims queued jobs from the store, one at a time, runs each through the one job
runner (`mist.runner.jobs.run_jobs` for a protection, `mist.runner.evaluation.job.run_evaluation` for an evaluation),
records progress in the store, and deletes results whose retention time is over.

While a job runs, a heartbeat renews its lease and looks for a cancel request (which may come from another server
sharing the queue). If the lease is lost (this server was presumed dead and another took the job), the run stops
without marking the job. Resume is the job runner's: outputs already complete on disk are skipped, and an evaluation's
finished units of work are read back. A cancelled job keeps its uploads until it expires, so that it can be resumed.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mist.engine.config import ProtectConfig
from mist.runner.estimate import Estimate
from mist.common.files import remove_old_folders
from mist.runner.jobs import Job, run_jobs, without_model_path
from mist.engine.pipeline import Progress, ProtectedImage
from mist.faces.service.layout import INPUT_FOLDERS, ORIGINALS, OUTPUT_FOLDER, PROTECTED, job_folder
from mist.faces.service.store import JobRecord, JobStore

if TYPE_CHECKING:
    from mist.runner.evaluation.run import EvaluationProgress
    from mist.runner.jobs import ModelCache

log = logging.getLogger(__name__)

_ORPHAN_AGE = 3600.0  # seconds: a job folder without a job (an upload that never became one) is removed after this


@dataclass
class WorkerStats:
    """What the worker did since it started, for /v1/metrics."""

    images_done: int = 0
    images_failed: int = 0
    jobs_finished: dict[str, int] = field(default_factory=dict)
    seconds_per_step: float | None = None
    fault: str | None = None  # why the worker cannot take jobs now (a database error, say); None while it can
    lock: threading.Lock = field(default_factory=threading.Lock)


def job_config(stored: dict[str, Any], folder: Path) -> ProtectConfig:
    """A job's settings as the store records them, with the files they name (a mask, a target) resolved in the job's
    folder."""
    settings = dict(stored)
    for name in settings.pop("_files", []):
        settings[name] = folder / settings[name]
    return ProtectConfig.of(**settings)


class Worker:
    """Runs the store's jobs on `models` (a `ModelCache`, or the Ray pool), one job at a time, in a thread."""

    def __init__(self, store: JobStore, data: Path, models: ModelCache | Any, *, retention_seconds: float,
                 lease_seconds: float = 60.0, poll_seconds: float = 1.0, sweep_seconds: float = 60.0,
                 progress_seconds: float = 1.0, batch_size: int = 1) -> None:
        self.store = store
        self.data = data
        self.models = models
        self.retention_seconds = retention_seconds
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.sweep_seconds = sweep_seconds
        self.progress_seconds = progress_seconds
        self.batch_size = batch_size
        self.name = f"worker-{time.time_ns():x}"
        self.stats = WorkerStats()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cancels: dict[str, threading.Event] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mist-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the current step: a running job is left to be resumed (its lease is released)."""
        self._stop.set()
        self._wake.set()
        for cancel in list(self._cancels.values()):
            cancel.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.store.release_leases(self.name)

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self._wake.set()

    def cancel_now(self, job_id: str) -> None:
        """This server's own cancel request: stop at the next step without waiting for the heartbeat."""
        cancel = self._cancels.get(job_id)
        if cancel is not None:
            cancel.set()

    @property
    def ready(self) -> bool:
        """Whether this worker is taking jobs: its thread runs and its last look at the queue worked."""
        return self._thread is not None and self._thread.is_alive() and self.stats.fault is None

    def _loop(self) -> None:
        """Take jobs until stopped. A failure of the queue's bookkeeping (the database locked or gone) never ends the
        loop: it is logged and said in `stats.fault`, and the loop tries again; a job's end is recorded once the
        database answers again (`_record_end`)."""
        last_sweep = 0.0
        while not self._stop.is_set():
            if time.monotonic() - last_sweep >= self.sweep_seconds:
                last_sweep = time.monotonic()
                self.sweep()
            try:
                job = self.store.claim(self.name, self.lease_seconds)
                if job is not None:
                    self.run(job)
            except Exception as exc:
                log.exception("the job queue failed; trying again")
                self.stats.fault = f"the job queue failed: {type(exc).__name__}: {_first_line(exc)}"
                self._stop.wait(self.poll_seconds)
                continue
            self.stats.fault = None
            if job is None:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()

    def run(self, job: JobRecord) -> None:
        """Run one claimed job to its end (or until cancelled, stopped or its lease is lost) and record the end."""
        folder = job_folder(self.data, job.id)
        cancel = threading.Event()
        self._cancels[job.id] = cancel
        lost = threading.Event()
        run = self._protection if job.kind == "protect" else self._evaluation
        reporter = StoreReporter(self.store, job.id, {folder / image.source: image.idx for image in job.images},
                                 self.stats, cancel)
        beat = threading.Thread(target=self._heartbeat, args=(job.id, cancel, lost, reporter), daemon=True)
        beat.start()
        state, error = "failed", None
        try:
            state = run(job, folder, reporter, cancel)
        except (ValueError, OSError) as exc:
            # files named by their place in the job, the model by its name: not the server's paths
            error = without_model_path(str(exc).replace(f"{folder}/", ""), self.models)
        except Exception as exc:  # the job fails, the server goes on
            log.exception("job %s failed", job.id)
            error = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            self._cancels.pop(job.id, None)
            cancel.set()  # ends the heartbeat
            beat.join()
            with contextlib.suppress(Exception):  # the last progress (a job shorter than a beat has had none)
                reporter.flush()
        if lost.is_set() or (self._stop.is_set() and state == "cancelled" and not self.store.cancel_requested(job.id)):
            return  # another server owns it now, or this one is stopping: the job resumes later
        if error is not None:  # the run stopped as a whole: no image of it may go on saying it is running
            running = [image.idx for image in (self.store.job(job.id) or job).images if image.state == "running"]
            self.store.set_images(job.id, running, state="failed", message=error)
        if self._record_end(job.id, state, error):
            with self.stats.lock:
                self.stats.jobs_finished[state] = self.stats.jobs_finished.get(state, 0) + 1
            for name in INPUT_FOLDERS if state != "cancelled" else ():
                shutil.rmtree(folder / name, ignore_errors=True)

    def _protection(self, job: JobRecord, folder: Path, reporter: StoreReporter, cancel: threading.Event) -> str:
        """Protect the job's images; returns the state it ends in."""
        jobs = [Job(folder / image.source, folder / image.output, label=image.name,
                    mask=folder / image.mask if image.mask else None) for image in job.images]
        summary = run_jobs(jobs, job_config(job.settings, folder), self.models, reporter, batch_size=self.batch_size,
                           metadata=job.metadata_level, cancel=cancel)
        return "cancelled" if summary.cancelled else "failed" if summary.failed else "done"

    def _evaluation(self, job: JobRecord, folder: Path, reporter: StoreReporter, cancel: threading.Event) -> str:
        """Evaluate the job's pairs into its report folder, going on from the units an earlier run finished;
        returns the state it ends in."""
        from mist.engine.attack import Cancelled
        from mist.runner.evaluation.job import EvaluationJob, run_evaluation
        from mist.runner.evaluation.settings import evaluation_settings

        indices = [image.idx for image in job.images]
        self.store.set_images(job.id, indices, state="running")
        settings = evaluation_settings(job.settings)  # the record `settings_record` made at submission
        evaluation_job = EvaluationJob(folder / ORIGINALS, folder / PROTECTED, settings, folder / OUTPUT_FOLDER,
                                       shown_from=folder)
        try:
            run_evaluation(evaluation_job, self.models, progress=reporter.unit_done, cancel=cancel,
                           on_load=reporter.model_loading)
        except Cancelled:
            self.store.set_images(job.id, indices, state="queued")
            return "cancelled"
        self.store.set_images(job.id, indices, state="done", message=None)
        return "done"

    def _record_end(self, job_id: str, state: str, error: str | None) -> bool:
        """Record a job's end, trying again (every poll, then less often) while the database refuses, with the
        reason in `stats.fault`; False if the job is no longer this worker's, or the worker stops first (the job is
        then taken again once its lease runs out, and its finished images are not redone)."""
        delay = self.poll_seconds
        while True:
            try:
                return self.store.finish(job_id, self.name, state, self.retention_seconds, error)
            except Exception as exc:
                log.warning("job %s: could not record its end (%s); trying again", job_id, exc)
                self.stats.fault = f"the job queue failed: {type(exc).__name__}: {_first_line(exc)}"
            if self._stop.wait(delay):
                return False
            delay = min(delay * 2, max(self.poll_seconds, self.lease_seconds / 4))

    def _heartbeat(self, job_id: str, cancel: threading.Event, lost: threading.Event,
                   reporter: StoreReporter) -> None:
        """Beside the attack: write its progress each second, renew the lease and look for a cancel request four
        times per lease (database writes wait for the disk, so the attack never waits for them)."""
        last_renewal = time.monotonic()
        while not cancel.wait(min(self.progress_seconds, self.lease_seconds / 4)):
            try:
                reporter.flush()
                if time.monotonic() - last_renewal < self.lease_seconds / 4:
                    continue
                last_renewal = time.monotonic()
                if not self.store.renew(job_id, self.name, self.lease_seconds):
                    lost.set()
                    cancel.set()
                elif self.store.cancel_requested(job_id):
                    cancel.set()
            except Exception:
                log.exception("heartbeat of job %s", job_id)

    def sweep(self, now: float | None = None) -> None:
        """Delete the jobs whose retention time is over, and job folders no job owns (an interrupted upload)."""
        now = time.time() if now is None else now
        try:
            for job_id in self.store.expired_jobs(now):
                shutil.rmtree(job_folder(self.data, job_id), ignore_errors=True)
                self.store.delete_job(job_id)
            remove_old_folders(self.data / "jobs", _ORPHAN_AGE, keep=self.store.job_ids(), now=now)
        except Exception:
            log.exception("retention sweep")


class StoreReporter:
    """Hears a job's run and writes it to the store: each image's state at once, its step and the job's seconds per
    step when `flush` is called (the worker's heartbeat does, each second)."""

    def __init__(self, store: JobStore, job_id: str, index_of: dict[Path, int], stats: WorkerStats,
                 cancel: threading.Event | None = None) -> None:
        self.store = store
        self.cancel = cancel
        self.job_id = job_id
        self.index_of = index_of
        self.stats = stats
        self.estimate: Estimate | None = None  # made at the first step, which says how many steps an image takes
        self._progress: tuple[list[int], int, int] | None = None  # not yet written: (images, step, steps)
        self._units: EvaluationProgress | None = None  # an evaluation's, not yet written
        self._lock = threading.Lock()

    def _indices(self, jobs: list[Job]) -> list[int]:
        return [self.index_of[job.source] for job in jobs]

    def flush(self) -> None:
        with self._lock:
            progress, self._progress = self._progress, None
            units, self._units = self._units, None
        if progress is not None:
            indices, step, steps = progress
            self.store.set_images(self.job_id, indices, step=step, steps=steps)
            if self.estimate is not None and self.estimate.seconds_per_step is not None:
                self.store.set_seconds_per_step(self.job_id, self.estimate.seconds_per_step)
        if units is not None:
            self.store.set_progress(self.job_id, units.done, units.total, units.doing, units.seconds_per_unit)

    def unit_done(self, progress: EvaluationProgress) -> None:
        """An evaluation finished a unit of work: written at the next `flush`."""
        with self._lock:
            self._units = progress

    def batch_started(self, jobs: list[Job], to_do: int) -> None:
        pass

    def model_loading(self, where: Any, device: Any) -> None:
        log.info("loading model %s onto %s", where, device)

    def images_started(self, jobs: list[Job], first: int, to_do: int) -> None:
        self.store.set_images(self.job_id, self._indices(jobs), state="running", step=0)
        if self.estimate is not None:
            self.estimate.pause()

    def step(self, jobs: list[Job], progress: Progress) -> None:
        # A local run reports every step of one image; a Ray pool reports a whole image's steps when a worker
        # finishes it (several in parallel, so the time per step is the pool's).
        if self.estimate is None:
            self.estimate = Estimate([progress.total] * len(self.index_of))
        indices = self._indices([jobs[i] for i in progress.images])
        self.estimate.step(indices[0], progress.step)
        with self.stats.lock:
            self.stats.seconds_per_step = self.estimate.seconds_per_step
        with self._lock:
            self._progress = (indices, progress.step, progress.total)

    def image_done(self, job: Job, result: ProtectedImage) -> None:
        with self._lock:
            self._progress = None
        if self.estimate is not None:
            self.estimate.finished(self.index_of[job.source])
        self.store.set_images(self.job_id, self._indices([job]), state="done", message=None)
        with self.stats.lock:
            self.stats.images_done += 1

    def image_skipped(self, job: Job, reason: str) -> None:  # complete from an earlier run of this job
        self.store.set_images(self.job_id, self._indices([job]), state="done", message=None)

    def image_failed(self, job: Job, message: str, stage: str) -> None:
        if stage == "not done" and self.cancel is not None and self.cancel.is_set():
            # Cancelled, or this server is stopping, before the image: queued again (a resumed run does it).
            self.store.set_images(self.job_id, self._indices([job]), state="queued", step=0)
            return
        # Messages name files by their place in the job's folder, never by the server's paths.
        self.store.set_images(self.job_id, self._indices([job]), state="failed",
                              message=message.replace(f"{job.source.parent.parent}/", ""))
        with self.stats.lock:
            self.stats.images_failed += 1


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]

"""/v1/metrics in Prometheus' text format: the queue (from the store, shared by every server on it) and what this
server's worker did since it started."""

from __future__ import annotations

from mist.faces.service.store import JobStore
from mist.faces.service.worker import WorkerStats


def metrics_text(store: JobStore, stats: WorkerStats) -> str:
    jobs, images = store.counts()
    lines = [
        "# HELP mist_jobs Jobs in the store, by state.",
        "# TYPE mist_jobs gauge",
        *(f'mist_jobs{{state="{state}"}} {count}' for state, count in jobs.items()),
        "# HELP mist_queue_length Jobs waiting for a worker.",
        "# TYPE mist_queue_length gauge",
        f"mist_queue_length {jobs['queued']}",
        "# HELP mist_images Images of the jobs in the store, by state.",
        "# TYPE mist_images gauge",
        *(f'mist_images{{state="{state}"}} {count}' for state, count in images.items()),
    ]
    with stats.lock:
        lines += [
            "# HELP mist_images_done_total Images this server protected since it started.",
            "# TYPE mist_images_done_total counter",
            f"mist_images_done_total {stats.images_done}",
            "# HELP mist_images_failed_total Images that failed on this server since it started.",
            "# TYPE mist_images_failed_total counter",
            f"mist_images_failed_total {stats.images_failed}",
            "# HELP mist_jobs_finished_total Jobs this server finished since it started, by final state.",
            "# TYPE mist_jobs_finished_total counter",
            *(f'mist_jobs_finished_total{{state="{state}"}} {stats.jobs_finished.get(state, 0)}'
              for state in ("done", "failed", "cancelled")),
        ]
        if stats.seconds_per_step is not None:
            lines += ["# HELP mist_seconds_per_step Duration of this server's latest PGD step.",
                      "# TYPE mist_seconds_per_step gauge",
                      f"mist_seconds_per_step {stats.seconds_per_step:.6g}"]
    return "\n".join(lines) + "\n"

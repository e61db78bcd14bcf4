"""The service's job store on SQLite and, when MIST_TEST_DATABASE_URL names one (e.g.
postgresql+psycopg://mist:mist@127.0.0.1/mist_test, a database the test may empty), on PostgreSQL: exclusive claims,
leases that run out, and two servers sharing one queue without doing a job twice."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy")
from mist.runner.jobs import ModelCache  # noqa: E402
from mist.faces.service import store as store_module  # noqa: E402
from mist.faces.service.store import JobStore, sqlite_url  # noqa: E402
from mist.faces.service.worker import Worker  # noqa: E402

BACKENDS = ["sqlite"] + (["postgresql"] if os.environ.get("MIST_TEST_DATABASE_URL") else [])


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    if request.param == "sqlite":
        url = sqlite_url(tmp_path)
    else:
        url = os.environ["MIST_TEST_DATABASE_URL"]
        import sqlalchemy as sa

        engine = sa.create_engine(url)
        store_module._meta.drop_all(engine)  # a database the test owns: start empty
        engine.dispose()
    store = JobStore(url)
    yield store
    store.close()


def one_image_job(store: JobStore, job_id: str, folder: Path | None = None, painting=None) -> None:
    if folder is not None:
        (folder / "jobs" / job_id / "in").mkdir(parents=True)
        painting.resize((32, 32)).save(folder / "jobs" / job_id / "in" / "a.png")
    store.add_job(job_id, "local", {"steps": 2, "input_size": 32}, "full", [("a.png", "in/a.png", None, "out/a.png")])


def test_claims_are_exclusive_and_a_dead_servers_lease_runs_out(store):
    one_image_job(store, "j1")
    first = store.claim("server-a", lease_seconds=1000)
    assert first is not None and first.id == "j1" and first.attempts == 1
    assert store.claim("server-b", lease_seconds=1000) is None  # leased
    assert store.release_leases("server-a") == 1  # as if its lease ran out
    second = store.claim("server-b", lease_seconds=1000)
    assert second is not None and second.attempts == 2
    assert not store.renew("j1", "server-a", 1000) and store.renew("j1", "server-b", 1000)
    assert not store.finish("j1", "server-a", "done", 60)  # only the lease owner may finish it
    assert store.finish("j1", "server-b", "done", 60) and store.job("j1").state == "done"


def test_many_claimers_get_each_job_once(store):
    for n in range(12):
        one_image_job(store, f"job{n:02d}")
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        while (job := store.claim(name, lease_seconds=1000)) is not None:
            with lock:
                claimed.append((job.id, name))

    threads = [threading.Thread(target=claimer, args=(f"server-{k}",)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(job for job, _ in claimed) == [f"job{n:02d}" for n in range(12)]


def test_two_servers_share_one_queue(store, tmp_path, painting):
    data = tmp_path / "data"
    for n in range(4):
        one_image_job(store, f"shared{n}", data, painting)
    models = ModelCache("tiny-random", "cpu")
    workers = [Worker(store, data, models, retention_seconds=600, poll_seconds=0.05) for _ in range(2)]
    runs: list[str] = []
    for worker in workers:
        original = worker.run

        def run(job, original=original, name=worker.name):
            runs.append(name)
            original(job)

        worker.run = run
        worker.start()
    try:
        deadline = threading.Event()
        for _ in range(2400):
            if all(store.job(f"shared{n}").state == "done" for n in range(4)):
                break
            deadline.wait(0.05)
    finally:
        for worker in workers:
            worker.stop()
    assert [store.job(f"shared{n}").state for n in range(4)] == ["done"] * 4
    assert len(runs) == 4  # each job ran once
    assert all((data / "jobs" / f"shared{n}" / "out" / "a.png").is_file() for n in range(4))


def test_an_image_left_undone_is_queued_again_only_when_the_run_was_cancelled(store, tmp_path):
    from mist.runner.jobs import Job
    from mist.faces.service.worker import StoreReporter, WorkerStats

    one_image_job(store, "j1")
    job = Job(tmp_path / "jobs" / "j1" / "in" / "a.png", tmp_path / "jobs" / "j1" / "out" / "a.png")
    cancel = threading.Event()
    reporter = StoreReporter(store, "j1", {job.source: 0}, WorkerStats(), cancel)
    reporter.image_failed(job, f"{job.source}: not done: the batch stopped because the disk is full", "not done")
    image = store.job("j1").images[0]
    assert (image.state, image.message) == ("failed", "in/a.png: not done: the batch stopped because the disk is full")
    cancel.set()
    reporter.image_failed(job, f"{job.source}: not done: cancelled", "not done")
    assert store.job("j1").images[0].state == "queued"


def test_the_queue_limit_holds_against_simultaneous_submissions(store):
    """The limit is part of the insert: 40 submissions from 16 threads at once, limit 3, give exactly 3 jobs, on
    SQLite and on PostgreSQL (where each transaction first takes the owner's lock)."""
    from concurrent.futures import ThreadPoolExecutor

    from mist.faces.service.store import QueueFull

    def add(n: int, owner: str = "alice") -> bool:
        try:
            store.add_job(f"{owner}{n}", owner, {}, "full", [("a.png", "in/a.png", None, "out/a.png")], max_queued=3)
        except QueueFull:
            return False
        return True

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(add, range(40))) == 3
    assert add(0, "bob")  # the limit is per owner
    assert store.count_jobs("alice") == 3 and store.count_jobs("bob") == 1
    job = store.claim("server-1", 30)
    assert store.finish(job.id, "server-1", "done", 60)  # a finished job makes room for one more
    assert add(100) and not add(101)


def test_a_restart_puts_interrupted_work_back_in_the_queue(store):
    """After kill -9 and a restart (release_leases), the interrupted job and its running image say queued at step 0
    (the attack starts over), not running at the step the dead server last wrote; a finished image stays done."""
    store.add_job("j1", "alice", {}, "full", [(f"{n}.png", f"in/{n}.png", None, f"out/{n}.png") for n in range(2)])
    job = store.claim("dead-server", 60)
    store.set_images(job.id, [0], state="done", step=10, steps=10)
    store.set_images(job.id, [1], state="running", step=7, steps=10)
    assert store.release_leases() == 1
    job = store.job("j1")
    assert job.state == "queued"
    assert [(i.state, i.step) for i in job.images] == [("done", 10), ("queued", 0)]
    assert store.claim("new-server", 60).id == "j1"

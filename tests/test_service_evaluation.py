"""Evaluation as a job of `mist serve` (POST /v1/evaluations), in-process on the tiny random model: the same report
as the runner every face uses, its settings and files checked as an attacker sends them, progress in units of work,
cancel at the next DDIM step, resume that does not redo finished units, per-owner visibility and limits; and resume
of a cancelled protection job, and a database made before jobs had kinds."""

from __future__ import annotations

import io
import json
import time
import zipfile

import pytest
import sqlalchemy as sa

pytest.importorskip("fastapi")

from mist.runner.evaluation.job import EvaluationJob, run_evaluation  # noqa: E402
from mist.runner.evaluation.settings import EvaluationSettings  # noqa: E402
from mist.faces.service.app import create_app  # noqa: E402
from mist.faces.service.store import JobStore, Limits, sqlite_url  # noqa: E402
from mist.runner.work_limits import WorkLimits  # noqa: E402

from mist.runner.jobs import ModelCache  # noqa: E402
from test_service import local_client, make_service, png_bytes, submit, wait_finished  # noqa: E402

FAST = {"purify": "", "strengths": "0.5", "steps": "4"}


@pytest.fixture(scope="module")
def models() -> ModelCache:
    return ModelCache("tiny-random", "cpu")


def pair_files(painting, names=("a.png",), size=32):
    originals = [("originals", (name, png_bytes(painting, size, n), "image/png")) for n, name in enumerate(names)]
    protected = [("protected", (name, png_bytes(painting, size, n + 1), "image/png")) for n, name in enumerate(names)]
    return originals + protected


def evaluate(http, files, data=None, headers=None):
    return http.post("/v1/evaluations", files=files, data={**FAST, **(data or {})}, headers=headers or {})


def wait_for(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_an_evaluation_job_writes_the_report_the_runner_writes(tmp_path, models, painting):
    service = make_service(tmp_path, models)
    files = pair_files(painting)
    with local_client(create_app(service)) as http:
        created = evaluate(http, files, {"seed": "3"})
        assert created.status_code == 201, created.text
        status = wait_finished(http, created.json()["id"])
        assert status["kind"] == "evaluate" and status["state"] == "done", status
        assert status["progress"] == 1.0 and status["units"]["done"] == status["units"]["total"] > 0
        assert "seconds_per_step" not in status and status["seconds_per_unit"] > 0  # units, not PGD steps
        assert status["images"] == [{"name": "a.png", "state": "done", "message": None,
                                     "url": f"/v1/jobs/{status['id']}/results/index.html"}]
        assert status["settings"]["strengths"] == [0.5] and status["settings"]["seed"] == 3
        archive = zipfile.ZipFile(io.BytesIO(http.get(status["results_url"]).content))
        served = json.loads(http.get(f"/v1/jobs/{status['id']}/results/results.json").content)
        assert http.get(f"/v1/jobs/{status['id']}/results/index.html").headers["content-type"].startswith("text/html")
        assert http.get(f"/v1/jobs/{status['id']}/results/mist.db").status_code == 404
    names = archive.namelist()
    assert {"index.html", "results.json", "results.csv"} <= set(names) and not any(".unfinished" in n for n in names)
    # Files are named by their place in the job, never by the server's paths.
    assert served["images"][0]["original"] == "originals/a.png" and str(service.data) not in archive.read(
        "index.html").decode()
    folder = service.data / "jobs" / status["id"]
    assert not (folder / "originals").exists() and not (folder / "protected").exists()  # inputs go once it is done
    # The same evaluation through the runner the command line uses: the same scores.
    for kind in ("originals", "protected"):
        (tmp_path / kind).mkdir()
    for field, (name, data, _) in files:
        (tmp_path / field / name).write_bytes(data)
    settings = EvaluationSettings(purify="", strengths=(0.5,), steps=4, seed=3)
    local, _ = run_evaluation(EvaluationJob(tmp_path / "originals", tmp_path / "protected", settings,
                                            tmp_path / "report"), models)
    assert [s.ssim for s in local.scores] == [s["ssim"] for s in served["scores"]]
    service.store.close()


def test_evaluation_settings_and_files_are_checked_and_named_as_sent(tmp_path, models, painting):
    service = make_service(tmp_path, models)
    service.work_limits = WorkLimits(max_steps=100, max_input_size=64)
    files = pair_files(painting)
    cases = [
        ({"strengths": "0.3,x"}, files, 400, "strengths: not a comma list of numbers"),
        ({"ssim-threshold": "2"}, files, 400, "ssim-threshold: must be above 0 and at most 1"),
        ({"ssim_threshold": "2"}, files, 400, "ssim_threshold: must be above 0 and at most 1"),
        ({"lora-lr": "zero"}, files, 400, "lora-lr: must be a number"),
        ({"prompt": "a cat"}, files, 400, "prompt: must be 'a painting' or 'a photo'"),
        ({"epsilon": "8"}, files, 400, "epsilon: not a setting of an evaluation"),
        ({"settings": json.dumps({"seed": 2.5})}, files, 400, "seed: must be a whole number"),
        ({"steps": "500"}, files, 400, "steps: 500 is over this server's limit of 100 steps"),
        ({}, files[:1], 400, "protected: no image uploaded"),
        ({}, files + [("images", ("b.png", png_bytes(painting), "image/png"))], 400,
         "images: not a file field of an evaluation"),
        ({}, [files[0], ("protected", ("other.png", files[1][1][1], "image/png"))], 400,
         "protected: no protected image matches an original"),
        ({}, [files[0], ("protected", ("a.png", b"not an image", "image/png"))], 400, "protected: a.png:"),
        ({}, [files[0], ("protected", ("../a.png", files[1][1][1], "image/png"))], 400, "is not a plain file name"),
        ({}, [files[0], ("protected", ("a.png", png_bytes(painting, 80), "image/png"))], 413,
         "80 x 80 pixels is over this server's limit of 64 x 64"),
    ]
    with local_client(create_app(service, manage_worker=False)) as http:
        for data, sent, code, message in cases:
            answer = evaluate(http, sent, data)
            assert answer.status_code == code and message in answer.json()["error"], (data, answer.text)
        assert service.store.count_jobs() == 0 and not list((service.data / "jobs").glob("*/*"))
    service.store.close()


def test_an_evaluation_cancels_at_its_next_step_and_resumes_without_redoing_finished_units(tmp_path, models,
                                                                                          painting, monkeypatch):
    import mist.runner.evaluation.img2img as img2img_module

    calls = []
    real = img2img_module.img2img
    monkeypatch.setattr(img2img_module, "img2img", lambda *a, **k: calls.append(1) or real(*a, **k))
    service = make_service(tmp_path, models)
    with local_client(create_app(service)) as http:
        job = evaluate(http, pair_files(painting), {"strengths": "1", "steps": "300"}).json()["id"]
        wait_for(lambda: (http.get(f"/v1/jobs/{job}").json()["units"]["done"] or 0) >= 1)
        running = http.get(f"/v1/jobs/{job}").json()
        assert running["state"] == "running" and 0 < running["progress"] < 1 and running["doing"]
        assert http.post(f"/v1/jobs/{job}/cancel").status_code == 202
        status = wait_finished(http, job)
        assert status["state"] == "cancelled" and status["images"][0]["state"] == "queued"
        folder = service.data / "jobs" / job
        assert list((folder / "out" / ".unfinished").glob("*.unit"))  # its finished units are kept
        assert (folder / "originals" / "a.png").is_file()  # and its uploads, so it can be resumed
        before = len(calls)
        resumed = http.post(f"/v1/jobs/{job}/resume")
        assert resumed.status_code == 202 and resumed.json()["state"] in ("queued", "running")  # the worker is quick
        assert wait_finished(http, job)["state"] == "done"
        assert http.post(f"/v1/jobs/{job}/resume").status_code == 409  # only a cancelled job
    # The full run generates 5 times (the target's reference, the clean mimicry with two seeds, the random control,
    # the protected mimicry); the resumed run read the reference back at least.
    assert len(calls) - before <= 4
    assert not (folder / "out" / ".unfinished").exists()
    service.store.close()


def test_evaluations_are_private_and_count_in_the_queue_limit(tmp_path, models, painting):
    service = make_service(tmp_path, models, require_tokens=True)
    _, alice = service.store.create_token("alice", Limits(max_queued=1))
    _, bob = service.store.create_token("bob", Limits())
    as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    with local_client(create_app(service, manage_worker=False)) as http:
        assert evaluate(http, pair_files(painting)).status_code == 401
        job = evaluate(http, pair_files(painting), headers=as_alice).json()["id"]
        for method, path in [("GET", f"/v1/jobs/{job}"), ("GET", f"/v1/jobs/{job}/results"),
                             ("GET", f"/v1/jobs/{job}/results/index.html"), ("POST", f"/v1/jobs/{job}/cancel"),
                             ("POST", f"/v1/jobs/{job}/resume"), ("DELETE", f"/v1/jobs/{job}")]:
            stolen = http.request(method, path, headers=as_bob)
            assert stolen.status_code == 404 and stolen.json() == {"error": f"no job {job}"}, (method, path)
        full = submit(http, [("images", ("a.png", png_bytes(painting), "image/png"))], headers=as_alice)
        assert full.status_code == 429 and "limit is 1" in full.json()["error"]
        assert http.post(f"/v1/jobs/{job}/cancel", headers=as_alice).json()["state"] == "cancelled"
        other = evaluate(http, pair_files(painting), headers=as_alice)
        assert other.status_code == 201
        again = http.post(f"/v1/jobs/{job}/resume", headers=as_alice)  # the queue is full again
        assert again.status_code == 429 and "limit is 1" in again.json()["error"]
    service.store.close()


def test_a_cancelled_protection_job_resumes_from_its_kept_uploads(tmp_path, models, painting):
    service = make_service(tmp_path, models)
    with local_client(create_app(service, manage_worker=False)) as http:
        job = submit(http, [("images", ("a.png", png_bytes(painting), "image/png"))]).json()["id"]
        assert http.post(f"/v1/jobs/{job}/cancel").json()["state"] == "cancelled"
        assert http.post(f"/v1/jobs/{job}/resume").json()["state"] == "queued"
    with local_client(create_app(service)) as http:
        status = wait_finished(http, job)
        assert status["state"] == "done" and status["kind"] == "protect" and status["expires"] is not None
        assert http.get(f"/v1/jobs/{job}/results/a.png").status_code == 200
    service.store.close()


def test_the_routes_are_in_the_api_reference(tmp_path, models):
    service = make_service(tmp_path, models)
    with local_client(create_app(service, manage_worker=False)) as http:
        paths = http.get("/openapi.json").json()["paths"]
        page = http.get("/docs").text
    assert "/v1/evaluations" in paths and "/v1/jobs/{job_id}/resume" in paths
    assert "/v1/evaluations" in page and "ssim-threshold" in page
    service.store.close()


def test_a_server_on_a_ray_cluster_refuses_evaluations_in_one_line(tmp_path, models, painting):
    service = make_service(tmp_path, models)
    service.evaluates = False
    with local_client(create_app(service, manage_worker=False)) as http:
        answer = evaluate(http, pair_files(painting))
    assert answer.status_code == 501 and "mist serve without --ray" in answer.json()["error"]
    service.store.close()


def test_a_database_from_before_job_kinds_is_brought_up_to_date(tmp_path):
    url = sqlite_url(tmp_path)
    JobStore(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as db:
        db.execute(sa.text("ALTER TABLE jobs DROP COLUMN kind"))
        db.execute(sa.text("ALTER TABLE jobs DROP COLUMN progress"))
        db.execute(sa.text("INSERT INTO jobs (id, owner, created, state, settings, metadata_level, cancel, attempts) "
                           "VALUES ('old', 'local', 1, 'done', '{}', 'full', 0, 1)"))
    engine.dispose()
    store = JobStore(url)
    assert store.job("old").kind == "protect" and store.job("old").progress is None
    store.add_job("new", "local", {}, "full", [("a.png", "protected/a.png", None, "out/index.html")],
                  kind="evaluate")
    store.set_progress("new", 1, 4, "img2img", 2.5)
    new = store.job("new")
    assert new.kind == "evaluate" and new.progress == {"done": 1, "total": 4, "doing": "img2img"}
    store.close()

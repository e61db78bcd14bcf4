"""`mist serve` in-process: the API over the job store and the worker, on the tiny random model. Submissions, their
checks, tokens and limits tried as an attacker would, idempotency, cancel, delete, retention and metrics. (A real
server killed with -9, and the Python client, are in test_service_process.py.)"""

from __future__ import annotations

import io
import json
import time
import zipfile
from html import escape
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mist.engine.config import ProtectConfig  # noqa: E402
from mist.common.images import read_png_text  # noqa: E402
from mist.runner.jobs import Job, ModelCache, run_jobs  # noqa: E402
from mist.faces.service.app import Service, create_app  # noqa: E402
from mist.runner.work_limits import WorkLimits  # noqa: E402
from mist.faces.service.store import JobStore, Limits, sqlite_url  # noqa: E402
from mist.faces.service.worker import Worker  # noqa: E402

FAST = {"steps": "2", "input-size": "32"}


class Quiet:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@pytest.fixture(scope="module")
def models() -> ModelCache:
    return ModelCache("tiny-random", "cpu")


def png_bytes(painting: Image.Image, size: int = 40, shift: int = 0) -> bytes:
    buffer = io.BytesIO()
    picture = painting.resize((size, size))
    if shift:
        picture = picture.rotate(shift)
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def local_client(app, **options) -> TestClient:
    """The app, called as from this machine (127.0.0.1), where a server started with --no-auth needs no token."""
    return TestClient(app, client=("127.0.0.1", 50000), **options)


def make_service(tmp_path: Path, models: ModelCache, *, require_tokens: bool = False,
                 local_limits: Limits | None = None, retention: float = 3600.0) -> Service:
    data = tmp_path / "data"
    data.mkdir()
    store = JobStore(sqlite_url(data))
    worker = Worker(store, data, models, retention_seconds=retention, lease_seconds=30, poll_seconds=0.05)
    return Service(store, data, worker, require_tokens, local_limits or Limits(), retention, "tiny-random")


@pytest.fixture
def service(tmp_path, models):
    service = make_service(tmp_path, models)
    yield service
    service.store.close()


def wait_finished(http: TestClient, job_id: str, headers: dict | None = None, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = http.get(f"/v1/jobs/{job_id}", headers=headers or {}).json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        assert time.monotonic() < deadline, f"job still {status['state']}: {status}"
        time.sleep(0.05)


def submit(http: TestClient, files: list, data: dict | None = None, headers: dict | None = None):
    return http.post("/v1/jobs", files=files, data={**FAST, **(data or {})}, headers=headers or {})


def test_a_job_gives_the_same_png_as_the_command_line_runner(service, models, painting, tmp_path):
    picture = png_bytes(painting)
    with local_client(create_app(service)) as http:
        created = submit(http, [("images", ("art.png", picture, "image/png"))], {"mode": "textural", "seed": "5"})
        assert created.status_code == 201, created.text
        status = wait_finished(http, created.json()["id"])
        assert status["state"] == "done" and status["progress"] == 1.0, (status["error"], status["images"])
        assert status["images"][0]["state"] == "done" and status["images"][0]["output"] == "art.png"
        single = http.get(status["images"][0]["url"])
        archive = zipfile.ZipFile(io.BytesIO(http.get(status["results_url"]).content))
        assert archive.namelist() == ["art.png"]
        served = archive.read("art.png")
    assert single.content == served
    # The same job through the runner the command line uses: byte for byte the same file.
    (tmp_path / "cli").mkdir()
    source = tmp_path / "cli" / "art.png"
    source.write_bytes(picture)
    config = ProtectConfig.of(steps=2, input_size=32, mode="textural", seed=5)
    summary = run_jobs([Job(source, tmp_path / "out" / "art.png")], config, models, Quiet())
    assert summary.ok
    assert (tmp_path / "out" / "art.png").read_bytes() == served
    assert json.loads(read_png_text(tmp_path / "out" / "art.png")["mist:settings"])["mode"] == "textural"
    # Inputs are removed once the job is finished; the outputs stay until the job expires.
    folder = service.data / "jobs" / status["id"]
    assert not (folder / "in").exists() and (folder / "out" / "art.png").is_file()


def test_a_job_without_steps_takes_the_test_models_ten(service, painting):
    picture = [("images", ("a.png", png_bytes(painting), "image/png"))]
    with local_client(create_app(service, manage_worker=False)) as http:
        untold = http.post("/v1/jobs", files=picture).json()
        told = http.post("/v1/jobs", files=picture, data={"steps": "3"}).json()
    assert untold["settings"]["steps"] == 10 and untold["images"][0]["steps"] == 10
    assert told["settings"]["steps"] == 3


def test_settings_take_the_command_lines_names_and_are_checked(service, painting):
    picture = ("images", ("a.png", png_bytes(painting), "image/png"))
    with local_client(create_app(service, manage_worker=False)) as http:
        ok = submit(http, [picture], {"step-size": "2", "no-resize": "true", "fused_weight": "0.5",
                                      "settings": json.dumps({"epsilon": 8})})
        assert ok.status_code == 201, ok.text
        assert ok.json()["settings"] == {"epsilon": 8, "fused_weight": 0.5, "input_size": 32, "keep_aspect": True,
                                         "step_size": 2.0, "steps": 2}
        for fields, words in [({"epsilon": "300"}, "epsilon: must be between 0 and 255"),
                              ({"steps": "many"}, "steps: must be a whole number"),
                              ({"method": "nope"}, "method:"),
                              ({"device": "cuda"}, "device: not a setting"),
                              ({"mode": "loud"}, "mode"),
                              ({"no-resize": "maybe"}, "no-resize: must be true or false"),
                              ({"settings": "[1]"}, "settings: must be a JSON object"),
                              ({"target": "x.png"}, "target: is a file"),
                              # a bad value is named as its field was sent, with the names it mentions
                              ({"input-size": "60", "block-num": "1"},
                               "input-size: 60 is not divisible by 8 x block-num = 8"),
                              ({"input_size": "60"}, "input_size: 60 is not divisible by 8 x block_num = 8")]:
            refused = submit(http, [picture], fields)
            assert refused.status_code == 400, (fields, refused.text)
            assert words in refused.json()["error"], (fields, refused.json())
        for content_type, body, error in [("multipart/form-data; boundary=xyz", b"garbage", "upload: "),
                                          ("multipart/form-data", b"garbage", "upload: "),
                                          ("text/plain", b"hello", "images: no image uploaded")]:
            refused = http.post("/v1/jobs", content=body, headers={"content-type": content_type})
            assert refused.status_code == 400 and refused.json()["error"].startswith(error), refused.text
    assert len(list((service.data / "jobs").iterdir())) == 1  # refused submissions leave no folder behind


def test_uploads_are_checked_and_named_as_the_client_named_them(service, painting):
    good = png_bytes(painting)
    truncated = good[: len(good) // 2]
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")  # 400 megapixels in a few kB
    cases = [
        ([("images", ("notes.png", b"hello, not an image", "image/png"))], 400, "images: notes.png:"),
        ([("images", ("half.png", truncated, "image/png"))], 400, "images: half.png:"),
        ([("images", ("bomb.png", bomb.getvalue(), "image/png"))], 413, "images: bomb.png: image is too large"),
        ([("images", ("../../etc/evil.png", good, "image/png"))], 400, "is not a plain file name"),
        ([("images", ("..\\evil.png", good, "image/png"))], 400, "is not a plain file name"),
        ([("images", (".hidden.png", good, "image/png"))], 400, "is not a plain file name"),
        ([("images", ("a.png", good, "image/png")), ("images", ("a.png", good, "image/png"))], 400, "two files"),
        ([("mask", ("m.png", good, "image/png"))], 400, "images: no image uploaded"),
        ([("images", ("a.png", good, "image/png")), ("masks", ("b.png", good, "image/png"))], 400,
         "named like none of the images"),
        ([("images", ("a.png", good, "image/png")), ("extra", ("b.png", good, "image/png"))], 400,
         "extra: not a file field"),
    ]
    with local_client(create_app(service, manage_worker=False)) as http:
        for files, status, words in cases:
            refused = submit(http, files)
            assert refused.status_code == status, (files[0][1][0], refused.text)
            assert words in refused.json()["error"], refused.json()
        # A mask per image, matched by name, and a method's file parameter under its own name.
        accepted = submit(http, [("images", ("a.jpg", good, "image/png")), ("masks", ("a.png", good, "image/png")),
                                 ("target", ("pattern.png", png_bytes(painting, 32, 90), "image/png"))])
        assert accepted.status_code == 201, accepted.text
    folder = service.data / "jobs" / accepted.json()["id"]
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "files/target.png", "in/a.jpg", "masks/a.png"]
    assert not (service.data.parent / "etc").exists()
    assert len(list((service.data / "jobs").iterdir())) == 1


def test_tokens_guard_every_job(tmp_path, models, painting):
    service = make_service(tmp_path, models, require_tokens=True)
    _, alice = service.store.create_token("alice", Limits())
    bob_token, bob = service.store.create_token("bob", Limits())
    as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    picture = [("images", ("a.png", png_bytes(painting), "image/png"))]
    with local_client(create_app(service, manage_worker=False)) as http:
        assert submit(http, picture).status_code == 401  # no token
        assert submit(http, picture, headers={"Authorization": "Bearer mist_guessed"}).status_code == 401
        assert submit(http, picture, headers={"Authorization": alice}).status_code == 401  # not "Bearer ..."
        assert http.get("/v1/metrics").status_code == 401
        job = submit(http, picture, headers=as_alice).json()["id"]
        for method, path in [("GET", f"/v1/jobs/{job}"), ("GET", f"/v1/jobs/{job}/results"),
                             ("GET", f"/v1/jobs/{job}/results/a.png"), ("DELETE", f"/v1/jobs/{job}"),
                             ("POST", f"/v1/jobs/{job}/cancel")]:
            stolen = http.request(method, path, headers=as_bob)
            assert stolen.status_code == 404 and stolen.json() == {"error": f"no job {job}"}, (method, path)
        assert http.get(f"/v1/jobs/{job}", headers=as_alice).json()["state"] == "queued"
        assert http.get("/v1/jobs/..%2F..%2Fmist.db", headers=as_alice).status_code == 404
        service.store.revoke_token(bob_token.name)
        health = http.get("/v1/health")  # needs no token, and tells an anonymous caller nothing private
        assert health.status_code == 503 and health.json() == {"status": "not ready"}  # no worker runs here
        assert http.get("/v1/status").status_code == 401
        status = http.get("/v1/status", headers=as_alice).json()
        assert status["model"] == "tiny-random" and status["queue_length"] == 1 and status["your_jobs"] == 1
        assert status["worker"] == "not ready: stopped"
        assert submit(http, picture, headers=as_bob).status_code == 401
    stored = (service.data / "mist.db").read_bytes()
    assert alice.encode() not in stored and bob.encode() not in stored  # only hashes are kept
    service.store.close()


def test_limits_refuse_what_is_too_much(tmp_path, models, painting):
    service = make_service(tmp_path, models, local_limits=Limits(max_upload_bytes=60_000, max_images=2,
                                                                 max_queued=1))
    small = png_bytes(painting, 24)
    with local_client(create_app(service, manage_worker=False)) as http:
        three = [("images", (f"{n}.png", small, "image/png")) for n in range(3)]
        refused = submit(http, three)
        assert refused.status_code == 413 and "limit of 2 per job" in refused.json()["error"]
        big = submit(http, [("images", ("big.png", bytes(70_000), "image/png"))])
        assert big.status_code == 413 and "60000 bytes" in big.json()["error"]
        chunked = http.post("/v1/jobs", content=iter([b"--x\r\n"]),
                            headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]
        assert submit(http, three[:1]).status_code == 201
        queued = submit(http, three[:1])
        assert queued.status_code == 429 and "limit is 1" in queued.json()["error"]


def test_an_idempotency_key_gives_back_the_first_job(service, painting):
    picture = [("images", ("a.png", png_bytes(painting), "image/png"))]
    with local_client(create_app(service, manage_worker=False)) as http:
        first = submit(http, picture, headers={"Idempotency-Key": "upload-42"})
        again = submit(http, picture, headers={"Idempotency-Key": "upload-42"})
        other = submit(http, picture, headers={"Idempotency-Key": "upload-43"})
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    assert service.store.count_jobs() == 2


def test_cancel_delete_and_retention(tmp_path, models, painting):
    service = make_service(tmp_path, models, retention=60)
    picture = [("images", ("a.png", png_bytes(painting), "image/png"))]
    with local_client(create_app(service, manage_worker=False)) as http:
        queued = submit(http, picture).json()["id"]
        assert http.delete(f"/v1/jobs/{queued}").status_code == 409  # an unfinished job is cancelled, not deleted
        assert http.post(f"/v1/jobs/{queued}/cancel").json() == {"id": queued, "state": "cancelled", "cancel": True}
        assert http.get(f"/v1/jobs/{queued}").json()["state"] == "cancelled"
        assert http.get(f"/v1/jobs/{queued}/results").status_code == 404  # nothing was protected
        kept = submit(http, picture).json()["id"]
    with local_client(create_app(service)) as http:
        assert wait_finished(http, kept)["state"] == "done"
        assert http.delete(f"/v1/jobs/{queued}").status_code == 204  # a finished job is deleted with its files
        assert http.get(f"/v1/jobs/{queued}").status_code == 404
        assert not (service.data / "jobs" / queued).exists()
        metrics = http.get("/v1/metrics").text
    assert 'mist_jobs{state="done"} 1' in metrics and "mist_images_done_total 1" in metrics
    assert "mist_seconds_per_step " in metrics
    service.worker.sweep(now=time.time() + 30)  # within the retention time: kept
    assert service.store.job(kept) is not None and (service.data / "jobs" / kept / "out" / "a.png").is_file()
    service.worker.sweep(now=time.time() + 120)
    assert service.store.job(kept) is None and not (service.data / "jobs" / kept).exists()
    service.store.close()


def test_cancelling_a_finished_job_keeps_it_and_its_results(tmp_path, models, painting):
    """Cancel and delete are two operations: a cancel that arrives after the job finished (the client's cancel
    racing the last step) leaves the job and its PNG alone, and says so as a JSON error the client raises."""
    from mist.faces.client import Client, ServiceError

    service = make_service(tmp_path, models)
    with local_client(create_app(service)) as http:
        job = submit(http, [("images", ("a.png", png_bytes(painting), "image/png"))]).json()["id"]
        assert wait_finished(http, job)["state"] == "done"
        client = Client()
        client._http = http  # the client's requests go to the app in this process
        with pytest.raises(ServiceError) as refused:
            client.cancel(job)
        assert refused.value.status == 409 and "nothing to cancel" in refused.value.message
        assert http.get(f"/v1/jobs/{job}").json()["state"] == "done"
        assert http.get(f"/v1/jobs/{job}/results/a.png").status_code == 200
        assert client.delete(job) is None  # a 204 without a body is not read as JSON
        with pytest.raises(ServiceError) as gone:
            client.cancel(job)
        assert gone.value.status == 404 and gone.value.message == f"no job {job}"
    service.store.close()


def test_a_running_job_cancels_at_its_next_step(tmp_path, models, painting):
    service = make_service(tmp_path, models)
    pictures = [("images", (f"{n}.png", png_bytes(painting, 32, n), "image/png")) for n in range(3)]
    with local_client(create_app(service)) as http:
        job = submit(http, pictures, {"steps": "400"}).json()["id"]
        deadline = time.monotonic() + 120
        while http.get(f"/v1/jobs/{job}").json()["images"][0]["step"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert http.post(f"/v1/jobs/{job}/cancel").status_code == 202
        status = wait_finished(http, job)
    assert status["state"] == "cancelled"
    assert [image["state"] for image in status["images"]] == ["queued"] * 3
    service.store.close()


def test_access_needs_a_token_by_default_made_on_first_start_and_a_private_data_folder(tmp_path, monkeypatch,
                                                                                      capsys):
    """Whatever the address: the first start creates a token and prints it once, later starts do not; --no-auth is
    refused beyond loopback; the data folder is 0700 and the database 0600 even where the folder existed open."""
    import stat

    import uvicorn

    from mist.faces.service.server import ServeOptions, serve

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append((app, options)))
    theirs = tmp_path / "shared-folder"
    theirs.mkdir()
    theirs.chmod(0o755)
    with pytest.raises(ValueError, match="other accounts can open this folder"):  # not Mist's to change
        serve(ServeOptions(data=theirs, model="tiny-random", device="cpu"))
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o755
    data = tmp_path / "data"
    serve(ServeOptions(data=data, model="tiny-random", device="cpu", no_auth=True))  # made private by Mist
    capsys.readouterr()
    data.chmod(0o755)  # opened up later: Mist's own folder (it has mist.db) is made private again
    with pytest.raises(ValueError, match="--no-auth: only on loopback"):
        serve(ServeOptions(data=data, host="0.0.0.0", model="tiny-random", device="cpu", no_auth=True))
    serve(ServeOptions(data=data, host="0.0.0.0", model="tiny-random", device="cpu"))
    first = capsys.readouterr().out
    secret = first.strip().splitlines()[1]
    assert "created the API token 'default'" in first and secret.startswith("mist_")
    serve(ServeOptions(data=data, model="tiny-random", device="cpu"))
    assert "mist_" not in capsys.readouterr().out  # shown once only
    app = served[-1][0]
    assert app.state.service.require_tokens and served[-1][1]["proxy_headers"] is False
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in data.glob("mist.db*")}["mist.db"] == 0o600
    with local_client(app) as http:
        assert http.get("/v1/metrics").status_code == 401
        assert http.get("/v1/metrics", headers={"Authorization": f"Bearer {secret}"}).status_code == 200


def test_no_auth_is_for_this_machine_only(tmp_path, models, painting):
    """With --no-auth, a request whose client is another machine (as a trusted reverse proxy reports it) still needs
    a token."""
    service = make_service(tmp_path, models)  # require_tokens False: --no-auth
    picture = [("images", ("a.png", png_bytes(painting), "image/png"))]
    with local_client(create_app(service, manage_worker=False)) as http:
        assert submit(http, picture).status_code == 201
    with TestClient(create_app(service, manage_worker=False), client=("203.0.113.7", 40000)) as http:
        refused = submit(http, picture)
        assert refused.status_code == 401 and "from other machines" in refused.json()["error"]
    service.store.close()


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps"])
def test_a_device_this_machine_lacks_is_refused_by_every_face_before_serving(tmp_path, capsys, monkeypatch, device):
    """`mist serve --device cuda` on a machine without CUDA stops before it listens, with the line `mist protect`
    and `mist evaluate` give for it (it used to serve, say it was healthy, and fail every job)."""
    import torch
    import uvicorn

    from mist.faces import cli

    if torch.cuda.is_available() or (device == "mps" and torch.backends.mps.is_available()):
        pytest.skip(f"this machine has {device}")
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("the server started listening"))
    painting = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(painting)
    errors = []
    for command in (["serve", "--data", tmp_path / "data"], ["protect", painting, "-o", tmp_path / "out"],
                    ["evaluate", painting, painting, "-o", tmp_path / "report"]):
        assert cli.main([str(part) for part in command] + ["--model", "tiny-random", "--device", device]) == 2
        errors.append(capsys.readouterr().err.strip().splitlines()[-1])
    assert len(set(errors)) == 1 and errors[0].startswith(f"mist: error: --device: {device}"), errors
    assert not (tmp_path / "out").exists() and not (tmp_path / "report").exists()
    assert not (tmp_path / "data").exists()  # no data folder, and so no API token made and printed for nothing


def test_a_data_folder_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    from mist.faces import cli

    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    for command in (["serve", "token", "list"], ["serve", "--model", "tiny-random"]):
        assert cli.main([*command, "--data", str(taken)]) == cli.EXIT_USAGE
        assert capsys.readouterr().err.strip() == f"mist: error: --data {taken}: is a file, not a folder"
    assert taken.read_text() == "mine"


def test_the_api_reference_page_needs_nothing_beyond_the_server(service):
    """/docs is rendered on the server from the OpenAPI description: no script or style from a CDN, which a server
    without internet access could not show."""
    with local_client(create_app(service, manage_worker=False)) as http:
        page = http.get("/docs")
        schema = http.get("/openapi.json").json()
        assert http.get("/redoc").status_code == 404
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script" not in page.text and "http://" not in page.text and "https://" not in page.text
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert f"<span class=method>{method.upper()}</span> {path}</h2>" in page.text
            assert escape(operation["summary"]) in page.text
    assert "Submit images to protect" in page.text and "Bearer &lt;token&gt;" in page.text  # text is escaped


def test_simultaneous_submissions_never_pass_the_queue_limit(tmp_path, models, painting):
    """20 submissions at once against a limit of 2 queued jobs: exactly 2 are accepted, whichever request checked
    the count first (the limit is part of the insert, not a check before it); the refused leave no files behind."""
    from concurrent.futures import ThreadPoolExecutor

    service = make_service(tmp_path, models, local_limits=Limits(max_queued=2))
    picture = [("images", ("a.png", png_bytes(painting), "image/png"))]
    with local_client(create_app(service, manage_worker=False)) as http:
        with ThreadPoolExecutor(20) as pool:
            codes = sorted(pool.map(lambda _: submit(http, picture).status_code, range(20)))
    assert codes == [201, 201] + [429] * 18
    assert service.store.count_jobs() == 2 and len(list((service.data / "jobs").iterdir())) == 2
    service.store.close()



def test_a_full_disk_or_any_fault_is_answered_in_json(service, painting, monkeypatch):
    """A disk that fills up during an upload is a 507 in the API's JSON shape, and the job's folder is removed; any
    other fault is a 500 in that shape too (not Starlette's plain-text page)."""
    import errno

    from mist.faces.service import submit as submit_module

    def full(upload, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    picture = [("images", ("a.png", png_bytes(painting), "image/png"))]
    with local_client(create_app(service, manage_worker=False), raise_server_exceptions=False) as http:
        monkeypatch.setattr(submit_module, "write_upload", full)
        refused = submit(http, picture)
        assert refused.status_code == 507 and refused.json()["error"].startswith("upload: the server's disk is full")
        assert not (service.data / "jobs").exists() or not any((service.data / "jobs").iterdir())
        monkeypatch.setattr(submit_module, "write_upload", lambda upload, path: 1 / 0)
        broken = submit(http, picture)
        assert broken.status_code == 500 and broken.json() == {
            "error": "internal error (ZeroDivisionError); the server's log says more"}
    assert service.store.count_jobs() == 0


@pytest.mark.parametrize("refusal", ["database is locked", "attempt to write a readonly database"])
def test_the_worker_outlives_a_database_that_fails_and_health_says_so(tmp_path, models, painting, monkeypatch,
                                                                      refusal):
    """The database refuses to record a job's end three times (locked by another process, or read-only): the worker
    does not die, says why while it waits, records the end once the database answers, and runs the job queued
    meanwhile."""
    import sqlalchemy as sa

    service = make_service(tmp_path, models)
    real_finish = service.store.finish
    refusals = {"left": 3}
    faults = []

    def locked_finish(*args, **kwargs):
        faults.append((service.worker.ready, service.worker.stats.fault))
        if refusals["left"] > 0:
            refusals["left"] -= 1
            raise sa.exc.OperationalError("UPDATE jobs", {}, Exception(refusal))
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(service.store, "finish", locked_finish)
    picture = [("images", ("a.png", png_bytes(painting), "image/png"))]
    with local_client(create_app(service)) as http:
        first = submit(http, picture).json()["id"]
        second = submit(http, picture).json()["id"]
        assert wait_finished(http, first)["state"] == "done"
        assert wait_finished(http, second)["state"] == "done"
        assert http.get("/v1/health").status_code == 200
        assert http.get("/v1/status").json()["worker"] == "ready"
    # What health and status say while the worker cannot take jobs (set by hand on the stopped worker, whose loop
    # would otherwise clear it at its next look at the queue).
    service.worker.stats.fault = "the job queue failed: OperationalError: disk I/O error"
    with local_client(create_app(service, manage_worker=False)) as http:
        assert http.get("/v1/health").status_code == 503
        assert http.get("/v1/status").json()["worker"] == "not ready: " + service.worker.stats.fault
    assert faults[0] == (True, None)  # the first attempt: nothing wrong yet
    assert all(not ready and refusal in fault for ready, fault in faults[1:4]), faults
    service.store.close()


def test_block_mode_progress_is_known_from_the_start_and_never_goes_back(service, painting):
    """Each image's step count is its tiles' steps from the moment it is queued (block-num 2: 4 tiles x 3 steps),
    the job's progress only grows and is 1 only when the job is done."""
    pictures = [("images", (f"{n}.png", png_bytes(painting, 64, n), "image/png")) for n in range(2)]
    seen = []
    with local_client(create_app(service)) as http:
        job = submit(http, pictures, {"steps": "3", "block-num": "2", "input-size": "64"}).json()["id"]
        deadline = time.monotonic() + 120
        while (status := http.get(f"/v1/jobs/{job}").json())["state"] not in ("done", "failed", "cancelled"):
            seen.append(status)
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert status["state"] == "done" and status["progress"] == 1.0, (status["error"], status["images"])
    assert all(image["steps"] == 12 for s in seen + [status] for image in s["images"])
    progress = [s["progress"] for s in seen]
    assert progress == sorted(progress), progress
    unfinished = [s["progress"] for s in seen if any(image["state"] != "done" for image in s["images"])]
    assert all(p < 1.0 for p in unfinished), unfinished  # 1 only once every image is done


def test_a_job_that_fails_as_a_whole_leaves_no_image_running(service, painting, monkeypatch):
    from mist.faces.service import worker as worker_module

    def failing_run(jobs, config, models, reporter, **kwargs):
        reporter.images_started(jobs[:1], 1, len(jobs))
        raise ValueError("the model could not be loaded")

    monkeypatch.setattr(worker_module, "run_jobs", failing_run)
    pictures = [("images", (f"{n}.png", png_bytes(painting, 40, n), "image/png")) for n in range(2)]
    with local_client(create_app(service)) as http:
        status = wait_finished(http, submit(http, pictures).json()["id"])
    assert status["state"] == "failed" and status["error"] == "the model could not be loaded"
    assert [(image["state"], image["message"]) for image in status["images"]] == [
        ("failed", "the model could not be loaded"), ("queued", None)]


def test_a_job_cannot_ask_for_more_compute_than_the_server_allows(tmp_path, models, painting):
    """`steps=1000000` would hold the worker for days and `input-size=8192` exhaust its memory: refused in one line
    naming the field and the server's option, before anything is stored."""
    service = make_service(tmp_path, models)
    service.work_limits = WorkLimits(max_steps=50, max_input_size=64)
    picture = [("images", ("a.png", png_bytes(painting), "image/png"))]
    with local_client(create_app(service, manage_worker=False)) as http:
        for fields, words in [({"steps": "51"}, "steps: 51 steps per image (x eot-samples) is over this server's "
                                                "limit of 50 (its --max-steps)"),
                              ({"steps": "20", "robust": "jpeg", "eot-samples": "3"}, "steps: 60 steps per image"),
                              ({"input-size": "72"}, "input-size: 72 is over this server's limit of 64")]:
            refused = submit(http, picture, fields)
            assert refused.status_code == 400 and refused.json()["error"].startswith(words), refused.text
        assert service.store.count_jobs() == 0 and not any((service.data / "jobs").glob("*/in/*"))
        assert submit(http, picture, {"steps": "50", "input-size": "64"}).status_code == 201
    service.store.close()


def test_a_preset_is_stored_spelt_out_and_its_steps_are_held_to_the_limits(tmp_path, models, painting):
    """`preset=paper` takes the method's paper settings where the form gives none; the job stores them as values, so
    that --max-steps sees the 1000 steps of PID's paper (on a real model: the test model keeps its ten)."""
    data = tmp_path / "data"
    data.mkdir()
    store = JobStore(sqlite_url(data))
    worker = Worker(store, data, models, retention_seconds=3600, lease_seconds=30, poll_seconds=0.05)
    service = Service(store, data, worker, False, Limits(), 3600.0, "some-real-model")
    service.work_limits = WorkLimits(max_steps=500)
    picture = [("images", ("a.png", png_bytes(painting), "image/png"))]
    with local_client(create_app(service, manage_worker=False)) as http:
        refused = http.post("/v1/jobs", files=picture, data={"method": "pid", "preset": "paper"})
        assert refused.status_code == 400 and refused.json()["error"].startswith("steps: 1000 steps per image")
        told = submit(http, picture, {"method": "pid", "preset": "paper", "steps": "20"})
        assert told.status_code == 201, told.text
        bad = submit(http, picture, {"preset": "nope"})
        assert bad.status_code == 400 and bad.json()["error"] == "preset: must be one of default, paper, got 'nope'"
    settings = told.json()["settings"]
    assert (settings["steps"], settings["epsilon"], settings["pid_loss"]) == (20, 12.75, "add-log")
    assert "preset" not in settings
    store.close()

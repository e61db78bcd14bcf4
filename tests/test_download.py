"""mist.common.download against a local HTTP server that can cut connections, ignore Range, refuse access or
redirect."""

from __future__ import annotations

import errno
import hashlib
import http.server
import os
import random
import re
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mist.common import download as dl
from mist.common.download import DownloadError, Remote, download, sha256_file

PAYLOAD = random.Random(1234).randbytes(300 * 1024)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
CHUNK = 16 * 1024


@dataclass
class Behaviour:
    """Switches for the fake server, and what it saw."""

    cut_after: int | None = None  # bytes of body to send before dropping the connection...
    cut_requests: int = 0  # ...on this many requests (then behave)
    ignore_range: bool = False
    status: int | None = None  # answer every request with this error code
    redirect_to: str | None = None  # answer with a 302 to this base URL (path kept)
    body: bytes = PAYLOAD  # what the file is on this server
    content_type: str | None = None
    requests: list[dict] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    behaviour: Behaviour

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        b = self.behaviour
        b.requests.append({"path": self.path, "headers": dict(self.headers)})
        if b.status is not None:
            self.send_error(b.status)
            return
        if b.redirect_to is not None:
            self.send_response(302)
            self.send_header("Location", b.redirect_to + urllib.parse.urlsplit(self.path).path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and not b.ignore_range:
            start = int(match.group(1))
            if start >= len(b.body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(b.body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(b.body) - 1}/{len(b.body)}")
        else:
            self.send_response(200)
        if b.content_type:
            self.send_header("Content-Type", b.content_type)
        body = b.body[start:]
        self.send_header("Content-Length", str(len(body)))  # the full length, even when we are about to cut
        self.end_headers()
        if b.cut_after is not None and b.cut_requests > 0:
            b.cut_requests -= 1
            self.wfile.write(body[: b.cut_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


def _serve() -> tuple[http.server.ThreadingHTTPServer, Behaviour, str]:
    behaviour = Behaviour()
    handler = type("Handler", (_Handler,), {"behaviour": behaviour})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, behaviour, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("HF_TOKEN", "HF_ENDPOINT", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dl, "RETRY_DELAY_S", 0)
    monkeypatch.setattr(dl, "TIMEOUT_S", 5)


@pytest.fixture
def server():
    srv, behaviour, base = _serve()
    yield behaviour, base
    srv.shutdown()
    srv.server_close()


def _remote(base: str, sha: str = PAYLOAD_SHA) -> Remote:
    return Remote(url=f"{base}/repo/resolve/main/model.bin", sha256=sha, filename="model.bin")


def _get(remote: Remote, dest: Path, **kwargs) -> Path:
    return download(remote, dest, progress=False, chunk_size=CHUNK, **kwargs)


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def test_models_table():
    assert set(dl.MODELS) == {"v1-4", "v1-5"}
    assert {remote.sha256 for remote in dl.MODELS.values()} <= set(dl.KNOWN_CHECKSUMS)
    assert all(re.fullmatch(r"[0-9a-f]{64}", sha) for sha in dl.KNOWN_CHECKSUMS) and len(dl.KNOWN_CHECKSUMS) == 6
    for remote in dl.MODELS.values():
        assert remote.url.startswith("{endpoint}/") and remote.url.endswith("/" + remote.filename)
        assert re.fullmatch(r"[0-9a-f]{64}", remote.sha256)
    assert dl.MODELS["v1-5"].resolve() == ("https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/"
                                           "resolve/main/v1-5-pruned-emaonly.safetensors")


def test_download(server, tmp_path):
    behaviour, base = server
    dest = tmp_path / "models" / "sub" / "model.bin"  # parents are created
    assert _get(_remote(base), dest) == dest
    assert dest.read_bytes() == PAYLOAD and sha256_file(dest) == PAYLOAD_SHA
    assert not _part(dest).exists()
    assert len(behaviour.requests) == 1 and "Range" not in behaviour.requests[0]["headers"]
    assert "Authorization" not in behaviour.requests[0]["headers"]


def test_progress_bar_does_not_break(server, tmp_path, capsys):
    _, base = server
    dest = tmp_path / "model.bin"
    download(_remote(base), dest, progress=True, chunk_size=CHUNK)
    assert dest.read_bytes() == PAYLOAD


def test_resume_from_part(server, tmp_path):
    behaviour, base = server
    dest = tmp_path / "model.bin"
    _part(dest).write_bytes(PAYLOAD[:102400])
    _get(_remote(base), dest)
    assert behaviour.requests[0]["headers"]["Range"] == "bytes=102400-"
    assert dest.read_bytes() == PAYLOAD and not _part(dest).exists()


def test_cut_connection_is_retried_and_resumed(server, tmp_path):
    behaviour, base = server
    behaviour.cut_after, behaviour.cut_requests = 50_000, 2
    dest = tmp_path / "model.bin"
    _get(_remote(base), dest)
    assert dest.read_bytes() == PAYLOAD and not _part(dest).exists()
    ranges = [r["headers"].get("Range") for r in behaviour.requests]
    assert ranges == [None, "bytes=50000-", "bytes=100000-"]


def test_connection_that_never_delivers_gives_up_and_keeps_part(server, tmp_path):
    behaviour, base = server
    dest = tmp_path / "model.bin"
    _part(dest).write_bytes(PAYLOAD[:1000])
    behaviour.cut_after, behaviour.cut_requests = 0, 100
    with pytest.raises(DownloadError, match="kept") as info:
        _get(_remote(base), dest)
    assert "retries" in str(info.value)
    assert len(behaviour.requests) == dl.MAX_RETRIES + 1
    assert _part(dest).read_bytes() == PAYLOAD[:1000] and not dest.exists()


def test_server_ignoring_range_starts_over(server, tmp_path):
    behaviour, base = server
    behaviour.ignore_range = True
    dest = tmp_path / "model.bin"
    _part(dest).write_bytes(b"x" * 5000)  # even a wrong prefix is discarded, not appended to
    _get(_remote(base), dest)
    assert behaviour.requests[0]["headers"]["Range"] == "bytes=5000-"
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_is_verified_and_renamed(server, tmp_path):
    behaviour, base = server
    dest = tmp_path / "model.bin"
    _part(dest).write_bytes(PAYLOAD)  # an earlier run finished the bytes but died before the rename: HTTP 416
    _get(_remote(base), dest)
    assert dest.read_bytes() == PAYLOAD and not _part(dest).exists()
    assert len(behaviour.requests) == 1


def test_checksum_mismatch(server, tmp_path):
    _, base = server
    dest = tmp_path / "model.bin"
    with pytest.raises(DownloadError, match="checksum mismatch") as info:
        _get(_remote(base, sha="0" * 64), dest)
    assert PAYLOAD_SHA in str(info.value)
    assert not dest.exists() and not _part(dest).exists()


def test_corrupt_resumed_prefix_fails_checksum(server, tmp_path):
    _, base = server
    dest = tmp_path / "model.bin"
    _part(dest).write_bytes(b"\0" * 102400)  # the prefix is hashed too, so a bad resume cannot slip through
    with pytest.raises(DownloadError, match="checksum mismatch"):
        _get(_remote(base), dest)
    assert not dest.exists() and not _part(dest).exists()


def test_not_found(server, tmp_path):
    behaviour, base = server
    behaviour.status = 404
    with pytest.raises(DownloadError, match="404") as info:
        _get(_remote(base), tmp_path / "model.bin")
    assert "HF_ENDPOINT" in str(info.value)
    assert len(behaviour.requests) == 1  # a real answer is not retried


@pytest.mark.parametrize("code", [401, 403])
def test_access_refused_mentions_token(server, tmp_path, code):
    behaviour, base = server
    behaviour.status = code
    with pytest.raises(DownloadError, match="HF_TOKEN") as info:
        _get(_remote(base), tmp_path / "model.bin")
    assert str(code) in str(info.value)


def test_server_error_is_retried_then_reported(server, tmp_path):
    behaviour, base = server
    behaviour.status = 503
    with pytest.raises(DownloadError, match="HTTP 503"):
        _get(_remote(base), tmp_path / "model.bin")
    assert len(behaviour.requests) == dl.MAX_RETRIES + 1


def test_token_from_environment(server, tmp_path, monkeypatch):
    behaviour, base = server
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    _get(_remote(base), tmp_path / "model.bin")
    assert behaviour.requests[0]["headers"]["Authorization"] == "Bearer hf_secret"


def test_token_not_forwarded_to_another_host(server, tmp_path):
    cdn_behaviour, cdn_base = server
    front, front_behaviour, front_base = _serve()
    try:
        front_behaviour.redirect_to = cdn_base
        dest = tmp_path / "model.bin"
        _part(dest).write_bytes(PAYLOAD[:1000])
        _get(_remote(front_base), dest, token="hf_secret")
    finally:
        front.shutdown()
        front.server_close()
    assert front_behaviour.requests[0]["headers"]["Authorization"] == "Bearer hf_secret"
    assert "Authorization" not in cdn_behaviour.requests[0]["headers"]
    assert cdn_behaviour.requests[0]["headers"]["Range"] == "bytes=1000-"  # the range survives the redirect
    assert dest.read_bytes() == PAYLOAD


def test_hf_endpoint(server, tmp_path, monkeypatch):
    behaviour, base = server
    monkeypatch.setenv("HF_ENDPOINT", base + "/")  # a trailing slash must not produce "//repo"
    remote = Remote(url="{endpoint}/repo/resolve/main/model.bin", sha256=PAYLOAD_SHA, filename="model.bin")
    _get(remote, tmp_path / "model.bin")
    assert behaviour.requests[0]["path"] == "/repo/resolve/main/model.bin"


def test_proxy_from_environment(server, tmp_path, monkeypatch):
    behaviour, base = server
    monkeypatch.setenv("http_proxy", base)  # the fake server plays the proxy for a host that does not exist
    remote = Remote(url="http://models.invalid/repo/model.bin", sha256=PAYLOAD_SHA, filename="model.bin")
    _get(remote, tmp_path / "model.bin")
    assert behaviour.requests[0]["path"] == "http://models.invalid/repo/model.bin"


def test_connection_refused(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match="cannot reach"):
        _get(_remote(f"http://127.0.0.1:{port}"), tmp_path / "model.bin")


def test_existing_correct_destination_makes_no_request(server, tmp_path):
    behaviour, base = server
    dest = tmp_path / "model.bin"
    dest.write_bytes(PAYLOAD)
    assert _get(_remote(base), dest) == dest
    assert behaviour.requests == []


def test_existing_wrong_destination_is_left_alone(server, tmp_path):
    behaviour, base = server
    dest = tmp_path / "model.bin"
    dest.write_bytes(b"my own fine-tune")
    with pytest.raises(DownloadError, match="different checksum") as info:
        _get(_remote(base), dest)
    assert "move it away" in str(info.value)
    assert dest.read_bytes() == b"my own fine-tune" and behaviour.requests == []


def test_disk_full_keeps_part_and_resumes(server, tmp_path, monkeypatch):
    behaviour, base = server
    dest = tmp_path / "model.bin"
    writes = []
    original = dl._write_chunk

    def fill_up(file, data):
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        writes.append(len(data))
        file.write(data)

    monkeypatch.setattr(dl, "_write_chunk", fill_up)
    with pytest.raises(DownloadError, match="disk full") as info:
        _get(_remote(base), dest)
    assert "GB" in str(info.value) and "kept" in str(info.value)
    assert _part(dest).stat().st_size == 3 * CHUNK and not dest.exists()
    assert len(behaviour.requests) == 1  # a local error is not retried

    monkeypatch.setattr(dl, "_write_chunk", original)  # space freed: the next run resumes where the disk ran out
    _get(_remote(base), dest)
    assert behaviour.requests[-1]["headers"]["Range"] == f"bytes={3 * CHUNK}-"
    assert dest.read_bytes() == PAYLOAD and not _part(dest).exists()


def test_a_web_page_instead_of_the_model_is_named_as_such(server, tmp_path):
    behaviour, base = server
    behaviour.body, behaviour.content_type = b"<html><body>Access denied</body></html>\n", "text/html; charset=utf-8"
    with pytest.raises(DownloadError) as info:
        _get(_remote(base), tmp_path / "model.bin")
    message = str(info.value)
    host = urllib.parse.urlsplit(base).netloc
    assert f"{host} sent {len(behaviour.body)} bytes (text/html)" in message
    assert "not a model" in message and "Access denied" in message
    assert "partial" not in message and "will get the same answer" in message
    assert not (tmp_path / "model.bin").exists() and not _part(tmp_path / "model.bin").exists()


def test_a_different_big_file_is_not_downloaded_again_and_again(server, tmp_path):
    behaviour, base = server
    behaviour.body, behaviour.content_type = PAYLOAD * 4, "application/octet-stream"  # 1.2 MB: model-sized here
    with pytest.raises(DownloadError) as info:
        _get(_remote(base), tmp_path / "model.bin")
    message = str(info.value)
    assert "sent 1.2 MB (application/octet-stream)" in message and "serves a different file" in message
    assert "--sha256" in message and "run again" not in message


def test_a_mismatch_after_resuming_an_old_part_suggests_one_fresh_download(server, tmp_path):
    _, base = server
    dest = tmp_path / "model.bin"
    _part(dest).write_bytes(b"\0" * 1000)  # left by an earlier run, and wrong
    with pytest.raises(DownloadError, match="run again once to download the whole file"):
        _get(_remote(base), dest)
    _get(_remote(base), dest)  # which then works
    assert dest.read_bytes() == PAYLOAD


def test_sha256_option_downloads_any_checkpoint(server, tmp_path, capsys):
    import mist.faces.cli

    _, base = server
    dest = tmp_path / "other.safetensors"
    code = mist.faces.cli.main(["download-model", "-q", "--url", f"{base}/x/other.safetensors", "--sha256",
                          PAYLOAD_SHA.upper(), "--to", str(dest)])
    assert code == 0 and dest.read_bytes() == PAYLOAD
    assert f"{dest}: other.safetensors ready (SHA-256 verified)" in capsys.readouterr().out


@pytest.mark.parametrize("args, problem", [(["--url", "http://127.0.0.1:9/m.ckpt"], "--url: give the file's"),
                                           (["--sha256", "abc"], "--sha256: expected 64 hexadecimal digits")])
def test_sha256_option_errors_are_one_line(capsys, tmp_path, args, problem):
    import mist.faces.cli

    code = mist.faces.cli.main(["download-model", "-q", "--to", str(tmp_path / "m.ckpt"), *args])
    err = capsys.readouterr().err
    assert code == 2 and problem in err and len(err.strip().splitlines()) == 1


def test_choose_remote_defaults_to_the_official_files():
    assert dl.choose_remote("v1-5") is dl.MODELS["v1-5"]
    replaced = dl.choose_remote("v1-4", sha256="A" * 64)
    assert replaced.url == dl.MODELS["v1-4"].url and replaced.sha256 == "a" * 64
    assert dl.choose_remote("v1-4", "https://h/x/v1-5-pruned.ckpt", "b" * 64).suffix == ".ckpt"
    assert dl.MODELS["v1-5"].label == "SD v1.5 (v1-5-pruned-emaonly.safetensors)"


def test_token_sent_to_a_third_party_mirror_is_warned_about(server, tmp_path, caplog):
    _, base = server
    _get(_remote(base), tmp_path / "model.bin", token="hf_secret")
    assert any("HF_TOKEN is sent to 127.0.0.1, which is not Hugging Face" in r.getMessage() for r in caplog.records)


def test_access_refused_without_token_says_set_token_and_accept_licence(server, tmp_path):
    behaviour, base = server
    behaviour.status = 401
    with pytest.raises(DownloadError, match="set HF_TOKEN and accept the model's licence"):
        _get(_remote(base), tmp_path / "model.bin")

"""Download Stable Diffusion checkpoints: resumable, checksum-verified, and never leaving a broken file in place.

Bytes go to `<destination>.part` and are renamed onto `destination` only once their SHA-256 matches, so a crash, a cut
connection or a corrupt mirror can never leave a partial or wrong model where the loader would pick it up. A later run
resumes the `.part` with an HTTP Range request. Only the standard library does the HTTP, so the usual `https_proxy` /
`no_proxy` variables work as for any Python tool, and `HF_ENDPOINT` points at a Hugging Face mirror.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import logging
import math
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"

# Module-level so tests (and impatient callers) can shrink them without threading arguments through every call.
RETRY_DELAY_S = 0.5  # the n-th retry waits n * RETRY_DELAY_S: long enough for a flapping link, short for a human
MAX_RETRIES = 5
TIMEOUT_S = 30.0  # per socket operation (connect, each read), not for the whole multi-GB transfer

# Gateways and overloaded CDNs answer these for a moment and then recover; anything else 4xx/5xx is a real answer.
_RETRY_HTTP_CODES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Remote:
    """A file to fetch: `url` may contain `{endpoint}`, filled in with the Hugging Face endpoint (or a mirror)."""

    url: str
    sha256: str
    filename: str

    def resolve(self, endpoint: str | None = None) -> str:
        # str.replace, not str.format: a URL may legitimately hold other braces or percent-escapes.
        return self.url.replace("{endpoint}", resolve_endpoint(endpoint))

    @property
    def suffix(self) -> str:
        """The suffix the saved file gets, so that the loader reads it the right way: .safetensors or .ckpt."""
        return ".safetensors" if self.filename.lower().endswith(".safetensors") else ".ckpt"

    @property
    def label(self) -> str:
        """What the file is, for messages: an official release's name, else its file name."""
        return KNOWN_CHECKSUMS.get(self.sha256.lower(), self.filename)


MODELS: dict[str, Remote] = {
    "v1-4": Remote(
        url="{endpoint}/CompVis/stable-diffusion-v-1-4-original/resolve/main/sd-v1-4.ckpt",
        sha256="fe4efff1e174c627256e44ec2991ba279b3816e364b49f9be2abc0b3ff3f8556",
        filename="sd-v1-4.ckpt",
    ),
    "v1-5": Remote(
        url="{endpoint}/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.safetensors",
        sha256="6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
        filename="v1-5-pruned-emaonly.safetensors",
    ),
}

# The official SD 1.x checkpoint files Mist runs on, by SHA-256 (the checksums published with them on Hugging Face),
# so that `doctor` recognises every one of them, not only the two `download-model` fetches by default.
KNOWN_CHECKSUMS: dict[str, str] = {
    "fe4efff1e174c627256e44ec2991ba279b3816e364b49f9be2abc0b3ff3f8556": "SD v1.4 (sd-v1-4.ckpt)",
    "14749efc0ae8ef0329391ad4436feb781b402f4fece4883c7ad8d10556d8a36a": "SD v1.4 (sd-v1-4-full-ema.ckpt)",
    "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa": "SD v1.5 (v1-5-pruned-emaonly.safetensors)",
    "cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90014281516": "SD v1.5 (v1-5-pruned-emaonly.ckpt)",
    "1a189f0be69d6106a48548e7626207dddd7042a418dbf372cefd05e0cdba61b6": "SD v1.5 (v1-5-pruned.safetensors)",
    "e1441589a6f3c5a53f5f54d0975a18a7feb7cdf0b0dee276dfc3331ae376a053": "SD v1.5 (v1-5-pruned.ckpt)",
}
_HUGGING_FACE_HOSTS = ("huggingface.co", "hf.co")


class DownloadError(Exception):
    """A download failed; the message is one line that says what happened and what to do about it."""


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The argument, else `HF_ENDPOINT`, else huggingface.co; read at call time so a changed environment applies."""
    value = endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    return value.strip().rstrip("/")


def choose_remote(version: str, url: str | None = None, sha256: str | None = None) -> Remote:
    """What `mist download-model` fetches: `version`'s official file, or any checkpoint at `url`, which then needs
    the SHA-256 its publisher gives (`sha256`, 64 hex digits) so that the download can be verified. `sha256` alone
    replaces the official checksum of `version`'s file. Raises ValueError naming the option at fault."""
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"--sha256: expected 64 hexadecimal digits, got {sha256!r}")
    if url is None:
        official = MODELS[version]
        return official if sha256 is None else Remote(official.url, sha256, official.filename)
    if sha256 is None:
        raise ValueError("--url: give the file's published SHA-256 with --sha256, so that the download can be checked")
    filename = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or "model.ckpt"
    return Remote(url, sha256, filename)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks so a 4 GB checkpoint does not need 4 GB of memory."""
    digest = hashlib.sha256()
    _hash_into(digest, Path(path))
    return digest.hexdigest()


def download(
    remote: Remote,
    destination: Path,
    *,
    progress: bool = True,
    endpoint: str | None = None,
    token: str | None = None,
    chunk_size: int = 1 << 20,
    opener: Any = None,
) -> Path:
    """Fetch `remote` to `destination` (parents created) and return it; raise DownloadError on any failure.

    An existing `destination` with the right checksum is returned without any network access; one with a different
    checksum is left alone and reported. `token` (default `HF_TOKEN`) is sent as a Bearer token, and only to the
    origin it was meant for, never along a redirect to another host such as a CDN. `opener` defaults to urllib's,
    which honours the proxy environment variables.
    """
    destination = Path(destination)
    expected = remote.sha256.lower()
    if destination.exists():
        got = sha256_file(destination)
        if got == expected:
            return destination
        # Never delete it: it may be the user's own fine-tune or a file they placed by hand.
        if got in KNOWN_CHECKSUMS:
            raise DownloadError(f"{destination} already holds {KNOWN_CHECKSUMS[got]}, which Mist can use as it is; to "
                                f"get {remote.label} as well, choose another file with --to")
        raise DownloadError(
            f"{destination} already exists with a different checksum (got {got}, expected {expected}): "
            "move it away and run again"
        )

    url = remote.resolve(endpoint)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"bad download URL {url!r}: HF_ENDPOINT must start with http:// or https://")
    token = token or os.environ.get("HF_TOKEN") or None
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if token and not any(host == known or host.endswith("." + known) for known in _HUGGING_FACE_HOSTS):
        log.warning("HF_TOKEN is sent to %s, which is not Hugging Face: whoever runs that server can use your token. "
                    "Unset HF_TOKEN for this download unless you trust it.", host)
    part = destination.with_name(destination.name + ".part")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create folder {destination.parent}: {exc.strerror or exc}") from exc

    job = _Job(url, part, token, chunk_size, opener or _default_opener(), progress, remote.filename)
    try:
        digest = job.run()
    finally:
        job.close_bar()

    if digest != expected:
        message = job.describe_mismatch(digest, expected)
        part.unlink(missing_ok=True)
        raise DownloadError(message)
    # Atomic on one filesystem (the .part sits beside its destination), so readers see no file or the whole file.
    os.replace(part, destination)
    return destination


# --- internals ---------------------------------------------------------------------------------------------------


class _WriteError(Exception):
    """Wraps an OSError from the local file, so it is never mistaken for a network error and retried."""

    def __init__(self, error: OSError):
        super().__init__(error)
        self.error = error


def _write_chunk(file: IO[bytes], data: bytes) -> None:
    # A seam of its own so tests can simulate a full disk without filling one.
    file.write(data)


def _hash_into(digest: Any, path: Path, block: int = 1 << 20) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


class _OriginAuthRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects, keeping the Authorization header only while the origin stays the same.

    urllib copies ordinary headers to the redirected request, which would hand the token to a CDN (whose signed URL
    then rejects a second auth scheme) or to any host a mirror redirects to. So the token is an "unredirected" header,
    and this handler re-adds it for same-origin hops such as Hugging Face's redirect of a renamed repository.
    """

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new is not None and auth and _origin(new.full_url) == _origin(req.full_url):
            new.add_unredirected_header("Authorization", auth)
        return new


def _default_opener() -> urllib.request.OpenerDirector:
    # build_opener keeps urllib's defaults, ProxyHandler from the environment included, and swaps in our redirect rule.
    return urllib.request.build_opener(_OriginAuthRedirectHandler())


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in _RETRY_HTTP_CODES
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    # RemoteDisconnected is a ConnectionResetError; socket.timeout is TimeoutError. A refused connection or an unknown
    # host is not here on purpose: retrying those only delays the message that tells the user what to fix.
    return isinstance(
        exc,
        (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, TimeoutError, http.client.IncompleteRead,
         ssl.SSLEOFError),
    )


def _describe_network_error(exc: BaseException, url: str, token: str | None) -> str:
    host = urllib.parse.urlsplit(url).netloc
    if isinstance(exc, urllib.error.HTTPError):
        code = exc.code
        if code in (401, 403):
            if token:
                return (f"access refused (HTTP {code}) at {url}: the token was not accepted: check HF_TOKEN and "
                        "accept the model's licence on its page")
            return (f"access refused (HTTP {code}) at {url}: this file needs a Hugging Face token: set HF_TOKEN and "
                    "accept the model's licence on its page")
        if code == 404:
            return f"not found (HTTP 404) at {url}: check HF_ENDPOINT / the mirror"
        return f"HTTP {code} {exc.reason} from {url}"
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ssl.SSLCertVerificationError):
        return (f"cannot verify the HTTPS certificate of {host} ({reason.verify_message}): "
                "behind an intercepting proxy, point SSL_CERT_FILE at its CA bundle")
    if isinstance(reason, (socket.gaierror, ConnectionRefusedError)) or (
        isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
    ):
        return (f"cannot reach {host}: no network or a proxy is needed (set https_proxy), or use a mirror with "
                "HF_ENDPOINT")
    return f"cannot download from {host}: {reason}"


class _Job:
    """One download: the request/retry loop, with the running hash kept in step with the bytes in the .part file."""

    def __init__(self, url: str, part: Path, token: str | None, chunk_size: int, opener: Any, progress: bool,
                 label: str):
        self.url, self.part, self.token, self.opener = url, part, token, opener
        self.chunk_size = max(1, chunk_size)
        self.progress, self.label = progress, label
        self.digest: Any = None  # hash of exactly the first `hashed` bytes of the .part, or None if not known
        self.hashed = 0
        self.total: int | None = None
        self.bar: Any = None
        self.received = 0  # bytes received over all attempts: tells a retry that made progress from one that did not
        self.resumed = part.exists()  # the .part was left by an earlier run: its bytes were not checked by this one
        self.source = urllib.parse.urlsplit(url).netloc  # host that sent the last bytes (after redirects)
        self.content_type = ""  # the Content-Type of the last answer

    def run(self) -> str:
        failures = 0
        while True:
            have = self.part.stat().st_size if self.part.exists() else 0
            before = self.received
            try:
                done = self._attempt(have)
            except _WriteError as exc:
                raise DownloadError(self._describe_write_error(exc.error)) from exc.error
            except (OSError, http.client.HTTPException) as exc:  # URLError and HTTPError are OSErrors
                if isinstance(exc, urllib.error.HTTPError):
                    exc.close()
                if not _is_transient(exc):
                    raise DownloadError(_describe_network_error(exc, self.url, self.token)) from exc
                # A connection that delivered bytes is progress: a long download over a flaky link should not give
                # up after five cuts spread over hours, only after five in a row without a single new byte.
                failures = 1 if self.received > before else failures + 1
                if failures > MAX_RETRIES:
                    if isinstance(exc, urllib.error.HTTPError):
                        message = _describe_network_error(exc, self.url, self.token)
                    else:
                        message = f"connection to {urllib.parse.urlsplit(self.url).netloc} kept failing ({exc!r})"
                    raise DownloadError(
                        f"{message} after {MAX_RETRIES} retries; the partial download is kept, run again to resume"
                    ) from exc
                log.warning("download interrupted (%r); retrying (%d/%d)", exc, failures, MAX_RETRIES)
                time.sleep(RETRY_DELAY_S * failures)
                continue
            if done is not None:
                return done

    def _attempt(self, have: int) -> str | None:
        """One request; returns the hex digest once the .part is complete, or None to go round again."""
        request = urllib.request.Request(self.url, headers={"Accept-Encoding": "identity",
                                                            "User-Agent": "mist-protect"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        if self.token:
            request.add_unredirected_header("Authorization", f"Bearer {self.token}")
        try:
            response = self.opener.open(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:
                # Nothing left to send from our offset: the .part is already whole (a run that died before the rename)
                # or longer than the file. Its checksum decides, exactly as for a finished download.
                exc.close()
                return self._digest_of_part(have)
            raise
        with response:
            status = getattr(response, "status", None) or response.getcode()
            self.source = urllib.parse.urlsplit(response.geturl()).netloc or self.source
            self.content_type = response.headers.get("Content-Type", "") or ""
            length = _int_or_none(response.headers.get("Content-Length"))
            if status == 206 and have:
                match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                if match is None or int(match.group(1)) != have:
                    # A range we did not ask for cannot be appended safely; drop the .part and fetch it whole.
                    log.warning("server answered a different range than requested; restarting the download")
                    self._truncate()
                    return None
                self.total = None if match.group(3) == "*" else int(match.group(3))
                expected_body = int(match.group(2)) - have + 1
                self._ensure_prefix_hash(have)
                mode, start = "ab", have
            else:
                # 200 (fresh, or a server that ignores Range): whatever the .part held is replaced from byte 0.
                if have:
                    log.info("server does not support resuming; downloading %s from the start", self.label)
                self.total = length
                expected_body = length
                self.resumed = False  # every byte of the file now comes from this run
                self.digest, self.hashed = hashlib.sha256(), 0
                mode, start = "wb", 0
            self._show(start)
            received = self._stream(response, mode)
        # read(n) returns b"" on a connection closed early instead of raising, so check the count ourselves.
        if expected_body is not None and received < expected_body:
            raise http.client.IncompleteRead(b"", expected_body - received)
        return self.digest.hexdigest()

    def _stream(self, response: Any, mode: str) -> int:
        try:
            file = open(self.part, mode)
        except OSError as exc:
            raise _WriteError(exc) from exc
        received = 0
        try:
            while True:
                data = response.read(self.chunk_size)
                if not data:
                    break
                try:
                    _write_chunk(file, data)
                except OSError as exc:
                    raise _WriteError(exc) from exc
                # Hash what was written, so the digest always describes the .part's bytes, across retries too.
                self.digest.update(data)
                self.hashed += len(data)
                received += len(data)
                self.received += len(data)
                if self.bar is not None:
                    self.bar.update(len(data))
        finally:
            try:
                # Flush to disk before the hash is trusted and the file renamed: a full disk often shows up only here.
                file.flush()
                os.fsync(file.fileno())
                file.close()
            except OSError as exc:
                with contextlib.suppress(OSError):  # the flush failed; closing retries it and would fail the same way
                    file.close()
                raise _WriteError(exc) from exc
        return received

    def _ensure_prefix_hash(self, have: int) -> None:
        # Within one call the running hash already covers the prefix; from an earlier run it must be read back once.
        if self.digest is None or self.hashed != have:
            self.digest = hashlib.sha256()
            _hash_into(self.digest, self.part)
            self.hashed = have

    def _digest_of_part(self, have: int) -> str:
        self._ensure_prefix_hash(have)
        return self.digest.hexdigest()

    def _truncate(self) -> None:
        self.part.unlink(missing_ok=True)
        self.digest, self.hashed = None, 0

    def _show(self, start: int) -> None:
        if not self.progress:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=self.label, dynamic_ncols=True)
        else:
            # A retry or a restart moves the bar to the .part's size without counting the jump as transfer speed.
            self.bar.total = self.total
            self.bar.n = self.bar.last_print_n = start
            self.bar.refresh()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def describe_mismatch(self, got: str, expected: str) -> str:
        """Why the finished .part does not have the expected checksum, and what to do: never "run again" when a new
        download would only bring the same wrong bytes (a 4 GB loop on a metered server)."""
        size = self.part.stat().st_size if self.part.exists() else 0
        kind = self.content_type.split(";")[0].strip() or "no content type"
        sent = f"{self.source} sent {_size_text(size)} ({kind})"
        if self.resumed:
            return (f"checksum mismatch: got {got}, expected {expected}; the download continued a partial file left "
                    "by an earlier run, which may be what was wrong: it was removed, run again once to download the "
                    "whole file (if that fails the same way, the source serves another file)")
        if kind.startswith("text/") or kind in ("application/json", "application/xml") or size < _SMALLEST_MODEL:
            return (f"checksum mismatch: {sent}, not a model: an error or login page{self._text_start()} (SHA-256 "
                    f"{got}). Nothing was kept. Check HF_ENDPOINT or the proxy; a gated file needs HF_TOKEN set and "
                    "its licence accepted. Running again unchanged will get the same answer")
        return (f"checksum mismatch: {sent} whose SHA-256 is {got}, not the expected {expected}: it serves a "
                "different file. Nothing was kept; downloading again from the same place would bring the same bytes. "
                "Use another source (HF_ENDPOINT), or if this is the checkpoint you want, give its published checksum "
                "with --sha256")

    def _text_start(self) -> str:
        try:
            with open(self.part, "rb") as handle:
                head = handle.read(200).decode("utf-8", errors="replace")
        except OSError:
            return ""
        words = " ".join(head.split())
        return f' starting "{words[:80]}"' if words.isprintable() and words else ""

    def _describe_write_error(self, error: OSError) -> str:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            have = self.part.stat().st_size if self.part.exists() else 0
            if self.total is not None:
                # Round up to a tenth of a GB so the advice is never "free 0.0 GB".
                need = max(math.ceil((self.total - have) / 1e8) / 10, 0.1)
                amount = f"free {need:.1f} GB"
            else:
                amount = "free some space"
            return (f"disk full while writing {self.part}: {amount} and run again; the partial download is kept and "
                    "will resume")
        return f"cannot write {self.part}: {error.strerror or error}"


_SMALLEST_MODEL = 1 << 20  # any Stable Diffusion checkpoint is gigabytes; a file under 1 MiB is a message, not one


def _size_text(size: int) -> str:
    return f"{size} bytes" if size < 1 << 20 else f"{size / 1e9:.2f} GB" if size >= 10**9 else f"{size / 1e6:.1f} MB"


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None

"""Bounded, verified, resumable file downloads into pacore's data cache.

A download streams into ``<file>.part`` beside its cache path and is renamed
into place only when complete and verified, so a file in the cache is always
whole. A broken connection (or Ctrl-C) keeps the ``.part`` bytes and the next
attempt asks for the rest; every other failure removes them. Every download
is bounded: a size cap (checked against ``Content-Length`` first, then counted
while streaming), connect and read timeouts, and a limited number of
redirects.

Checksums: a caller may pin a sha256. Without one, the digest of the first
download is recorded in ``manifest.json`` in the cache directory and every
later use of the cached file (or a fresh download with ``force``) must match
it: trust on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import fcntl
except ImportError:  # not on Windows: downloads there are not locked against each other
    fcntl = None  # type: ignore[assignment]

from pacore import __version__
from pacore.errors import DownloadError, UsageError
from pacore.files import write_atomic

# httpx is imported where a file is downloaded: `pacore data list` reads the catalogue without it.
if TYPE_CHECKING:
    import httpx

_CHUNK = 1 << 16

#: A progress display for one download, passed in by a front door (the CLI passes rich's bar):
#: ``bar(label, total_bytes, bytes_already_held)`` is a context manager yielding ``advance(n_bytes)``;
#: ``total_bytes`` is ``None`` when the server does not say.
DownloadBar = Callable[[str, int | None, int], contextlib.AbstractContextManager[Callable[[int], None]]]


def data_cache_dir() -> Path:
    """Where downloaded data set files are kept (``PACORE_CACHE_DIR``/data, else ~/.cache/pacore/data)."""
    root = os.environ.get("PACORE_CACHE_DIR") or Path.home() / ".cache" / "pacore"
    return Path(root) / "data"


@dataclass(frozen=True)
class DownloadLimits:
    """Bounds on one download."""

    max_bytes: int = 1 << 30
    connect_timeout_s: float = 20.0
    #: Longest wait for the next chunk, not for the whole file.
    read_timeout_s: float = 60.0
    max_redirects: int = 5


@dataclass(frozen=True)
class Fetched:
    """A verified local copy of a remote file."""

    path: Path
    sha256: str
    size: int
    #: ``True`` when it was downloaded now, ``False`` when the cached copy was reused.
    downloaded: bool
    #: ``"pinned"`` (matched a given sha256), ``"recorded"`` (matched the manifest) or ``"first use"``.
    trust: str


def normalize_sha256(text: str) -> str:
    """A pinned checksum in canonical form; a :class:`UsageError` if it is not 64 hex digits."""
    value = text.strip().lower().removeprefix("sha256:")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise UsageError(f"a sha256 must be 64 hex digits, got {text!r}")
    return value


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Manifest:
    """``manifest.json``: the sha256 first seen for each source URL (trust on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise DownloadError(f"cannot read the checksum manifest {self.path}: {exc}") from None
        if not isinstance(data, dict):
            raise DownloadError(f"the checksum manifest {self.path} is not a JSON object")
        return data

    def recorded(self, url: str) -> str | None:
        entry = self._load().get(url)
        return entry.get("sha256") if isinstance(entry, dict) else None

    def record(self, url: str, sha256: str, size: int) -> None:
        data = self._load()
        data[url] = {"sha256": sha256, "bytes": size, "recorded": datetime.now(UTC).isoformat(timespec="seconds")}
        write_atomic(self.path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8"))


class _PartialDownload(DownloadError):
    """The transfer broke off; the bytes received so far stay in the ``.part`` file."""


def fetch(
    url: str,
    dest: Path,
    *,
    manifest: Manifest,
    manifest_key: str | None = None,
    sha256: str | None = None,
    force: bool = False,
    limits: DownloadLimits = DownloadLimits(),
    progress: DownloadBar | None = None,
) -> Fetched:
    """A verified copy of ``url`` at ``dest``, downloading it unless a good copy is cached.

    ``manifest_key`` names the file in the manifest (default ``url``; a mirror
    passes the public URL so that both share one recorded checksum). With
    ``sha256`` the file must match it and the manifest is updated to it;
    otherwise it must match the manifest's record, if there is one. ``force``
    downloads again from the start even when a cached copy verifies.
    ``progress`` opens a progress display for the transfer (default: none).

    The bytes go to ``dest`` + ``.part`` first. When the connection breaks
    (or on Ctrl-C) they are kept, and the next call asks the server for the
    rest (an HTTP range, with ``If-Range`` so a changed file starts over); any
    other failure removes them.

    Raises :class:`DownloadError` (unreachable, HTTP error, too large,
    checksum mismatch, another process downloading the same file) with a
    one-line message.
    """
    key = manifest_key or url
    expected = sha256 or manifest.recorded(key)
    trust = "pinned" if sha256 else "recorded" if expected else "first use"
    if dest.is_file() and not force:
        digest = file_sha256(dest)
        if expected is None or digest == expected:
            if expected is None or sha256:
                manifest.record(key, digest, dest.stat().st_size)
            return Fetched(dest, digest, dest.stat().st_size, downloaded=False, trust=trust)
        raise DownloadError(
            f"the cached copy {dest} has sha256 {digest[:16]}..., expected {expected[:16]}...; "
            "it was changed or corrupted: pass --force to download it again"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resume = dest.with_name(dest.name + ".part.json")
    with _locked(part, dest) as handle:
        keep = False
        try:
            if force:
                handle.truncate(0)
            try:
                digest, size = _download(url, handle, resume, limits, progress or _no_bar)
            except (_PartialDownload, KeyboardInterrupt):
                keep = True
                raise
            if expected is not None and digest != expected:
                where = "the pinned --sha256" if sha256 else f"the one recorded on first download ({manifest.path})"
                raise DownloadError(
                    f"checksum mismatch for {url}: got sha256 {digest}, expected {where} {expected}; "
                    "the file is not kept"
                )
            os.replace(part, dest)
        finally:
            if not keep or handle.seek(0, os.SEEK_END) == 0:
                part.unlink(missing_ok=True)
                resume.unlink(missing_ok=True)
    if expected is None or sha256:
        manifest.record(key, digest, size)
    return Fetched(dest, digest, size, downloaded=True, trust=trust)


@contextlib.contextmanager
def _locked(part: Path, dest: Path) -> Iterator[Any]:
    """``part`` opened for appending, locked so that two processes never write one file."""
    handle = part.open("a+b")
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DownloadError(f"another process is downloading {dest} now; try again when it is done") from None
        yield handle
    finally:
        handle.close()


def _download(url: str, handle: Any, resume: Path, limits: DownloadLimits, bar: DownloadBar) -> tuple[str, int]:
    """Fill ``handle`` (append mode) with ``url``'s bytes, resuming what it holds when the server allows."""
    import httpx

    offset = handle.seek(0, os.SEEK_END)
    state = _read_resume_state(resume)
    if offset and state.get("url") != url:
        handle.truncate(0)  # bytes of another URL (a mirror shares the cache path): start over
        offset = 0
    timeout = httpx.Timeout(limits.read_timeout_s, connect=limits.connect_timeout_s)
    # identity: the bytes hashed, capped and resumed are the file's own, never a compressed form of them.
    headers = {"User-Agent": f"pacore/{__version__}", "Accept-Encoding": "identity"}
    try:
        with httpx.Client(
            timeout=timeout, follow_redirects=True, max_redirects=limits.max_redirects, headers=headers
        ) as client:
            for _attempt in range(2):  # a refused range is retried once from the start
                ranged = {}
                if offset:
                    ranged["Range"] = f"bytes={offset}-"
                    if state.get("validator"):
                        ranged["If-Range"] = state["validator"]
                with client.stream("GET", url, headers=ranged) as response:
                    if offset and not _resumes_at(response, offset):
                        handle.truncate(0)  # the file changed or ranges are not served: start over
                        offset = 0
                        if response.status_code in (206, 416):
                            continue  # an unusable range answer: ask again for the whole file
                    _check_status(url, response)
                    if not offset:
                        _write_resume_state(resume, url, response)
                    return _receive(url, response, handle, offset, limits, bar)
            raise DownloadError(f"{url}: the server answered the range requests with the wrong bytes")
    except httpx.TooManyRedirects:
        raise DownloadError(f"{url}: more than {limits.max_redirects} redirects") from None
    except httpx.InvalidURL as exc:
        raise UsageError(f"not a valid URL: {url} ({exc})") from None
    except httpx.UnsupportedProtocol:
        raise UsageError(f"not an http(s) URL: {url}") from None
    except httpx.TransportError as exc:
        if isinstance(exc, httpx.ConnectError):
            message = f"cannot connect to {_host(url)}: {_reason(exc)}"
        elif isinstance(exc, httpx.TimeoutException):
            message = f"{url}: timed out ({type(exc).__name__})"
        else:
            message = f"{url}: the connection broke off: {_reason(exc)}"
        handle.flush()
        kept = handle.seek(0, os.SEEK_END)
        if kept:
            message += f"; {format_size(kept)} kept: run the same command again to resume"
        raise _PartialDownload(message) from None
    except httpx.HTTPError as exc:
        raise DownloadError(f"{url}: download failed: {_reason(exc)}") from None


def _receive(
    url: str, response: httpx.Response, handle: Any, offset: int, limits: DownloadLimits, bar: DownloadBar
) -> tuple[str, int]:
    """Append the response body to the ``offset`` bytes ``handle`` holds; the sha256 and size of the whole."""
    remaining = _declared_length(response)
    total = None if remaining is None else offset + remaining
    if total is not None and total > limits.max_bytes:
        raise DownloadError(
            f"{url} is {format_size(total)}, over the {format_size(limits.max_bytes)} download limit "
            "(raise it with --max-mb)"
        )
    digest = _hash_prefix(handle, offset)
    size = offset
    with bar(url.rsplit("/", 1)[-1][:40], total, offset) as advance:
        for chunk in response.iter_bytes():  # as received, so a broken transfer keeps all it got
            size += len(chunk)
            if size > limits.max_bytes:
                raise DownloadError(
                    f"{url} sent more than the {format_size(limits.max_bytes)} download limit "
                    "(raise it with --max-mb); stopped"
                )
            digest.update(chunk)
            handle.write(chunk)
            advance(len(chunk))
    handle.flush()
    return digest.hexdigest(), size


def _resumes_at(response: httpx.Response, offset: int) -> bool:
    """Whether the server answered the range request with the bytes from ``offset`` on."""
    if response.status_code != 206:
        return False
    content_range = response.headers.get("content-range", "")
    return content_range.startswith(f"bytes {offset}-")


def _hash_prefix(handle: Any, length: int) -> Any:
    digest = hashlib.sha256()
    handle.seek(0)
    left = length
    while left and (chunk := handle.read(min(_CHUNK, left))):
        digest.update(chunk)
        left -= len(chunk)
    return digest


def _read_resume_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_resume_state(path: Path, url: str, response: httpx.Response) -> None:
    # If-Range takes a strong ETag or a Last-Modified date; a weak ETag would never match.
    etag = response.headers.get("etag", "")
    validator = etag if etag and not etag.startswith("W/") else response.headers.get("last-modified")
    write_atomic(path, json.dumps({"url": url, "validator": validator}).encode("utf-8"))


def _check_status(url: str, response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    if status in (401, 403):
        hint = "access denied; the data set may be gated: download it yourself and pass --from FILE"
    elif status == 404:
        hint = "not found"
    else:
        hint = response.reason_phrase or "error"
    raise DownloadError(f"{url}: HTTP {status} ({hint})")


def _declared_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None or "content-encoding" in response.headers:
        return None  # compressed: the header counts encoded bytes, not the file's
    try:
        return int(value)
    except ValueError:
        return None


@contextlib.contextmanager
def _no_bar(_label: str, _total: int | None, _done: int) -> Iterator[Callable[[int], None]]:
    yield lambda _n: None


def _host(url: str) -> str:
    import httpx

    try:
        return httpx.URL(url).host or url
    except httpx.InvalidURL:
        return url


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def format_size(size: int) -> str:
    """``"532 bytes"``, ``"4.1 kB"``, ``"12.3 MB"``."""
    if size < 1000:
        return f"{size} bytes"
    return f"{size / 1e3:.1f} kB" if size < 1_000_000 else f"{size / 1e6:.1f} MB"

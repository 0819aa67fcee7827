"""Bounded, verified file downloads into pacore's data cache.

A download streams into a temporary file beside its cache path and is renamed
into place only when complete and verified, so an interrupted or refused
download never leaves a file that looks finished. Every download is bounded:
a size cap (checked against ``Content-Length`` first, then counted while
streaming), connect and read timeouts, and a limited number of redirects.

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
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from pacore import __version__
from pacore.errors import DownloadError, UsageError

_CHUNK = 1 << 16


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
        write_atomically(self.path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def write_atomically(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_beside(path) as (temp, handle):
        handle.write(content)
        handle.close()
        os.replace(temp, path)


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[tuple[Path, Any]]:
    """A temporary file in ``path``'s directory, removed unless it was renamed away."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    temp = Path(name)
    handle = os.fdopen(fd, "wb")
    try:
        yield temp, handle
    finally:
        handle.close()
        temp.unlink(missing_ok=True)


def fetch(
    url: str,
    dest: Path,
    *,
    manifest: Manifest,
    manifest_key: str | None = None,
    sha256: str | None = None,
    force: bool = False,
    limits: DownloadLimits = DownloadLimits(),
    progress: bool | None = None,
) -> Fetched:
    """A verified copy of ``url`` at ``dest``, downloading it unless a good copy is cached.

    ``manifest_key`` names the file in the manifest (default ``url``; a mirror
    passes the public URL so that both share one recorded checksum). With
    ``sha256`` the file must match it and the manifest is updated to it;
    otherwise it must match the manifest's record, if there is one. ``force``
    downloads again even when a cached copy verifies. ``progress`` draws a
    progress bar on stderr (default: when stderr is a terminal).

    Raises :class:`DownloadError` (unreachable, HTTP error, too large,
    checksum mismatch) with a one-line message.
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
    with _temporary_beside(dest) as (temp, handle):
        digest, size = _stream(url, handle, limits, sys.stderr.isatty() if progress is None else progress)
        handle.close()
        if expected is not None and digest != expected:
            where = "the pinned --sha256" if sha256 else f"the one recorded on first download ({manifest.path})"
            raise DownloadError(
                f"checksum mismatch for {url}: got sha256 {digest}, expected {where} {expected}; "
                "the file is not kept"
            )
        os.replace(temp, dest)
    if expected is None or sha256:
        manifest.record(key, digest, size)
    return Fetched(dest, digest, size, downloaded=True, trust=trust)


def _stream(url: str, out: Any, limits: DownloadLimits, show_progress: bool) -> tuple[str, int]:
    timeout = httpx.Timeout(limits.read_timeout_s, connect=limits.connect_timeout_s)
    headers = {"User-Agent": f"pacore/{__version__}"}
    digest = hashlib.sha256()
    size = 0
    try:
        with (
            httpx.Client(
                timeout=timeout, follow_redirects=True, max_redirects=limits.max_redirects, headers=headers
            ) as client,
            client.stream("GET", url) as response,
        ):
            _check_status(url, response)
            total = _declared_length(response)
            if total is not None and total > limits.max_bytes:
                raise DownloadError(
                    f"{url} is {format_size(total)}, over the {format_size(limits.max_bytes)} download limit "
                    "(raise it with --max-mb)"
                )
            with _progress_bar(show_progress, url, total) as advance:
                for chunk in response.iter_bytes(_CHUNK):
                    size += len(chunk)
                    if size > limits.max_bytes:
                        raise DownloadError(
                            f"{url} sent more than the {format_size(limits.max_bytes)} download limit "
                            "(raise it with --max-mb); stopped"
                        )
                    digest.update(chunk)
                    out.write(chunk)
                    advance(len(chunk))
    except httpx.TooManyRedirects:
        raise DownloadError(f"{url}: more than {limits.max_redirects} redirects") from None
    except httpx.TimeoutException as exc:
        raise DownloadError(f"{url}: timed out ({type(exc).__name__})") from None
    except httpx.ConnectError as exc:
        raise DownloadError(f"cannot connect to {_host(url)}: {_reason(exc)}") from None
    except httpx.InvalidURL as exc:
        raise UsageError(f"not a valid URL: {url} ({exc})") from None
    except httpx.UnsupportedProtocol:
        raise UsageError(f"not an http(s) URL: {url}") from None
    except httpx.HTTPError as exc:
        raise DownloadError(f"{url}: download failed: {_reason(exc)}") from None
    return digest.hexdigest(), size


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
def _progress_bar(show: bool, url: str, total: int | None) -> Iterator[Any]:
    if not show:
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(url.rsplit("/", 1)[-1][:40], total=total)
        yield lambda n: bar.advance(task, n)


def _host(url: str) -> str:
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

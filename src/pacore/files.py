"""Files pacore reads and writes: bounded reads, atomic writes, no output over an input.

Every command that reads a file given by the user reads it through
:func:`read_input` (a size limit, no devices, no directories), and every
command that writes a file writes it through :func:`atomic_output` (a
temporary file in the same directory, flushed to disk, then renamed over the
target: a reader never sees half a file, a crash never leaves one) after
:func:`refuse_overwriting` has checked that the target is none of its inputs.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pacore.errors import InputError, OutputError, PacoreError, UsageError

MIB = 1024 * 1024
_CHUNK = MIB


def size_text(limit: int) -> str:
    return f"{limit / MIB:g} MiB" if limit >= MIB else f"{limit} bytes"


def read_input(path: str | Path, *, limit: int, what: str, error: type[UsageError] = InputError) -> bytes:
    """The bytes of a regular file or a pipe, refused with one line past ``limit`` bytes.

    Directories and devices (``/dev/zero`` would never end) are refused before
    any reading; a regular file is refused by its size before it is read; a
    pipe is read up to ``limit`` bytes and refused if it holds more. A FIFO
    nobody writes to reads as empty instead of blocking. ``error`` is the
    class of the one-line error raised, ``what`` names the file in it.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise error(f"cannot read {what} {path}: it is a directory")
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
            raise error(f"cannot read {what} {path}: not a regular file or a pipe")
        if stat.S_ISREG(info.st_mode) and info.st_size > limit:
            raise error(f"{what} {path} is larger than the {size_text(limit)} limit")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, _CHUNK):
            size += len(chunk)
            if size > limit:
                raise error(f"{what} {path} is larger than the {size_text(limit)} limit")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def read_stream(stream: IO[bytes] | None, *, limit: int, what: str) -> bytes:
    """Up to ``limit`` bytes of an open binary stream (stdin), refused past it or when closed."""
    if stream is None:
        raise InputError(f"cannot read {what}: it is closed")
    try:
        data = stream.read(limit + 1)
    except (OSError, ValueError) as exc:  # ValueError: a closed file object
        raise InputError(f"cannot read {what}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(data) > limit:
        raise InputError(f"{what} holds more than the {size_text(limit)} limit")
    return data


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: same path once resolved, a symlink to it, or a hard link."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwriting(out: Path, inputs: Mapping[Path, str]) -> None:
    """Refuse to write ``out`` if it is one of ``inputs`` (path -> what that file is)."""
    for path, description in inputs.items():
        if same_file(out, path):
            raise OutputError(f"refusing to write {out}: it is {description}; choose another output path")


def output_path(text: str) -> Path:
    """An ``--out`` value as a path; an empty one is a mistake, not the current directory."""
    if not text.strip():
        raise OutputError("the path is empty; give a file or directory path")
    if "\0" in text:
        raise OutputError("the path holds a NUL character")
    return Path(text)


def _temporary_beside(path: Path) -> tuple[int, str]:
    """A new file next to ``path``, with ``path``'s mode if it exists, else what ``open(path, "w")`` gives."""
    try:
        existing: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        existing = None
    for _ in range(100):
        name = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.partial")
        try:
            # 0o666 less the umask, applied by the kernel (mkstemp would give 0600).
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        if existing is not None:
            os.fchmod(fd, existing)  # a replaced file keeps its mode, whatever the umask
        return fd, name
    raise FileExistsError(f"no free temporary name beside {path}")


@contextmanager
def atomic_output(path: Path, mode: str = "w", *, check: Callable[[Path], object] | None = None) -> Iterator[IO[Any]]:
    """Write ``path`` all at once: a temporary file beside it, synced, then renamed over it.

    If the block (or ``check``, given the complete temporary file before the
    rename) raises, ``path`` is left as it was and the temporary file is
    removed. A device or a pipe is written in place (there is nothing to replace).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file path")
    if path.exists() and not path.is_file():
        # A device or a pipe (/dev/null, /dev/stdout, a FIFO): written in place, never
        # replaced by a regular file (as root, a rename would replace /dev/null itself).
        with _open_for_writing(path, mode) as file:
            yield file
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = _temporary_beside(path)
    except OSError as exc:
        raise PacoreError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        if check is not None:
            check(Path(temporary))
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise PacoreError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


@contextmanager
def _open_for_writing(path: Path, mode: str) -> Iterator[IO[Any]]:
    try:
        file = open(path, mode, encoding=None if "b" in mode else "utf-8")  # noqa: SIM115
    except OSError as exc:
        raise PacoreError(f"cannot write {path}: {exc.strerror or exc}") from None
    with file:
        yield file


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path, "wb") as file:
        file.write(data.encode("utf-8") if isinstance(data, str) else data)


def _sync_directory(directory: Path) -> None:
    # The rename itself survives a power loss only once the directory is synced.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Writing a store safely: one writer at a time, and a full or read-only disk in one line.

`exclusive(lock_path, ...)` holds an exclusive `flock` on a small lock file for as long as a
convert (lock beside the target: PARENT/.NAME.lock) or a calibrate (lock inside the store)
writes. The kernel drops the lock when its holder exits, however it exits (kill -9
included), so a lock file left behind by a killed process is harmless: the next writer
takes it at once. A second writer of the same target fails at once with `StoreBusyError`,
naming the holder's pid (written into the lock file). On release the holder removes the
lock file; a writer that locked a file just removed takes the lock again on the new one
(the lock counts only while its file is still the one at `lock_path`).

`write_error(exc, ...)` turns the OSErrors of a disk that is full (ENOSPC, EDQUOT) or a
folder that is unwritable (EACCES, EPERM, EROFS) into a one-line `StoreWriteError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import FlashInferError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, no exclusion
    fcntl = None

FULL = (errno.ENOSPC, errno.EDQUOT)
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class StoreBusyError(FlashInferError):
    """Another process is writing the same store (a convert or a calibrate)."""


class StoreWriteError(FlashInferError):
    """A store could not be written: the disk is full, or the folder is not writable."""


def _holder(fd: int) -> str:
    """The pid the lock's holder wrote into the lock file ("unknown" before it has)."""
    with contextlib.suppress(OSError):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return text
    return "unknown"


def _lock(lock_path: Path, doing: str) -> int | None:
    """Lock `lock_path` (created if missing); its fd. StoreBusyError if another holds it."""
    if fcntl is None:  # pragma: no cover
        return None
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise StoreBusyError(f"another run-model process (pid {pid}) is {doing}; wait "
                                 "for it to finish, or stop it") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            with contextlib.suppress(OSError):  # no locks on this file system: write
                os.unlink(lock_path)             # unguarded, as before locks were taken
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            now = os.stat(lock_path)
        except FileNotFoundError:
            now = None
        held = os.fstat(fd)
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # its holder removed the file before we locked it: lock the new one
    with contextlib.suppress(OSError):  # informative only (a full disk may refuse it)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def exclusive(lock_path: Path, doing: str, target: Path) -> Iterator[None]:
    """Hold the lock at `lock_path` for the block. `doing` completes "another process is
    ..." (e.g. "converting into out/x"); `target` names what could not be written when the
    lock file cannot be created."""
    try:
        fd = _lock(lock_path, doing)
    except OSError as exc:
        error = write_error(exc, target, lock_path.parent)
        if error is None:
            raise
        raise error from None
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock_path)  # while still held: see the module's notes
            os.close(fd)


def _inside(name, folder: Path) -> bool:
    try:
        return Path(os.path.abspath(name)).is_relative_to(os.path.abspath(folder))
    except (TypeError, ValueError):
        return False


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system of `folder` (or of its nearest existing parent)."""
    folder = Path(os.path.abspath(folder))
    for candidate in (folder, *folder.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return None


def _mb(nbytes: int) -> str:
    digits = 2 if nbytes < 1e6 else 1 if nbytes < 10e6 else 0
    return f"{nbytes / 1e6:.{digits}f} MB"


def write_error(exc: OSError, target: Path, folder: Path, needed: int | None = None
                ) -> StoreWriteError | None:
    """A one-line error for `exc`, raised while writing `target` into `folder`, when it
    means a full disk or an unwritable folder; None for any other OSError (a permission
    error on a file outside `folder` is the source's, not the target's). `needed`: about
    how many bytes the whole write takes."""
    if exc.errno in FULL:
        what = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on device"
        free = free_bytes(folder)
        room = [f"about {_mb(needed)} needed"] if needed and (free is None or
                                                             needed > free) else []
        room += [f"{_mb(free)} free"] if free is not None else []
        return StoreWriteError(f"{what} writing {target}" +
                               (f": {', '.join(room)}" if room else ""))
    if exc.errno in UNWRITABLE and (exc.filename is None or _inside(exc.filename, folder)):
        reason = "read-only file system" if exc.errno == errno.EROFS else "permission denied"
        where = "" if os.path.abspath(folder) == os.path.abspath(target) else f" ({folder})"
        return StoreWriteError(f"cannot write {target}: {reason}{where}")
    return None

"""Atomic file writes: an interrupted stage never leaves a half file that looks finished.

A file (or folder) is written under :func:`temporary_name` and renamed into place; a lock file is
named ``.NAME.lock``. A process killed mid-write leaves its temporary (and its lock file) behind:
:func:`remove_stale_temporaries` removes those whose writer is gone, so a rerun ends with exactly
the files an uninterrupted run holds.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from synthdistill.errors import SynthdistillError

TEMPORARY_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)$")
"""What :func:`temporary_name` writes: ``.NAME.tmp-HOST-PID``."""

LOCK_PATTERN = re.compile(r"^\..+\.lock$")
"""The name of a lock file held with :func:`exclusive_lock`: ``.NAME.lock``."""

FOREIGN_TEMPORARY_AGE_S = 24 * 3600
"""A temporary of another host is removed only when nothing in it changed for this long: its writer's
liveness cannot be checked from here, and no write of this project stays silent for a day."""

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def temporary_name(path: Path) -> Path:
    """The hidden sibling a file is written to before it is renamed into place.

    Host and process id both: job-array tasks on different nodes may share a folder and a pid.
    """
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def disk_full_error(folder: str | Path) -> SynthdistillError:
    """The one sentence for a write that ran out of disk space (or quota) in ``folder``."""
    return SynthdistillError(
        f"The disk is full: there is no space left to write in '{folder}'; free some space there "
        "(or choose another output folder) and run the command again."
    )


@contextmanager
def disk_full_is_an_error(folder: str | Path) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT raised inside the block into :func:`disk_full_error` for ``folder``."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(folder) from None
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to (a file or a folder); rename it to ``path`` only if the
    block succeeds. On any failure the temporary is removed; a full disk becomes one sentence."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with disk_full_is_an_error(path.parent):
            yield tmp
            os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def make_readable(paths: list[Path]) -> None:
    """Files 0644 and folders 0755, less the umask: readable like any file the user writes
    (safetensors' ``save_file`` creates its files 0600, whatever the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in map(Path, paths):
        for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
            os.chmod(item, (0o755 if item.is_dir() else 0o644) & ~umask)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for inner in path.rglob("*"):
            with suppress(FileNotFoundError):  # removed meanwhile
                newest = max(newest, inner.lstat().st_mtime)
    return newest


def is_stale_temporary(path: Path, now: float | None = None) -> bool:
    """Whether ``path`` is a temporary of this project whose writer is gone: same host and its
    process no longer exists, or another host and untouched for :data:`FOREIGN_TEMPORARY_AGE_S`."""
    match = TEMPORARY_PATTERN.match(path.name)
    if match is None:
        return False
    if match["host"] == socket.gethostname():
        return not _process_alive(int(match["pid"]))
    now = time.time() if now is None else now
    try:
        return now - _newest_mtime(path) > FOREIGN_TEMPORARY_AGE_S
    except FileNotFoundError:
        return False


def _remove_if_unheld(lock: Path) -> bool:
    """Remove a lock file that no process holds (its holder was killed); keep a held one."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            same_file = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            lock.unlink(missing_ok=True)
        return same_file
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Remove, in ``folder`` (and its subfolders unless ``recursive=False``, for a file's folder that
    is not the stage's own), the temporaries and lock files that killed writers left behind; returns
    what was removed. Temporaries of a live writer are left alone, so this is safe to call while
    other processes write into the same folder. A missing folder is fine."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for root, dirs, files in os.walk(folder):
        if not recursive and Path(root) != folder:
            break
        here = Path(root)
        for name in list(dirs):
            if is_stale_temporary(here / name):
                _remove(here / name)
                removed.append(here / name)
            if TEMPORARY_PATTERN.match(name):
                dirs.remove(name)  # never descend into a temporary folder, stale or in use
        for name in files:
            path = here / name
            if is_stale_temporary(path):
                _remove(path)
                removed.append(path)
            elif LOCK_PATTERN.match(name) and _remove_if_unheld(path):
                removed.append(path)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextmanager
def exclusive_lock(path: str | Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the advisory lock file ``path`` (named ``.NAME.lock``) so that two processes never write
    the same output.

    ``wait=False`` refuses at once with one sentence when another process holds it; ``wait=True``
    blocks until it is free. The lock file is removed on release (the inode check makes that safe
    against a process that opened the old file meanwhile), so a finished run leaves none behind;
    a killed holder's lock is released by the kernel, and :func:`remove_stale_temporaries` removes
    its file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise SynthdistillError(
                f"Another process is writing {what} in {path.parent}; wait for it to finish (or stop it) "
                "and run the command again."
            ) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the holder before us removed this file: lock the new one
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)

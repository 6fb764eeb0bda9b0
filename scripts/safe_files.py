"""Nothing replaced unasked, nothing left half-written, no two runs in one folder: the one overwrite guard, the one
atomic write and the one folder lock of every CLI and config of the bundle."""

from __future__ import annotations

import os
import sys
import time

from filelock import FileLock, Timeout
from scripts.flags import as_bool

__all__ = ["hold_folder", "rank", "refuse_existing", "release_folder", "require_held", "write_atomically"]

LOCK = ".in_use"  # the lock file of a folder a run writes into: the process id and command line of its holder


def refuse_existing(paths, overwrite=False) -> None:
    """Raise ``FileExistsError`` naming the first of ``paths`` that exists (for a folder: its first entry; an empty
    folder does not count), unless ``overwrite``. Called before any work, so that nothing is replaced by surprise.

    Args:
        paths: the files and folders a run would write.
        overwrite: the run may replace them (a bool, or true/false as typed on the command line).
    """
    if as_bool(overwrite, "overwrite"):
        return
    for path in paths:
        if os.path.isdir(path):
            entries = sorted(os.listdir(path))
            existing = os.path.join(path, entries[0]) if entries else None
        else:
            existing = path if os.path.lexists(path) else None
        if existing:
            raise FileExistsError(f"{existing} exists; pass --overwrite true to replace it, or choose another output")


def write_atomically(path: str, write) -> None:
    """Write ``path`` through ``write(file)`` into a hidden temporary file beside it, flushed to disk, then renamed
    over ``path`` (an atomic step on one file system); the temporary file is removed if ``write`` fails.

    Args:
        path: the file to create or replace.
        write: called with the temporary file, opened for binary writing.
    """
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f".{name}.partial")
    try:
        with open(partial, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash of the machine, not only of the process
    finally:
        os.close(directory)


def rank() -> int:
    """This process's rank among the processes of one ``torchrun`` (the ``RANK`` it sets), 0 outside one. The one
    reading of the rank in the bundle: it holds before the process group is set up, when a run checks its folders."""
    return int(os.environ.get("RANK", "0"))


def _name_holder(fd: int) -> None:
    """Write this process's id and command line into the lock file it has just locked, for another run's message."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()}: {' '.join(sys.argv)[:200]}".encode(), 0)


def _holder(path: str) -> str:
    """The process named in the lock file ``path`` (it may be a moment before a new holder has written it)."""
    for _ in range(20):
        with open(path, errors="replace") as f:
            text = f.read().strip()
        if text:
            return text
        time.sleep(0.05)
    return "process unknown"


def _lock(folder: str) -> FileLock:
    """This process's one lock object of ``folder`` (``filelock``'s singleton for its lock file)."""
    return FileLock(os.path.join(os.path.abspath(folder), LOCK), is_singleton=True, on_acquired=_name_holder)


def hold_folder(folder: str) -> FileLock:
    """Make this process the one run that writes into ``folder``: ``filelock``'s lock on ``folder/.in_use``, an OS
    lock that the system frees when the process ends, however it ends (kill -9 included). The lock file names the
    process for another run's message; it stays when the lock is freed. In one process the lock of a folder is one
    object (held again by a later run of the same Python session). Under ``torchrun`` only rank 0 takes it (the ranks
    of one run write together): other ranks get the lock unheld.

    Args:
        folder: the output folder (created if absent).

    Returns:
        The held lock: keep it for the whole run (the run's config holds it as an id) and release it at the end
        (``release_folder``); it is also freed when its last reference goes.

    Raises:
        FileExistsError: another process that is still running holds ``folder``.
    """
    lock = _lock(folder)
    if rank() != 0:
        return lock
    os.makedirs(os.path.abspath(folder), exist_ok=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FileExistsError(
            f"{os.path.abspath(folder)} is in use by another run ({_holder(lock.lock_file)}); wait for it to finish"
            " or stop it, or choose another output folder"
        ) from None
    return lock


def release_folder(folder: str) -> None:
    """Release this process's hold on ``folder`` (``hold_folder``), if it has one: the last step of a run (its
    config's ``finalize``), which takes no lock of its own when the run stopped before it held the folder."""
    _lock(folder).release()


def require_held(folder: str, lock) -> None:
    """Raise ``ValueError`` unless ``lock`` is this process's held ``hold_folder`` lock of ``folder`` (on rank 0: the
    other ranks of a ``torchrun`` hold none): a run checks and clears its folder only while holding it."""
    held = lock is not None and lock.is_locked and lock.lock_file == os.path.join(os.path.abspath(folder), LOCK)
    if rank() == 0 and not held:
        raise ValueError(f"{folder}: hold it first (scripts.safe_files.hold_folder), for the whole run")

"""Nothing replaced unasked, nothing left half-written, no two runs in one folder: the one overwrite guard, the one
atomic write and the one folder lock of every CLI and config of the bundle."""

from __future__ import annotations

import atexit
import os
import sys

from scripts.flags import as_bool

__all__ = ["hold_folder", "refuse_existing", "write_atomically"]

LOCK = ".in_use"  # the lock file of a folder a run writes into: the process id and command line of that run
_held = set()


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


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _command_line_run() -> bool:
    """Whether this process is a command-line run of the bundle (``python -m monai.bundle ...`` or
    ``python -m scripts.tools.<tool>``), which exits when its run ends, rather than a Python session that builds
    runs."""
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    tool = os.path.dirname(script).endswith(os.path.join("scripts", "tools"))
    return tool or script.endswith(os.path.join("monai", "bundle", "__main__.py"))


def hold_folder(folder: str) -> None:
    """Make this process the one run that writes into ``folder`` until it exits: a lock file there names its
    process. Another live process's lock is refused, naming it; the lock of a process that is gone (killed) is taken
    over. Under ``torchrun`` only rank 0 takes it (the ranks of one run write together). A process may hold several
    folders, and the same one again. A Python session that builds runs itself (``ConfigWorkflow``, a notebook, the
    tests) is checked against other runs' locks but takes none: it outlives its runs, and its lock would bar the
    folder to every later command.

    Args:
        folder: the output folder (created if absent).

    Raises:
        FileExistsError: another process that is still running writes into ``folder``.
    """
    folder = os.path.abspath(folder)
    if folder in _held or int(os.environ.get("RANK", "0")) != 0:
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK)
    mine = f"{os.getpid()}\n{' '.join(sys.argv)}\n"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid, _, command = f.read().partition("\n")
                pid = int(pid)
            except (OSError, ValueError):  # removed meanwhile, or half-written by a process killed at that moment
                pid, command = None, ""
            if pid is not None and pid != os.getpid() and _running(pid):
                raise FileExistsError(
                    f"{folder} is in use by another run (process {pid}: {command.strip()[:200]}); wait for it to"
                    f" finish or stop it, or choose another output folder"
                ) from None
            try:
                os.remove(path)  # the run that held it is gone
            except FileNotFoundError:
                pass
            continue
        if not _command_line_run():
            os.close(fd)
            os.remove(path)
            return
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        _held.add(folder)
        atexit.register(_release, path, mine)
        return
    raise FileExistsError(f"{folder}: could not take its lock {path}")


def _release(path, mine):
    try:
        with open(path) as f:
            if f.read() == mine:
                os.remove(path)
    except OSError:
        pass

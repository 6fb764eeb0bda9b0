"""Nothing replaced unasked, nothing left half-written: the one overwrite guard and the one atomic write of every
CLI and config of the bundle."""

from __future__ import annotations

import os

from scripts.flags import as_bool

__all__ = ["refuse_existing", "write_atomically"]


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

"""Writing files so that a kill at any moment leaves either the previous file or the new one, never a part."""

from __future__ import annotations

import os

__all__ = ["write_atomically"]


def write_atomically(path: str, write) -> None:
    """Write ``path`` through ``write(file)`` into a hidden temporary file beside it, flushed to disk, then renamed
    over ``path`` (an atomic step on one file system); the temporary file is removed if ``write`` fails.

    Args:
        path: the file to create or replace.
        write: called with the temporary file, opened for binary writing.
    """
    folder, name = os.path.split(os.path.abspath(path))
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

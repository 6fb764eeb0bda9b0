"""A NIfTI reader that several threads can share, for ``LoadImaged`` under ``CacheDataset(num_workers > 1)``.

MONAI 1.6.1's ``NibabelReader.read()`` stores the file names of the call on the reader (``self.filenames``) and
``get_data()`` zips the loaded images with them. ``CacheDataset`` fills its cache from a thread pool that shares one
``LoadImaged``, so when another thread reads a case's one-file label between this thread's ``read()`` of the five
maps and its ``get_data()``, the five images are zipped with one name and the image comes back with one channel.
``LoadImage`` takes ``filename_or_obj`` from its own argument, not from the reader, so the race loses channels but
never renames a case.
"""

from __future__ import annotations

import threading

from monai.data import NibabelReader

__all__ = ["ThreadSafeNibabelReader"]


class ThreadSafeNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` with the file names of the current ``read()`` kept per thread.

    Same arguments and results as ``NibabelReader``; only where ``read()`` leaves the names for ``get_data()``
    changes, from the shared reader to the calling thread.
    """

    def __init__(self, *args, **kwargs):
        self._per_thread = threading.local()
        super().__init__(*args, **kwargs)

    @property
    def filenames(self):
        """The file names of this thread's latest ``read()``."""
        return self._per_thread.filenames

    @filenames.setter
    def filenames(self, names):
        self._per_thread.filenames = names

    def __getstate__(self):
        """Pickle (spawned DataLoader workers) and deepcopy without the thread-local store, which neither supports."""
        state = self.__dict__.copy()
        del state["_per_thread"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._per_thread = threading.local()

"""Where MONAI 1.6.1 falls short for this bundle, each gap worked around in one place, naming the MONAI code.

- The reader race: ``monai.data.NibabelReader.read()`` (monai/data/image_reader.py) stores the file names of the
  call on the reader (``self.filenames``) and ``get_data()`` zips the loaded images with them. ``CacheDataset`` fills
  its cache from a thread pool that shares one ``LoadImaged``, so when another thread reads a case's one-file label
  between this thread's ``read()`` of the five maps and its ``get_data()``, the five images are zipped with one name
  and the image comes back with one channel (seen on a 10-case tree with 4 workers). ``ThreadSafeNibabelReader``
  keeps the names per thread.
- Default readers built per instance: ``monai.transforms.LoadImage.__init__`` (monai/transforms/io/array.py) builds
  every default reader for each instance, and ``NvImgCodecPydicomReader`` warns on each build that nvImageCodec is not
  installed, even where the call passes its own reader. ``LoadImageWithGivenReader`` builds none.
- CPU autocast in the engines: ``monai.engines.SupervisedTrainer`` and ``SupervisedEvaluator``
  (monai/engines/trainer.py, evaluator.py) autocast with ``torch.autocast("cuda")`` under ``amp``, so on a CPU their
  ``amp`` does nothing but warn. ``engine_amp`` turns it on for CUDA only, and ``CpuAutocastInferer`` runs the
  network in bfloat16 on the CPU instead, inside the inferer the engines call.
- A deprecation MONAI raises at itself: ``monai.metrics.utils.get_edge_surface_distance`` calls ``get_mask_edges``
  with ``always_return_as_numpy``, which that function deprecates (a ``FutureWarning`` per call of
  ``compute_hausdorff_distance`` or ``compute_average_surface_distance``, whatever the caller passes):
  ``surface_distance_deprecation_ignored``.
- A notice about a case it does not apply to: ``monai.bundle.ConfigWorkflow.__init__`` (monai/bundle/workflows.py)
  logs "Not all config files are in <folder>. If logging_file and meta_file are not specified, <folder> will be
  used ..." for each config file outside the first one's folder, even when both files are given:
  ``config_root_notice_dropped``.

Handlers whose behaviour goes beyond a gap live with their concern: the atomic ``CheckpointSaver`` and the
validation after the last epoch in ``scripts.engine.checkpoints``, the non-finite guards in ``scripts.engine.finite`` (training)
and ``scripts.data.transforms.RequireFinited`` (inputs, predictions);
masks are written with nibabel because MONAI's NIfTI writer fails on one-slice and head-foot-first scans
(``scripts.report.cases``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings

import numpy as np
import torch
from monai.data import NibabelReader
from monai.inferers import Inferer
from monai.transforms import LoadImage
from scripts.flags import as_bool

__all__ = [
    "CpuAutocastInferer",
    "LoadImageWithGivenReader",
    "ThreadSafeNibabelReader",
    "config_root_notice_dropped",
    "engine_amp",
    "surface_distance_deprecation_ignored",
]


class ThreadSafeNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` with the file names of the current ``read()`` kept per thread (the reader race)."""

    def __init__(self, **kwargs):
        self._per_thread = threading.local()
        super().__init__(**kwargs)

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


class LoadImageWithGivenReader(LoadImage):
    """MONAI's ``LoadImage`` for calls that pass their reader (``LoadImage.__call__(filename, reader)``), built without
    the default readers. Its attributes are those ``LoadImage.__call__`` reads.

    Args:
        simple_keys: ``LoadImage``'s.
    """

    def __init__(self, simple_keys=False):  # noqa: D107 (not LoadImage's: it would build the default readers)
        attributes = dict(readers=[], auto_select=False, expanduser=False, dtype=np.float32, image_only=True)
        vars(self).update(attributes, ensure_channel_first=True, simple_keys=simple_keys, pattern=None, sep=".")


def engine_amp(amp, device) -> bool:
    """``amp`` as MONAI's engines take it: they autocast for CUDA only, so it is on only for a CUDA ``device``.

    Args:
        amp: the ``amp`` id (a bool, or true/false as typed on the command line).
        device: the ``device`` id (a ``torch.device`` or its name).
    """
    return as_bool(amp, "amp") and torch.device(device).type == "cuda"


class CpuAutocastInferer(Inferer):
    """Runs ``inferer`` under ``torch.autocast("cpu", dtype)`` and returns float32: convolutions run in bfloat16,
    autocast keeps norms, softmax and losses in float32, and what follows (loss, post-processing) gets float32.

    Args:
        inferer: the inferer to run, e.g. ``SimpleInferer()`` or ``FlipInferer()``.
        dtype: the lower precision, ``torch.bfloat16``.
    """

    def __init__(self, inferer: Inferer, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.inferer, self.dtype = inferer, dtype

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        with torch.autocast("cpu", dtype=self.dtype):
            outputs = self.inferer(inputs, network, *args, **kwargs)
        return outputs.float()


@contextlib.contextmanager
def surface_distance_deprecation_ignored():
    """Inside: no ``FutureWarning`` of MONAI's surface-distance metrics about the argument they pass themselves."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"monai\.metrics\.utils get_mask_edges:always_return_as_numpy: ", category=FutureWarning
        )
        yield


@contextlib.contextmanager
def config_root_notice_dropped():
    """Inside: ``ConfigWorkflow`` logs no "Not all config files are in ..." notice (for a workflow given its
    ``meta_file`` and ``logging_file``, whose config files lie in several folders)."""

    def other_than_the_notice(record):
        return not record.getMessage().startswith("Not all config files are in")

    monai_logger = logging.getLogger("monai.bundle.workflows")
    monai_logger.addFilter(other_than_the_notice)
    try:
        yield
    finally:
        monai_logger.removeFilter(other_than_the_notice)

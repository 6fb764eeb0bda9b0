"""What the data modules share without MONAI: how NIfTI files are named, and the refusal of a case (so that the
release layouts and the tools find files and refuse cases before MONAI is imported)."""

import os

__all__ = ["NIFTI_SUFFIXES", "InvalidCaseError", "file_stem"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class InvalidCaseError(ValueError):
    """A case that cannot be used; the message names the case and the file."""


def file_stem(path) -> str:
    """A file's name without ``.nii``/``.nii.gz``."""
    name = os.path.basename(str(path))
    longest_first = sorted(NIFTI_SUFFIXES, key=len, reverse=True)
    return next((name[: -len(s)] for s in longest_first if name.lower().endswith(s)), name)

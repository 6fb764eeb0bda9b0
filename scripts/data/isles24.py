"""The ISLES 2024 release on disk (BIDS-like), read into the same datalist items as ISLES 2018's.

Two layouts are seen in public copies: the challenge's README
(``rawdata/sub-strokecase0001/ses-0001/sub-strokecase0001_ses-0001_ncct.nii.gz``,
``derivatives/sub-strokecase0001/ses-0001/perfusion-maps/sub-strokecase0001_ses-0001_space-ncct_cbf.nii.gz``,
``derivatives/sub-strokecase0001/ses-0002/sub-strokecase0001_ses-0002_lesion-msk.nii.gz``) and the public archive
(``train/raw_data/sub-stroke0001/ses-01/..._ncct.nii.gz``, ``train/derivatives/sub-stroke0001/ses-01/perfusion-maps/
..._space-ncct_tmax.nii.gz``, ``train/derivatives/sub-stroke0001/ses-02/..._space-ncct_lesion-msk.nii.gz``). Both
are read by pattern: the NCCT in a session folder of the raw tree, the four maps in a ``perfusion-maps`` folder of
the derivatives, the lesion mask in another derivatives session. The maps are registered to the NCCT; the mask is
the final infarct from follow-up MRI, on the NCCT grid. A subject without a mask is a testing case. A subject with
the raw CTP (``<raw>/sub-*/ses-*/sub-*_ses-*_ctp.nii.gz``) and no perfusion maps gets them computed from it (its
item's ``maps_source``); where it has the maps, they are used and the raw CTP is not read.
"""

from __future__ import annotations

import glob
import os
import re

from scripts.data import channels as spec
from scripts.data.channels import CHANNELS, COMPUTED_MAPS, MAPS_SOURCE, computed_channels
from scripts.data.files import NIFTI_SUFFIXES, InvalidCaseError
from scripts.data.isles18 import TESTING_DIR, TRAINING_DIR, find_dir

__all__ = ["EXPECTED", "find_root", "find_subjects", "read_subject", "subject_of"]

RAW_DIRS = ("rawdata", "raw_data")
DERIVATIVES_DIR = "derivatives"
SUBJECT_PREFIX = "sub-"
MASK_SUFFIX = "lesion-msk"
MASK_LIKE = re.compile(r"msk|mask|lesion|label|seg")  # in the name of a file that is not read as a mask
EXPECTED = (
    "an ISLES 2024 root holds rawdata/ (or raw_data/) and derivatives/, or a train/ folder holding them:"
    " <raw>/sub-*/ses-*/sub-*_ses-*_ncct.nii.gz, derivatives/sub-*/ses-*/perfusion-maps/"
    "sub-*_ses-*_space-ncct_{cbf,cbv,mtt,tmax}.nii.gz, derivatives/sub-*/ses-*/sub-*_ses-*[_space-ncct]_lesion-msk.nii.gz"
)
# an ISLES 2024 NCCT file, sub-<label>_ses-<label>_ncct.nii[.gz]: its subject names the case
NCCT_FILE = re.compile(r"^(?P<subject>sub-[A-Za-z0-9]+)_ses-[A-Za-z0-9]+_ncct\.nii(\.gz)?$", re.IGNORECASE)


def subject_of(path):
    """The subject (``sub-...``) of an ISLES 2024 NCCT file's name, else None."""
    match = NCCT_FILE.match(os.path.basename(path))
    return match.group("subject") if match else None


def find_root(data_root: str) -> tuple[str, str] | None:
    """``(raw_dir, derivatives_dir)`` of an ISLES 2024 tree at ``data_root`` or in its ``train/`` folder, else None.

    Raises:
        InvalidCaseError: when the choice is not one: two ISLES 2024 trees (``rawdata/`` and ``raw_data/``, or one at
            the root and one in ``train/``), or an ISLES 2024 tree beside ISLES 2018 ``TRAINING/``/``TESTING/``
            folders; each would silently leave the other's cases out.
    """
    found = []
    for root in (data_root, os.path.join(data_root, "train")):
        derivatives = os.path.join(root, DERIVATIVES_DIR)
        raws = [os.path.join(root, d) for d in RAW_DIRS if os.path.isdir(os.path.join(root, d))]
        found += [(raw, derivatives) for raw in raws if os.path.isdir(derivatives)]
    if len(found) > 1:
        raise InvalidCaseError(
            f"{data_root} holds {len(found)} ISLES 2024 trees ({', '.join(raw for raw, _ in found)}); one would be"
            " left out unseen: pass the folder of one of them"
        )
    isles18 = [d for d in (find_dir(data_root, TRAINING_DIR), find_dir(data_root, TESTING_DIR)) if d]
    if found and isles18:
        raise InvalidCaseError(
            f"{data_root} holds both ISLES 2018 ({', '.join(isles18)}) and ISLES 2024 ({found[0][0]}) cases; one"
            " release would be left out unseen: keep each release in its own folder"
        )
    return found[0] if found else None


def find_subjects(raw_dir: str, derivatives_dir: str) -> list[str]:
    """The subjects (``sub-...`` folders) of the raw tree and the derivatives, in name order."""
    names = set()
    for folder in (raw_dir, derivatives_dir):
        names |= {
            d for d in os.listdir(folder) if d.startswith(SUBJECT_PREFIX) and os.path.isdir(os.path.join(folder, d))
        }
    return sorted(names)


def _one(subject, pattern, what, required=True):
    found = sorted(p for p in glob.glob(pattern) if p.lower().endswith(NIFTI_SUFFIXES))
    if len(found) > 1:
        raise InvalidCaseError(f"{subject}: more than one {what}: {', '.join(found)}")
    if not found and required:
        raise InvalidCaseError(f"{subject}: no {what} ({pattern}.nii[.gz]); {EXPECTED}")
    return found[0] if found else None


def _refuse_misnamed_mask(subject, derivatives_dir):
    """A subject without a ``*lesion-msk*`` file is a testing case; one whose derivatives hold a file that looks like
    a mask under another name would become one unseen, so it is refused, naming the file."""
    candidates = [
        path
        for path in glob.glob(os.path.join(derivatives_dir, subject, "ses-*", "*"))
        if path.lower().endswith(NIFTI_SUFFIXES) and MASK_LIKE.search(os.path.basename(path).lower())
    ]
    if candidates:
        raise InvalidCaseError(
            f"{subject}: no *{MASK_SUFFIX}* file, but {', '.join(sorted(candidates))} looks like a mask; name it"
            f" <subject>_<session>[_space-ncct]_{MASK_SUFFIX}.nii.gz to train on the subject, or move it away to use"
            " the subject as a testing case"
        )


def read_subject(subject: str, raw_dir: str, derivatives_dir: str, channels=CHANNELS) -> dict:
    """The datalist item of one subject: ``{"image": [a file per channel], "case": subject}`` with absolute paths, and
    ``"label"`` when the subject has a lesion mask; each channel's file where ``scripts.data.channels`` says ISLES
    2024 keeps it (the NCCT in the raw tree, the maps in ``perfusion-maps``, the CTA registered to the NCCT beside it);
    a subject with the raw CTP and none of the maps that can be computed from it names the CTP as their file, with
    ``maps_source`` ``COMPUTED_MAPS`` (``scripts.data.readers.LoadCased`` computes them).

    Raises:
        InvalidCaseError: naming the subject and the file pattern that matched nothing (or more than one file).
    """
    trees = {"raw": raw_dir, "derivatives": derivatives_dir}

    def find(entry, what, required=True):
        tree, *folder, ending = entry.isles24.split("/")
        pattern = os.path.join(trees[tree], subject, "ses-*", *folder, f"{subject}_ses-*_{ending}")
        return _one(subject, pattern + "*", what, required)

    computed = computed_channels(channels)
    raw = None
    if not any(find(spec.channel(name), f"{name} map", required=False) for name in computed):
        raw = find(spec.RAW_CTP, "raw CTP", required=False)
    image = []
    for name in channels:
        if not spec.channel(name).isles24:
            raise InvalidCaseError(f"{subject}: ISLES 2024 has no {name}")
        if raw and name in computed:
            image.append(raw)
            continue
        image.append(find(spec.channel(name), "NCCT" if name == CHANNELS[0] else f"{name} map"))
    sessions = os.path.join(derivatives_dir, subject, "ses-*", f"{subject}_ses-*_")
    mask = _one(subject, sessions + "*" + MASK_SUFFIX + "*", "lesion mask", required=False)
    if mask is None:
        _refuse_misnamed_mask(subject, derivatives_dir)
    item = {"image": image, "case": subject, **({"label": mask} if mask else {})}
    return {**item, MAPS_SOURCE: COMPUTED_MAPS} if raw else item

"""What the ISLES 2018 CT-perfusion release looks like on disk, shared by the generator and the datalist builder."""

import re

# Model input channels, in the fixed order of metadata.json's channel_def.
CHANNELS = ("CT", "CBF", "CBV", "MTT", "Tmax")
LABEL = "OT"

# Modality token(s) found in the folder names for each channel; the first is what the generator writes.
# One early release named some training maps MR_MTT / MR_Tmax instead of CT_MTT / CT_Tmax.
MODALITY_TOKENS = {
    "CT": ("CT",),
    "CBF": ("CT_CBF",),
    "CBV": ("CT_CBV",),
    "MTT": ("CT_MTT", "MR_MTT"),
    "Tmax": ("CT_Tmax", "MR_Tmax"),
    LABEL: ("OT",),
}
# Raw 4D perfusion series: present in the release, not used by the model.
IGNORED_TOKENS = ("CT_4DPWI", "MR_4DPWI")

TRAINING_DIR = "TRAINING"
TESTING_DIR = "TESTING"

# SMIR.Brain.XX.O.<MOD>.<id>, the name of both the map folder and the NIfTI file inside it.
SMIR_NAME = re.compile(r"^SMIR\.Brain\.XX\.O\.(?P<mod>[A-Za-z0-9_]+)\.(?P<id>\d+)$", re.IGNORECASE)
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def smir_name(token: str, smir_id: int) -> str:
    """Folder (and file stem) name of one map, e.g. ``SMIR.Brain.XX.O.CT_CBF.345563``."""
    return f"SMIR.Brain.XX.O.{token}.{smir_id}"


def key_of_token(token: str):
    """Channel name (or ``OT``) of a folder's modality token, ``None`` for ignored or unknown tokens."""
    for key, tokens in MODALITY_TOKENS.items():
        if token.lower() in (t.lower() for t in tokens):
            return key
    return None

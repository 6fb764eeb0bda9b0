"""The ISLES 2018 CT-perfusion release on disk: ``TRAINING/`` and ``TESTING/`` folders of ``case_N`` folders, each map in
``SMIR.Brain.XX.O.<MOD>.<id>/SMIR.Brain.XX.O.<MOD>.<id>.nii``, found by the modality tokens of ``scripts.data.channels``
(``OT``: the label), read into datalist items named after their case folder. A case with the raw series (``CT_4DPWI``)
and none of the perfusion maps gets them computed from it (its item's ``maps_source``); where it has the maps, they are
used and the raw series is not read.

MONAI reads datalists and NIfTI files but knows nothing of the ISLES folder layout; this module fills that gap.
"""

import logging
import os
import re

from scripts.data import channels as spec
from scripts.data.channels import CHANNELS, COMPUTED_MAPS, MAPS_SOURCE, computed_channels
from scripts.data.files import NIFTI_SUFFIXES, InvalidCaseError

logger = logging.getLogger(__name__)

LABEL = "OT"
TRAINING_DIR = "TRAINING"
TESTING_DIR = "TESTING"
# SMIR.Brain.XX.O.<MOD>.<id>, the name of both the map folder and the NIfTI file inside it.
SMIR_NAME = re.compile(r"^SMIR\.Brain\.XX\.O\.(?P<mod>[A-Za-z0-9_]+)\.(?P<id>\d+)$", re.IGNORECASE)


def smir_name(token: str, smir_id: int) -> str:
    """Folder (and file stem) name of one map, e.g. ``SMIR.Brain.XX.O.CT_CBF.345563``."""
    return f"SMIR.Brain.XX.O.{token}.{smir_id}"


def modality_tokens() -> dict:
    """The modality tokens of each input that ISLES 2018 has (``scripts.data.channels``), and of ``OT``."""
    return {c.name: c.isles18 for c in spec.SPEC if c.isles18} | {LABEL: (LABEL,)}


def key_of_token(token: str):
    """Channel name (or ``OT``) of a folder's modality token, ``None`` for ignored or unknown tokens."""
    return next((key for key, tokens in modality_tokens().items() if token.lower() in map(str.lower, tokens)), None)


def find_dir(parent, name):
    """``parent/name`` matched case-insensitively (releases differ in the case of folder names)."""
    if not os.path.isdir(parent):
        return None
    matches = [
        d for d in sorted(os.listdir(parent)) if d.lower() == name.lower() and os.path.isdir(os.path.join(parent, d))
    ]
    return os.path.join(parent, matches[0]) if matches else None


def case_folders(folder):
    """``(name, path)`` of the sub-folders of ``folder``, in numeric order of their ``_N`` suffix.

    A symbolic link whose target is missing is listed too (``read_case`` then names it), not dropped unseen."""

    def order(name):
        number = name.rsplit("_", 1)[-1]
        return (0, int(number), name) if number.isdigit() else (1, 0, name)

    paths = {name: os.path.join(folder, name) for name in os.listdir(folder)}
    names = [n for n, p in paths.items() if os.path.isdir(p) or os.path.islink(p) and not os.path.exists(p)]
    return [(name, paths[name]) for name in sorted(names, key=order)]


def find_cases(data_root, section):
    """Case folders (``case_N``) of ``TRAINING`` or ``TESTING``, in numeric order; [] if the section is absent."""
    section_dir = find_dir(data_root, section)
    return [] if section_dir is None else case_folders(section_dir)


def _map_file(case, map_dir):
    """The one NIfTI file in a ``SMIR.Brain.XX.O.<MOD>.<id>`` folder."""
    files = [f for f in sorted(os.listdir(map_dir)) if f.lower().endswith(NIFTI_SUFFIXES)]
    if len(files) != 1:
        found = ", ".join(sorted(os.listdir(map_dir))) or "nothing"
        raise InvalidCaseError(f"{case}: expected one .nii or .nii.gz file in {map_dir}, found {found}")
    return os.path.join(map_dir, files[0])


def read_case(case, case_dir, with_label, channels=CHANNELS):
    """Map the case's folders to ``{"image": [a file per channel], "label": OT, "case": case}`` (absolute paths); a
    case with the raw series (``CT_4DPWI``) and none of the maps that can be computed from it names that series as
    their file, with ``maps_source`` ``COMPUTED_MAPS`` (``scripts.data.readers.LoadCased`` computes them).

    Raises:
        InvalidCaseError: naming the case and the folder, for a dangling link, no map folders, two folders of one
            channel, a channel missing, or an input that ISLES 2018 does not have.
    """
    absent = [c for c in channels if c not in modality_tokens()]
    if absent:
        raise InvalidCaseError(
            f"{case}: ISLES 2018 has no {', '.join(absent)} (read from ISLES 2024 trees or 4D files)"
        )
    if not os.path.isdir(case_dir):
        raise InvalidCaseError(
            f"{case}: {case_dir} is a symbolic link to {os.readlink(case_dir)}, which does not exist"
        )
    found, raw_tokens = {}, [token.upper() for token in spec.RAW_CTP.isles18]
    for entry in sorted(os.listdir(case_dir)):
        path = os.path.join(case_dir, entry)
        match = SMIR_NAME.match(entry)
        if not os.path.isdir(path) or match is None:
            continue
        key = spec.RAW_CTP.name if match.group("mod").upper() in raw_tokens else key_of_token(match.group("mod"))
        if key is None:
            logger.warning("%s: ignoring folder %s (unknown modality %s)", case, path, match.group("mod"))
            continue
        if key in found:
            raise InvalidCaseError(f"{case}: two folders for {key}: {os.path.dirname(found[key])} and {path}")
        # the raw series' folder is looked into only where its maps are computed (a case with maps never reads it)
        found[key] = os.path.join(path, "") if key == spec.RAW_CTP.name else _map_file(case, path)
    if not found:
        raise InvalidCaseError(f"{case}: no SMIR.Brain.XX.O.<MOD>.<id> map folders in {case_dir}")
    computed = computed_channels(channels)
    raw = found.pop(spec.RAW_CTP.name, None)
    from_raw = raw is not None and not any(name in found for name in computed)
    if from_raw:
        found.update(dict.fromkeys(computed, _map_file(case, os.path.dirname(raw))))
    wanted = list(channels) + ([LABEL] if with_label else [])
    missing = [key for key in wanted if key not in found]
    if missing:
        hint = "" if raw or set(computed) - set(missing) else f"; nor a raw series ({spec.RAW_CTP.isles18[0]})"
        raise InvalidCaseError(f"{case}: missing {', '.join(missing)} in {case_dir} (found {', '.join(found)}){hint}")
    item = {"image": [found[c] for c in channels], "case": case, **({MAPS_SOURCE: COMPUTED_MAPS} if from_raw else {})}
    if with_label:
        item["label"] = found[LABEL]
    return item


def case_of(path):
    """The case folder of an ISLES 2018 map file (``case_N/SMIR.Brain.XX.O.<MOD>.<id>/...``), else None."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.basename(os.path.dirname(folder)) if SMIR_NAME.match(os.path.basename(folder)) else None


def tree_cases(data_root):
    """The ``(name, folder, with_label)`` of each case of an ISLES 2018 root, TRAINING (labelled) then TESTING; None
    where ``data_root`` has neither folder."""
    if not (find_dir(data_root, TRAINING_DIR) or find_dir(data_root, TESTING_DIR)):
        return None
    return [(c, d, True) for c, d in find_cases(data_root, TRAINING_DIR)] + [
        (c, d, False) for c, d in find_cases(data_root, TESTING_DIR)
    ]


def folder_inputs(source, channels):
    """The unlabelled items to segment in ``source``: the TESTING cases of a root, one case folder, or a folder of case
    folders; None where ``source`` holds none of these."""
    if find_dir(source, TESTING_DIR):
        return [read_case(case, case_dir, False, channels) for case, case_dir in find_cases(source, TESTING_DIR)]
    if find_dir(source, TRAINING_DIR):
        raise InvalidCaseError(
            f"{source} has a {TRAINING_DIR} folder but no {TESTING_DIR} folder; to segment the training cases pass"
            f" {os.path.join(source, TRAINING_DIR)}"
        )
    names = sorted(os.listdir(source))
    if any(SMIR_NAME.match(name) and os.path.isdir(os.path.join(source, name)) for name in names):
        return [read_case(os.path.basename(source), source, False, channels)]  # one case folder
    if any(name.lower().endswith(NIFTI_SUFFIXES) for name in names):
        return None
    return [read_case(case, case_dir, False, channels) for case, case_dir in case_folders(source)] or None

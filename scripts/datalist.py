"""Datalists as the configs read them: one fold of the training section, a section to evaluate, or the scans to
segment (an ISLES root, case folders, 4D files or a datalist), each item checked before any work is done."""

import json
import os

from monai.data import load_decathlon_datalist
from scripts import isles24
from scripts.flags import as_bool
from scripts.isles import (
    CHANNELS,
    NIFTI_SUFFIXES,
    TESTING_DIR,
    TRAINING_DIR,
    InvalidCaseError,
    case_folders,
    case_name,
    check_case,
    check_unique_names,
    find_cases,
    find_dir,
    read_case,
)


def _require_datalist(data_list_file_path, dataset_dir):
    if not os.path.isfile(data_list_file_path):
        raise FileNotFoundError(
            f"datalist {data_list_file_path} not found; build it with: python -m scripts.tools.prepare_datalist"
            f" --data_root {dataset_dir} --output {data_list_file_path}"
        )


def _read_section(path, key, base_dir=None, is_segmentation=True):
    """The ``key`` section of the datalist file ``path``, read by MONAI's ``load_decathlon_datalist``; a file that
    is not JSON (empty, truncated, another format) is named, which the JSON parser's own message does not do."""
    try:
        return load_decathlon_datalist(path, is_segmentation=is_segmentation, data_list_key=key, base_dir=base_dir)
    except json.JSONDecodeError as err:
        raise InvalidCaseError(f"{path} is not a datalist: it is not valid JSON ({err})") from err


def check_entries(items, source, need_label=False, need_fold=False):
    """Check the structure of datalist items before any file is read: ``image`` one file or the 5 maps, and where
    asked a ``label`` file and an integer ``fold``. Raises ``InvalidCaseError`` naming the case and ``source``."""
    for index, item in enumerate(items):
        image = item.get("image")
        case = item.get("case") or (case_name(image) if image else f"item {index}")
        if not (
            isinstance(image, str)
            or isinstance(image, list)
            and len(image) == len(CHANNELS)
            and all(isinstance(p, str) for p in image)
        ):
            count = len(image) if isinstance(image, list) else repr(image)
            raise InvalidCaseError(
                f"{case}: 'image' in {source} lists {count} files, expected one 4D file or the"
                f" {len(CHANNELS)} maps {', '.join(CHANNELS)}"
            )
        if need_label and not isinstance(item.get("label"), str):
            raise InvalidCaseError(f"{case}: no 'label' file in {source}; training and evaluation need one per case")
        fold = item.get("fold")
        if need_fold and (isinstance(fold, bool) or not isinstance(fold, int)):
            raise InvalidCaseError(f"{case}: 'fold' in {source} must be an integer, got {fold!r}")


def load_fold(data_list_file_path, dataset_dir, fold, check=False):
    """One fold of the ``training`` section, for the training configs.

    Args:
        data_list_file_path: the datalist (``python -m scripts.tools.prepare_datalist``).
        dataset_dir: the folder its paths are relative to.
        fold: the fold held out for validation.
        check: run ``check_case`` on every case, and refuse a fold whose training labels are all empty.

    Returns:
        ``{"train": [...], "validation": [...]}``, items with absolute paths.
    """
    _require_datalist(data_list_file_path, dataset_dir)
    items = _read_section(data_list_file_path, "training", base_dir=dataset_dir)
    check_entries(items, data_list_file_path, need_label=True, need_fold=True)
    folds = sorted({item["fold"] for item in items})
    if fold not in folds:
        raise ValueError(f"fold {fold} is not in {data_list_file_path}, which has folds {folds}")
    split = {
        "train": [item for item in items if item["fold"] != fold],
        "validation": [item for item in items if item["fold"] == fold],
    }
    if as_bool(check, "check_inputs"):
        lesion_voxels = {
            item["case"] if "case" in item else case_name(item["image"]): check_case(item) for item in split["train"]
        }
        if lesion_voxels and not any(lesion_voxels.values()):
            raise InvalidCaseError(
                f"{data_list_file_path}: the labels of all {len(lesion_voxels)} training cases of"
                f" fold {fold} are empty; the network would learn nothing (its loss stays near 1)"
            )
        for item in split["validation"]:
            check_case(item)
    return split


def load_section(data_list_file_path, dataset_dir, section="validation", fold=0, check=False):
    """Labelled cases to evaluate, with absolute paths: the ``"validation"`` (or ``"train"``) part of ``fold`` (see
    ``load_fold``), or every case of another datalist section, e.g. ``"training"`` or a ``"testing"`` section that has
    labels. Raises ``InvalidCaseError`` for cases without a label, and when two cases get one ``case_name``."""
    if section in ("train", "validation"):
        items = load_fold(data_list_file_path, dataset_dir, fold)[section]
    else:
        _require_datalist(data_list_file_path, dataset_dir)
        items = _read_section(data_list_file_path, section, base_dir=dataset_dir)
        check_entries(items, data_list_file_path)
        unlabelled = [case_name(item["image"]) for item in items if "label" not in item]
        if unlabelled:
            raise InvalidCaseError(
                f"{data_list_file_path}: section '{section}' has no label for"
                f" {', '.join(unlabelled)}; evaluation needs labels (inference.json does not)"
            )
    if not items:
        raise InvalidCaseError(f"{data_list_file_path}: no cases in section '{section}'")
    check_unique_names(items)
    if as_bool(check, "check_inputs"):
        for item in items:
            check_case(item)
    return items


def find_inputs(source, data_list_key="testing", check=False):
    """Unlabelled cases to segment, as items ``{"image", "case"}`` with absolute paths; ``image`` is the 5 maps in
    channel order (CT, CBF, CBV, MTT, Tmax) or one 4D NIfTI file with those 5 channels last, ``case`` its
    ``case_name``. ``source`` is:

    - an ISLES 2018 root (with a ``TESTING`` folder): its TESTING cases;
    - a folder of ISLES 2018 case folders (``case_N/SMIR.Brain.XX.O.<MOD>.<id>/...``);
    - an ISLES 2024 root (``scripts.isles24``): every subject;
    - a folder of 4D NIfTI files, one case each;
    - a datalist ``.json``: the ``image`` of each item of its ``data_list_key`` section (relative paths are relative to
      the file's folder).

    Labels are ignored. ``check`` runs ``check_case`` on every case. Raises ``InvalidCaseError`` naming the case and
    the file, also when two cases would get the same name.
    """
    source = os.path.abspath(source)
    if os.path.isfile(source) and source.lower().endswith(".json"):
        images = [item["image"] for item in _read_section(source, data_list_key, is_segmentation=False)]
    elif not os.path.isdir(source):
        raise FileNotFoundError(f"{source} is neither a folder nor a datalist .json file")
    elif find_dir(source, TESTING_DIR):
        images = [
            read_case(case, case_dir, with_label=False)["image"] for case, case_dir in find_cases(source, TESTING_DIR)
        ]
    else:
        files = sorted(
            f
            for f in os.listdir(source)
            if f.lower().endswith(NIFTI_SUFFIXES) and os.path.isfile(os.path.join(source, f))
        )
        if files:
            images = [os.path.join(source, f) for f in files]
        elif isles24.find_root(source):
            roots = isles24.find_root(source)
            images = [isles24.read_subject(subject, *roots)["image"] for subject in isles24.find_subjects(*roots)]
        elif find_dir(source, TRAINING_DIR):
            raise InvalidCaseError(
                f"{source} has a {TRAINING_DIR} folder but no {TESTING_DIR} folder; to segment"
                f" the training cases pass {os.path.join(source, TRAINING_DIR)}"
            )
        else:
            images = [read_case(case, case_dir, with_label=False)["image"] for case, case_dir in case_folders(source)]
    if not images:
        raise InvalidCaseError(
            f"{source}: no cases (an ISLES 2018 or 2024 root, a folder of case folders or of 4D NIfTI files,"
            f" or a datalist .json)"
        )
    items = [{"image": image, "case": case_name(image)} for image in images]
    check_entries(items, source)
    check_unique_names(items)
    if as_bool(check, "check_inputs"):
        for item in items:
            check_case(item)
    return items

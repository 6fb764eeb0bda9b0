"""Datalists as the configs read them: one fold of the training section, a section to evaluate, or the scans to
segment (an ISLES root, case folders, 4D files or a datalist), each item checked before any work is done."""

import json
import os

from monai.data import load_decathlon_datalist
from scripts.data import isles24
from scripts.data.isles18 import (
    CHANNELS,
    NIFTI_SUFFIXES,
    SMIR_NAME,
    TESTING_DIR,
    TRAINING_DIR,
    InvalidCaseError,
    case_folders,
    case_name,
    check_case,
    check_channels,
    check_unique_names,
    find_cases,
    find_dir,
    key_of_token,
    read_case,
)
from scripts.flags import as_bool


def _require_datalist(data_list_file_path, dataset_dir):
    if not os.path.isfile(data_list_file_path):
        raise FileNotFoundError(
            f"datalist {data_list_file_path} not found; build it with: python -m scripts.tools.prepare_datalist"
            f" --data_root {dataset_dir} --output {data_list_file_path}"
        )


def _read_section(path, key, base_dir=None, is_segmentation=True, channels=CHANNELS):
    """The ``key`` section of the datalist file ``path``, read by MONAI's ``load_decathlon_datalist``; a file that
    is not JSON (empty, truncated, another format) is named, which the JSON parser's own message does not do, and so
    is a datalist whose ``channels`` (``scripts.data.folds.build_datalist`` records them) are not the model's
    ``channels``."""
    try:
        with open(path) as f:
            listed = json.load(f).get("channels", list(CHANNELS))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise InvalidCaseError(f"{path} is not a datalist: it is not valid JSON, or not a JSON object ({err})") from err
    if listed != list(channels):
        raise InvalidCaseError(
            f"{path} lists its images in the channel order {listed}; the model takes {list(channels)} (the"
            " 'channels' id; a datalist with the CTA: prepare_datalist --cta true)"
        )
    return load_decathlon_datalist(path, is_segmentation=is_segmentation, data_list_key=key, base_dir=base_dir)


def _named_channel(path):
    """The input a file's name says it holds (ISLES 2018 ``SMIR.Brain.XX.O.<MOD>.<id>``, ISLES 2024
    ``..._space-ncct_<map>``), None when the name says nothing."""
    stem = os.path.basename(path)
    stem = next((stem[: -len(s)] for s in (".nii.gz", ".nii") if stem.lower().endswith(s)), stem)
    smir = SMIR_NAME.match(stem) or SMIR_NAME.match(os.path.basename(os.path.dirname(path)))
    if smir:
        return key_of_token(smir.group("mod"))
    return next((c for c, suffix in isles24.INPUT_SUFFIXES.items() if stem.lower().endswith("_" + suffix)), None)


def check_entries(items, source, need_label=False, need_fold=False, channels=CHANNELS):
    """Check the structure of datalist items before any file is read: ``image`` one file or the 5 maps, and where
    asked a ``label`` file and an integer ``fold``. Raises ``InvalidCaseError`` naming the case and ``source``."""
    for index, item in enumerate(items):
        image = item.get("image")
        case = item.get("case") or (case_name(image) if image else f"item {index}")
        if not (
            isinstance(image, str)
            or isinstance(image, list)
            and len(image) == len(channels)
            and all(isinstance(p, str) for p in image)
        ):
            count = len(image) if isinstance(image, list) else repr(image)
            raise InvalidCaseError(
                f"{case}: 'image' in {source} lists {count} files, expected one 4D file or the"
                f" {len(channels)} inputs {', '.join(channels)}"
            )
        for position, path in enumerate(image if isinstance(image, list) else []):
            named = _named_channel(path)
            if named not in (None, channels[position]):
                raise InvalidCaseError(
                    f"{case}: 'image' in {source} gives {path}, a {named} map, as channel {position + 1}; the"
                    f" channels are {', '.join(channels)}, in that order"
                )
        if need_label and not isinstance(item.get("label"), str):
            raise InvalidCaseError(f"{case}: no 'label' file in {source}; training and evaluation need one per case")
        fold = item.get("fold")
        if need_fold and (isinstance(fold, bool) or not isinstance(fold, int)):
            raise InvalidCaseError(f"{case}: 'fold' in {source} must be an integer, got {fold!r}")


def load_fold(data_list_file_path, dataset_dir, fold, check=False, channels=CHANNELS):
    """One fold of the ``training`` section, for the training configs.

    Args:
        data_list_file_path: the datalist (``python -m scripts.tools.prepare_datalist``).
        dataset_dir: the folder its paths are relative to.
        fold: the fold held out for validation.
        check: run ``check_case`` on every case (blank perfusion maps refused), and refuse a fold whose training
            labels are all empty.
        channels: the inputs the model takes (the ``channels`` id), which the datalist's must be.

    Returns:
        ``{"train": [...], "validation": [...]}``, items with absolute paths.
    """
    check_channels(channels)
    _require_datalist(data_list_file_path, dataset_dir)
    items = _read_section(data_list_file_path, "training", base_dir=dataset_dir, channels=channels)
    check_entries(items, data_list_file_path, need_label=True, need_fold=True, channels=channels)
    seen = {}
    for item in items:
        name = case_name(item["image"])
        if name in seen:
            raise InvalidCaseError(
                f"{name}: listed twice in the training section of {data_list_file_path} (folds {seen[name]} and"
                f" {item['fold']}); a case in two folds is trained on and validated on"
            )
        seen[name] = item["fold"]
    folds = sorted(set(seen.values()))
    if fold not in folds:
        raise ValueError(f"fold {fold} is not in {data_list_file_path}, which has folds {folds}")
    split = {
        "train": [item for item in items if item["fold"] != fold],
        "validation": [item for item in items if item["fold"] == fold],
    }
    if as_bool(check, "check_inputs"):
        lesion_voxels = {
            item["case"] if "case" in item else case_name(item["image"]): check_case(item, True, channels)
            for item in split["train"]
        }
        if lesion_voxels and not any(lesion_voxels.values()):
            raise InvalidCaseError(
                f"{data_list_file_path}: the labels of all {len(lesion_voxels)} training cases of"
                f" fold {fold} are empty; the network would learn nothing (its loss stays near 1)"
            )
        for item in split["validation"]:
            check_case(item, True, channels)
    return split


def load_section(data_list_file_path, dataset_dir, section="validation", fold=0, check=False, channels=CHANNELS):
    """Labelled cases to evaluate, with absolute paths: the ``"validation"`` (or ``"train"``) part of ``fold`` (see
    ``load_fold``), or every case of another datalist section, e.g. ``"training"`` or a ``"testing"`` section that has
    labels. Raises ``InvalidCaseError`` for cases without a label, and when two cases get one ``case_name``."""
    if section in ("train", "validation"):
        items = load_fold(data_list_file_path, dataset_dir, fold, channels=channels)[section]
    else:
        _require_datalist(data_list_file_path, dataset_dir)
        items = _read_section(data_list_file_path, section, base_dir=dataset_dir, channels=channels)
        check_entries(items, data_list_file_path, channels=channels)
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
            check_case(item, channels=channels)
    return items


def _refuse_missing(items, datalist):
    """A datalist given to inference names files relative to its own folder: say so when one is not there."""
    for item in items:
        missing = next((p for p in _as_list(item["image"]) if not os.path.exists(p)), None)
        if missing:
            raise InvalidCaseError(
                f"{item['case']}: {missing}, listed in {datalist}, does not exist; the relative paths of a datalist"
                f" given as dataset_dir are relative to its folder ({os.path.dirname(datalist)}): keep it in the folder its"
                " paths are relative to, or give absolute paths"
            )


def _as_list(image):
    return [image] if isinstance(image, str) else image


def _folder_inputs(source, channels):
    """The ``image`` of each case in the folder ``source`` (see ``find_inputs``)."""
    roots = isles24.find_root(source)  # first: it refuses a folder that mixes the releases
    if roots:
        return [isles24.read_subject(s, *roots, channels)["image"] for s in isles24.find_subjects(*roots)]
    if tuple(channels) != CHANNELS and not any(f.lower().endswith(NIFTI_SUFFIXES) for f in os.listdir(source)):
        extra = ", ".join(channels[len(CHANNELS) :])
        raise InvalidCaseError(f"{source}: {extra} is read from ISLES 2024 trees (or 4D files) only")
    if find_dir(source, TESTING_DIR):
        return [read_case(case, case_dir, False)["image"] for case, case_dir in find_cases(source, TESTING_DIR)]
    if find_dir(source, TRAINING_DIR):
        raise InvalidCaseError(
            f"{source} has a {TRAINING_DIR} folder but no {TESTING_DIR} folder; to segment"
            f" the training cases pass {os.path.join(source, TRAINING_DIR)}"
        )
    names = sorted(os.listdir(source))
    if any(SMIR_NAME.match(name) and os.path.isdir(os.path.join(source, name)) for name in names):
        return [read_case(os.path.basename(source), source, False)["image"]]  # one ISLES 2018 case folder
    files = [f for f in names if f.lower().endswith(NIFTI_SUFFIXES) and os.path.isfile(os.path.join(source, f))]
    if files:
        return [os.path.join(source, f) for f in files]
    return [read_case(case, case_dir, False)["image"] for case, case_dir in case_folders(source)]


def find_inputs(source, data_list_key="testing", check=False, channels=CHANNELS):
    """Unlabelled cases to segment, as items ``{"image", "case"}`` with absolute paths; ``image`` is the 5 maps in
    channel order (CT, CBF, CBV, MTT, Tmax) or one 4D NIfTI file with those 5 channels last, ``case`` its
    ``case_name``. ``source`` is:

    - an ISLES 2018 root (with a ``TESTING`` folder): its TESTING cases;
    - a folder of ISLES 2018 case folders (``case_N/SMIR.Brain.XX.O.<MOD>.<id>/...``), or one such case folder;
    - an ISLES 2024 root (``scripts.data.isles24``): every subject;
    - a folder of 4D NIfTI files, one case each;
    - a datalist ``.json``: the ``image`` of each item of its ``data_list_key`` section (relative paths are relative to
      the file's folder).

    Labels are ignored. ``check`` runs ``check_case`` on every case. ``channels`` (the model's) may add optional inputs
    after the five (``"CTA"``: ISLES 2024 trees, 4D files with as many channels, datalists that list them). Raises
    ``InvalidCaseError`` naming the case and the file, also when two cases would get the same name.
    """
    check_channels(channels)
    source = os.path.abspath(source)
    if os.path.isfile(source) and source.lower().endswith(".json"):
        images = [
            item["image"] for item in _read_section(source, data_list_key, is_segmentation=False, channels=channels)
        ]
    elif not os.path.isdir(source):
        raise FileNotFoundError(f"{source} is neither a folder nor a datalist .json file")
    else:
        images = _folder_inputs(source, channels)
    if not images:
        raise InvalidCaseError(
            f"{source}: no cases (an ISLES 2018 or 2024 root, a folder of case folders or of 4D NIfTI files,"
            f" or a datalist .json)"
        )
    items = [{"image": image, "case": case_name(image)} for image in images]
    check_entries(items, source, channels=channels)
    if os.path.isfile(source):
        _refuse_missing(items, source)
    check_unique_names(items)
    if as_bool(check, "check_inputs"):
        for item in items:
            check_case(item, channels=channels)
    return items

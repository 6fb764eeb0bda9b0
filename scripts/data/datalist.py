"""Datalists: built from an ISLES 2018 or ISLES 2024 tree with patient-grouped folds (``build_datalist``, what
``python -m scripts.tools.prepare_datalist`` writes and the demo and the cross-validation build: MONAI reads datalists
with ``load_decathlon_datalist`` but cannot make one from the ISLES layouts), and read as the configs take them: one
fold of the training section, a section to evaluate, or the scans to segment (an ISLES root, case folders, 4D files or
a datalist), each item's structure checked before any file is read.

The sources, tried in order (a registry, as nnU-Net's ``imageio``): ``TREES`` for datalists (ISLES 2024, ISLES
2018), ``FOLDERS`` for inference (ISLES 2024, ISLES 2018 roots and case folders, 4D NIfTI files); each names its cases
(``case``) and decides where its perfusion maps come from (``maps_source``: the vendor's files, or computed from the
raw CT perfusion series where a case has it and no maps). DICOM studies come from configs/dicom.json
(``scripts.dicom.series.find_studies``). Every item is read by ``scripts.data.readers.LoadCased``, which checks its
files as it reads them (and computes the maps of a case that has none).
"""

import csv
import json
import logging
import os
from collections import defaultdict
from functools import partial

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist
from monai.utils import ensure_tuple
from scripts.data import channels as spec
from scripts.data import isles18, isles24
from scripts.data.channels import CHANNELS, MAPS_SOURCE, check_channels
from scripts.data.files import NIFTI_SUFFIXES, InvalidCaseError, file_stem
from scripts.data.readers import LoadCased, computed_positions
from scripts.flags import as_bool

logger = logging.getLogger(__name__)


def case_name(image) -> str:
    """The name of a case that its datalist item does not give, from its ``image`` (one file or a list of files):
    the ISLES 2018 case folder, the ISLES 2024 subject, else the (first) file's name without ``.nii``/``.nii.gz``."""
    first = image if isinstance(image, str) else image[0]
    return isles18.case_of(first) or isles24.subject_of(first) or file_stem(first)


def _isles24_tree(data_root, channels):
    roots = isles24.find_root(data_root)  # first: it refuses a root that mixes the releases
    if roots:
        return "ISLES 2024", [partial(isles24.read_subject, s, *roots, channels) for s in isles24.find_subjects(*roots)]
    return None


def _isles18_tree(data_root, channels):
    cases = isles18.tree_cases(data_root)
    return None if cases is None else ("ISLES 2018", [partial(isles18.read_case, *c, channels) for c in cases])


def _isles24_inputs(source, channels):
    tree = _isles24_tree(source, channels)
    return None if tree is None else [read() for read in tree[1]]


def _nifti_inputs(source, channels):
    """One case per NIfTI file of ``source``: 4D files with the channels last."""
    names = sorted(f for f in os.listdir(source) if f.lower().endswith(NIFTI_SUFFIXES))
    return [
        {"image": os.path.join(source, f), "case": file_stem(f)}
        for f in names
        if os.path.isfile(os.path.join(source, f))
    ]


TREES = (_isles24_tree, _isles18_tree)  # (root, channels) -> (release, a reader per case) or None
FOLDERS = (_isles24_inputs, isles18.folder_inputs, _nifti_inputs)  # (folder, channels) -> items or None


def read_patients_csv(path):
    """``{case: patient}`` from a CSV with columns ``case,patient``."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"case", "patient"} <= set(reader.fieldnames):
            raise ValueError(
                f"{path}: a case-to-patient CSV needs the columns 'case' and 'patient', got {reader.fieldnames}"
            )
        patients = {}
        for line, row in enumerate(reader, start=2):
            case, patient = (row["case"] or "").strip(), (row["patient"] or "").strip()
            if not case or not patient:
                raise ValueError(f"{path}, line {line}: empty case or patient")
            if patients.setdefault(case, patient) != patient:
                raise ValueError(
                    f"{path}, line {line}: case {case} is given to patient {patient}, an earlier line gave"
                    f" it to patient {patients[case]}"
                )
        return patients


def assign_folds(cases, patients, folds, seed):
    """Fold of each case; all cases of one patient share a fold, folds are balanced by case count."""
    groups = defaultdict(list)
    for case in cases:
        groups[patients[case]].append(case)
    if not 2 <= folds <= len(groups):
        raise ValueError(f"folds must be between 2 and the number of patients ({len(groups)}), got {folds}")
    order = sorted(groups)
    np.random.default_rng(seed).shuffle(order)
    sizes, fold_of = [0] * folds, {}
    for patient in sorted(order, key=lambda p: -len(groups[p])):  # stable: ties keep the shuffled order
        fold = int(np.argmin(sizes))
        sizes[fold] += len(groups[patient])
        fold_of.update({case: fold for case in groups[patient]})
    return fold_of


def read_valid_cases(reads, check=False, skip_invalid=False, channels=CHANNELS):
    """Read each case (``reads``: a callable per case giving its datalist item) and, with ``check``, load it with
    every check (``scripts.data.readers.LoadCased``; a training case's blank maps refused); the one loop of every tool
    that reads an ISLES tree.

    Returns:
        The items of the valid cases, in order, and the error messages of the cases left out (``skip_invalid``).

    Raises:
        InvalidCaseError: naming the case and the file, for the first invalid case unless ``skip_invalid``.
    """
    items, skipped = [], []
    load = {labelled: LoadCased(("image", "label"), channels, refuse_blank=labelled) for labelled in (False, True)}
    for read in reads:
        try:
            item = read()
            if check:
                load["label" in item](item)
        except InvalidCaseError as err:
            if not skip_invalid:
                raise
            skipped.append(str(err))
            continue
        items.append(item)
    return items, skipped


def log_skipped(skipped):
    """One warning listing the cases ``read_valid_cases`` left out (their error messages), if any."""
    if skipped:
        logger.warning("skipped %d invalid case(s):\n  %s", len(skipped), "\n  ".join(skipped))


def median_spacing(items):
    """The median voxel size (mm, per axis) of the items' CT files, read from their headers: the target spacing that
    nnU-Net's dataset fingerprint would choose, for ``target_spacing`` (configs/isles24_native.json); files whose
    header cannot be read are left out (the datalist's check names them); None when no header could be read."""
    zooms = []
    for item in items:
        try:
            zooms.append(nib.load(item["image"][0]).header.get_zooms()[:3])
        except Exception:  # nibabel raises several types; the check names unreadable files where asked (--check)
            continue
    return [round(float(z), 4) for z in np.median(np.asarray(zooms, dtype=np.float64), axis=0)] if zooms else None


def build_datalist(data_root, folds=5, seed=0, patients_csv=None, check=False, skip_invalid=False, channels=CHANNELS):
    """The datalist dict: ``training`` items with ``fold`` and ``patient``, ``testing`` items without label, from an
    ISLES 2018 or ISLES 2024 root (a subject with a mask trains).

    Without a case-to-patient CSV (argument, or ``patients.csv`` in ``data_root``) every case counts as its own
    patient, so the two slabs of one ISLES 2018 patient may land in different folds; a warning says so. ISLES 2024
    gives one case per subject: the subject is the patient. ``channels`` may add optional inputs
    (``scripts.data.channels``) after the required ones; ``check`` loads every case with its checks.
    """
    check_channels(channels)
    data_root = os.path.abspath(data_root)
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data_root {data_root} is not a folder")
    release, reads = next((tree for find in TREES if (tree := find(data_root, channels))), (None, None))
    if release is None:
        raise InvalidCaseError(
            f"{data_root}: neither an ISLES 2018 root ({isles18.TRAINING_DIR}/ and/or {isles18.TESTING_DIR}/ of case_N"
            f" folders) nor an ISLES 2024 one ({isles24.EXPECTED})"
        )
    items, skipped = read_valid_cases(reads, check, skip_invalid, channels)
    training, testing = [i for i in items if "label" in i], [i for i in items if "label" not in i]
    if not items:
        raise InvalidCaseError(f"{data_root}: no usable cases ({release} CT perfusion)")
    if release == "ISLES 2024" and training and testing:
        logger.warning(
            "%d subject(s) without a %s file are testing cases, not training ones: %s",
            len(testing),
            isles24.MASK_SUFFIX,
            ", ".join(i["case"] for i in testing),
        )
    log_skipped(skipped)
    if patients_csv is None and os.path.isfile(os.path.join(data_root, "patients.csv")):
        patients_csv = os.path.join(data_root, "patients.csv")
    cases = [item["case"] for item in training]
    patients = {case: case for case in cases}
    if patients_csv is not None:
        patients = read_patients_csv(patients_csv)
        unknown = [case for case in cases if case not in patients]
        if unknown:
            raise ValueError(f"{patients_csv}: no patient for case(s) {', '.join(unknown)}")
    elif release == "ISLES 2018":
        logger.warning(
            "no case-to-patient CSV: each case is its own patient; slabs of one patient may split across folds"
        )
    fold_of = assign_folds(cases, patients, folds, seed) if training else {}
    for item in training:
        item.update(patient=patients[item["case"]], fold=fold_of[item["case"]])

    def relative(item):
        return {key: os.path.relpath(v, data_root) if key == "label" else v for key, v in item.items()} | {
            "image": [os.path.relpath(p, data_root) for p in item["image"]]
        }

    return {
        "name": f"{release} CT perfusion",
        "channels": list(channels),
        "median_spacing": median_spacing(training),
        "num_folds": folds,
        "seed": seed,
        "patients_csv": patients_csv,
        "skipped": skipped,
        "training": [relative(item) for item in training],
        "testing": [relative(item) for item in testing],
    }


def _require_datalist(data_list_file_path, dataset_dir):
    if not os.path.isfile(data_list_file_path):
        raise FileNotFoundError(
            f"datalist {data_list_file_path} not found; build it with: python -m scripts.tools.prepare_datalist"
            f" --data_root {dataset_dir} --output {data_list_file_path}"
        )


def _read_section(path, key, base_dir=None, is_segmentation=True, channels=CHANNELS):
    """The ``key`` section of the datalist file ``path``, read by MONAI's ``load_decathlon_datalist``; a file that
    is not JSON (empty, truncated, another format) is named, which the JSON parser's own message does not do, and so
    is a datalist whose ``channels`` (``build_datalist`` records them) are not the model's ``channels``."""
    try:
        with open(path) as f:
            listed = json.load(f).get("channels", list(CHANNELS))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise InvalidCaseError(f"{path} is not a datalist: it is not valid JSON, or not a JSON object ({err})") from err
    if listed != list(channels):
        raise InvalidCaseError(
            f"{path} lists its images in the channel order {listed}; the model takes {list(channels)} (the"
            f" 'channels' id; a datalist with them: prepare_datalist --channels {','.join(channels)})"
        )
    items = load_decathlon_datalist(path, is_segmentation=is_segmentation, data_list_key=key, base_dir=base_dir)
    for index, item in enumerate(items):
        item["case"] = item.get("case") or (case_name(item["image"]) if item.get("image") else f"item {index}")
    return items


def _named_channel(path):
    """The input a file's name says it holds (ISLES 2018 ``SMIR.Brain.XX.O.<MOD>.<id>``, ISLES 2024
    ``..._space-ncct_<map>``), None when the name says nothing."""
    stem = file_stem(path)
    smir = isles18.SMIR_NAME.match(stem) or isles18.SMIR_NAME.match(os.path.basename(os.path.dirname(path)))
    if smir:
        return isles18.key_of_token(smir.group("mod"))
    endings = {c.name: "_" + c.isles24.rsplit("/", 1)[-1] for c in spec.SPEC if c.isles24}
    return next((name for name, ending in endings.items() if stem.lower().endswith(ending)), None)


def check_entries(items, source, need_label=False, need_fold=False, channels=CHANNELS):
    """Check the structure of datalist items before any file is read: ``image`` one file or the channels' files, and
    where asked a ``label`` file and an integer ``fold``. Raises ``InvalidCaseError`` naming the case and ``source``."""
    for item in items:
        image, case = item.get("image"), item["case"]
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
        computed_positions(item, channels)
        if need_label and not isinstance(item.get("label"), str):
            raise InvalidCaseError(f"{case}: no 'label' file in {source}; training and evaluation need one per case")
        fold = item.get("fold")
        if need_fold and (isinstance(fold, bool) or not isinstance(fold, int)):
            raise InvalidCaseError(f"{case}: 'fold' in {source} must be an integer, got {fold!r}")


def check_unique_names(items):
    """Every case must have its own name: outputs are named after it."""
    seen = {}
    for item in items:
        first = item["image"] if isinstance(item["image"], str) else item["image"][0]
        if item["case"] in seen:
            raise InvalidCaseError(
                f"two cases are named {item['case']} ({seen[item['case']]} and {first}); their outputs would overwrite"
                " each other: outputs are named after the ISLES case folder, else after the (first) file"
            )
        seen[item["case"]] = first


def _check_all(items, check, channels):
    """With ``check``, every item loaded with its checks before any work: inference and evaluation read their cases
    one at a time, so a bad case would otherwise stop the run part-way. A raw series that maps are computed from is
    checked from its header here (read once, in the run, where the maps are computed)."""
    if as_bool(check, "check_inputs"):
        load = LoadCased(("image", "label"), channels, compute_maps=False)
        for item in items:
            load(item)


def load_fold(data_list_file_path, dataset_dir, fold, channels=CHANNELS):
    """One fold of the ``training`` section, for the training configs; the files are read (and checked, with
    ``check_inputs``) as ``CacheDataset`` loads them, then ``refuse_empty_fold``.

    Args:
        data_list_file_path: the datalist (``python -m scripts.tools.prepare_datalist``).
        dataset_dir: the folder its paths are relative to.
        fold: the fold held out for validation.
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
        if item["case"] in seen:
            raise InvalidCaseError(
                f"{item['case']}: listed twice in the training section of {data_list_file_path} (folds"
                f" {seen[item['case']]} and {item['fold']}); a case in two folds is trained on and validated on"
            )
        seen[item["case"]] = item["fold"]
    if fold not in set(seen.values()):
        raise ValueError(f"fold {fold} is not in {data_list_file_path}, which has folds {sorted(set(seen.values()))}")
    return {
        "train": [item for item in items if item["fold"] != fold],
        "validation": [item for item in items if item["fold"] == fold],
    }


def refuse_empty_fold(dataset, fold, check=True):
    """Refuse, with ``check``, a fold whose training labels are all empty (the network would learn nothing), from the
    lesion voxels ``LoadCased`` counted as ``dataset`` (a ``CacheDataset``) cached the labels; cases not cached
    (``cache_rate`` < 1) are not counted. MONAI has no public accessor of the cache: ``_cache`` is read."""
    counts = [c["label"].meta.get("lesion_voxels") for c in getattr(dataset, "_cache", []) if isinstance(c, dict)]
    if as_bool(check, "check_inputs") and counts and not any(counts):
        raise InvalidCaseError(
            f"the labels of all {len(counts)} training cases of fold {fold} are empty; the network would learn"
            " nothing (its loss stays near 1)"
        )


def load_section(data_list_file_path, dataset_dir, section="validation", fold=0, check=False, channels=CHANNELS):
    """Labelled cases to evaluate, with absolute paths: the ``"validation"`` (or ``"train"``) part of ``fold`` (see
    ``load_fold``), or every case of another datalist section, e.g. ``"training"`` or a ``"testing"`` section that has
    labels; ``check`` loads each case with its checks first. Raises ``InvalidCaseError`` for cases without a label,
    and when two cases get one name."""
    if section in ("train", "validation"):
        items = load_fold(data_list_file_path, dataset_dir, fold, channels=channels)[section]
    else:
        _require_datalist(data_list_file_path, dataset_dir)
        items = _read_section(data_list_file_path, section, base_dir=dataset_dir, channels=channels)
        check_entries(items, data_list_file_path, channels=channels)
        unlabelled = [item["case"] for item in items if "label" not in item]
        if unlabelled:
            raise InvalidCaseError(
                f"{data_list_file_path}: section '{section}' has no label for"
                f" {', '.join(unlabelled)}; evaluation needs labels (inference.json does not)"
            )
    if not items:
        raise InvalidCaseError(f"{data_list_file_path}: no cases in section '{section}'")
    check_unique_names(items)
    _check_all(items, check, channels)
    return items


def find_inputs(source, data_list_key="testing", check=False, channels=CHANNELS):
    """Unlabelled cases to segment, as items ``{"image", "case"}`` with absolute paths; ``image`` is a file per channel
    or one 4D NIfTI file with the channels last. ``source`` is:

    - an ISLES 2018 root (with a ``TESTING`` folder): its TESTING cases;
    - a folder of ISLES 2018 case folders (``case_N/SMIR.Brain.XX.O.<MOD>.<id>/...``), or one such case folder;
    - an ISLES 2024 root (``scripts.data.isles24``): every subject;
    - a folder of 4D NIfTI files, one case each;
    - a datalist ``.json``: the ``image`` of each item of its ``data_list_key`` section (relative paths are relative to
      the file's folder).

    Labels are ignored. ``check`` loads every case with its checks first. ``channels`` (the model's) may add optional
    inputs after the required ones (ISLES 2024 trees, 4D files with as many channels, datalists that list them).
    Raises ``InvalidCaseError`` naming the case and the file, also when two cases would get the same name.
    """
    check_channels(channels)
    source = os.path.abspath(source)
    if os.path.isfile(source) and source.lower().endswith(".json"):
        items = _read_section(source, data_list_key, is_segmentation=False, channels=channels)
    elif not os.path.isdir(source):
        raise FileNotFoundError(f"{source} is neither a folder nor a datalist .json file")
    else:
        items = next(found for find in FOLDERS if (found := find(source, channels)) is not None)
    items = [{key: item[key] for key in ("image", "case", MAPS_SOURCE) if key in item} for item in items]
    if not items:
        raise InvalidCaseError(
            f"{source}: no cases (an ISLES 2018 or 2024 root, a folder of case folders or of 4D NIfTI files,"
            f" or a datalist .json)"
        )
    check_entries(items, source, channels=channels)
    for item in items if os.path.isfile(source) else []:  # a datalist names files relative to its own folder
        missing = next((p for p in ensure_tuple(item["image"]) if not os.path.exists(p)), None)
        if missing:
            raise InvalidCaseError(
                f"{item['case']}: {missing}, listed in {source}, does not exist; the relative paths of a datalist"
                f" given as dataset_dir are relative to its folder ({os.path.dirname(source)}): keep it in the folder"
                " its paths are relative to, or give absolute paths"
            )
    check_unique_names(items)
    _check_all(items, check, channels)
    return items

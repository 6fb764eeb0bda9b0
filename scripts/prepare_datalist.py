"""Build a MONAI datalist (with patient-grouped folds) from an ISLES 2018 CT-perfusion tree, and check its files.

MONAI reads datalists (``load_decathlon_datalist``) but knows nothing of the ISLES folder layout, of
patients who gave two slabs, or of the ways a scan folder can be broken; this module fills that gap.

    python -m scripts.prepare_datalist --data_root DIR --output datalist.json --folds 5 --seed 0 [--check]
"""

import csv
import json
import logging
import os
from collections import defaultdict

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist

from scripts.cli import as_bool
from scripts.isles import (
    CHANNELS,
    IGNORED_TOKENS,
    LABEL,
    NIFTI_SUFFIXES,
    SMIR_NAME,
    TESTING_DIR,
    TRAINING_DIR,
    key_of_token,
)

logger = logging.getLogger(__name__)


class InvalidCaseError(ValueError):
    """A case that cannot be used; the message names the case and the file."""


def _find_dir(parent, name):
    """``parent/name`` matched case-insensitively (releases differ in the case of folder names)."""
    if not os.path.isdir(parent):
        return None
    matches = [d for d in sorted(os.listdir(parent)) if d.lower() == name.lower() and os.path.isdir(os.path.join(parent, d))]
    return os.path.join(parent, matches[0]) if matches else None


def _case_sort_key(name):
    number = name.rsplit("_", 1)[-1]
    return (0, int(number), name) if number.isdigit() else (1, 0, name)


def find_cases(data_root, section):
    """Case folders (``case_N``) of ``TRAINING`` or ``TESTING``, in numeric order; [] if the section is absent."""
    section_dir = _find_dir(data_root, section)
    return [] if section_dir is None else case_folders(section_dir)


def case_folders(folder):
    """``(name, path)`` of the sub-folders of ``folder``, in numeric order of their ``_N`` suffix.

    A symbolic link whose target is missing is listed too (``read_case`` then names it), not dropped unseen."""
    names = [d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))
             or os.path.islink(os.path.join(folder, d)) and not os.path.exists(os.path.join(folder, d))]
    return [(name, os.path.join(folder, name)) for name in sorted(names, key=_case_sort_key)]


def _map_file(case, map_dir):
    """The one NIfTI file in a ``SMIR.Brain.XX.O.<MOD>.<id>`` folder."""
    files = [f for f in sorted(os.listdir(map_dir)) if f.lower().endswith(NIFTI_SUFFIXES)]
    if len(files) != 1:
        found = ", ".join(sorted(os.listdir(map_dir))) or "nothing"
        raise InvalidCaseError(f"{case}: expected one .nii or .nii.gz file in {map_dir}, found {found}")
    return os.path.join(map_dir, files[0])


def read_case(case, case_dir, with_label):
    """Map the case's folders to ``{"image": [CT, CBF, CBV, MTT, Tmax], "label": OT}`` (absolute paths)."""
    if not os.path.isdir(case_dir):
        raise InvalidCaseError(f"{case}: {case_dir} is a symbolic link to {os.readlink(case_dir)}, which does not exist")
    found = {}
    for entry in sorted(os.listdir(case_dir)):
        path = os.path.join(case_dir, entry)
        match = SMIR_NAME.match(entry)
        if not os.path.isdir(path) or match is None:
            continue
        token = match.group("mod")
        key = key_of_token(token)
        if key is None:
            if token.upper() not in (t.upper() for t in IGNORED_TOKENS):
                logger.warning("%s: ignoring folder %s (unknown modality %s)", case, path, token)
            continue
        if key in found:
            raise InvalidCaseError(f"{case}: two folders for {key}: {os.path.dirname(found[key])} and {path}")
        found[key] = _map_file(case, path)
    if not found:
        raise InvalidCaseError(f"{case}: no SMIR.Brain.XX.O.<MOD>.<id> map folders in {case_dir}")
    wanted = CHANNELS + ((LABEL,) if with_label else ())
    missing = [key for key in wanted if key not in found]
    if missing:
        raise InvalidCaseError(f"{case}: missing {', '.join(missing)} in {case_dir} (found {', '.join(found)})")
    item = {"image": [found[c] for c in CHANNELS], "case": case}
    if with_label:
        item["label"] = found[LABEL]
    return item


# Largest magnitude accepted in a map or label, after the header's scaling. No CT (HU), perfusion map or label value
# comes near it; beyond it lie "no value" markers such as FLT_MAX (3.4e38), and a float32 z-score over a slab with such
# a value loses the rest of the map (beyond about 1e19 its sum of squares overflows to Inf, and the input to NaN).
MAX_ABS_VALUE = 1e6


def same_grid(affine, ref_affine):
    """Whether two affines describe one grid, by the rule MONAI's ``NibabelReader`` applies when it stacks the maps
    of a case (``np.allclose`` with its default tolerances), so that the check refuses exactly what loading would."""
    return np.allclose(affine, ref_affine)


def _values_problem(data):
    """What is wrong with a map's values as the pipeline reads them (float32 after the header's scaling), or None."""
    with np.errstate(over="ignore", invalid="ignore"):
        values = data.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        count = int((~finite).sum())
        where = "" if np.isfinite(data).all() else " (NaN/Inf in the file)"
        return f"{count} values that are NaN/Inf as float32{where}, e.g. {data[~finite].flat[0]:.4g}"
    large = np.abs(values) > MAX_ABS_VALUE
    if large.any():
        return (f"{int(large.sum())} values beyond +-{MAX_ABS_VALUE:g} (largest {np.abs(values).max():.4g}), e.g. a"
                f" 'no value' marker; set them to 0 (or to a value the map can hold) before use")
    return None


def check_case(item):
    """Load every file of a datalist item (absolute paths) and check grids, values and the label.

    ``item["image"]`` is the 5 maps in channel order, or one 4D file with the 5 channels last (x, y, z, 5).
    Values are checked as the pipeline reads them: after the header's scaling (``scl_slope``/``scl_inter``), as
    float32.

    Returns:
        The number of lesion voxels of the label, None for an item without label.

    Raises:
        InvalidCaseError: naming the case and the file, for unreadable/truncated/non-NIfTI files, a 4D file that is not
            (x, y, z, 5), a shape or affine that differs from the CT's (``same_grid``), values that are NaN/Inf as
            float32 or beyond ``MAX_ABS_VALUE``, and a label with values other than 0 and 1.
    """
    case = item.get("case", "?")
    image = item["image"]
    one_file = isinstance(image, str)
    files = [("image", image)] if one_file else list(zip(CHANNELS, image))
    files += [(LABEL, item["label"])] if "label" in item else []
    ref_shape = ref_affine = lesion_voxels = None
    for name, path in files:
        try:
            img = nib.load(path)
            data = np.asanyarray(img.dataobj)
        except Exception as err:  # nibabel raises several types for missing, truncated and foreign files
            raise InvalidCaseError(f"{case}: cannot read {name} file {path}: {err}") from err
        shape = data.shape
        if name == "image":
            if data.ndim != 4 or shape[3] != len(CHANNELS):
                raise InvalidCaseError(f"{case}: image file {path} has shape {shape}; a single-file input must be"
                                       f" (x, y, z, {len(CHANNELS)}) with the channels {', '.join(CHANNELS)} last")
            shape = shape[:3]
        if ref_shape is None:
            ref_shape, ref_affine = shape, img.affine
        elif shape != ref_shape:
            raise InvalidCaseError(f"{case}: {name} file {path} has shape {shape}, CT has {ref_shape}")
        elif not same_grid(img.affine, ref_affine):
            raise InvalidCaseError(
                f"{case}: {name} file {path} has an affine that differs from the CT's (by up to"
                f" {np.abs(img.affine - ref_affine).max():.2g}; MONAI stacks maps only when np.allclose holds)"
                f"\n{np.array2string(img.affine, precision=6)}\nvs CT\n{np.array2string(ref_affine, precision=6)}"
            )
        problem = _values_problem(data)
        if problem:
            raise InvalidCaseError(f"{case}: {name} file {path} has {problem}")
        if name == LABEL:
            extra = np.setdiff1d(np.unique(data), [0, 1])
            if extra.size:
                raise InvalidCaseError(f"{case}: label file {path} is not binary: values {extra[:10].tolist()} besides 0/1")
            lesion_voxels = int(np.count_nonzero(data))
    return lesion_voxels


def read_patients_csv(path):
    """``{case: patient}`` from a CSV with columns ``case,patient``."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"case", "patient"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: a case-to-patient CSV needs the columns 'case' and 'patient', got {reader.fieldnames}")
        patients = {}
        for line, row in enumerate(reader, start=2):
            case, patient = (row["case"] or "").strip(), (row["patient"] or "").strip()
            if not case or not patient:
                raise ValueError(f"{path}, line {line}: empty case or patient")
            if patients.setdefault(case, patient) != patient:
                raise ValueError(f"{path}, line {line}: case {case} is given to patient {patient}, an earlier line gave"
                                 f" it to patient {patients[case]}")
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


def _collect(data_root, section, with_label, check, skip_invalid):
    items, skipped = [], []
    for case, case_dir in find_cases(data_root, section):
        try:
            item = read_case(case, case_dir, with_label)
            if check:
                check_case(item)
        except InvalidCaseError as err:
            if not skip_invalid:
                raise
            skipped.append(f"{section}/{err}")
            continue
        items.append(item)
    return items, skipped


def _relative(item, data_root):
    out = dict(item, image=[os.path.relpath(p, data_root) for p in item["image"]])
    if "label" in item:
        out["label"] = os.path.relpath(item["label"], data_root)
    return out


def build_datalist(data_root, folds=5, seed=0, patients_csv=None, check=False, skip_invalid=False):
    """The datalist dict: ``training`` items with ``fold`` and ``patient``, ``testing`` items without label.

    Without a case-to-patient CSV (argument, or ``patients.csv`` in ``data_root``) every case counts as its own
    patient, so the two slabs of one ISLES patient may land in different folds; a warning says so.
    """
    data_root = os.path.abspath(data_root)
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data_root {data_root} is not a folder")
    training, skipped = _collect(data_root, TRAINING_DIR, True, check, skip_invalid)
    testing, skipped_test = _collect(data_root, TESTING_DIR, False, check, skip_invalid)
    skipped += skipped_test
    if not training and not testing:
        raise InvalidCaseError(f"{data_root}: no usable case folders under {TRAINING_DIR}/ or {TESTING_DIR}/")
    if skipped:
        logger.warning("skipped %d invalid case(s):\n  %s", len(skipped), "\n  ".join(skipped))
    if patients_csv is None and os.path.isfile(os.path.join(data_root, "patients.csv")):
        patients_csv = os.path.join(data_root, "patients.csv")
    cases = [item["case"] for item in training]
    if patients_csv is None:
        logger.warning("no case-to-patient CSV: each case is its own patient; slabs of one patient may split across folds")
        patients = {case: case for case in cases}
    else:
        patients = read_patients_csv(patients_csv)
        unknown = [case for case in cases if case not in patients]
        if unknown:
            raise ValueError(f"{patients_csv}: no patient for case(s) {', '.join(unknown)}")
    fold_of = assign_folds(cases, patients, folds, seed) if training else {}
    for item in training:
        item.update(patient=patients[item["case"]], fold=fold_of[item["case"]])
    return {
        "name": "ISLES 2018 CT perfusion",
        "channels": list(CHANNELS),
        "num_folds": folds,
        "seed": seed,
        "patients_csv": patients_csv,
        "skipped": skipped,
        "training": [_relative(item, data_root) for item in training],
        "testing": [_relative(item, data_root) for item in testing],
    }


def main(data_root: str, output: str = "datalist.json", folds: int = 5, seed: int = 0, patients_csv: str | None = None,
         check: bool = False, skip_invalid: bool = False, overwrite: bool = False):
    """CLI: write the datalist of ``data_root`` to ``output``; never replaces an existing file without ``--overwrite``."""
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    datalist = build_datalist(data_root, folds, seed, patients_csv, check, skip_invalid)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(datalist, f, indent=2)
    print(f"{output}: {len(datalist['training'])} training cases in {folds} folds, {len(datalist['testing'])} testing,"
          f" {len(datalist['skipped'])} skipped")


def _require_datalist(data_list_file_path, dataset_dir):
    if not os.path.isfile(data_list_file_path):
        raise FileNotFoundError(
            f"datalist {data_list_file_path} not found; build it with: python -m scripts.prepare_datalist"
            f" --data_root {dataset_dir} --output {data_list_file_path}"
        )


def check_entries(items, source, need_label=False, need_fold=False):
    """Check the structure of datalist items before any file is read: ``image`` one file or the 5 maps, and where
    asked a ``label`` file and an integer ``fold``. Raises ``InvalidCaseError`` naming the case and ``source``."""
    for index, item in enumerate(items):
        image = item.get("image")
        case = item.get("case") or (case_name(image) if image else f"item {index}")
        if not (isinstance(image, str) or isinstance(image, list) and len(image) == len(CHANNELS)
                and all(isinstance(p, str) for p in image)):
            count = len(image) if isinstance(image, list) else repr(image)
            raise InvalidCaseError(f"{case}: 'image' in {source} lists {count} files, expected one 4D file or the"
                                   f" {len(CHANNELS)} maps {', '.join(CHANNELS)}")
        if need_label and not isinstance(item.get("label"), str):
            raise InvalidCaseError(f"{case}: no 'label' file in {source}; training and evaluation need one per case")
        fold = item.get("fold")
        if need_fold and (isinstance(fold, bool) or not isinstance(fold, int)):
            raise InvalidCaseError(f"{case}: 'fold' in {source} must be an integer, got {fold!r}")


def load_fold(data_list_file_path, dataset_dir, fold, check=False):
    """One fold of the ``training`` section, for the training configs.

    Args:
        data_list_file_path: the datalist (``python -m scripts.prepare_datalist``).
        dataset_dir: the folder its paths are relative to.
        fold: the fold held out for validation.
        check: run ``check_case`` on every case, and refuse a fold whose training labels are all empty.

    Returns:
        ``{"train": [...], "validation": [...]}``, items with absolute paths.
    """
    _require_datalist(data_list_file_path, dataset_dir)
    items = load_decathlon_datalist(data_list_file_path, data_list_key="training", base_dir=dataset_dir)
    check_entries(items, data_list_file_path, need_label=True, need_fold=True)
    folds = sorted({item["fold"] for item in items})
    if fold not in folds:
        raise ValueError(f"fold {fold} is not in {data_list_file_path}, which has folds {folds}")
    split = {
        "train": [item for item in items if item["fold"] != fold],
        "validation": [item for item in items if item["fold"] == fold],
    }
    if as_bool(check, "check_inputs"):
        lesion_voxels = {item["case"] if "case" in item else case_name(item["image"]): check_case(item)
                         for item in split["train"]}
        if lesion_voxels and not any(lesion_voxels.values()):
            raise InvalidCaseError(f"{data_list_file_path}: the labels of all {len(lesion_voxels)} training cases of"
                                   f" fold {fold} are empty; the network would learn nothing (its loss stays near 1)")
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
        items = load_decathlon_datalist(data_list_file_path, data_list_key=section, base_dir=dataset_dir)
        check_entries(items, data_list_file_path)
        unlabelled = [case_name(item["image"]) for item in items if "label" not in item]
        if unlabelled:
            raise InvalidCaseError(f"{data_list_file_path}: section '{section}' has no label for"
                                   f" {', '.join(unlabelled)}; evaluation needs labels (inference.json does not)")
    if not items:
        raise InvalidCaseError(f"{data_list_file_path}: no cases in section '{section}'")
    _check_names(items)
    if as_bool(check, "check_inputs"):
        for item in items:
            check_case(item)
    return items


def case_name(image):
    """Name of a case, which its outputs carry, from its ``image`` (one file or a list of files): the ISLES case folder
    (``case_N`` above ``SMIR.Brain.XX.O.<MOD>.<id>/``), else the (first) file's name without ``.nii``/``.nii.gz``."""
    path = os.path.abspath(image if isinstance(image, str) else image[0])
    folder = os.path.dirname(path)
    if SMIR_NAME.match(os.path.basename(folder)):
        return os.path.basename(os.path.dirname(folder))
    name = os.path.basename(path)
    return next(name[: -len(s)] for s in sorted(NIFTI_SUFFIXES, key=len, reverse=True) if name.lower().endswith(s))


def _check_names(items):
    """Every case must get its own ``case_name``: outputs are named after it."""
    seen = {}
    for item in items:
        name, first = case_name(item["image"]), item["image"] if isinstance(item["image"], str) else item["image"][0]
        if name in seen:
            raise InvalidCaseError(f"two cases are named {name} ({seen[name]} and {first}); their outputs would"
                                   f" overwrite each other: outputs are named after the ISLES case folder, else after"
                                   f" the (first) file")
        seen[name] = first


def find_inputs(source, data_list_key="testing", check=False):
    """Unlabelled cases to segment, as items ``{"image", "case"}`` with absolute paths; ``image`` is the 5 maps in
    channel order (CT, CBF, CBV, MTT, Tmax) or one 4D NIfTI file with those 5 channels last, ``case`` its
    ``case_name``. ``source`` is:

    - an ISLES root (with a ``TESTING`` folder): its TESTING cases;
    - a folder of ISLES case folders (``case_N/SMIR.Brain.XX.O.<MOD>.<id>/...``);
    - a folder of 4D NIfTI files, one case each;
    - a datalist ``.json``: the ``image`` of each item of its ``data_list_key`` section (relative paths are relative to
      the file's folder).

    Labels are ignored. ``check`` runs ``check_case`` on every case. Raises ``InvalidCaseError`` naming the case and
    the file, also when two cases would get the same name.
    """
    source = os.path.abspath(source)
    if os.path.isfile(source) and source.lower().endswith(".json"):
        images = [item["image"] for item in load_decathlon_datalist(source, is_segmentation=False,
                                                                    data_list_key=data_list_key)]
    elif not os.path.isdir(source):
        raise FileNotFoundError(f"{source} is neither a folder nor a datalist .json file")
    elif _find_dir(source, TESTING_DIR):
        images = [read_case(case, case_dir, with_label=False)["image"] for case, case_dir in
                  find_cases(source, TESTING_DIR)]
    else:
        files = sorted(f for f in os.listdir(source)
                       if f.lower().endswith(NIFTI_SUFFIXES) and os.path.isfile(os.path.join(source, f)))
        if files:
            images = [os.path.join(source, f) for f in files]
        elif _find_dir(source, TRAINING_DIR):
            raise InvalidCaseError(f"{source} has a {TRAINING_DIR} folder but no {TESTING_DIR} folder; to segment"
                                   f" the training cases pass {os.path.join(source, TRAINING_DIR)}")
        else:
            images = [read_case(case, case_dir, with_label=False)["image"] for case, case_dir in case_folders(source)]
    if not images:
        raise InvalidCaseError(f"{source}: no cases (an ISLES root, a folder of case folders or of 4D NIfTI files,"
                               f" or a datalist .json)")
    items = [{"image": image, "case": case_name(image)} for image in images]
    check_entries(items, source)
    _check_names(items)
    if as_bool(check, "check_inputs"):
        for item in items:
            check_case(item)
    return items


if __name__ == "__main__":
    from scripts.cli import run

    run(main)

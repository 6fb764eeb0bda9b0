"""The datalist of an ISLES 2018 or ISLES 2024 CT-perfusion tree, with patient-grouped folds: what
``python -m scripts.tools.prepare_datalist`` writes and the demo and the cross-validation build (MONAI reads datalists with
``load_decathlon_datalist`` but cannot make one from the ISLES layouts)."""

import csv
import logging
import os
from collections import defaultdict

import nibabel as nib
import numpy as np
from scripts.data import isles24
from scripts.data.isles18 import (
    CHANNELS,
    TESTING_DIR,
    TRAINING_DIR,
    InvalidCaseError,
    check_channels,
    find_cases,
    find_dir,
    log_skipped,
    read_valid_cases,
)

__all__ = ["assign_folds", "build_datalist", "median_spacing", "read_patients_csv"]

logger = logging.getLogger(__name__)


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


def _relative(item, data_root):
    out = dict(item, image=[os.path.relpath(p, data_root) for p in item["image"]])
    if "label" in item:
        out["label"] = os.path.relpath(item["label"], data_root)
    return out


def _read_tree(data_root, check, skip_invalid, channels):
    """The training items (with a label), testing items, skipped messages and release name of an ISLES 2018 root
    (``TRAINING/``, ``TESTING/``) or an ISLES 2024 root (``scripts.data.isles24``: a subject with a mask trains)."""
    roots = isles24.find_root(data_root)  # first: it refuses a root that mixes the releases
    if roots is None and (find_dir(data_root, TRAINING_DIR) or find_dir(data_root, TESTING_DIR)):
        if tuple(channels) != CHANNELS:
            raise InvalidCaseError(f"{data_root}: ISLES 2018 has no {', '.join(channels[len(CHANNELS) :])}")
        training, skipped = read_valid_cases(
            [(c, d, True) for c, d in find_cases(data_root, TRAINING_DIR)], check, skip_invalid
        )
        testing, skipped_test = read_valid_cases(
            [(c, d, False) for c, d in find_cases(data_root, TESTING_DIR)], check, skip_invalid
        )
        return training, testing, skipped + skipped_test, "ISLES 2018 CT perfusion"
    if roots is None:
        raise InvalidCaseError(
            f"{data_root}: neither an ISLES 2018 root ({TRAINING_DIR}/ and/or {TESTING_DIR}/ of case_N folders) nor"
            f" an ISLES 2024 one ({isles24.EXPECTED})"
        )
    subjects = [(s, *roots, channels) for s in isles24.find_subjects(*roots)]
    items, skipped = read_valid_cases(subjects, check, skip_invalid, read=isles24.read_subject, channels=channels)
    training, testing = [i for i in items if "label" in i], [i for i in items if "label" not in i]
    if training and testing:
        logger.warning(
            "%d subject(s) without a %s file are testing cases, not training ones: %s",
            len(testing),
            isles24.MASK_SUFFIX,
            ", ".join(i["case"] for i in testing),
        )
    return training, testing, skipped, "ISLES 2024 CT perfusion"


def median_spacing(items):
    """The median voxel size (mm, per axis) of the items' CT files, read from their headers: the target spacing that
    nnU-Net's dataset fingerprint would choose, for ``target_spacing`` (configs/isles24_native.json); files whose
    header cannot be read are left out (the datalist's check names them); None when no header could be read."""
    if not items:
        return None
    zooms = []
    for item in items:
        try:
            zooms.append(nib.load(item["image"][0]).header.get_zooms()[:3])
        except Exception:  # nibabel raises several types; check_case names unreadable files where asked (--check)
            continue
    if not zooms:
        return None
    return [round(float(z), 4) for z in np.median(np.asarray(zooms, dtype=np.float64), axis=0)]


def build_datalist(data_root, folds=5, seed=0, patients_csv=None, check=False, skip_invalid=False, channels=CHANNELS):
    """The datalist dict: ``training`` items with ``fold`` and ``patient``, ``testing`` items without label, from an
    ISLES 2018 or ISLES 2024 root.

    Without a case-to-patient CSV (argument, or ``patients.csv`` in ``data_root``) every case counts as its own
    patient, so the two slabs of one ISLES 2018 patient may land in different folds; a warning says so. ISLES 2024
    gives one case per subject: the subject is the patient. ``channels`` may add ``OPTIONAL_CHANNELS`` (ISLES 2024's
    CTA) after the five inputs.
    """
    check_channels(channels)
    data_root = os.path.abspath(data_root)
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data_root {data_root} is not a folder")
    training, testing, skipped, release = _read_tree(data_root, check, skip_invalid, channels)
    if not training and not testing:
        raise InvalidCaseError(f"{data_root}: no usable cases ({release})")
    log_skipped(skipped)
    if patients_csv is None and os.path.isfile(os.path.join(data_root, "patients.csv")):
        patients_csv = os.path.join(data_root, "patients.csv")
    cases = [item["case"] for item in training]
    if release.startswith("ISLES 2024") and patients_csv is None:
        patients = {case: case for case in cases}
    elif patients_csv is None:
        logger.warning(
            "no case-to-patient CSV: each case is its own patient; slabs of one patient may split across folds"
        )
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
        "name": release,
        "channels": list(channels),
        "median_spacing": median_spacing(training),
        "num_folds": folds,
        "seed": seed,
        "patients_csv": patients_csv,
        "skipped": skipped,
        "training": [_relative(item, data_root) for item in training],
        "testing": [_relative(item, data_root) for item in testing],
    }

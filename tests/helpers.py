"""Helpers shared by the test modules (pytest puts tests/ on sys.path: `from helpers import ...`)."""

import csv
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
from panoptica import ConnectedComponentsInstanceApproximator, InputType, NaiveThresholdMatching, Panoptica_Evaluator

# The tiny network of the DICOM, PACS and training tests.
TINY_NETWORK = {"features": [2, 4, 8, 16, 32], "spatial_size": [32, 32, 16], "num_workers": 0}


def bundle_run_command(run_id, config_file, **ids) -> list:
    """``python -m monai.bundle run <run_id> --config_file <config_file> --<id> <value> ...`` as a user types it: each
    value as text, a list without spaces."""
    flags = [x for key, value in ids.items() for x in (f"--{key}", str(value).replace(" ", ""))]
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file, *flags]


def initialize_and_run(workflow):
    """``initialize()`` then ``run()`` of a MONAI bundle workflow: one call, for a ``pytest.raises`` block."""
    workflow.initialize()
    workflow.run()


def raised_messages(excinfo):
    """The messages of a raised exception and of its causes, one per line: engines and config expressions wrap the
    error they meet in their own."""
    messages, err = [], excinfo.value
    while err is not None:
        messages.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return "\n".join(messages)


def challenge_scoring(prediction, ground_truth, voxel_size):
    """The ISLES 2024 scoring of one case (github:ezequieldlrosa/isles24, utils/eval_utils.py), called on panoptica
    2.x directly: F1, lesion count difference, Dice, absolute volume difference (``voxel_size`` in mL)."""
    evaluator = Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=NaiveThresholdMatching(matching_threshold=0.2),
    )
    result = evaluator.evaluate(prediction.astype(int), ground_truth.astype(int), verbose=False)["ungrouped"]
    count_difference = abs(result.n_ref_instances - result.n_pred_instances)
    if result.n_ref_instances == 0 and result.n_pred_instances == 0:
        f1, dice = 1.0, 1.0
    else:
        f1, dice = result.rq, result.global_bin_dsc
    volume_difference = abs(np.sum(ground_truth > 0) * voxel_size - np.sum(prediction > 0) * voxel_size)
    return f1, count_difference, dice, volume_difference


def study_files(folder):
    """The .dcm files under ``folder``, sorted."""
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".dcm"))


def canonical(array, affine):
    """(array, affine) reoriented to the closest RAS axes: one image gives one result whatever its voxel order."""
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asanyarray(array), affine))
    return np.asanyarray(image.dataobj), image.affine


def run_bundle(repo_root, configs, bundle_root, dataset_dir, output_dir, *extra):
    """`python -m monai.bundle run` with the tiny network; the finished process (stdout and stderr as text)."""
    folders = {"bundle_root": bundle_root, "dataset_dir": dataset_dir, "output_dir": output_dir}
    cmd = bundle_run_command("run", configs, **folders, **TINY_NETWORK) + list(extra)
    return subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600, check=False)


def read_rows(path):
    """The rows of a CSV file (per_case.csv), by their ``case``."""
    with open(path, newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def sr_texts(dataset):
    """Every TEXT content item of an SR, ``{concept meaning: [values]}``, from its content tree at any depth."""
    found = {}
    for item in dataset.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            found.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(item.TextValue)
        for meaning, values in sr_texts(item).items():
            found.setdefault(meaning, []).extend(values)
    return found

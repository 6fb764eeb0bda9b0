"""benchmarks/peers.py without nnU-Net: a synthetic tree written as nnU-Net v2's raw dataset (files, channels,
geometry, labels, the bundle's folds as nnU-Net's splits), and the scoring of a mask file with the bundle's metrics."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from helpers import challenge_scoring
from scripts.data.channels import CHANNELS
from scripts.data.datalist import build_datalist, case_name
from scripts.synthetic.isles import generate_isles24

from benchmarks.peers import NNUNET_CHANNEL_NAMES, nnunet_raw_dataset, score_case


def _voxels(path):
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image


def _convert(tmp_path, tree, channels=CHANNELS):
    datalist = build_datalist(tree, folds=5, seed=0, check=True, channels=channels)
    datalist_path = tmp_path / "datalist.json"
    datalist_path.write_text(json.dumps(datalist))
    raw_dir = tmp_path / "raw" / "Dataset501_Peers"
    summary = nnunet_raw_dataset(str(datalist_path), tree, str(raw_dir), "synthetic test tree")
    return datalist, raw_dir, summary


def _check_raw_dataset(tree, datalist, raw_dir, channels):
    """Every training case of ``datalist`` in ``raw_dir`` as nnU-Net v2 reads it, and nothing else there."""
    items = datalist["training"]
    cases = sorted(case_name(item["image"]) for item in items)
    dataset = json.loads((raw_dir / "dataset.json").read_text())
    assert dataset["channel_names"] == {str(i): NNUNET_CHANNEL_NAMES.get(c, c) for i, c in enumerate(channels)}
    assert dataset["labels"] == {"background": 0, "lesion": 1}
    assert dataset["numTraining"] == len(items) and dataset["file_ending"] == ".nii.gz"
    expected_images = {f"{case}_{i:04d}.nii.gz" for case in cases for i in range(len(channels))}
    assert set(os.listdir(raw_dir / "imagesTr")) == expected_images
    assert set(os.listdir(raw_dir / "labelsTr")) == {f"{case}.nii.gz" for case in cases}
    for item in items:
        case = case_name(item["image"])
        label, label_image = _voxels(os.path.join(tree, item["label"]))
        for i, source in enumerate(item["image"]):
            original, original_image = _voxels(os.path.join(tree, source))
            converted, converted_image = _voxels(raw_dir / "imagesTr" / f"{case}_{i:04d}.nii.gz")
            # channel i is the datalist's i-th input, voxel for voxel, on its own grid
            assert converted.dtype == original.dtype and np.array_equal(converted, original), (case, i)
            assert np.allclose(converted_image.affine, original_image.affine)
            assert converted_image.header.get_zooms() == original_image.header.get_zooms()
        converted, converted_image = _voxels(raw_dir / "labelsTr" / f"{case}.nii.gz")
        assert converted.dtype == np.uint8 and set(np.unique(converted)) <= {0, 1}
        assert np.array_equal(converted, (label > 0).astype(np.uint8)) and converted.any(), case
        assert np.allclose(converted_image.affine, label_image.affine) and converted.shape == label.shape
    # the bundle's folds, in order: nnU-Net's fold k validates on the datalist's fold k
    splits = json.loads((raw_dir / "splits_final.json").read_text())
    folds = sorted({item["fold"] for item in items})
    assert len(splits) == len(folds) == 5
    for fold, split in zip(folds, splits):
        held_out = sorted(case_name(item["image"]) for item in items if item["fold"] == fold)
        assert split["val"] == held_out and held_out
        assert split["train"] == sorted(set(cases) - set(held_out))


def test_an_isles18_tree_becomes_nnunet_raw_dataset(tmp_path, synthetic_tree):
    datalist, raw_dir, summary = _convert(tmp_path, synthetic_tree)
    _check_raw_dataset(synthetic_tree, datalist, raw_dir, CHANNELS)
    assert summary["channels"] == list(CHANNELS)
    # the two slabs of one patient are on the same side of every split, as in the bundle's folds
    patients = {case_name(item["image"]): item["patient"] for item in datalist["training"]}
    for split in json.loads((raw_dir / "splits_final.json").read_text()):
        assert not {patients[c] for c in split["train"]} & {patients[c] for c in split["val"]}


def test_an_isles24_tree_with_cta_becomes_nnunet_raw_dataset(tmp_path):
    tree = str(tmp_path / "isles24")
    generate_isles24(tree, num_train=5, num_test=0, seed=1, in_plane=24, slices=8)
    channels = CHANNELS + ("CTA",)
    datalist, raw_dir, _ = _convert(tmp_path, tree, channels)
    _check_raw_dataset(tree, datalist, raw_dir, channels)
    # nnU-Net's CT normalisation for the NCCT and the CTA, a z-score for the maps
    names = json.loads((raw_dir / "dataset.json").read_text())["channel_names"]
    assert names == {"0": "CT", "1": "CBF", "2": "CBV", "3": "MTT", "4": "Tmax", "5": "CT"}


def test_score_case_gives_the_challenge_figures_on_the_label_grid(tmp_path):
    affine = np.diag([0.8, 0.9, 5.0, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 3.0]
    label = np.zeros((20, 20, 6), np.uint8)
    label[2:8, 2:8, 1:3] = 1
    label[12:16, 12:18, 3:5] = 1
    prediction = np.zeros_like(label)
    prediction[3:8, 2:9, 1:3] = 1  # overlaps the first lesion
    prediction[0:2, 15:19, 5] = 1  # a false positive
    for name, array in (("label", label), ("prediction", prediction)):
        nib.save(nib.Nifti1Image(array, affine), tmp_path / f"{name}.nii.gz")
    values = score_case(str(tmp_path / "prediction.nii.gz"), str(tmp_path / "label.nii.gz"))
    voxel_ml = 0.8 * 0.9 * 5.0 / 1000
    f1, count_difference, dice, volume_difference = challenge_scoring(prediction, label, voxel_ml)
    assert values["dice"] == pytest.approx(dice, abs=1e-6)
    assert values["lesion_f1"] == pytest.approx(f1, abs=1e-6) and 0 < f1 < 1
    assert values["lesion_count_diff"] == count_difference == 0
    assert values["volume_abs_diff_ml"] == pytest.approx(volume_difference, rel=1e-5)
    assert values["volume_true_ml"] == pytest.approx(label.sum() * voxel_ml, rel=1e-5)

    # a mask on another grid is refused, naming both files
    nib.save(nib.Nifti1Image(prediction[:, :, :5], affine), tmp_path / "cropped.nii.gz")
    with pytest.raises(ValueError, match="cropped.nii.gz.*is not the grid of .*label.nii.gz"):
        score_case(str(tmp_path / "cropped.nii.gz"), str(tmp_path / "label.nii.gz"))


def test_the_per_voxel_classifier_learns_the_lesions_of_held_out_cases(tmp_path, synthetic_tree):
    """benchmarks/voxel_classifier.py fitted on a fold's training cases: on the held-out cases it finds lesion
    (Dice well above an all-lesion mask's), each row holds every metric of the bundle's evaluation, and the masks it
    writes are on each case's own grid."""
    from benchmarks import voxel_classifier

    datalist = build_datalist(synthetic_tree, folds=2, seed=0, check=True)
    datalist_path = tmp_path / "datalist.json"
    datalist_path.write_text(json.dumps(datalist))
    result = voxel_classifier.evaluate(str(datalist_path), synthetic_tree, 0, output_dir=str(tmp_path / "masks"))
    held_out = [item for item in datalist["training"] if item["fold"] == 0]
    assert [row["case"] for row in result["rows"]] == [case_name(item["image"]) for item in held_out]
    everything = []
    for item, row in zip(held_out, result["rows"]):
        label, image = _voxels(os.path.join(synthetic_tree, item["label"]))
        mask, written = _voxels(tmp_path / "masks" / f"{row['case']}.nii.gz")
        assert mask.shape == label.shape and np.allclose(written.affine, image.affine)
        everything.append(2 * label.sum() / (label.size + label.sum()))  # Dice of an all-lesion mask
    assert np.mean([row["dice"] for row in result["rows"]]) > max(0.3, 2 * np.mean(everything))

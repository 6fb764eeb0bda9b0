"""scripts/perfusion_report.py on hand-made maps, its figures counted independently, and the threshold baseline."""

import csv

import nibabel as nib
import numpy as np
import pytest
from scripts.isles import CHANNELS
from scripts.perfusion_report import perfusion_figures, score_threshold_baseline, write_perfusion_report

SPACING = (0.8, 0.9, 5.0)  # mm: one voxel is 3.6 mm^3


def case_files(folder, tmax_scale=1.0):
    """A 40 x 40 x 8 brain: healthy CBF 50 and Tmax 2 s; a hypoperfused box (Tmax 8 s) holding a severe part (Tmax
    12 s) and a core (CBF 10, under 30 % of 50); 0 outside the brain. Returns the 5 files, the label and the masks."""
    shape = (48, 48, 8)
    brain = np.zeros(shape, bool)
    brain[4:44, 4:44, :] = True
    hypo, severe, core = (np.zeros(shape, bool) for _ in range(3))
    hypo[10:30, 10:30, 2:6] = True
    severe[10:20, 10:30, 2:6] = True
    core[12:18, 12:22, 3:5] = True
    cbf = np.where(brain, 50.0, 0.0)
    cbf[core] = 10.0
    tmax = np.where(brain, 2.0, 0.0)
    tmax[hypo], tmax[severe] = 8.0, 12.0
    arrays = {
        "CT": np.where(brain, 35.0, -1000.0),
        "CBF": cbf,
        "CBV": np.where(brain, 4.0, 0.0),
        "MTT": np.where(brain, 4.0, 0.0),
        "Tmax": tmax * tmax_scale,
    }
    affine = np.diag([*SPACING, 1.0])
    files = []
    for name in CHANNELS:
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arrays[name].astype(np.float32), affine), path)
        files.append(str(path))
    label = folder / "label.nii.gz"
    nib.save(nib.Nifti1Image(core.astype(np.uint8), affine), label)
    return files, str(label), hypo, severe, core


def ml(mask):
    return mask.sum() * np.prod(SPACING) / 1000


def test_figures_recomputed_from_the_maps(tmp_path):
    files, _, hypo, severe, core = case_files(tmp_path)
    figures = perfusion_figures(files)
    assert figures["hypoperfusion_ml"] == pytest.approx(ml(hypo), abs=1e-3)
    assert figures["core_rcbf_ml"] == pytest.approx(ml(core), abs=1e-3)
    assert figures["mismatch_ml"] == pytest.approx(ml(hypo) - ml(core), abs=1e-3)
    assert figures["mismatch_ratio"] == pytest.approx(ml(hypo) / ml(core), abs=1e-3)
    assert figures["hypoperfusion_intensity_ratio"] == pytest.approx(ml(severe) / ml(hypo), abs=1e-3)
    stricter = perfusion_figures(files, {"rcbf": 0.1})  # thresholds are settings: CBF 10 is not < 5
    assert stricter["core_rcbf_ml"] == 0 and stricter["mismatch_ratio"] == ""


def test_tmax_in_milliseconds_gives_a_note_not_figures(tmp_path):
    files, *_ = case_files(tmp_path, tmax_scale=1000.0)
    figures = perfusion_figures(files)
    assert "milliseconds" in figures["perfusion_note"] and figures["hypoperfusion_ml"] == ""


def test_report_joins_volumes_csv_and_the_baseline_scores_the_threshold_core(tmp_path):
    files, label, _, _, core = case_files(tmp_path)
    volumes = tmp_path / "volumes.csv"
    volumes.write_text("case,volume_pred_ml\nCT,1.5\n")
    (row,) = write_perfusion_report([{"image": files}], str(volumes))
    assert row["volume_pred_ml"] == "1.5" and float(row["core_rcbf_ml"]) == pytest.approx(ml(core), abs=1e-3)
    with open(volumes) as f:
        assert next(csv.DictReader(f))["hypoperfusion_intensity_ratio"] != ""
    (scores,) = score_threshold_baseline([{"image": files, "label": label}], str(tmp_path / "baseline.csv"))
    assert scores["dice"] == pytest.approx(1.0) and scores["hd95_mm"] == pytest.approx(0.0)
    assert scores["volume_true_ml"] == pytest.approx(ml(core), rel=1e-5)

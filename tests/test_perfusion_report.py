"""scripts/report/perfusion.py on hand-made maps, its figures counted independently, and the threshold core that
scripts/report/cases.py's PerfusionReportd hands evaluation as its baseline."""

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from scripts.data.channels import CHANNELS
from scripts.report.cases import PER_CASE, THRESHOLD_CORE, CaseOutputsWriter, PerfusionReportd
from scripts.report.perfusion import perfusion_figures, perfusion_regions

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


def figures_of(files, thresholds=None):
    cbf, tmax = (np.asanyarray(nib.load(files[CHANNELS.index(c)]).dataobj) for c in ("CBF", "Tmax"))
    return perfusion_figures(*perfusion_regions(cbf, tmax, thresholds), np.prod(SPACING) / 1000)


def test_figures_recomputed_from_the_maps(tmp_path):
    files, _, hypo, severe, core = case_files(tmp_path)
    figures = figures_of(files)
    assert figures["hypoperfusion_ml"] == pytest.approx(ml(hypo), abs=1e-3)
    assert figures["core_rcbf_ml"] == pytest.approx(ml(core), abs=1e-3)
    assert figures["mismatch_ml"] == pytest.approx(ml(hypo) - ml(core), abs=1e-3)
    assert figures["mismatch_ratio"] == pytest.approx(ml(hypo) / ml(core), abs=1e-3)
    assert figures["hypoperfusion_intensity_ratio"] == pytest.approx(ml(severe) / ml(hypo), abs=1e-3)
    stricter = figures_of(files, {"rcbf": 0.1})  # thresholds are settings: CBF 10 is not < 5
    assert stricter["core_rcbf_ml"] == 0 and stricter["mismatch_ratio"] == ""


def test_tmax_in_milliseconds_gives_a_note_not_figures(tmp_path):
    files, *_ = case_files(tmp_path, tmax_scale=1000.0)
    figures = figures_of(files)
    assert "milliseconds" in figures["perfusion_note"] and figures["hypoperfusion_ml"] == ""


def test_the_case_report_holds_the_figures_the_threshold_core_the_mask_and_the_overlay(tmp_path):
    """PerfusionReportd and CaseOutputsWriter on one case as the evaluator hands it over: the mask (here the label
    itself) and the kept CT, CBF and Tmax maps as read. The row has the figures, the baseline is the threshold core
    on the mask's grid, and the mask file is the mask on that grid."""
    files, label, _, _, core = case_files(tmp_path)
    affine = np.diag([*SPACING, 1.0])
    maps = {
        f"input_{c}": MetaTensor(np.asanyarray(nib.load(files[CHANNELS.index(c)]).dataobj)[None])
        for c in ("CT", "CBF", "Tmax")
    }
    pred = MetaTensor(torch.as_tensor(core[None], dtype=torch.float32), affine=torch.as_tensor(affine))
    pred.meta["filename_or_obj"] = "/data/case_7.nii.gz"
    out = PerfusionReportd("pred", list(maps))({"pred": pred, **maps})
    assert torch.equal(out[THRESHOLD_CORE], pred) and torch.equal(out[THRESHOLD_CORE].affine, pred.affine)
    assert out["perfusion"]["core_rcbf_ml"] == pytest.approx(ml(core), abs=1e-3)

    # as MONAI's evaluators leave it: the mask and the figures in the output, the kept maps in the batch
    output = {k: v for k, v in out.items() if k not in maps}
    engine = Engine(lambda engine, batch: [output])
    CaseOutputsWriter(str(tmp_path / "out"), list(maps)).attach(engine)
    engine.run([[{**maps, "case": "case_7"}]])  # the datalist item's case name travels in the batch
    with open(tmp_path / "out" / PER_CASE) as f:
        (row,) = csv.DictReader(f)
    assert row["case"] == "case_7" and float(row["volume_pred_ml"]) == pytest.approx(ml(core), abs=1e-4)
    assert float(row["core_rcbf_ml"]) == pytest.approx(ml(core), abs=1e-3) and row["perfusion_note"] == ""
    written = nib.load(tmp_path / "out" / "masks" / "case_7.nii.gz")
    assert written.get_data_dtype() == np.uint8 and np.array_equal(np.asanyarray(written.dataobj), core)
    assert np.allclose(written.affine, affine) and written.header["sform_code"] == 1
    assert (tmp_path / "out" / "overlays" / "case_7.png").stat().st_size > 0


def maps_of(files):
    return [np.asanyarray(nib.load(files[CHANNELS.index(c)]).dataobj).astype(np.float64) for c in ("CBF", "Tmax")]


@pytest.mark.parametrize("blank", ["CBF", "Tmax"])
def test_a_blank_map_gives_a_note_naming_it_not_zero_volumes(tmp_path, blank):
    cbf, tmax = maps_of(case_files(tmp_path)[0])
    maps = {"CBF": cbf, "Tmax": tmax}
    maps[blank] = np.zeros_like(maps[blank])
    figures = perfusion_figures(*perfusion_regions(maps["CBF"], maps["Tmax"]), np.prod(SPACING) / 1000)
    assert figures["hypoperfusion_ml"] == "" and figures["core_rcbf_ml"] == ""
    assert f"the {blank} map is blank" in figures["perfusion_note"] and "network's mask" in figures["perfusion_note"]


@pytest.mark.parametrize("scale", [10.0, 1000.0], ids=["tenths", "milliseconds"])
def test_tmax_not_in_seconds_is_not_reported(tmp_path, scale):
    """Tmax x10 passed the old milliseconds test (99th percentile 120 here) and reported hypoperfusion in the healthy
    brain; the median of the brain's Tmax (20 here, 2000) cannot be seconds."""
    cbf, tmax = maps_of(case_files(tmp_path, tmax_scale=scale)[0])
    figures = perfusion_figures(*perfusion_regions(cbf, tmax), np.prod(SPACING) / 1000)
    assert figures["hypoperfusion_ml"] == "" and "Tmax is not in seconds" in figures["perfusion_note"]


def test_a_no_flow_core_without_values_is_named_in_the_note(tmp_path):
    """A core stored as 0 in both maps (no value) drops out of the brain mask: the note says how much."""
    files, _, hypo, _, core = case_files(tmp_path)
    cbf, tmax = maps_of(files)
    cbf[core], tmax[core] = 0.0, 0.0
    figures = perfusion_figures(*perfusion_regions(cbf, tmax), np.prod(SPACING) / 1000)
    assert figures["hypoperfusion_ml"] == pytest.approx(ml(hypo & ~core), abs=1e-3)
    assert f"{ml(core):.3g} mL inside the brain" in figures["perfusion_note"]
    assert "not counted in the core" in figures["perfusion_note"]
    healthy = perfusion_figures(*perfusion_regions(*maps_of(files)), np.prod(SPACING) / 1000)
    assert healthy["perfusion_note"] == "", "no note when every brain voxel has its values"

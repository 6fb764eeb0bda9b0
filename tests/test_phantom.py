"""The CT perfusion digital phantom (scripts.synthetic.phantom): its truth, its series, its writers, and synthetic trees
whose maps are computed from phantom series (``python -m scripts.tools.synthetic_isles --phantom true``)."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scripts.data import perfusion_maps as pm
from scripts.data.isles18 import TRAINING_DIR, find_cases, read_case
from scripts.data.isles24 import find_root, read_subject
from scripts.synthetic.dicom_studies import dicom_representable
from scripts.synthetic.phantom import (
    CTP_SERIES_NUMBER,
    TISSUE_CLASSES,
    TRUTH_DIR,
    TRUTH_MAPS,
    draw_phantom,
    frame_times,
    load_truth,
    write_dicom_series,
    write_isles18_series,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = {"in_plane": 64, "slices": 4}


@pytest.fixture(scope="module")
def phantom():
    return draw_phantom(5, **SMALL)


def best_dice(values, label):
    """Best Dice of ``values <= t`` or ``values >= t`` with ``label``, over every threshold t."""
    best = 0.0
    for v in (values, -values):
        order = np.argsort(v, kind="stable")
        v_sorted, hits = v[order], np.cumsum(label[order])
        cuts = np.append(np.flatnonzero(np.diff(v_sorted)), len(v) - 1)
        best = max(best, float(np.max(2 * hits[cuts] / (cuts + 1 + label.sum()))))
    return best


def test_the_same_seed_gives_the_same_phantom_another_seed_another(phantom):
    again = draw_phantom(5, **SMALL)
    assert np.array_equal(again.series.frames, phantom.series.frames)
    assert np.array_equal(again.series.times, phantom.series.times)
    assert all(np.array_equal(again.truth[name], phantom.truth[name]) for name in TRUTH_MAPS)
    other = draw_phantom(6, **SMALL)
    assert not np.array_equal(other.truth["CBF"], phantom.truth["CBF"])


def test_the_truth_is_consistent(phantom):
    truth, tissue = phantom.truth, phantom.truth["tissue"] > 0
    assert set(truth) == set(TRUTH_MAPS)
    assert np.allclose(truth["CBV"], truth["CBF"] * truth["MTT"] / 60, rtol=1e-4)  # central volume theorem
    assert np.all(truth["Tmax"][tissue] >= truth["delay"][tissue])  # dispersion only delays the peak
    for name in TRUTH_MAPS:
        assert not truth[name][~tissue].any(), name
    assert np.array_equal(phantom.label > 0, truth["tissue"] == TISSUE_CLASSES["core"])
    assert set(np.unique(truth["tissue"])) == {0, *TISSUE_CLASSES.values()}
    healthy = {name: truth[name][truth["tissue"] == TISSUE_CLASSES["healthy"]].mean() for name in ("CBF", "Tmax")}
    core = {name: truth[name][truth["tissue"] == TISSUE_CLASSES["core"]].mean() for name in ("CBF", "Tmax")}
    assert core["CBF"] < 0.4 * healthy["CBF"] and core["Tmax"] > healthy["Tmax"] + 4


def test_the_core_is_no_threshold_of_any_one_map():
    """The tissue-fate model: no threshold of a true map (rCBF included) reproduces the core, over four patients."""
    for seed in (5, 6, 7, 8):
        phantom = draw_phantom(seed, **SMALL)
        tissue = phantom.truth["tissue"] > 0
        label = phantom.label[tissue] > 0
        for name in ("CBF", "CBV", "MTT", "Tmax", "rCBF"):
            assert best_dice(phantom.truth[name][tissue], label) < 0.95, (seed, name)


def test_the_series_is_the_ncct_before_the_bolus_and_enhances_later_where_the_delay_is_longer():
    phantom = draw_phantom(5, noise_sd=0.0, **SMALL)
    frames, truth = phantom.series.frames.astype(float), phantom.truth
    tissue = truth["tissue"] > 0
    difference = frames[..., 0][tissue] - phantom.ncct[tissue]  # blood (40 HU) in a voxel's vessel part, if any
    assert np.mean(difference == 0) > 0.9 and np.abs(difference).max() <= 5
    enhancement = frames - frames[..., :1]
    times = phantom.series.times
    peak = {
        label: times[enhancement[truth["tissue"] == value].mean(axis=0).argmax()]
        for label, value in TISSUE_CLASSES.items()
    }
    assert peak["healthy"] < peak["penumbra"] and peak["healthy"] < peak["core"], peak
    hypodense = phantom.ncct[truth["tissue"] == TISSUE_CLASSES["core"]].mean()
    assert hypodense < phantom.ncct[truth["tissue"] == TISSUE_CLASSES["penumbra"]].mean()


def test_noise_has_the_asked_standard_deviation_at_the_voxel_size():
    phantom = draw_phantom(5, noise_sd=10.0, **SMALL)
    frames, tissue = phantom.series.frames.astype(float), phantom.truth["tissue"] > 0
    spacing = np.sqrt((phantom.series.affine[:3, :3] ** 2).sum(axis=0))
    expected = 10.0 * np.sqrt(5.0 / np.prod(spacing))
    measured = np.std((frames[..., 1] - frames[..., 0])[tissue]) / np.sqrt(2)
    assert abs(measured / expected - 1) < 0.1, (measured, expected)


def test_frame_times_are_a_protocols_irregular_ones():
    rng = np.random.default_rng(0)
    for _ in range(20):
        times = frame_times(rng)
        steps = np.diff(times)
        assert len(times) == 40 and times[0] == 0
        assert steps.min() >= 0.95 and steps.max() <= 3.15
        assert steps[:20].mean() < steps[-10:].mean() and np.ptp(steps[:20]) > 0  # fast then slow, jittered
    regular = np.diff(frame_times(rng, 30, regular=True))
    assert len(regular) == 29 and np.allclose(regular, regular[0])
    cut = draw_phantom(5, truncate_s=30.0, **SMALL)
    assert cut.series.times[-1] <= 30.0 and cut.series.frames.shape[3] == len(cut.series.times) < 40


def test_the_isles18_writer_names_and_times_the_series_as_the_release(phantom, tmp_path):
    path = Path(write_isles18_series(tmp_path / "case_1", phantom.series, 345600))
    assert path == tmp_path / "case_1" / "SMIR.Brain.XX.O.CT_4DPWI.345600" / "SMIR.Brain.XX.O.CT_4DPWI.345600.nii"
    image = nib.load(path)
    assert image.shape == phantom.series.frames.shape and image.get_data_dtype() == np.int16
    assert image.header.get_xyzt_units() == ("mm", "sec")
    assert np.isclose(image.header["pixdim"][4], np.diff(phantom.series.times).mean())
    with open(path.with_suffix(".json")) as f:  # the irregular times, which pixdim[4] cannot hold
        assert np.allclose(json.load(f)["FrameTimesStart"], phantom.series.times)
    regular = draw_phantom(5, regular=True, **SMALL)
    path = Path(write_isles18_series(tmp_path / "case_2", regular.series, 345601))
    assert not path.with_suffix(".json").exists()
    assert np.allclose(pm.read_series(path).times, regular.series.times, atol=1e-5)


def test_the_dicom_series_is_valid_ct_with_each_frames_acquisition_time(phantom, tmp_path):
    paths = write_dicom_series(tmp_path, phantom.series, "case", 0)
    depth, count = phantom.series.frames.shape[2:]
    assert len(paths) == depth * count and all(Path(p).parent.name == f"{CTP_SERIES_NUMBER}_CTP" for p in paths)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert len({h.SeriesInstanceUID for h in headers}) == 1 and len({h.SOPInstanceUID for h in headers}) == len(paths)
    assert sorted(int(h.InstanceNumber) for h in headers) == list(range(1, len(paths) + 1))
    assert [int(h.AcquisitionNumber) for h in headers[::depth]] == list(range(1, count + 1))
    seconds = [float(h.AcquisitionTime[4:]) + 60 * int(h.AcquisitionTime[2:4]) for h in headers[::depth]]
    assert np.allclose(np.array(seconds) - seconds[0], phantom.series.times, atol=1e-5)
    report = subprocess.run(["dciodvfy", paths[0]], capture_output=True, text=True, check=False)
    assert not [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]


def generate(tmp_path, *args):
    cmd = [sys.executable, "-m", "scripts.tools.synthetic_isles", "--output_dir", str(tmp_path), "--phantom", "true"]
    result = subprocess.run([*cmd, *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def test_an_isles18_tree_of_phantoms_holds_maps_computed_from_the_series_beside_them(tmp_path):
    generate(tmp_path, "--num_train", "2", "--num_test", "1", "--in_plane", "64", "--slices", "4", "--dicom", "true")
    items = [read_case(name, path, True) for name, path in find_cases(tmp_path, TRAINING_DIR)]
    assert len(items) == 2
    for item in items:
        case_dir = Path(item["image"][0]).parents[1]
        (series_dir,) = case_dir.glob("SMIR.Brain.XX.O.CT_4DPWI.*")
        series = pm.read_series(next(series_dir.glob("*.nii")))
        expected = dicom_representable(pm.isles18_maps(pm.compute_maps(series)))  # a --dicom tree's NIfTI values
        for name, path in zip(("CBF", "CBV", "MTT", "Tmax"), item["image"][1:]):
            # the times read back from the files equal the phantom's to float precision: MTT and Tmax within 0.01 s
            assert np.allclose(np.asanyarray(nib.load(path).dataobj), expected[name], rtol=0, atol=0.01), name
        truth = load_truth(case_dir / TRUTH_DIR)
        assert np.array_equal(np.asanyarray(nib.load(item["label"]).dataobj), truth["core"])
        assert set(truth) == {*TRUTH_MAPS, "core"}
    dicom_ctp = tmp_path / "dicom" / TRAINING_DIR / "case_1" / f"{CTP_SERIES_NUMBER}_CTP"
    nifti_ctp = next((tmp_path / TRAINING_DIR / "case_1").glob("SMIR.Brain.XX.O.CT_4DPWI.*/*.nii"))
    from_dicom, from_nifti = pm.read_series(dicom_ctp), pm.read_series(nifti_ctp)
    assert np.array_equal(from_dicom.frames, from_nifti.frames)
    assert np.allclose(from_dicom.times, from_nifti.times, atol=1e-5)
    study = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in dicom_ctp.parent.rglob("*.dcm")}
    assert len(study) == 1  # the perfusion series joins the case's study


@pytest.mark.parametrize("layout", ["isles24", "isles24_archive"])
def test_an_isles24_tree_of_phantoms_keeps_the_raw_ctp_where_the_release_does(tmp_path, layout):
    generate(tmp_path, "--layout", layout, "--num_train", "1", "--num_test", "0", "--in_plane", "48", "--slices", "16")
    raw_dir, derivatives = find_root(str(tmp_path))
    (subject,) = [p.name for p in Path(raw_dir).iterdir()]
    session = "ses-0001" if layout == "isles24" else "ses-01"
    ctp = Path(raw_dir) / subject / session / f"{subject}_{session}_ctp.nii.gz"
    series = pm.read_series(ctp)
    assert ctp.with_name(f"{subject}_{session}_ctp.json").is_file() and series.frames.ndim == 4
    item = read_subject(subject, raw_dir, derivatives)
    assert np.allclose(nib.load(item["image"][0]).affine, series.affine)  # on the NCCT's (oblique) grid
    tmax = np.asanyarray(nib.load(item["image"][4]).dataobj)
    assert np.allclose(tmax, pm.compute_maps(series)["Tmax"], atol=1e-6)
    assert np.array_equal(
        np.asanyarray(nib.load(item["label"]).dataobj) > 0, load_truth(ctp.parent / TRUTH_DIR)["core"] > 0
    )

"""Perfusion maps from raw 4D CT perfusion series (scripts.data.perfusion_maps), checked against the truth of phantom
series (scripts.synthetic.phantom), written to and read back from NIfTI and DICOM files."""

import json
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scripts.data import perfusion_maps as pm
from scripts.synthetic.phantom import TISSUE_CLASSES, draw_phantom, write_dicom_series, write_nifti_series

SMALL = {"in_plane": 64, "slices": 4}
SEEDS = (1, 2, 3)
MAPS = ("CBF", "CBV", "MTT", "Tmax")


@pytest.fixture(scope="module")
def phantoms():
    return [draw_phantom(seed, **SMALL) for seed in SEEDS]


@pytest.fixture(scope="module")
def computed(phantoms):
    """(oSVD maps, fixed-15 % bSVD maps) of each phantom."""
    return [(pm.compute_maps(p.series), pm.compute_maps(p.series, truncation=pm.FIXED_TRUNCATION)) for p in phantoms]


def class_means(phantom, maps, name):
    """{class: (computed mean, true mean)} of one map over the voxels both call tissue."""
    both = (phantom.truth["tissue"] > 0) & maps["tissue"]
    means = {}
    for label, value in TISSUE_CLASSES.items():
        voxels = both & (phantom.truth["tissue"] == value)
        if voxels.sum() >= 20:
            means[label] = (float(maps[name][voxels].mean()), float(phantom.truth[name][voxels].mean()))
    return means


def mean_absolute_error(phantom, maps, name):
    both = (phantom.truth["tissue"] > 0) & maps["tissue"]
    return float(np.abs(maps[name][both] - phantom.truth[name][both]).mean())


def circulant_deconvolution(curves, aif, dt, threshold):
    """The textbook block-circulant SVD (Wu 2003): the explicit SVD of the zero-padded circulant matrix of the AIF."""
    length = 2 * len(aif)
    padded = np.concatenate([aif, np.zeros(len(aif))])
    matrix = dt * np.array([[padded[(i - j) % length] for j in range(length)] for i in range(length)])
    u, s, vt = np.linalg.svd(matrix)
    kept = s >= threshold * s.max()
    inverse = vt[kept].T @ np.diag(1 / s[kept]) @ u[:, kept].T
    return (inverse @ np.concatenate([curves, np.zeros_like(curves)], axis=1).T).T


def test_the_dft_form_of_block_circulant_svd_is_the_explicit_svd():
    rng = np.random.default_rng(0)
    t = np.arange(30.0)
    aif = gamma_variate(t, arrival=4.0) + rng.normal(0, 2, 30)
    curves = np.stack([np.convolve(aif, np.exp(-t / m))[:30] * 0.01 for m in (3, 6, 12)]) + rng.normal(0, 0.5, (3, 30))
    for threshold in (0.02, 0.15, 0.4):
        expected = circulant_deconvolution(curves, aif, 1.0, threshold)
        got = pm.deconvolve(curves, aif, 1.0, threshold)
        assert np.allclose(got, expected, atol=1e-4 * np.abs(expected).max()), threshold


def gamma_variate(t, arrival=6.0, alpha=3.0, width=1.5, peak=300.0):
    after = np.clip(t - arrival, 0, None) / (alpha * width)
    return peak * after**alpha * np.exp(alpha * (1 - after))


def test_osvd_picks_the_threshold_where_the_oscillation_index_crosses_its_limit():
    aif = gamma_variate(np.arange(60.0))
    rng = np.random.default_rng(1)
    curves = np.stack([np.convolve(aif, np.exp(-np.arange(len(aif)) / m))[: len(aif)] * 0.01 for m in (3, 8, 15)])
    curves = np.repeat(curves, 10, axis=0) + rng.normal(0, 0.3, (30, len(aif)))
    chosen = pm.deconvolve(curves, aif, 1.0)
    candidates = np.stack([pm.deconvolve(curves, aif, 1.0, p) for p in pm.TRUNCATIONS])  # (P, n, L)
    index = np.argmin(np.abs(candidates - chosen[None]).max(axis=2), axis=0)
    assert np.allclose(candidates[index, np.arange(len(curves))], chosen)
    oscillation = pm.oscillation_index(candidates)  # (P, n)
    for i, p in enumerate(index):
        assert oscillation[p, i] <= pm.OSCILLATION_INDEX or p == len(pm.TRUNCATIONS) - 1
        assert p == 0 or oscillation[p - 1, i] > pm.OSCILLATION_INDEX
    assert len(set(index)) > 1, "one threshold for curves of different noise and shape"


def test_maps_lie_within_tolerance_of_the_truth_in_each_tissue_class(phantoms, computed):
    """Per class, over three noisy phantoms (64 x 64 x 4, 40 irregular frames): relative bias of CBF and CBV, Tmax
    bias in seconds; and the classes in the order the physiology gives."""
    tolerances = {"CBF": 0.4, "CBV": 0.25, "MTT": 0.5}
    for phantom, (maps, _) in zip(phantoms, computed):
        for name, tolerance in tolerances.items():
            for label, (ours, truth) in class_means(phantom, maps, name).items():
                if label != "core":  # the core is small: smoothing mixes it with its surroundings
                    assert abs(ours / truth - 1) < tolerance, (name, label, ours, truth)
        tmax = class_means(phantom, maps, "Tmax")
        assert abs(tmax["healthy"][0] - tmax["healthy"][1]) < 2.0, tmax
        assert abs(tmax["penumbra"][0] - tmax["penumbra"][1]) < 4.0, tmax
        assert tmax["healthy"][0] < tmax["oligaemia"][0] < tmax["penumbra"][0], tmax
        rcbf = class_means(phantom, maps, "rCBF")
        assert rcbf["healthy"][0] > rcbf["oligaemia"][0] > rcbf["penumbra"][0] > rcbf["core"][0], rcbf
        assert abs(rcbf["healthy"][0] - rcbf["healthy"][1]) < 0.2, rcbf


def test_without_noise_the_maps_are_close_to_the_truth():
    phantom = draw_phantom(1, noise_sd=0.0, **SMALL)
    maps = pm.compute_maps(phantom.series)
    cbf, cbv, tmax = (class_means(phantom, maps, name)["healthy"] for name in ("CBF", "CBV", "Tmax"))
    assert abs(cbf[0] / cbf[1] - 1) < 0.15 and abs(cbv[0] / cbv[1] - 1) < 0.1, (cbf, cbv)
    assert abs(tmax[0] - tmax[1]) < 1.5, tmax
    assert maps["info"]["smoothing_mm"] == 0.0
    assert 1.0 < maps["info"]["partial_volume_scale"] < pm.MAX_PV_SCALE


def test_closer_to_the_truth_than_a_fixed_15_percent_bsvd(phantoms, computed):
    """Mean absolute error over three phantoms: oSVD below the plain bSVD for CBF, MTT and Tmax; CBV does not depend
    on the truncation (an area ratio): identical."""
    for name in ("CBF", "MTT", "Tmax"):
        ours = np.mean([mean_absolute_error(p, maps, name) for p, (maps, _) in zip(phantoms, computed)])
        plain = np.mean([mean_absolute_error(p, maps, name) for p, (_, maps) in zip(phantoms, computed)])
        assert ours < plain, (name, ours, plain)
    for maps, plain in computed:
        assert np.array_equal(maps["CBV"], plain["CBV"]) and np.array_equal(maps["tissue"], plain["tissue"])


def test_isles18_maps_are_stored_in_the_release_units_and_dtypes(computed):
    maps = computed[0][0]
    stored = pm.isles18_maps(maps)
    assert {k: v.dtype for k, v in stored.items()} == {
        "CBF": np.uint16,
        "CBV": np.uint16,
        "MTT": np.float64,
        "Tmax": np.float64,
    }
    assert np.array_equal(stored["CBV"], np.rint(100 * maps["CBV"]).astype(np.uint16))  # 0.01 mL/100 g
    assert np.array_equal(stored["CBF"], np.rint(maps["CBF"]).astype(np.uint16))


def test_frame_times_from_a_bids_sidecar_then_pixdim_with_its_unit(phantoms, tmp_path):
    series = phantoms[0].series
    path = write_nifti_series(tmp_path / "ctp.nii.gz", series)
    with open(tmp_path / "ctp.json") as f:
        assert np.allclose(json.load(f)["FrameTimesStart"], series.times)
    read = pm.read_series(path)
    assert np.allclose(read.times, series.times, atol=1e-6) and np.array_equal(read.frames, series.frames)
    # the sidecar wins over pixdim[4]
    with open(tmp_path / "ctp.json", "w") as f:
        json.dump({"FrameTimesStart": list(np.arange(len(series.times)) * 1.25 + 3.0)}, f)
    assert np.allclose(pm.read_series(path).times, np.arange(len(series.times)) * 1.25)
    # no sidecar: pixdim[4] in its unit
    os.remove(tmp_path / "ctp.json")
    image = nib.load(path)
    image.header.set_xyzt_units("mm", "msec")
    image.header["pixdim"][4] = 1500.0
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header), tmp_path / "ms.nii")
    assert np.allclose(pm.read_series(tmp_path / "ms.nii").times, np.arange(len(series.times)) * 1.5)


def test_frame_times_from_dicom_acquisition_times(phantoms, tmp_path):
    series = phantoms[0].series
    paths = write_dicom_series(tmp_path, series, "case", 0)
    folder = os.path.dirname(paths[0])
    read = pm.read_series(folder)
    assert np.allclose(read.times, series.times, atol=1e-5)
    assert np.array_equal(read.frames, series.frames)
    assert np.allclose(read.affine, series.affine, atol=1e-3)
    for path in paths:  # AcquisitionTime alone (no AcquisitionDateTime), files in any order
        ds = pydicom.dcmread(path)
        del ds.AcquisitionDateTime
        ds.save_as(path)
    os.rename(paths[0], os.path.join(folder, "zz_last.dcm"))
    assert np.allclose(pm.read_series(folder).times, series.times, atol=1e-5)


def test_a_series_that_cannot_be_timed_is_refused_naming_the_file(phantoms, tmp_path):
    series = phantoms[0].series
    unitless = tmp_path / "unitless.nii.gz"
    image = nib.Nifti1Image(series.frames, series.affine)
    image.header.set_xyzt_units("mm", "unknown")
    nib.save(image, unitless)
    with pytest.raises(pm.CtpSeriesError, match=f"{unitless}: cannot be timed: pixdim.*no sidecar"):
        pm.read_series(unitless)
    with open(tmp_path / "unitless.json", "w") as f:
        json.dump({"FrameTimesStart": [0, 1, 2]}, f)
    with pytest.raises(pm.CtpSeriesError, match=r"unitless.json gives 3 FrameTimesStart for 40 frames"):
        pm.read_series(unitless)
    paths = write_dicom_series(tmp_path / "dicom", series, "case", 0)
    ds = pydicom.dcmread(paths[5])
    del ds.AcquisitionDateTime, ds.AcquisitionTime
    ds.save_as(paths[5])
    with pytest.raises(pm.CtpSeriesError, match=f"cannot be timed: {paths[5]} has no AcquisitionDateTime"):
        pm.read_series(os.path.dirname(paths[5]))
    backwards = pm.CtpSeries(series.frames, series.times[::-1].copy(), series.affine, "backwards.nii")
    with pytest.raises(pm.CtpSeriesError, match="backwards.nii: cannot be timed: its 40 frame times do not increase"):
        pm.compute_maps(backwards)
    few = pm.CtpSeries(series.frames[..., :5], series.times[:5], series.affine, "few.nii")
    with pytest.raises(pm.CtpSeriesError, match="few.nii: has 5 frames"):
        pm.compute_maps(few)


def test_a_series_without_bolus_is_refused(phantoms):
    series = phantoms[0].series
    rng = np.random.default_rng(0)
    still = series.frames[..., :1] + rng.normal(0, 3, series.frames.shape).round().astype(np.int16)
    with pytest.raises(pm.CtpSeriesError, match="still.nii: has no bolus"):
        pm.compute_maps(pm.CtpSeries(still, series.times, series.affine, "still.nii"))


def test_a_bolus_cut_before_it_passed_is_refused_a_shorter_one_is_not():
    cut = draw_phantom(2, truncate_s=20.0, **SMALL)
    cut.series.source = "cut.nii"
    with pytest.raises(pm.CtpSeriesError, match="cut.nii: the bolus is truncated"):
        pm.compute_maps(cut.series)
    shorter = draw_phantom(2, truncate_s=40.0, **SMALL)
    maps = pm.compute_maps(shorter.series)
    assert class_means(shorter, maps, "rCBF")["healthy"][0] > class_means(shorter, maps, "rCBF")["core"][0]


def test_head_motion_is_realigned_and_too_much_is_refused(phantoms, computed):
    still, moved = phantoms[0], draw_phantom(SEEDS[0], motion_mm=3.0, **SMALL)
    maps = pm.compute_maps(moved.series)
    assert 2.0 < maps["info"]["motion_mm"] < 4.5
    for name in ("CBF", "Tmax"):
        assert mean_absolute_error(moved, maps, name) < 1.3 * mean_absolute_error(still, computed[0][0], name), name
    assert computed[0][0]["info"]["motion_mm"] < 0.5
    shaken = draw_phantom(SEEDS[0], motion_mm=16.0, **SMALL)
    shaken.series.source = "shaken.nii"
    with pytest.raises(pm.CtpSeriesError, match=r"shaken.nii: moves too much: frame \d+ .* is displaced by"):
        pm.compute_maps(shaken.series)

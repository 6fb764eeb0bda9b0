"""The synthetic cases as DICOM studies (scripts.synthetic.dicom_studies, generate(..., dicom=True)): read back with pydicom and
highdicom, they hold exactly the NIfTI form's values on its grid; checked on the files written to temp dirs."""

import shutil
import subprocess
from pathlib import Path

import highdicom
import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import canonical
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds
from scripts.data.channels import CHANNELS
from scripts.data.isles18 import SMIR_NAME, key_of_token
from scripts.dicom.series import volume_as_nifti
from scripts.synthetic.dicom_studies import SERIES_DESCRIPTIONS, dicom_representable, write_study
from scripts.synthetic.isles import generate, generate_isles24

ISLES18 = {"num_train": 1, "num_test": 1, "seed": 7, "in_plane": 32, "slices": (3,)}
ISLES24 = {"num_train": 1, "num_test": 0, "seed": 7, "in_plane": 32, "slices": 6}
SUBJECT = "sub-strokecase0001"
MAP_FILES_24 = {"CBF": "cbf", "CBV": "cbv", "MTT": "mtt", "Tmax": "tmax"}


def tree_bytes(root):
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def nifti_18(case_dir):
    """{channel or OT: nibabel image} of an ISLES 2018 case folder."""
    return {key_of_token(SMIR_NAME.match(d.name)["mod"]): nib.load(next(d.iterdir())) for d in case_dir.iterdir()}


def nifti_24(root):
    """{channel: nibabel image} of the ISLES 2024 subject."""
    maps = root / "derivatives" / SUBJECT / "ses-0001" / "perfusion-maps"
    images = {"CT": nib.load(root / "rawdata" / SUBJECT / "ses-0001" / f"{SUBJECT}_ses-0001_ncct.nii.gz")}
    for key, name in MAP_FILES_24.items():
        images[key] = nib.load(maps / f"{SUBJECT}_ses-0001_space-ncct_{name}.nii.gz")
    return images


def series_files(study_dir):
    """{channel: [files in InstanceNumber order]} of a study folder (<number>_<channel>/<number>_<instance>.dcm),
    the ground-truth SEG (<number>_label/) left out."""
    folders = sorted(Path(study_dir).iterdir(), key=lambda d: int(d.name.split("_")[0]))
    return {d.name.split("_", 1)[1]: sorted(d.iterdir()) for d in folders if not d.name.endswith("_label")}


def label_files(study_dir):
    """The ground-truth SEG files of a study folder (a training case's)."""
    return sorted(path for d in Path(study_dir).iterdir() if d.name.endswith("_label") for path in d.iterdir())


def read_back(datasets):
    """volume_as_nifti of the highdicom Volume of one series' datasets."""
    return volume_as_nifti(highdicom.get_volume_from_series(datasets, dtype=np.float32))


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """An ISLES 2018 tree (one training and one testing case) and an ISLES 2024 tree (one subject), with DICOM."""
    root18, root24 = tmp_path_factory.mktemp("isles18"), tmp_path_factory.mktemp("isles24")
    generate(root18, **ISLES18, dicom=True)
    generate_isles24(root24, **ISLES24, dicom=True)
    return {
        "isles18 training": (nifti_18(root18 / "TRAINING" / "case_1"), root18 / "dicom" / "TRAINING" / "case_1"),
        "isles18 testing": (nifti_18(root18 / "TESTING" / "case_1"), root18 / "dicom" / "TESTING" / "case_1"),
        "isles24": (nifti_24(root24), root24 / "sourcedata" / SUBJECT / "ses-0001"),
    }


@pytest.mark.parametrize("case", ["isles18 training", "isles18 testing", "isles24"])
def test_dicom_reads_back_as_the_nifti(trees, case):
    images, study_dir = trees[case]
    files = series_files(study_dir)
    assert list(files) == list(CHANNELS)
    assert len(label_files(study_dir)) == (0 if case == "isles18 testing" else 1)
    if case == "isles18 training":  # the training label as a ground-truth SEG on the NCCT: the same voxels
        (path,) = label_files(study_dir)
        array, affine = volume_as_nifti(highdicom.seg.segread(path).get_volume(combine_segments=True))
        expected = images["OT"]
        ours = canonical((array > 0).astype(np.uint8), affine)[0]
        assert ours.any() and np.array_equal(ours, canonical(np.asanyarray(expected.dataobj), expected.affine)[0])
    for channel, paths in files.items():
        array, affine = read_back([pydicom.dcmread(p) for p in paths])
        expected = images[channel].get_fdata(dtype=np.float32)
        assert array.dtype == np.float32 and array.shape == expected.shape, (case, channel)
        assert np.array_equal(array, expected), (case, channel)
        np.testing.assert_allclose(affine, images[channel].affine, atol=1e-4, err_msg=f"{case} {channel}")


def test_nifti_of_a_dicom_tree_holds_the_dicom_values(tmp_path, trees):
    """dicom=True: the NIfTI maps are dicom_representable of dicom=False's (same dtypes), the label as is; dicom=False
    writes no DICOM and the same bytes each run."""
    generate(tmp_path / "a", **ISLES18)
    generate(tmp_path / "b", **ISLES18)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert not (tmp_path / "a" / "dicom").exists()
    generate_isles24(tmp_path / "c", **ISLES24)
    assert not (tmp_path / "c" / "sourcedata").exists()
    plain = {"isles18 training": nifti_18(tmp_path / "a" / "TRAINING" / "case_1"), "isles24": nifti_24(tmp_path / "c")}
    for case, images in plain.items():
        with_dicom = trees[case][0]
        assert set(images) == set(with_dicom)
        values = {key: np.asanyarray(image.dataobj) for key, image in images.items()}
        expected = {**values, **dicom_representable({key: values[key] for key in CHANNELS})}
        for key, image in with_dicom.items():
            stored = np.asanyarray(image.dataobj)
            assert stored.dtype == values[key].dtype and np.array_equal(stored, expected[key]), (case, key)
        for key in ("MTT", "Tmax"):  # float maps: rounded, so not unchanged, but by less than half a grid step
            assert not np.array_equal(expected[key], values[key])
            np.testing.assert_allclose(expected[key], values[key], atol=2**-9)


def test_same_arguments_give_identical_files(tmp_path, trees):
    generate(tmp_path / "again", **ISLES18, dicom=True)
    generate_isles24(tmp_path / "again24", **ISLES24, dicom=True)
    first = trees["isles18 training"][1].parents[2]
    assert tree_bytes(tmp_path / "again") == tree_bytes(first)
    assert tree_bytes(tmp_path / "again24" / "sourcedata") == tree_bytes(trees["isles24"][1].parents[1])


@pytest.mark.parametrize("case", ["isles18 training", "isles24"])
def test_one_study_of_five_vendor_like_series(trees, case):
    study_dir = trees[case][1]
    headers = {
        channel: [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        for channel, paths in series_files(study_dir).items()
    }
    first = {channel: series[0] for channel, series in headers.items()}
    assert len({ds.StudyInstanceUID for ds in first.values()}) == 1
    assert len({ds.FrameOfReferenceUID for ds in first.values()}) == 1
    assert len({ds.SeriesInstanceUID for ds in first.values()}) == 5
    instances = [ds.SOPInstanceUID for series in headers.values() for ds in series]
    assert len(set(instances)) == len(instances)
    for number, (channel, series) in enumerate(headers.items(), start=1):
        ds = series[0]
        assert ds.SeriesDescription == SERIES_DESCRIPTIONS[channel] and ds.SeriesNumber == number
        assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert str(ds.PatientName).startswith("SYNTHETIC^") and ds.PatientID.startswith("SYN-")
        assert list(ds.ImageType[:2]) == (["ORIGINAL", "PRIMARY"] if channel == "CT" else ["DERIVED", "SECONDARY"])
        assert ds.RescaleType == ("HU" if channel == "CT" else "US")
        assert ds.BitsAllocated == 16 and ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
        if channel == "CT":
            assert ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1
        else:  # a power of two
            assert ds.RescaleIntercept == 0 and np.log2(float(ds.RescaleSlope)).is_integer()
        assert [s.InstanceNumber for s in series] == list(range(1, len(series) + 1))
        assert {tuple(s.ImageOrientationPatient) for s in series} == {tuple(ds.ImageOrientationPatient)}
    orientation = np.asarray(first["CT"].ImageOrientationPatient, dtype=float)
    axis_aligned = np.isin(np.round(np.abs(orientation), 9), (0.0, 1.0)).all()
    assert axis_aligned == (case != "isles24"), f"{case}: {orientation}"


def test_write_study_returns_what_it_wrote(tmp_path, trees):
    images, _ = trees["isles24"]
    arrays = {channel: np.asanyarray(image.dataobj) for channel, image in images.items()}
    result = write_study(tmp_path / "study", arrays, images["CT"].affine, "case-x", 3, patient="patient-x")
    assert result["folder"] == str(tmp_path / "study")
    assert result["files"] == [str(p) for paths in series_files(tmp_path / "study").values() for p in paths]
    assert Path(result["files"][0]).relative_to(tmp_path / "study") == Path("1_CT/01_0001.dcm")
    ds = pydicom.dcmread(result["files"][-1], stop_before_pixels=True)
    assert ds.StudyInstanceUID == result["study_instance_uid"] and ds.SeriesInstanceUID == result["series"]["Tmax"]
    assert list(result["series"]) == list(CHANNELS)
    assert (str(ds.PatientName), ds.PatientID) == ("SYNTHETIC^PATIENT-X", "SYN-patient-x")


def test_write_study_refuses_values_off_the_dicom_grid(tmp_path, trees):
    images, _ = trees["isles24"]
    arrays = {channel: np.asanyarray(image.dataobj) for channel, image in images.items()}
    with pytest.raises(ValueError, match="not dicom_representable"):
        write_study(tmp_path / "a", {**arrays, "MTT": arrays["MTT"] + np.float32(1e-4)}, np.eye(4), "c", 0)
    with pytest.raises(ValueError, match="channels"):
        write_study(tmp_path / "b", {key: arrays[key] for key in CHANNELS[:4]}, np.eye(4), "c", 0)


def test_dicom_representable_grid():
    ramp = np.linspace(0, 3, 7, dtype=np.float32) + np.float32(1e-3)
    out = dicom_representable({"int": np.arange(5, dtype=np.int16), "pos": ramp, "neg": -np.float64(ramp)})
    assert out["int"].dtype == np.int16 and np.array_equal(out["int"], np.arange(5))
    # the finest grid that fits: 3.001 * 2**14 fits uint16, * 2**15 does not; int16 holds -3.001 * 2**13, not * 2**14
    for key, exponent, (lower, upper) in (("pos", 14, (0, 2**16 - 1)), ("neg", 13, (-(2**15), 2**15 - 1))):
        stored = out[key].astype(np.float64) * 2.0**exponent
        assert np.array_equal(stored, np.rint(stored)) and lower <= stored.min() and stored.max() <= upper
        assert not lower <= 2 * stored.min() <= 2 * stored.max() <= upper
    assert out["pos"].dtype == np.float32 and out["neg"].dtype == np.float64
    np.testing.assert_allclose(out["pos"], ramp, atol=2**-15)
    assert all(np.array_equal(dicom_representable(out)[key], out[key]) for key in out)
    with pytest.raises(ValueError, match="16 bits"):
        dicom_representable({"big": np.array([70000.0])})
    with pytest.raises(ValueError, match="NaN"):
        dicom_representable({"nan": np.array([1.0, np.nan])})


def _flipped(datasets, axis):
    """The series with its rows (axis 0) or columns (axis 1) stored in reverse: pixel data, orientation and position
    changed together, so that it is the same image."""
    for ds in datasets:
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        cosine = orientation[3:] if axis == 0 else orientation[:3]
        steps = (ds.Rows if axis == 0 else ds.Columns) - 1
        spacing = float(ds.PixelSpacing[axis])
        position = np.asarray(ds.ImagePositionPatient, dtype=float) + steps * spacing * cosine
        cosine *= -1
        ds.PixelData = np.ascontiguousarray(np.flip(ds.pixel_array, axis)).tobytes()
        ds.ImageOrientationPatient = [format_number_as_ds(float(v) + 0.0) for v in orientation]
        ds.ImagePositionPatient = [format_number_as_ds(float(v) + 0.0) for v in position]
    return datasets


@pytest.mark.parametrize("case", ["isles18 testing", "isles24"])
@pytest.mark.parametrize("variant", ["reversed files", "rows flipped", "columns flipped", "both flipped, shuffled"])
def test_volume_as_nifti_of_other_slice_and_pixel_orders(trees, case, variant):
    """Another voxel order of the same image converts to the same image: equal after reorienting to RAS."""
    images, study_dir = trees[case]
    datasets = [pydicom.dcmread(p) for p in series_files(study_dir)["CT"]]
    if variant == "reversed files":
        datasets = datasets[::-1]
    elif variant == "rows flipped":
        datasets = _flipped(datasets, 0)
    elif variant == "columns flipped":
        datasets = _flipped(datasets, 1)
    else:
        datasets = _flipped(_flipped(datasets, 0), 1)
        datasets = datasets[1::2] + datasets[::2]
    array, affine = read_back(datasets)
    expected_array, expected_affine = canonical(images["CT"].get_fdata(dtype=np.float32), images["CT"].affine)
    got_array, got_affine = canonical(array, affine)
    assert np.array_equal(got_array, expected_array)
    np.testing.assert_allclose(got_affine, expected_affine, atol=1e-4)
    assert np.linalg.det(affine[:3, :3]) > 0
    # reversed files give the NIfTI's own voxel order, flipped pixels another one
    assert np.array_equal(array, images["CT"].get_fdata(dtype=np.float32)) == (variant == "reversed files")


def test_left_handed_affine_reads_back_right_handed(tmp_path, trees):
    """The same image with its slices stored the other way round (the affine's third column reversed): written and read
    back, it gives the right-handed form exactly."""
    images, _ = trees["isles24"]
    arrays = {channel: np.asanyarray(image.dataobj)[:, :, ::-1] for channel, image in images.items()}
    affine = images["CT"].affine.copy()
    depth = arrays["CT"].shape[2]
    affine[:3, 3] += (depth - 1) * affine[:3, 2]
    affine[:3, 2] *= -1
    result = write_study(tmp_path / "study", arrays, affine, "left-handed", 0)
    array, read_affine = read_back([pydicom.dcmread(p) for p in result["files"][:depth]])
    assert np.array_equal(array, images["CT"].get_fdata(dtype=np.float32))
    np.testing.assert_allclose(read_affine, images["CT"].affine, atol=1e-4)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("case", ["isles18 training", "isles24"])
def test_dciodvfy_finds_no_errors(trees, case):
    for channel, paths in series_files(trees[case][1]).items():
        report = subprocess.run(["dciodvfy", str(paths[0])], capture_output=True, text=True, check=False)
        lines = (report.stdout + report.stderr).splitlines()
        assert not [line for line in lines if line.startswith("Error")], (channel, lines)

"""DICOM studies through configs/dicom.json: the same masks and volumes as the same cases given as NIfTI, the SEG
and SR read back with highdicom, bad studies refused naming the series before anything is written, a file we did
not write (pydicom's CT test file) and multi-frame series read."""

import json
import os
import re
import shutil
import subprocess
import sys

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import canonical, read_rows, run_bundle, sr_texts, study_files
from monai.bundle import ConfigParser
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import UID, JPEGLosslessSV1, JPEGLSLossless, generate_uid
from pydicom.valuerep import format_number_as_ds
from scripts.data.datalist import build_datalist
from scripts.data.readers import InvalidCaseError
from scripts.dicom.results import figure_concepts
from scripts.dicom.series import DicomSeriesReader, case_of, find_studies, volume_arrays, volume_as_nifti
from scripts.synthetic.isles import generate

DICOM_CONFIGS = "['configs/inference.json','configs/dicom.json']"


def rules(repo_root):
    """configs/dicom.json's ``series_rules``: the spec's default rule of each input (scripts.data.channels)."""
    parser = ConfigParser()
    parser.read_config([os.path.join(repo_root, "configs", name) for name in ("inference.json", "dicom.json")])
    return parser.get_parsed_content("series_rules")


TEXT_COLUMNS = ("case", "maps_source", "perfusion_note")


def assert_same_row(expected, row, case):
    """Two CSV rows alike: the text and blank cells equal, the numbers to 1e-6 relative (the DICOM grid's spacing is
    the NIfTI's to about 1e-10 mm, decimal strings, so a volume can differ in its seventh digit)."""
    assert expected.keys() == row.keys(), case

    def number(key, value):
        return key not in TEXT_COLUMNS and value not in ("", None)

    assert {k: v for k, v in expected.items() if not number(k, v)} == {
        k: v for k, v in row.items() if not number(k, v)
    }, case
    numbers = [k for k, v in expected.items() if number(k, v)]
    assert [float(row[k]) for k in numbers] == pytest.approx(
        [float(expected[k]) for k in numbers], rel=1e-6, nan_ok=True
    ), case


@pytest.fixture(scope="module")
def both_runs(repo_root, tiny_model, dicom_tree, tmp_path_factory):
    """Inference of the NIfTI cases and of their DICOM studies with the same model."""
    out = tmp_path_factory.mktemp("dicom_runs")
    nifti = run_bundle(repo_root, "configs/inference.json", tiny_model, dicom_tree, out / "nifti")
    assert nifti.returncode == 0, nifti.stderr[-3000:]
    dicom = run_bundle(repo_root, DICOM_CONFIGS, tiny_model, dicom_tree / "dicom", out / "dicom")
    assert dicom.returncode == 0, dicom.stderr[-3000:]
    cases = {}  # case_N -> its study's case name
    for folder in sorted((dicom_tree / "dicom" / "TESTING").iterdir()):
        cases[folder.name] = case_of(pydicom.dcmread(study_files(folder)[0]).StudyInstanceUID)
    return out, cases, dicom


def test_a_dicom_study_gets_the_mask_and_volumes_of_the_same_case_as_nifti(both_runs):
    out, cases, _ = both_runs
    nifti_rows = read_rows(out / "nifti" / "predictions" / "per_case.csv")
    dicom_rows = read_rows(out / "dicom" / "predictions" / "per_case.csv")
    assert sorted(dicom_rows) == sorted(cases.values())
    for case, study in cases.items():
        nifti_mask = nib.load(out / "nifti" / "predictions" / "masks" / f"{case}.nii.gz")
        dicom_mask = nib.load(out / "dicom" / "predictions" / "masks" / f"{study}.nii.gz")
        a, a_affine = canonical(nifti_mask.dataobj, nifti_mask.affine)
        b, b_affine = canonical(dicom_mask.dataobj, dicom_mask.affine)
        assert a.sum() > 0 and np.array_equal(a, b) and np.allclose(a_affine, b_affine, atol=1e-3), case
        assert_same_row({**nifti_rows[case], "case": study}, dicom_rows[study], case)


def test_the_seg_reads_back_as_the_mask_and_the_sr_holds_the_volumes(both_runs, dicom_tree):
    out, cases, _ = both_runs
    rows = read_rows(out / "dicom" / "predictions" / "per_case.csv")
    for case, study in cases.items():
        folder = out / "dicom" / "predictions" / "dicom" / study
        seg = hd.seg.segread(folder / "seg.dcm")
        ct = [pydicom.dcmread(f, stop_before_pixels=True) for f in study_files(dicom_tree / "dicom" / "TESTING" / case)]
        ct = [ds for ds in ct if ds.SeriesDescription == ct[0].SeriesDescription and "ORIGINAL" in ds.ImageType]
        assert seg.SeriesDescription == "Ischemic core (predicted, research use)"
        assert seg.StudyInstanceUID == ct[0].StudyInstanceUID and seg.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
        assert {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == {
            ds.SOPInstanceUID for ds in ct
        }
        segment = seg.SegmentSequence[0]
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "55641003"  # SNOMED CT: infarct
        mask = nib.load(out / "dicom" / "predictions" / "masks" / f"{study}.nii.gz")
        read_back, affine = volume_as_nifti(seg.get_volume(combine_segments=True))
        a, a_affine = canonical(read_back, affine)
        b, b_affine = canonical(mask.dataobj, mask.affine)
        assert np.array_equal(a, b) and np.allclose(a_affine, b_affine, atol=1e-3), case

        sr = hd.sr.srread(folder / "sr.dcm")
        assert sr.SeriesDescription == "Stroke CTP volumes (predicted, research use)"
        groups = sr.content.get_volumetric_roi_measurement_groups()
        assert len(groups) == 1 and groups[0].referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        (volume,) = groups[0].get_measurements()
        assert volume.value == pytest.approx(float(rows[study]["volume_pred_ml"]))
        (perfusion,) = sr.content.get_image_measurement_groups()
        concepts = {concept.value: column for column, (concept, _) in figure_concepts().items()}
        figures = {concepts[m.name.value]: float(m.value) for m in perfusion.get_measurements()}
        expected = {k: float(v) for k, v in rows[study].items() if k in concepts.values() and v not in ("", None)}
        assert expected and figures == pytest.approx(expected), case
        parameters = sr_texts(sr)["Algorithm Parameters"]  # of the core's group and the figures' group
        assert rows[study]["maps_source"] == "vendor" and parameters == ["perfusion maps: vendor"] * 2, case


def test_no_patient_name_id_or_uid_in_the_logs_or_file_names(both_runs, dicom_tree):
    """Neither the patient's name and ID nor a UID of the studies (highdicom logs the UID of each dataset it copies
    from at INFO: configs/logging.conf keeps it at WARNING) reaches the run's output or a file name."""
    out, cases, dicom = both_runs
    header = pydicom.dcmread(study_files(dicom_tree / "dicom" / "TESTING" / "case_1")[0])
    written = [os.path.join(d, n) for d, dirs, files in os.walk(out / "dicom") for n in dirs + files]
    for secret in (str(header.PatientName), str(header.PatientID)):
        assert secret and secret not in dicom.stdout + dicom.stderr
        assert not any(secret in path for path in written)
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in study_files(dicom_tree / "dicom" / "TESTING")]
    uids = {ds.get(key) for ds in headers for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    assert len(uids) > len(headers) and not [uid for uid in uids if uid in dicom.stdout + dicom.stderr]


def test_a_rerun_makes_objects_of_the_same_uids(repo_root, tiny_model, dicom_tree, both_runs):
    out, cases, _ = both_runs
    again = run_bundle(repo_root, DICOM_CONFIGS, tiny_model, dicom_tree / "dicom", out / "dicom", "--overwrite", "true")
    assert again.returncode == 0, again.stderr[-3000:]
    # the first run's objects were replaced; compare with a third run into another folder
    other = run_bundle(
        repo_root, DICOM_CONFIGS, tiny_model, dicom_tree / "dicom", out / "other", "--dicom_overlay", "true"
    )
    assert other.returncode == 0, other.stderr[-3000:]
    for study in cases.values():
        for name in ("seg.dcm", "sr.dcm"):
            first = pydicom.dcmread(out / "dicom" / "predictions" / "dicom" / study / name)
            second = pydicom.dcmread(out / "other" / "predictions" / "dicom" / study / name)
            assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (second.SOPInstanceUID, second.SeriesInstanceUID)
        # --dicom_overlay true: the overlay PNG as a secondary capture of the study, pixel for pixel
        assert not (out / "dicom" / "predictions" / "dicom" / study / "overlay.dcm").exists()
        capture = pydicom.dcmread(out / "other" / "predictions" / "dicom" / study / "overlay.dcm")
        png = np.asarray(Image.open(out / "other" / "predictions" / "overlays" / f"{study}.png").convert("RGB"))
        assert capture.StudyInstanceUID == first.StudyInstanceUID and np.array_equal(capture.pixel_array, png)


@pytest.fixture()
def study_copy(dicom_tree, tmp_path):
    """A copy of case_1's DICOM study, its files by series description: {description: [paths]}."""
    folder = tmp_path / "study"
    shutil.copytree(dicom_tree / "dicom" / "TESTING" / "case_1", folder)
    by_series = {}
    for path in study_files(folder):
        by_series.setdefault(str(pydicom.dcmread(path, stop_before_pixels=True).SeriesDescription), []).append(path)
    return folder, by_series


def rewrite(paths, change):
    """Apply ``change(dataset, index)`` to each file of ``paths`` and save it in place."""
    for index, path in enumerate(sorted(paths)):
        dataset = pydicom.dcmread(path)
        change(dataset, index)
        dataset.save_as(path)


def series_named(by_series, channel):
    return next(paths for description, paths in by_series.items() if channel.lower() in description.lower())


def _missing_tmax(by_series):
    for path in series_named(by_series, "Tmax"):
        os.remove(path)
    return "no series for Tmax"


def _two_cbf(by_series):
    uid = generate_uid()
    for path in series_named(by_series, "CBF"):
        shutil.copy(path, path + ".copy.dcm")
        rewrite(
            [path + ".copy.dcm"],
            lambda ds, i: (setattr(ds, "SeriesInstanceUID", uid), setattr(ds, "SOPInstanceUID", generate_uid())),
        )
    return "two or more series match CBF"


def _other_frame(by_series):
    uid = generate_uid()
    rewrite(series_named(by_series, "MTT"), lambda ds, i: setattr(ds, "FrameOfReferenceUID", uid))
    return "not in one frame of reference"


def _sagittal(by_series):
    rewrite(series_named(by_series, "CBV"), lambda ds, i: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]))
    return "is not axial"


def _missing_slice(by_series):
    paths = sorted(series_named(by_series, "NCCT"), key=lambda p: int(pydicom.dcmread(p).InstanceNumber))
    os.remove(paths[len(paths) // 2])
    return "irregular slice spacing"


def _tmax_ms(by_series):
    rewrite(series_named(by_series, "Tmax"), lambda ds, i: setattr(ds, "RescaleSlope", float(ds.RescaleSlope) * 1000))
    return "milliseconds"


def _truncated(by_series):
    path = series_named(by_series, "CBF")[0]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    return "is cut short"


def _cut_in_header(by_series):
    path = series_named(by_series, "CBF")[1]
    with open(path, "r+b") as f:
        f.truncate(600)  # inside its data set: pydicom reads what is there without a word
    return f"{path} is cut short: its data need"


def _cut_pixel_data_consistently(by_series):
    """Pixel data shorter than the rows and columns need, with a length that says so (a writer cut them)."""
    rewrite(series_named(by_series, "CBV")[:1], lambda ds, i: setattr(ds, "PixelData", ds.PixelData[:1000]))
    return "is cut short: its pixel data hold 1000 bytes, its header needs 2048"


def _duplicate_instance_uid(by_series):
    paths = series_named(by_series, "MTT")
    uid = pydicom.dcmread(paths[0]).SOPInstanceUID
    rewrite(paths[1:2], lambda ds, i: setattr(ds, "SOPInstanceUID", uid))
    return "share one SOPInstanceUID"


def ncct_in_slice_order(by_series):
    return sorted(series_named(by_series, "NCCT"), key=lambda p: int(pydicom.dcmread(p).InstanceNumber))


def _odd_slices_only(by_series):
    """NCCT slices 1, 3, 5 of 6: what a series arriving odd-first holds half-way (regular, at twice the spacing)."""
    for path in ncct_in_slice_order(by_series)[1::2]:
        os.remove(path)
    return "lacks 2 slice(s): its instance numbers run 1-5 along the stack, 2, 4 missing"


def _every_other_slice_renumbered(by_series):
    """The same, numbered 1, 2, 3: only the spacing against SpacingBetweenSlices tells."""
    paths = ncct_in_slice_order(by_series)
    for path in paths[1::2]:
        os.remove(path)
    rewrite(paths[::2], lambda ds, i: setattr(ds, "InstanceNumber", i + 1))
    said = float(pydicom.dcmread(paths[0]).SpacingBetweenSlices)
    return f"lacks slices: they are {2 * said:.3g} mm apart, its SpacingBetweenSlices is {said:.3g} mm"


def _ncct_still_arriving(by_series):
    for path in ncct_in_slice_order(by_series)[-2:]:
        os.remove(path)
    return "the perfusion maps reach beyond the NCCT"


def _maps_of_another_scan(by_series):
    def shift(ds, i):
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 500]

    for channel in ("CBF", "CBV", "MTT", "Tmax"):
        rewrite(series_named(by_series, channel), shift)
    return "the perfusion maps reach beyond the NCCT"


def _one_map_short(by_series):
    os.remove(sorted(series_named(by_series, "Tmax"), key=lambda p: int(pydicom.dcmread(p).InstanceNumber))[-1])
    return "the perfusion maps cover different slices"


def _smaller_field_of_view(by_series):
    def drop_columns(ds, index):
        pixels = np.ascontiguousarray(ds.pixel_array[:, 3:])
        row_direction = np.asarray(ds.ImageOrientationPatient[:3], dtype=float)
        position = np.asarray(ds.ImagePositionPatient, dtype=float) + 3 * row_direction * float(ds.PixelSpacing[1])
        ds.Columns, ds.PixelData = pixels.shape[1], pixels.tobytes()
        ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in position]

    rewrite(series_named(by_series, "CBF"), drop_columns)
    return "covers a smaller field of view than the NCCT"


NAMES_NO_SERIES = (_missing_tmax, _truncated, _cut_in_header, _cut_pixel_data_consistently, _duplicate_instance_uid)


@pytest.mark.parametrize(
    "breakage",
    [
        _missing_tmax,
        _two_cbf,
        _other_frame,
        _sagittal,
        _missing_slice,
        _tmax_ms,
        _truncated,
        _cut_in_header,
        _cut_pixel_data_consistently,
        _duplicate_instance_uid,
        _odd_slices_only,
        _every_other_slice_renumbered,
        _ncct_still_arriving,
        _maps_of_another_scan,
        _one_map_short,
        _smaller_field_of_view,
    ],
)
def test_a_bad_study_is_refused_naming_the_series(repo_root, study_copy, breakage):
    folder, by_series = study_copy
    expected = breakage(by_series)
    with pytest.raises(InvalidCaseError) as excinfo:
        find_studies(str(folder), rules(repo_root))
    message = str(excinfo.value)
    assert expected in message, message
    assert breakage is _cut_in_header or "study-" in message, message
    if breakage not in NAMES_NO_SERIES:  # the others name the series by description and UID's hash
        assert re.search(r'" \(series \d+, uid-[0-9a-f]{12}\)', message), message
    assert not re.search(r"\d+(\.\d+){4,}", message), message  # no UID in clear


def test_the_reader_imports_neither_the_writer_nor_pillow_of_its_own(repo_root):
    """scripts.dicom.series reads studies without the results writer or the overlay (Pillow) modules (pydicom 3
    itself imports PIL.ImageCms, so PIL is in the process anyway)."""
    code = (
        "import sys, scripts.dicom.series; "
        "print([m for m in sys.modules if m in ('scripts.dicom.results', 'scripts.report.overlay',"
        " 'scripts.report.cases') or m.startswith('scripts.tools')])"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_a_bad_study_stops_the_run_before_anything_is_written(repo_root, tiny_model, study_copy, tmp_path):
    folder, by_series = study_copy
    _other_frame(by_series)
    result = run_bundle(repo_root, DICOM_CONFIGS, tiny_model, folder, tmp_path / "out")
    assert result.returncode != 0 and "not in one frame of reference" in result.stderr
    assert not (tmp_path / "out").exists()


def test_pydicoms_vendor_ct_file_reads_with_its_rescale_and_geometry():
    """pydicom's CT_small.dcm (a file we did not write): HU from its stored values, slope and intercept; the affine
    from its orientation, position and spacing."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    array, affine = volume_arrays([dataset])
    expected = dataset.pixel_array.astype(np.float64) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    assert array.shape == (dataset.Columns, dataset.Rows, 1)
    assert np.array_equal(array[:, :, 0], expected.T.astype(np.float32))
    row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
    position = np.asarray(dataset.ImagePositionPatient, dtype=float) * [-1, -1, 1]
    assert np.allclose(affine[:3, 3], position, atol=1e-4)
    assert np.allclose(np.linalg.norm(affine[:3, :2], axis=0), [column_spacing, row_spacing], atol=1e-5)


def test_multi_frame_series_read_as_their_single_frame_slices(repo_root, study_copy, tmp_path):
    """Each series of a study converted to one legacy-converted enhanced CT instance (highdicom): the same arrays."""
    folder, by_series = study_copy
    (single,) = find_studies(str(folder), rules(repo_root))
    multi_dir = tmp_path / "multi"
    multi_dir.mkdir()
    for index, paths in enumerate(by_series.values()):
        datasets = [pydicom.dcmread(p) for p in paths]
        enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
            datasets,
            series_instance_uid=generate_uid(),
            series_number=100 + index,
            sop_instance_uid=generate_uid(),
            instance_number=1,
        )
        enhanced.SeriesDescription = datasets[0].SeriesDescription
        enhanced.save_as(multi_dir / f"series_{index}.dcm")
    (multi,) = find_studies(str(multi_dir), rules(repo_root))
    for channel in single.series:
        a, a_affine = volume_arrays([pydicom.dcmread(p) for p in single.series[channel].sources])
        b, b_affine = volume_arrays([pydicom.dcmread(p) for p in multi.series[channel].sources])
        assert np.array_equal(a, b) and np.allclose(a_affine, b_affine, atol=1e-4), channel


EVALUATE = "['configs/inference.json','configs/evaluate.json']"
EVALUATE_DICOM = "['configs/inference.json','configs/evaluate.json','configs/dicom.json']"


def test_evaluation_of_studies_with_a_ground_truth_seg_scores_them_as_their_nifti_cases(
    repo_root, tiny_model, tmp_path
):
    root = tmp_path / "tree"
    generate(str(root), num_train=3, num_test=0, seed=13, in_plane=32, slices=(4, 6), dicom=True)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(build_datalist(str(root), folds=2, seed=0)))
    nifti = run_bundle(
        repo_root,
        EVALUATE,
        tiny_model,
        root,
        tmp_path / "nifti",
        "--data_list_file_path",
        str(datalist),
        "--eval_section",
        "training",
    )
    assert nifti.returncode == 0, nifti.stderr[-3000:]
    dicom = run_bundle(repo_root, EVALUATE_DICOM, tiny_model, root / "dicom" / "TRAINING", tmp_path / "dicom")
    assert dicom.returncode == 0, dicom.stderr[-3000:]
    nifti_rows = read_rows(tmp_path / "nifti" / "eval" / "per_case.csv")
    dicom_rows = read_rows(tmp_path / "dicom" / "eval" / "per_case.csv")
    assert len(nifti_rows) == len(dicom_rows) == 3
    for folder in sorted((root / "dicom" / "TRAINING").iterdir()):
        study = case_of(pydicom.dcmread(study_files(folder)[0]).StudyInstanceUID)
        assert_same_row({**nifti_rows[folder.name], "case": study}, dicom_rows[study], folder.name)


def test_evaluation_refuses_a_study_without_a_ground_truth_seg(repo_root, tiny_model, dicom_tree, tmp_path):
    result = run_bundle(repo_root, EVALUATE_DICOM, tiny_model, dicom_tree / "dicom" / "TESTING", tmp_path / "out")
    assert result.returncode != 0 and "evaluation needs one ground-truth SEG" in result.stderr
    assert not (tmp_path / "out").exists()


OTHER_VENDOR = {"NCCT": "Head 5.0 H31s", "CBF": "CT Perfusion CBF", "CBV": "rCBV", "MTT": "Mean Transit Time"}


def test_another_vendors_descriptions_and_slice_order_pick_and_read_the_same_series(repo_root, study_copy):
    """syngo.via-like descriptions, files in reverse order with their instance numbers reversed, and distractors
    (the perfusion source series, a thresholded CBF) that the rules must not pick."""
    folder, by_series = study_copy
    (before,) = find_studies(str(folder), rules(repo_root))
    expected = {c: volume_arrays([pydicom.dcmread(p) for p in s.sources]) for c, s in before.series.items()}
    for old, new in {**OTHER_VENDOR, "Tmax": "TMAX"}.items():
        paths = series_named(by_series, old)
        rewrite(
            paths,
            lambda ds, i, new=new, n=len(paths): (
                setattr(ds, "SeriesDescription", new),
                setattr(ds, "InstanceNumber", n - i),
            ),
        )
    for description, source in (("Perfusion 4D 0.5s", "CBF"), ("RAPID CBF<30%", "CBF")):
        uid = generate_uid()
        for path in series_named(by_series, source):
            copy = path.replace(".dcm", f"_{description[:5].strip()}.dcm")
            shutil.copy(path, copy)
            rewrite(
                [copy],
                lambda ds, i, uid=uid, d=description: (
                    setattr(ds, "SeriesInstanceUID", uid),
                    setattr(ds, "SOPInstanceUID", generate_uid()),
                    setattr(ds, "SeriesDescription", d),
                ),
            )
    (after,) = find_studies(str(folder), rules(repo_root))
    assert {c: s.uid for c, s in after.series.items()} == {c: s.uid for c, s in before.series.items()}
    for channel, series in after.series.items():
        datasets = [pydicom.dcmread(p) for p in series.sources]
        array, affine = volume_arrays(datasets)
        assert np.array_equal(array, expected[channel][0]) and np.allclose(affine, expected[channel][1]), channel
        # the bundle's stacking of single-frame slices is highdicom's volume, voxel for voxel
        reference, reference_affine = volume_as_nifti(hd.get_volume_from_series(datasets, dtype=np.float32))
        assert np.array_equal(array, reference) and np.array_equal(affine, reference_affine), channel


def test_a_sites_own_series_names_are_set_in_a_config_file_after_dicom_json(repo_root, study_copy, tmp_path):
    folder, by_series = study_copy
    rewrite(series_named(by_series, "CBF"), lambda ds, i: setattr(ds, "SeriesDescription", "PERF FLOW"))
    with pytest.raises(InvalidCaseError, match="no series for CBF"):
        find_studies(str(folder), rules(repo_root))
    site = tmp_path / "site.json"
    site.write_text(json.dumps({"site_series_rules#CBF": {"description": "^PERF FLOW$"}}))
    parser = ConfigParser()
    parser.read_config([os.path.join(repo_root, "configs", name) for name in ("inference.json", "dicom.json")] + [site])
    rules_read = parser.get_parsed_content("series_rules")
    (study,) = find_studies(str(folder), rules_read)
    assert study.series["CBF"].description == "PERF FLOW"
    assert rules_read["CBF"]["exclude"] == rules(repo_root)["CBF"]["exclude"], "the tests the site gives no value keep"


def assert_dciodvfy_passes(path, empty_type_2=False):
    """dicom3tools' IOD checker on a file the bundle sends: no error; its one warning is the bundle's private coding
    scheme (99STROKECTP, declared in the SR's CodingSchemeIdentificationSequence), which it does not know, and (for a
    study without them, ``empty_type_2``) that the empty Type 2 attributes could not index a DICOMDIR."""
    if shutil.which("dciodvfy") is None:
        return
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    lines = (report.stdout + report.stderr).splitlines()
    assert not [line for line in lines if line.startswith("Error")], (path, lines)
    warnings = [line for line in lines if line.startswith("Warning")]
    allowed = ("99STROKECTP", "needed to build DICOMDIR") if empty_type_2 else ("99STROKECTP",)
    assert all(any(reason in line for reason in allowed) for line in warnings), (path, warnings)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian's dicom3tools) is not installed")
def test_dciodvfy_finds_no_errors_in_the_seg_and_sr(both_runs):
    out, cases, _ = both_runs
    for study in cases.values():
        for name in ("seg.dcm", "sr.dcm"):
            assert_dciodvfy_passes(out / "dicom" / "predictions" / "dicom" / study / name)


def test_a_ctp_slab_a_study_without_type_2_attributes_and_overwrite(repo_root, tiny_model, dicom_tree, tmp_path):
    """One run on two studies: maps covering NCCT slices 2-5 of 6 (a CT perfusion slab on a longer NCCT) are
    segmented there only, and the SEG and SR say so; a study without the Type 2 patient and study attributes gets
    them empty in its SEG and SR. Then the same folder with --overwrite true on the second study alone: the first
    study's SEG and SR of the earlier run are gone."""
    folder = tmp_path / "studies"
    slab, bare = {}, {}
    for case, by_series in (("case_1", slab), ("case_2", bare)):
        shutil.copytree(dicom_tree / "dicom" / "TESTING" / case, folder / case)
        for path in study_files(folder / case):
            description = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesDescription)
            by_series.setdefault(description, []).append(path)
    for channel in ("CBF", "CBV", "MTT", "Tmax"):
        paths = sorted(series_named(slab, channel), key=lambda p: int(pydicom.dcmread(p).InstanceNumber))
        os.remove(paths[0])
        os.remove(paths[-1])
    missing = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID", "AccessionNumber")
    rewrite(study_files(folder / "case_2"), lambda ds, i: [delattr(ds, k) for k in missing if k in ds])
    studies = {study.case: study for study in find_studies(str(folder), rules(repo_root))}
    slab_case = case_of(pydicom.dcmread(study_files(folder / "case_1")[0]).StudyInstanceUID)
    bare_case = case_of(pydicom.dcmread(study_files(folder / "case_2")[0]).StudyInstanceUID)
    assert studies[slab_case].coverage == {"first": 2, "last": 5, "of": 6} and studies[bare_case].coverage is None
    kept = {str(h.SOPInstanceUID) for h in studies[slab_case].series["CT"].headers}
    assert len(kept) == 4

    result = run_bundle(repo_root, DICOM_CONFIGS, tiny_model, folder, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{slab_case}: the perfusion maps cover NCCT slices 2-5 of 6" in result.stdout + result.stderr
    written = tmp_path / "out" / "predictions" / "dicom"
    seg = hd.seg.segread(written / slab_case / "seg.dcm")
    assert seg.SeriesDescription == "Ischemic core (predicted, research use, CTP slab)"
    assert seg.ContentDescription.startswith("NCCT slices 2-5 of 6")
    assert {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == kept
    mask = nib.load(tmp_path / "out" / "predictions" / "masks" / f"{slab_case}.nii.gz")
    assert mask.shape[2] == 4
    sr = hd.sr.srread(written / slab_case / "sr.dcm")
    assert sr.SeriesDescription == "Stroke CTP volumes (predicted, research use, CTP slab)"
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    assert {m.name.value: m.value for m in group.get_measurements()}["NCCT_SLAB"] == pytest.approx(4 / 6)
    for name in ("seg.dcm", "sr.dcm"):
        assert_dciodvfy_passes(written / slab_case / name)
        dataset = pydicom.dcmread(written / bare_case / name)
        assert all(dataset[k].value in ("", None) for k in missing), name
        assert_dciodvfy_passes(written / bare_case / name, empty_type_2=True)

    shutil.rmtree(folder / "case_1")
    again = run_bundle(repo_root, DICOM_CONFIGS, tiny_model, folder, tmp_path / "out", "--overwrite", "true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(os.listdir(written)) == [bare_case]
    assert sorted(os.listdir(written / bare_case)) == ["seg.dcm", "sr.dcm"]


def test_a_real_enhanced_ct_reads_frame_by_frame_at_its_positions():
    """pydicom-data's eCT_Supplemental.dcm (the standard's Enhanced CT example, two frames, its rescale in the shared
    functional groups): each frame's HU at the slice of the affine that its position gives."""
    dataset = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    array, affine = volume_arrays([dataset])
    shared = dataset.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    hu = dataset.pixel_array.astype(np.float64) * float(shared.RescaleSlope) + float(shared.RescaleIntercept)
    assert array.shape == (dataset.Columns, dataset.Rows, 2)
    inverse = np.linalg.inv(np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine)  # LPS position -> (column, row, slice)
    for frame, groups in enumerate(dataset.PerFrameFunctionalGroupsSequence):
        position = np.asarray(groups.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        column, row, k = (inverse @ np.append(position, 1.0))[:3]
        assert np.allclose([column, row], 0, atol=1e-4) and abs(k - round(k)) < 1e-4
        assert np.array_equal(array[:, :, int(round(k))], hu[frame].T.astype(np.float32)), frame


def test_a_compressed_series_reads_as_its_uncompressed_one_and_an_unreadable_one_is_refused(repo_root, study_copy):
    folder, by_series = study_copy
    (before,) = find_studies(str(folder), rules(repo_root))
    expected = volume_arrays([pydicom.dcmread(p) for p in before.series["CBF"].sources])[0]
    rewrite(series_named(by_series, "CBF"), lambda ds, i: ds.compress(JPEGLSLossless))
    (after,) = find_studies(str(folder), rules(repo_root))
    datasets = [pydicom.dcmread(p) for p in after.series["CBF"].sources]
    assert datasets[0].file_meta.TransferSyntaxUID == JPEGLSLossless
    assert np.array_equal(volume_arrays(datasets)[0], expected)
    assert get_decoder(JPEGLosslessSV1).is_available  # requirements.txt's pylibjpeg-libjpeg: PACS CT exports
    rewrite(series_named(by_series, "MTT"), lambda ds, i: setattr(ds.file_meta, "TransferSyntaxUID", UID("1.2.3.4")))
    with pytest.raises(InvalidCaseError, match="which no installed pixel data decoder reads"):
        find_studies(str(folder), rules(repo_root))


def test_a_map_on_another_grid_of_the_frame_of_reference_is_resampled_onto_the_nccts(repo_root, study_copy):
    """CBF stored without its first column (its grid shifted by one voxel, as a map computed on its own grid): the
    reader puts it back on the NCCT's grid, the same values where it has them, 0 in the column it lacks."""
    folder, by_series = study_copy

    def image_of():
        (study,) = find_studies(str(folder), rules(repo_root))
        reader = DicomSeriesReader()
        return reader.get_data(reader.read(study.item()["image"]))

    image, meta = image_of()

    def drop_first_column(ds, index):
        pixels = np.ascontiguousarray(ds.pixel_array[:, 1:])
        row_direction = np.asarray(ds.ImageOrientationPatient[:3], dtype=float)
        position = np.asarray(ds.ImagePositionPatient, dtype=float) + row_direction * float(ds.PixelSpacing[1])
        ds.Columns, ds.PixelData = pixels.shape[1], pixels.tobytes()
        ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in position]

    rewrite(series_named(by_series, "CBF"), drop_first_column)
    resampled, resampled_meta = image_of()
    assert resampled.shape == image.shape and np.allclose(resampled_meta["affine"], meta["affine"])
    assert np.allclose(resampled[1, 1:], image[1, 1:], atol=1e-3) and not resampled[1, 0].any()
    assert np.array_equal(resampled[[0, 2, 3, 4]], image[[0, 2, 3, 4]])

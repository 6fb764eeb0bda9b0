"""Cases with the raw CT perfusion series and no perfusion maps (ISLES 2018 ``CT_4DPWI``, ISLES 2024 raw CTP, a DICOM
CT perfusion series) through configs/inference.json and configs/evaluate.json: their maps computed by
scripts.data.perfusion_maps as the case is loaded, the report and the SR saying so; cases with vendor maps unchanged;
a series the maps cannot be computed from refused naming the case and the file."""

import json
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from helpers import read_rows, run_bundle, sr_texts, study_files
from scripts.data.channels import COMPUTED_MAPS, VENDOR_MAPS, computed_channels, series_rules
from scripts.data.datalist import build_datalist, find_inputs
from scripts.data.isles18 import SMIR_NAME, TESTING_DIR, TRAINING_DIR, key_of_token
from scripts.data.perfusion_maps import sidecar_path
from scripts.data.readers import InvalidCaseError, LoadCased
from scripts.dicom.series import case_of, find_studies
from scripts.synthetic.isles import generate, generate_isles24
from scripts.synthetic.phantom import CTP_SERIES_NUMBER, CTP_TOKEN, PhantomSource

DICOM_CONFIGS = "['configs/inference.json','configs/dicom.json']"
EVALUATE_CONFIGS = "['configs/inference.json','configs/evaluate.json']"
MAPS = computed_channels()


@pytest.fixture(scope="module")
def phantom_trees(tmp_path_factory):
    """Phantom trees (maps computed from each case's raw series, which is written beside it): ISLES 2018 with two
    training cases and one testing case, also as DICOM studies; ISLES 2024 with one subject."""
    root = tmp_path_factory.mktemp("phantom_trees")
    source = PhantomSource()
    generate(
        str(root / "isles18"), 2, 1, seed=2, in_plane=64, slices=4, two_slab_fraction=0, dicom=True, case_source=source
    )
    generate_isles24(str(root / "isles24"), 1, 0, seed=2, in_plane=48, slices=16, case_source=source)
    return root


def copy_case(case_dir, to, keep_maps=True, keep_raw=True):
    """A copy of an ISLES 2018 case folder, without its perfusion maps or its raw series where asked."""
    shutil.copytree(case_dir, to)
    for folder in Path(to).iterdir():
        match = SMIR_NAME.match(folder.name)
        is_map = match and key_of_token(match.group("mod")) in MAPS
        if (is_map and not keep_maps) or (match and match.group("mod") == CTP_TOKEN and not keep_raw):
            shutil.rmtree(folder)
    return Path(to)


def raw_series_file(case_dir):
    return next(Path(case_dir).glob(f"SMIR.Brain.XX.O.{CTP_TOKEN}.*/*.nii"))


def mask_of(out, case):
    return np.asanyarray(nib.load(out / "predictions" / "masks" / f"{case}.nii.gz").dataobj)


def test_the_spec_says_which_inputs_are_computed_and_where_the_raw_series_is():
    assert MAPS == ["CBF", "CBV", "MTT", "Tmax"]
    assert "CTP" in series_rules() and "CTP" not in series_rules(["CT"])


def test_a_raw_only_isles18_case_is_segmented_from_computed_maps_and_vendor_cases_are_unchanged(
    repo_root, tiny_model, phantom_trees, tmp_path
):
    case = phantom_trees / "isles18" / TESTING_DIR / "case_1"
    cases = tmp_path / "cases"
    copy_case(case, cases / "raw_only", keep_maps=False)
    copy_case(case, cases / "vendor")  # maps and the raw series: the maps are used
    copy_case(case, cases / "vendor_without_raw", keep_raw=False)
    result = run_bundle(repo_root, "configs/inference.json", tiny_model, cases, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(tmp_path / "out" / "predictions" / "per_case.csv")
    assert rows["raw_only"]["maps_source"] == COMPUTED_MAPS
    assert rows["vendor"]["maps_source"] == rows["vendor_without_raw"]["maps_source"] == VENDOR_MAPS
    assert {**rows["vendor"], "case": ""} == {**rows["vendor_without_raw"], "case": ""}
    vendor = mask_of(tmp_path / "out", "vendor")
    assert np.array_equal(vendor, mask_of(tmp_path / "out", "vendor_without_raw"))
    # the computed maps are the tree's own (the generator computed them from the same series), to the float precision
    # of the frame times read back from the sidecar: the same mask and figures
    raw_only = mask_of(tmp_path / "out", "raw_only")
    assert vendor.any() and np.mean(raw_only != vendor) < 0.001
    for column in ("volume_pred_ml", "hypoperfusion_ml", "core_rcbf_ml"):
        assert float(rows["raw_only"][column]) == pytest.approx(float(rows["vendor"][column]), rel=0.02), column


def test_evaluation_scores_a_raw_only_isles18_case_beside_a_vendor_one(repo_root, tiny_model, phantom_trees, tmp_path):
    root = tmp_path / "tree"
    training = phantom_trees / "isles18" / TRAINING_DIR
    copy_case(training / "case_1", root / TRAINING_DIR / "case_1", keep_maps=False)
    copy_case(training / "case_2", root / TRAINING_DIR / "case_2")
    datalist = build_datalist(str(root), folds=2, seed=0, check=True)
    item = next(i for i in datalist["training"] if i["case"] == "case_1")
    raw = str(raw_series_file(root / TRAINING_DIR / "case_1").relative_to(root))
    assert item["maps_source"] == COMPUTED_MAPS and item["image"][1:] == [raw] * 4  # the file they come from
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    extra = ["--data_list_file_path", str(path), "--eval_section", "training"]
    result = run_bundle(repo_root, EVALUATE_CONFIGS, tiny_model, root, tmp_path / "out", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(tmp_path / "out" / "eval" / "per_case.csv")
    assert rows["case_1"]["maps_source"] == COMPUTED_MAPS and rows["case_2"]["maps_source"] == VENDOR_MAPS
    for row in rows.values():
        assert 0 <= float(row["dice"]) <= 1 and row["threshold_core_dice"] != ""
    assert (tmp_path / "out" / "eval" / "summary.csv").is_file()


def test_a_raw_only_isles24_subject_is_segmented_from_computed_maps(repo_root, tiny_model, phantom_trees, tmp_path):
    root = tmp_path / "isles24"
    shutil.copytree(phantom_trees / "isles24", root)
    (maps,) = root.glob("derivatives/sub-*/ses-*/perfusion-maps")
    shutil.rmtree(maps)
    result = run_bundle(repo_root, "configs/inference.json", tiny_model, root, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    (subject,) = read_rows(tmp_path / "out" / "predictions" / "per_case.csv").values()
    assert subject["maps_source"] == COMPUTED_MAPS and subject["hypoperfusion_ml"] != ""
    (ncct,) = root.glob("rawdata/sub-*/ses-*/*_ncct.nii.gz")
    mask = nib.load(tmp_path / "out" / "predictions" / "masks" / f"{subject['case']}.nii.gz")
    assert mask.shape == nib.load(ncct).shape and np.allclose(mask.affine, nib.load(ncct).affine, atol=1e-5)


def raw_only_study(phantom_trees, to):
    """A copy of a phantom DICOM study without its map series: the NCCT and the CT perfusion series."""
    study = phantom_trees / "isles18" / "dicom" / TESTING_DIR / "case_1"
    shutil.copytree(study, to, ignore=lambda folder, names: [n for n in names if n.split("_", 1)[-1] in MAPS])
    return Path(to)


def test_a_raw_only_dicom_study_is_segmented_and_its_sr_says_the_maps_are_computed(
    repo_root, tiny_model, phantom_trees, tmp_path
):
    study = raw_only_study(phantom_trees, tmp_path / "studies" / "case_1")
    result = run_bundle(repo_root, DICOM_CONFIGS, tiny_model, tmp_path / "studies", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    case = case_of(pydicom.dcmread(study_files(study)[0]).StudyInstanceUID)
    rows = read_rows(tmp_path / "out" / "predictions" / "per_case.csv")
    assert list(rows) == [case] and rows[case]["maps_source"] == COMPUTED_MAPS
    folder = tmp_path / "out" / "predictions" / "dicom" / case
    seg = hd.seg.segread(folder / "seg.dcm")
    assert seg.StudyInstanceUID == pydicom.dcmread(study_files(study)[0]).StudyInstanceUID
    sr = hd.sr.srread(folder / "sr.dcm")
    assert sr_texts(sr)["Algorithm Parameters"] == [f"perfusion maps: {COMPUTED_MAPS}"] * 2


def _untimed(case_dir):
    """The sidecar gives fewer frame times than the series has frames: refused from the header, before any work."""
    sidecar = Path(sidecar_path(raw_series_file(case_dir)))
    times = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**times, "FrameTimesStart": times["FrameTimesStart"][:5]}))
    return "cannot be timed"


def _no_bolus(case_dir):
    """Every frame the first (no contrast arrives): refused as the case is loaded, when its maps are computed."""
    path = raw_series_file(case_dir)
    image = nib.load(path)
    frames = np.asanyarray(image.dataobj)
    nib.save(nib.Nifti1Image(np.repeat(frames[..., :1], frames.shape[3], axis=3), image.affine, image.header), path)
    return "has no bolus"


@pytest.mark.parametrize("breakage", [_untimed, _no_bolus])
def test_a_raw_series_the_maps_cannot_be_computed_from_is_refused_naming_the_case_and_file(
    repo_root, tiny_model, phantom_trees, tmp_path, breakage
):
    cases = tmp_path / "cases"
    case_dir = copy_case(phantom_trees / "isles18" / TESTING_DIR / "case_1", cases / "broken", keep_maps=False)
    reason = breakage(case_dir)
    result = run_bundle(repo_root, "configs/inference.json", tiny_model, cases, tmp_path / "out")
    assert result.returncode != 0
    assert f"broken: cannot compute perfusion maps from the raw CT perfusion series {raw_series_file(case_dir)}: " in (
        result.stderr
    )
    assert reason in result.stderr
    assert not list((tmp_path / "out").rglob("*.nii.gz"))  # no mask, empty or not


def test_a_dicom_perfusion_series_with_an_untimed_slice_is_refused_with_the_study(phantom_trees, tmp_path):
    study = raw_only_study(phantom_trees, tmp_path / "study")
    path = study_files(study / f"{CTP_SERIES_NUMBER}_CTP")[3]
    ds = pydicom.dcmread(path)
    del ds.AcquisitionTime, ds.AcquisitionDateTime
    ds.save_as(path)
    case = case_of(ds.StudyInstanceUID)
    with pytest.raises(InvalidCaseError, match=f"{case}: CT perfusion series .*: cannot be timed: {path} has no"):
        find_studies(str(study), series_rules())


def test_maps_of_a_series_on_another_grid_are_resampled_onto_the_nccts(phantom_trees, tmp_path):
    """The raw CTP stored with its first axis reversed (the same voxels in space, another affine): the maps computed
    from it and resampled onto the NCCT's grid are those computed on that grid."""
    root = tmp_path / "isles24"
    shutil.copytree(phantom_trees / "isles24", root)
    shutil.rmtree(next(root.glob("derivatives/sub-*/ses-*/perfusion-maps")))
    (item,) = find_inputs(str(root))
    on_grid = LoadCased(("image",))(item)["image"]
    path = item["image"][1]
    image = nib.load(path)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = image.shape[0] - 1
    reversed_image = nib.Nifti1Image(np.asanyarray(image.dataobj)[::-1], image.affine @ flip, image.header)
    reversed_image.set_qform(image.affine @ flip, code=1)
    reversed_image.set_sform(image.affine @ flip, code=1)
    nib.save(reversed_image, path)
    resampled = LoadCased(("image",))(item)["image"]
    assert resampled.shape == on_grid.shape and np.allclose(resampled.affine, on_grid.affine)
    assert torch.allclose(resampled, on_grid, atol=1e-3) and on_grid[1:].abs().sum() > 0

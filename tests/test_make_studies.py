"""scripts/tools/make_studies.py: ISLES cases (5 maps) -> single 5-channel 4D NIfTI studies, e.g. a MONAI Label studies folder."""

import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import correct_nifti_header_if_necessary
from scripts.data.channels import CHANNELS
from scripts.data.isles18 import find_cases, read_case
from scripts.data.readers import InvalidCaseError, LoadCased
from scripts.tools.make_studies import convert

# The header fields that place a NIfTI in the world; the study and the label must carry the CT's.
GEOMETRY_FIELDS = ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y")
GEOMETRY_FIELDS += ("qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units")


def maps_of(case_dir):
    return read_case(os.path.basename(case_dir), case_dir, with_label=True)


def test_one_case_is_one_4d_float32_file_with_the_cts_geometry(synthetic_tree, tmp_path):
    case_dir = os.path.join(synthetic_tree, "TRAINING", "case_2")
    written = convert(case_dir, str(tmp_path))
    assert written == {"case_2": str(tmp_path / "case_2.nii.gz")}
    assert sorted(os.listdir(tmp_path)) == ["case_2.nii.gz"]  # no label unless asked, no temporary left over
    study = nib.load(tmp_path / "case_2.nii.gz")
    item = maps_of(case_dir)
    ct = nib.load(item["image"][0])
    assert study.shape == ct.shape + (5,) and study.get_data_dtype() == np.float32
    assert np.array_equal(study.affine, ct.affine)
    assert np.array_equal(study.header.get_sform(), ct.header.get_sform())
    assert np.array_equal(study.header.get_qform(), ct.header.get_qform())
    assert study.header["descrip"].item().decode().endswith(",".join(CHANNELS))
    data = study.get_fdata(dtype=np.float32)
    for channel, path in enumerate(item["image"]):  # metadata.json's channel order: CT, CBF, CBV, MTT, Tmax
        assert np.array_equal(data[..., channel], np.asanyarray(nib.load(path).dataobj).astype(np.float32)), channel


def test_the_bundle_loads_the_study_and_the_five_maps_to_the_same_tensor(synthetic_tree, tmp_path):
    """What the bundle's loader (LoadCased, configs/*.json's) makes of either input: same values and affine."""
    case_dir = os.path.join(synthetic_tree, "TESTING", "case_1")
    convert(case_dir, str(tmp_path))
    load = LoadCased(("image",))
    maps = load({"image": read_case("case_1", case_dir, with_label=False)["image"]})["image"]
    study = load({"image": str(tmp_path / "case_1.nii.gz")})["image"]
    assert study.shape == maps.shape and study.shape[0] == 5
    assert np.array_equal(study.numpy(), maps.numpy())
    assert np.array_equal(study.affine.numpy(), maps.affine.numpy())


def _rotation_x(degrees):
    t = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rotation


def _set_codes(qform_code, sform_code):
    def edit(header):
        header["qform_code"], header["sform_code"] = qform_code, sform_code

    return edit


def _oblique_flipped(header):
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _rotation_x(15) @ header.get_best_affine()
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)


def _gantry_tilt(header):  # the sform sheared along y by a 12 degree tilt, the qform (no shears) not
    affine = header.get_sform()
    affine[1, 2] = affine[2, 2] * np.tan(np.deg2rad(12))
    header.set_sform(affine, code=1)


def _thickness_as_pixdim(header):  # pixdim (and so the qform) says 0.9 x the slice spacing of the sform
    header["pixdim"][3] *= 0.9


@pytest.mark.parametrize(
    "edit, read_differently",
    [
        (None, False),
        (_set_codes(1, 2), False),  # sform "aligned"
        (_set_codes(1, 0), False),  # qform only
        (_set_codes(0, 1), False),  # sform only
        (_oblique_flipped, False),
        (_gantry_tilt, True),  # MONAI reads the 3D maps with the qform
        (_thickness_as_pixdim, True),
    ],
    ids=["as_generated", "sform_aligned", "qform_only", "sform_only", "oblique_flipped", "gantry_tilt", "thickness"],
)
def test_the_study_and_label_carry_the_cts_geometry_as_the_bundle_reads_it(
    synthetic_tree, tmp_path, edit, read_differently
):
    """The study and its label get the CT's geometry fields verbatim (codes, quaternion, offsets, srows, pixdim, units)
    and load in the bundle (its loader, LoadCased, as configs/*.json) to exactly the maps' tensor and affine; where MONAI
    reads the CT's header differently (``correct_nifti_header_if_necessary``), they carry the header as MONAI reads it.
    """
    case_dir = tmp_path / "case_3"
    shutil.copytree(os.path.join(synthetic_tree, "TRAINING", "case_3"), case_dir)
    item = maps_of(str(case_dir))
    if edit is not None:  # the same edit to all six files, so that the case stays valid
        for path in item["image"] + [item["label"]]:
            img = nib.load(path)
            header = img.header.copy()
            edit(header)
            nib.save(nib.Nifti1Image(np.array(img.dataobj.get_unscaled()), None, header=header), path)
    convert(str(case_dir), str(tmp_path / "out"), labels=True)
    study = nib.load(tmp_path / "out" / "case_3.nii.gz")
    label = nib.load(tmp_path / "out" / "labels" / "final" / "case_3.nii.gz")
    ct = nib.load(item["image"][0])
    as_read = correct_nifti_header_if_necessary(nib.load(item["image"][0])).header
    assert read_differently == (not np.array_equal(as_read.get_best_affine(), ct.affine))
    for written in (study, label):
        for field in GEOMETRY_FIELDS:
            assert np.array_equal(written.header[field], as_read[field]), field
            assert read_differently or np.array_equal(written.header[field], ct.header[field]), field
        assert np.array_equal(written.header["pixdim"][:4], as_read["pixdim"][:4])
        assert read_differently or np.array_equal(written.header["pixdim"][:4], ct.header["pixdim"][:4])
    assert study.shape == ct.shape + (5,) and study.get_data_dtype() == np.float32
    assert label.shape == ct.shape and label.get_data_dtype() == np.uint8

    load = LoadCased(("image", "label"))
    maps = load({"image": item["image"], "label": item["label"]})
    from_study = load({"image": study.get_filename(), "label": label.get_filename()})
    for key in ("image", "label"):
        assert from_study[key].shape == maps[key].shape and np.array_equal(from_study[key].numpy(), maps[key].numpy())
        assert np.array_equal(from_study[key].affine.numpy(), maps["image"].affine.numpy()), key


def test_a_tree_fills_a_monai_label_studies_folder(synthetic_tree, tmp_path):
    out = tmp_path / "studies"
    written = convert(synthetic_tree, str(out), labels=True)
    training = [c for c, _ in find_cases(synthetic_tree, "TRAINING")]
    testing = [c for c, _ in find_cases(synthetic_tree, "TESTING")]
    assert sorted(written) == sorted([f"training_{c}" for c in training] + [f"testing_{c}" for c in testing])
    assert sorted(os.listdir(out / "labels" / "final")) == sorted(f"training_{c}.nii.gz" for c in training)
    case_dir = os.path.join(synthetic_tree, "TRAINING", training[0])
    label = nib.load(out / "labels" / "final" / f"training_{training[0]}.nii.gz")
    ot = nib.load(maps_of(case_dir)["label"])
    assert label.get_data_dtype() == np.uint8 and np.array_equal(label.affine, ot.affine)
    assert np.array_equal(np.asanyarray(label.dataobj), np.asanyarray(ot.dataobj))

    only_testing = convert(synthetic_tree, str(tmp_path / "testing_only"), sections="TESTING")
    assert sorted(only_testing) == sorted(f"testing_{c}" for c in testing)


def test_existing_files_are_never_replaced_without_overwrite(synthetic_tree, tmp_path):
    out = tmp_path / "studies"
    convert(synthetic_tree, str(out), sections="TESTING")
    first = out / "testing_case_1.nii.gz"
    first.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="testing_case_1.nii.gz exists.*--overwrite"):
        convert(synthetic_tree, str(out), sections=("TESTING",))
    assert first.read_bytes() == b"precious"
    convert(synthetic_tree, str(out), sections="TESTING", overwrite=True)
    assert nib.load(first).shape[-1] == 5


def test_bad_cases_are_named_and_can_be_skipped(synthetic_tree, tmp_path):
    root = tmp_path / "isles"
    shutil.copytree(synthetic_tree, root)
    broken = root / "TESTING" / "case_2"
    os.remove(read_case("case_2", str(broken), with_label=False)["image"][2])  # the CBV map
    with pytest.raises(InvalidCaseError, match=r"TESTING/case_2: expected one \.nii or \.nii\.gz file in .*CT_CBV"):
        convert(str(root), str(tmp_path / "a"))
    written = convert(str(root), str(tmp_path / "b"), skip_invalid=True)
    assert "testing_case_2" not in written and "testing_case_1" in written
    assert not os.path.exists(tmp_path / "b" / "testing_case_2.nii.gz")


def make_studies(repo_root, *args):
    """``python -m scripts.tools.make_studies`` with ``args`` (as text): the finished process."""
    cmd = [sys.executable, "-m", "scripts.tools.make_studies", *map(str, args)]
    return subprocess.run(cmd, check=False, cwd=repo_root, capture_output=True, text=True, timeout=300)


def test_a_bad_later_case_stops_the_run_before_any_study_is_written(repo_root, synthetic_tree, tmp_path):
    """Every case is read and checked first, so a rerun after fixing the case is not refused for files half a run
    wrote; with --skip_invalid the other cases are written."""
    root = tmp_path / "isles"
    shutil.copytree(synthetic_tree, root)
    case, case_dir = find_cases(str(root), "TRAINING")[-1]
    cbf = read_case(case, case_dir, with_label=True)["image"][1]
    with open(cbf, "r+b") as f:
        f.truncate(os.path.getsize(cbf) // 2)
    out = tmp_path / "studies"
    args = ["--source", root, "--output_dir", out, "--labels"]
    result = make_studies(repo_root, *args)
    assert result.returncode == 1, result.stderr
    error = result.stderr[result.stderr.find("error: ") :]  # nibabel's reason runs over two lines
    assert error.startswith(f"error: TRAINING/{case}: ") and cbf in error.splitlines()[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists(), "no study is written when a case is bad"

    skipping = make_studies(repo_root, *args, "--skip_invalid")
    assert skipping.returncode == 0, skipping.stderr
    assert f"skipped 1 invalid case(s):\n  TRAINING/{case}: " in skipping.stderr
    training = [c for c, _ in find_cases(str(root), "TRAINING") if c != case]
    testing = [c for c, _ in find_cases(str(root), "TESTING")]
    expected = [f"training_{c}.nii.gz" for c in training] + [f"testing_{c}.nii.gz" for c in testing]
    assert sorted(os.listdir(out)) == sorted(expected + ["labels"])
    assert sorted(os.listdir(out / "labels" / "final")) == sorted(f"training_{c}.nii.gz" for c in training)


def test_shape_mismatch_is_reported_with_case_and_file(synthetic_tree, tmp_path):
    case_dir = tmp_path / "case_9"
    shutil.copytree(os.path.join(synthetic_tree, "TESTING", "case_1"), case_dir)
    tmax = read_case("case_9", str(case_dir), with_label=False)["image"][4]
    img = nib.load(tmax)
    data = np.asarray(img.dataobj)[:-1].copy()  # a copy: the file is memory-mapped and is about to be replaced
    nib.save(nib.Nifti1Image(data, img.affine), tmax)
    with pytest.raises(InvalidCaseError, match=r"case_9: Tmax file .* has shape"):
        convert(str(case_dir), str(tmp_path / "out"))
    with pytest.raises(InvalidCaseError, match=r"case_9: Tmax file .* has shape"):
        convert(str(case_dir), str(tmp_path / "out"), check=False)  # stacking checks shapes too
    assert not os.path.exists(tmp_path / "out" / "case_9.nii.gz")


def test_cli(repo_root, synthetic_tree, tmp_path):
    out = tmp_path / "studies"
    args = ["--source", synthetic_tree, "--output_dir", out, "--sections", "TESTING"]
    result = make_studies(repo_root, *args)
    assert result.returncode == 0, result.stderr
    assert "wrote 2 5-channel studies" in result.stdout
    assert sorted(os.listdir(out)) == ["testing_case_1.nii.gz", "testing_case_2.nii.gz"]
    again = make_studies(repo_root, *args)
    assert again.returncode != 0
    assert again.stderr.strip().splitlines()[-1].startswith("error: ") and "--overwrite" in again.stderr


def test_inference_gives_the_same_masks_for_the_maps_and_the_study(repo_root, synthetic_tree, tmp_path):
    """configs/inference.json on an ISLES root (5 maps per case) and on the studies made from it: identical masks."""
    from monai.bundle import ConfigParser, ConfigWorkflow

    tiny = {"features": [2, 4, 8, 16, 32], "spatial_size": [32, 32, 16], "num_workers": 0}
    config = os.path.join(repo_root, "configs", "inference.json")
    parser = ConfigParser()
    parser.read_config(config)
    parser.update(tiny)
    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "models" / "model.pt")
    studies = tmp_path / "studies"
    convert(synthetic_tree, str(studies), sections="TESTING")
    masks = {}
    for name, source in (("maps", synthetic_tree), ("studies", str(studies))):
        wf = ConfigWorkflow(
            config_file=config,
            meta_file=os.path.join(repo_root, "configs", "metadata.json"),
            workflow_type="infer",
            bundle_root=str(tmp_path),
            dataset_dir=source,
            output_dir=str(tmp_path / name),
            **tiny,
        )
        wf.initialize()
        wf.run()
        wf.finalize()
        masks[name] = tmp_path / name / "predictions" / "masks"
    cases = [c for c, _ in find_cases(synthetic_tree, "TESTING")]
    for case in cases:
        from_maps = nib.load(masks["maps"] / f"{case}.nii.gz")
        from_study = nib.load(masks["studies"] / f"testing_{case}.nii.gz")
        assert np.array_equal(from_maps.affine, from_study.affine)
        mask = np.asanyarray(from_maps.dataobj)
        assert 0 < mask.mean() < 1, "an untrained network, but not a constant mask"
        assert np.array_equal(mask, np.asanyarray(from_study.dataobj)), case

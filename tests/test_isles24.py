"""ISLES 2024 data unchanged: both public layouts (scripts/data/isles24.py), their synthetic look-alike, the dataset
profile, and masks back on the NCCT's oblique grid."""

import glob
import json
import logging
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from helpers import raised_messages
from monai.bundle import ConfigWorkflow
from monai.inferers import SlidingWindowInferer
from scripts.data.channels import CHANNELS
from scripts.data.datalist import build_datalist, find_inputs
from scripts.data.readers import InvalidCaseError
from scripts.synthetic.isles import generate_isles24

SMALL = {"num_train": 4, "num_test": 1, "seed": 2, "in_plane": 48, "slices": 20}
TOKENS = ("_ncct.", "_space-ncct_cbf.", "_space-ncct_cbv.", "_space-ncct_mtt.", "_space-ncct_tmax.")


@pytest.fixture(scope="module", params=["isles24", "isles24_archive"])
def tree(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    generate_isles24(str(root), layout=request.param, **SMALL)
    return str(root), request.param


@pytest.fixture
def copy(tree, tmp_path):
    root, layout = tree
    shutil.copytree(root, tmp_path / "tree")
    return str(tmp_path / "tree"), layout


def test_the_generator_writes_the_public_geometry(tree):
    root, layout = tree
    mask_path, *_ = sorted(glob.glob(os.path.join(root, "**", "*lesion-msk.nii.gz"), recursive=True))
    mask = nib.load(mask_path)
    assert mask.get_data_dtype() == np.uint16 and mask.dataobj.slope == pytest.approx(1 / 65535)
    assert set(np.unique(np.asanyarray(mask.dataobj.get_unscaled()))) == {0, 65535}
    assert abs(mask.affine[1, 2]) > 0.1 and abs(mask.affine[2, 1]) > 0.01, "an oblique (tilted-gantry) affine"
    subjects = sorted(
        os.path.basename(os.path.dirname(os.path.dirname(p)))
        for p in glob.glob(os.path.join(root, "**", "*_ncct.nii.gz"), recursive=True)
    )
    prefix = "sub-strokecase" if layout == "isles24" else "sub-stroke0"
    assert len(subjects) == 5 and all(s.startswith(prefix) for s in subjects)
    assert (layout == "isles24_archive") == os.path.isdir(os.path.join(root, "train", "raw_data"))


def test_datalist_of_either_layout(tree):
    root, _ = tree
    datalist = build_datalist(root, folds=2, seed=0, check=True)
    assert datalist["name"] == "ISLES 2024 CT perfusion"
    assert len(datalist["training"]) == 4 and len(datalist["testing"]) == 1
    for item in datalist["training"] + datalist["testing"]:
        assert [t for t, p in zip(TOKENS, item["image"]) if t in os.path.basename(p)] == list(TOKENS), item
        assert item["case"].startswith("sub-") and f"/{item['case']}/" in f"/{item['image'][0]}"
    for item in datalist["training"]:
        assert item["patient"] == item["case"] and "lesion-msk" in item["label"]
    assert [i["case"] for i in find_inputs(root)] == sorted(
        i["case"] for i in datalist["training"] + datalist["testing"]
    )


def mask_of(root, subject):
    (path,) = glob.glob(os.path.join(root, "**", subject, "ses-*", "*lesion-msk.nii.gz"), recursive=True)
    return path


def test_a_mask_with_more_than_one_lesion_value_is_named(copy):
    root, _ = copy
    subject = build_datalist(root, folds=2)["training"][0]["case"]
    path = mask_of(root, subject)
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data.flat[np.flatnonzero(data)[0]] = 0.5  # values {0, 0.5, 1}
    nib.save(nib.Nifti1Image(data, img.affine), path)
    with pytest.raises(InvalidCaseError, match=f"^{subject}: label file {path} is not a binary mask"):
        build_datalist(root, folds=2, check=True)


def test_missing_maps_and_foreign_folders_say_what_was_expected(copy, tmp_path):
    root, _ = copy
    (tmax,) = glob.glob(os.path.join(root, "**", "*0002_ses-*_space-ncct_tmax.nii.gz"), recursive=True)
    os.remove(tmax)
    with pytest.raises(InvalidCaseError, match=r"sub-stroke(case)?0002: no Tmax map .*space-ncct_tmax"):
        build_datalist(root, folds=2)
    (tmp_path / "other" / "data").mkdir(parents=True)
    with pytest.raises(InvalidCaseError, match="neither an ISLES 2018 root .* nor an ISLES 2024 one"):
        build_datalist(str(tmp_path / "other"), folds=2)


def test_the_check_compares_every_map_and_the_mask_with_the_nccts_grid(copy):
    root, _ = copy
    subject = build_datalist(root, folds=2)["training"][1]["case"]
    path = mask_of(root, subject)
    img = nib.load(path)
    shifted = img.affine.copy()
    shifted[0, 3] += 2.0
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.uint8), shifted), path)
    with pytest.raises(InvalidCaseError, match=f"^{subject}: OT file {path} has an affine that differs from the CT's"):
        build_datalist(root, folds=2, check=True)


def test_a_root_that_mixes_trees_or_releases_is_refused(copy, synthetic_tree, tmp_path, caplog):
    root, layout = copy
    raw = glob.glob(os.path.join(root, "**", "raw*data"), recursive=True)[0]
    other = os.path.join(os.path.dirname(raw), "raw_data" if layout == "isles24" else "rawdata")
    shutil.copytree(raw, other)
    for read in (lambda: build_datalist(root, folds=2), lambda: find_inputs(root)):
        with pytest.raises(InvalidCaseError, match=f"^{root} holds 2 ISLES 2024 trees .*one would be left out"):
            read()
    shutil.rmtree(other)
    shutil.copytree(os.path.join(synthetic_tree, "TESTING"), os.path.join(root, "TESTING"))
    for read in (lambda: build_datalist(root, folds=2), lambda: find_inputs(root)):
        with pytest.raises(InvalidCaseError, match=f"^{root} holds both ISLES 2018 .*TESTING.* and ISLES 2024"):
            read()
    shutil.rmtree(os.path.join(root, "TESTING"))
    with caplog.at_level(logging.WARNING):
        datalist = build_datalist(root, folds=2)
    (testing,) = [item["case"] for item in datalist["testing"]]
    assert f"1 subject(s) without a lesion-msk file are testing cases, not training ones: {testing}" in caplog.text


def test_a_misnamed_mask_is_refused_not_turned_into_a_testing_case(copy):
    root, _ = copy
    subject = build_datalist(root, folds=2)["training"][0]["case"]
    path = mask_of(root, subject)
    misnamed = path.replace("lesion-msk", "lesion-mask")
    os.rename(path, misnamed)
    with pytest.raises(
        InvalidCaseError, match=f"^{subject}: no \\*lesion-msk\\* file, but {misnamed} looks like a mask"
    ):
        build_datalist(root, folds=2)
    os.remove(misnamed)  # without it the subject is a testing case, as documented
    assert subject in [item["case"] for item in build_datalist(root, folds=2)["testing"]]


TINY = {"features": [2, 4, 8, 16, 32], "spatial_size": [32, 32, 16], "num_workers": 0}


def workflow(repo_root, configs, bundle_root, **override):
    """A tiny workflow of the bundle's ``configs`` (file names, in order) in ``bundle_root``: one epoch for train.json,
    else inference."""
    kind = "train" if configs[0] == "train.json" else "infer"
    settings = {"epochs": 1, "val_interval": 1} if kind == "train" else {}
    return ConfigWorkflow(
        config_file=[os.path.join(repo_root, "configs", name) for name in configs],
        workflow_type=kind,
        meta_file=os.path.join(repo_root, "configs", "metadata.json"),
        bundle_root=str(bundle_root),
        **{**TINY, **settings, **override},
    )


# the native profile at this tree's coarse voxels (about 4.8 x 4.8 x 10 mm): 6 x 6 x 10 mm gives a grid of about
# 38 x 38 x 20 voxels, 8 windows of 32 x 32 x 16 blended with Gaussian weights
NATIVE = {"target_spacing": [6.0, 6.0, 10.0], "spatial_size": [32, 32, 16], "sliding_window_size": [32, 32, 16]}


@pytest.mark.parametrize(
    "profile, sizes",
    [("isles24.json", {}), ("isles24_native.json", NATIVE), ("isles24.json", {"brain_mask": True})],
    ids=["resize", "native", "resize_brain_mask"],
)
def test_train_one_epoch_and_segment_on_the_nccts_exact_grid(repo_root, tree, tmp_path, profile, sizes):
    """With a dataset profile (configs/isles24.json, its spatial size made tiny here; configs/isles24_native.json:
    patches at a target spacing, sliding-window validation and inference)."""
    root, _ = tree
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(build_datalist(root, folds=2, seed=0)))
    train = workflow(
        repo_root, ("train.json", profile), tmp_path, dataset_dir=root, data_list_file_path=str(datalist), **sizes
    )
    train.initialize()
    assert train.parser.get_parsed_content("ct_window") == [0, 80]
    if "target_spacing" in sizes:  # patches of the network's size, sampled around lesions and in the background
        batch = train.parser.get_parsed_content("train#dataset")[0]
        assert len(batch) == 2 and all(tuple(p["image"].shape) == (5, 32, 32, 16) for p in batch)
        # the maps in their fixed windows (tests/test_channels.py checks the values): in [0, 1], not z-scores
        assert train.parser.get_parsed_content("map_normalisation") == "window"
        validate = train.parser.get_parsed_content("validate#dataset")[0]["image"]  # unaugmented
        assert float(validate.min()) >= 0 and float(validate.max()) <= 1 and float(validate.max()) > 0.5
        assert validate.shape[1] > 32 and validate.shape[3] > 16  # more than one window
        assert isinstance(train.parser.get_parsed_content("validate#inferer"), SlidingWindowInferer)
    if sizes.get("brain_mask"):  # the CT is 0 where no perfusion map gives a value, and the box is the brain's
        image = train.parser.get_parsed_content("validate#dataset")[0]["image"]
        outside = (image[1:] == 0).all(0)
        assert outside.any() and (image[0][outside] == 0).all() and (image[0][~outside] > 0).any()
    train.run()
    infer = workflow(repo_root, ("inference.json", profile), tmp_path, dataset_dir=root, **sizes)
    infer.initialize()
    infer.run()
    for item in find_inputs(root):
        ncct = nib.load(item["image"][0])
        mask = nib.load(tmp_path / "runs" / "predictions" / "masks" / f"{item['case']}.nii.gz")
        assert mask.shape == ncct.shape and np.array_equal(mask.affine, ncct.affine), item["case"]
    assert len(CHANNELS) == 5


def test_the_cta_as_a_sixth_input(repo_root, tree, tmp_path):
    """configs/isles24_cta.json after isles24.json: the datalist lists the CTA, the network takes 6 channels, and a
    five-input datalist is refused by name."""
    root, _ = tree
    five, six = tmp_path / "five.json", tmp_path / "six.json"
    five.write_text(json.dumps(build_datalist(root, folds=2, seed=0)))
    datalist = build_datalist(root, folds=2, seed=0, channels=CHANNELS + ("CTA",))
    six.write_text(json.dumps(datalist))
    assert datalist["channels"][-1] == "CTA" and all(
        i["image"][5].endswith("_space-ncct_cta.nii.gz") for i in datalist["training"]
    )
    profiles = ("isles24.json", "isles24_cta.json")
    refused = workflow(repo_root, ("train.json", *profiles), tmp_path, dataset_dir=root, data_list_file_path=str(five))
    with pytest.raises(Exception) as excinfo:
        refused.parser.get_parsed_content("datalist")
    message = raised_messages(excinfo)
    assert f"{five} lists its images in the channel order" in message and "CTA" in message
    train = workflow(repo_root, ("train.json", *profiles), tmp_path, dataset_dir=root, data_list_file_path=str(six))
    train.initialize()
    first = next(w for w in train.parser.get_parsed_content("network_def").parameters() if w.dim() == 5)
    assert first.shape[1] == 6, "the first convolution takes 6 channels"
    assert train.parser.get_parsed_content("train#dataset")[0]["image"].shape[0] == 6
    train.run()
    infer = workflow(repo_root, ("inference.json", *profiles), tmp_path, dataset_dir=root)
    infer.initialize()
    infer.run()
    assert len(list((tmp_path / "runs" / "predictions" / "masks").glob("*.nii.gz"))) == len(find_inputs(root))

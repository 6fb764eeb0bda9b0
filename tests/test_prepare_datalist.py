"""The datalist builder and its input checks, on synthetic ISLES trees written to temp dirs."""

import csv
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_training
from helpers import raised_messages
from monai.data import load_decathlon_datalist
from scripts.data.channels import CHANNELS
from scripts.data.datalist import build_datalist, find_inputs, load_fold, load_section, refuse_empty_fold
from scripts.data.isles18 import read_case
from scripts.data.readers import InvalidCaseError, LoadCased

# The token each channel's folder carries in the synthetic tree (the real release's CT_ names).
TOKENS = {"CT": ".CT.", "CBF": ".CT_CBF.", "CBV": ".CT_CBV.", "MTT": ".CT_MTT.", "Tmax": ".CT_Tmax.", "OT": ".OT."}


@pytest.fixture
def tree(synthetic_tree, tmp_path):
    """A private copy of the session's synthetic tree that a test may break."""
    root = tmp_path / "isles"
    shutil.copytree(synthetic_tree, root)
    return str(root)


def map_file(root, case, token, section="TRAINING"):
    (path,) = glob.glob(os.path.join(root, section, case, f"*{TOKENS[token]}*", "*.nii*"))
    return path


def read_patients(root):
    with open(os.path.join(root, "patients.csv")) as f:
        return {row["case"]: row["patient"] for row in csv.DictReader(f)}


def test_datalist_content_and_channel_order(synthetic_tree):
    datalist = build_datalist(synthetic_tree, folds=3, seed=0)
    assert len(datalist["training"]) == 10 and len(datalist["testing"]) == 2
    assert [item["case"] for item in datalist["training"]] == [f"case_{i}" for i in range(1, 11)]
    for item in datalist["training"]:
        assert len(item["image"]) == 5
        for channel, path in zip(CHANNELS, item["image"]):
            assert TOKENS[channel] in os.path.basename(path), (channel, path)
            assert not os.path.isabs(path) and os.path.isfile(os.path.join(synthetic_tree, path))
        assert TOKENS["OT"] in item["label"] and os.path.isfile(os.path.join(synthetic_tree, item["label"]))
        assert item["fold"] in (0, 1, 2)
    for item in datalist["testing"]:
        assert "label" not in item and "fold" not in item and len(item["image"]) == 5
        assert item["image"][0].startswith("TESTING")


def test_written_datalist_loads_with_monai(synthetic_tree, tmp_path):
    out = tmp_path / "datalist.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.tools.prepare_datalist",
            "--data_root",
            synthetic_tree,
            "--output",
            str(out),
            "--folds",
            "5",
            "--seed",
            "0",
        ],
        cwd=os.path.dirname(os.path.dirname(__file__)),
        check=True,
        capture_output=True,
    )
    items = load_decathlon_datalist(str(out), data_list_key="training", base_dir=synthetic_tree)
    assert len(items) == 10
    assert all(os.path.isfile(p) for item in items for p in item["image"] + [item["label"]])
    testing = load_decathlon_datalist(str(out), data_list_key="testing", base_dir=synthetic_tree)
    assert len(testing) == 2 and all(os.path.isfile(p) for item in testing for p in item["image"])


def test_folds_keep_patients_together_and_are_balanced(synthetic_tree):
    patients = read_patients(synthetic_tree)
    assert len(set(patients.values())) < len(patients), "fixture should hold a patient with two slabs"
    for seed in (0, 1, 2):
        training = build_datalist(synthetic_tree, folds=3, seed=seed)["training"]
        fold_of_patient = {}
        for item in training:
            assert item["patient"] == patients[item["case"]]
            assert fold_of_patient.setdefault(item["patient"], item["fold"]) == item["fold"]
        sizes = np.bincount([item["fold"] for item in training], minlength=3)
        assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 2
    first = [i["fold"] for i in build_datalist(synthetic_tree, folds=3, seed=7)["training"]]
    assert first == [i["fold"] for i in build_datalist(synthetic_tree, folds=3, seed=7)["training"]]


def test_without_patient_csv_each_case_is_a_patient(tree, caplog):
    os.remove(os.path.join(tree, "patients.csv"))
    with caplog.at_level(logging.WARNING):
        training = build_datalist(tree, folds=5, seed=0)["training"]
    assert "each case is its own patient" in caplog.text
    assert all(item["patient"] == item["case"] for item in training)


def test_patient_csv_must_cover_every_case(tree, tmp_path):
    csv_path = tmp_path / "patients.csv"
    csv_path.write_text("case,patient\ncase_1,p1\n")
    with pytest.raises(ValueError, match="case_2"):
        build_datalist(tree, patients_csv=str(csv_path))
    with pytest.raises(ValueError, match="folds must be between 2"):
        build_datalist(tree, folds=50)


def test_real_release_naming_variants(tree):
    """Lower-case section folder, .nii.gz files, MR_MTT/MR_Tmax tokens and an ignored 4DPWI folder."""
    case_dir = os.path.join(tree, "TRAINING", "case_2")
    for token, new in ((".CT_MTT.", ".MR_MTT."), (".CT_Tmax.", ".MR_Tmax.")):
        (folder,) = glob.glob(os.path.join(case_dir, f"*{token}*"))
        new_folder = folder.replace(token, new)
        os.rename(folder, new_folder)
        (nii,) = glob.glob(os.path.join(new_folder, "*.nii"))
        img = nib.load(nii)
        nib.save(img, os.path.join(new_folder, os.path.basename(nii).replace(token, new) + ".gz"))
        os.remove(nii)
    os.makedirs(os.path.join(case_dir, "SMIR.Brain.XX.O.CT_4DPWI.999999"))
    os.rename(os.path.join(tree, "TRAINING"), os.path.join(tree, "training"))
    datalist = build_datalist(tree, folds=2, seed=0, check=True)
    item = next(i for i in datalist["training"] if i["case"] == "case_2")
    assert item["image"][0].startswith("training/")
    assert ".MR_MTT." in item["image"][3] and item["image"][3].endswith(".nii.gz")
    assert ".MR_Tmax." in item["image"][4] and item["image"][4].endswith(".nii.gz")


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("endianness", ["<", ">"])
def test_check_reads_every_nifti_gz_flavour(tree, image_class, endianness):
    """The check decompresses a .nii.gz itself (once, checking its stream): NIfTI-1 and NIfTI-2, either byte order,
    are read as nibabel reads them, good values accepted and a NaN refused."""
    path = map_file(tree, "case_4", "CBF")
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    gz = path[: -len(".nii")] + ".nii.gz" if path.endswith(".nii") else path

    def save(values):
        header = image_class.header_class(endianness=endianness)
        nib.save(image_class(values, img.affine, header=header), gz)

    save(data)
    if gz != path:
        os.remove(path)
    assert type(nib.load(gz)) is image_class and nib.load(gz).header.endianness == endianness
    build_datalist(tree, folds=3, check=True)
    data.flat[7] = np.nan
    save(data)
    with pytest.raises(InvalidCaseError, match=f"^case_4: CBF file {re.escape(gz)} has 1 values that are NaN"):
        build_datalist(tree, folds=3, check=True)


def rewrite(path, change):
    img = nib.load(path)
    data, affine = change(np.asanyarray(img.dataobj).copy(), img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)


def break_missing_map(tree):
    shutil.rmtree(os.path.dirname(map_file(tree, "case_4", "CBF")))
    return "case_4", "CBF"


def break_shape(tree):
    path = map_file(tree, "case_4", "CBV")
    rewrite(path, lambda d, a: (d[:-1], a))
    return "case_4", os.path.basename(path)


def break_affine(tree):
    path = map_file(tree, "case_4", "MTT")

    def shift(data, affine):
        affine[0, 3] += 5.0
        return data, affine

    rewrite(path, shift)
    return "case_4", os.path.basename(path)


def break_truncated(tree):
    path = map_file(tree, "case_4", "Tmax")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return "case_4", os.path.basename(path)


def break_not_nifti(tree):
    path = map_file(tree, "case_4", "CT")
    with open(path, "w") as f:
        f.write("this is not a NIfTI file\n")
    return "case_4", os.path.basename(path)


def break_nan(tree):
    path = map_file(tree, "case_4", "MTT")

    def add_nan(data, affine):
        data.flat[0] = np.nan
        return data, affine

    rewrite(path, add_nan)
    return "case_4", os.path.basename(path)


def break_flt_max_marker(tree):
    """float32 Tmax with FLT_MAX, a common 'no value' marker, in 20 voxels: finite, but not a value."""
    path = map_file(tree, "case_4", "Tmax")

    def mark(data, affine):
        data = data.astype(np.float32)
        data.flat[:20] = np.finfo(np.float32).max
        return data, affine

    rewrite(path, mark)
    return "case_4", os.path.basename(path)


def break_float64_overflow(tree):
    """float64 MTT with 1e300: finite in the file, Inf as the float32 the pipeline reads."""
    path = map_file(tree, "case_4", "MTT")

    def huge(data, affine):
        data.flat[5] = 1e300
        return data, affine

    rewrite(path, huge)
    return "case_4", os.path.basename(path)


def break_scaled_overflow(tree):
    """int16 CBF whose header scl_slope is 1e37: every non-zero value overflows float32 after scaling."""
    path = map_file(tree, "case_4", "CBF")
    rewrite(path, lambda d, a: (d.astype(np.int16), a))
    with open(path, "r+b") as f:  # NIfTI-1: scl_slope and scl_inter are float32 at bytes 112 and 116
        f.seek(112)
        f.write(np.array([1e37, 0.0], dtype="<f4").tobytes())
    assert nib.load(path).dataobj.slope == pytest.approx(1e37)  # the image moves the scaling to its proxy
    return "case_4", os.path.basename(path)


def break_affine_rounding(tree):
    """A rotation entry 2e-4 off the CT's: too much for MONAI's np.allclose when it stacks the maps."""
    path = map_file(tree, "case_4", "CBV")

    def nudge(data, affine):
        affine[0, 1] += 2e-4
        return data, affine

    rewrite(path, nudge)
    return "case_4", os.path.basename(path)


def break_dangling_case_link(tree):
    case_dir = os.path.join(tree, "TRAINING", "case_4")
    shutil.rmtree(case_dir)
    os.symlink(os.path.join(tree, "elsewhere", "case_4"), case_dir)
    return "case_4", "symbolic link"


def break_label(tree):
    path = map_file(tree, "case_4", "OT")

    def relabel(data, affine):  # two lesion values: not a mask (0 and one positive value would be binarised)
        data.flat[np.flatnonzero(data == 1)[0]] = 2
        return data, affine

    rewrite(path, relabel)
    return "case_4", os.path.basename(path)


def break_empty_case(tree):
    case_dir = os.path.join(tree, "TRAINING", "case_4")
    shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    return "case_4", "case_4"


def break_gzip_checksum(tree):
    """A .nii.gz whose stream fails its CRC: nibabel reads the values the header asks for and never notices."""
    path = map_file(tree, "case_4", "CBV")
    gz = path + ".gz" if path.endswith(".nii") else path
    nib.save(nib.load(path), gz)
    if gz != path:
        os.remove(path)
    with open(gz, "r+b") as f:  # the last 8 bytes are the CRC-32 and the length
        f.seek(-6, os.SEEK_END)
        byte = f.read(1)
        f.seek(-6, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    np.asanyarray(nib.load(gz).dataobj)  # no error from nibabel
    return "case_4", os.path.basename(gz)


def break_blank_cbf(tree):
    """The perfusion software produced no CBF map: every voxel 0."""
    path = map_file(tree, "case_4", "CBF")
    rewrite(path, lambda d, a: (np.zeros_like(d), a))
    return "case_4", os.path.basename(path)


BREAKERS = [
    break_gzip_checksum,
    break_blank_cbf,
    break_missing_map,
    break_shape,
    break_affine,
    break_truncated,
    break_not_nifti,
    break_nan,
    break_label,
    break_empty_case,
    break_flt_max_marker,
    break_float64_overflow,
    break_scaled_overflow,
    break_affine_rounding,
    break_dangling_case_link,
]


@pytest.mark.parametrize("breaker", BREAKERS, ids=[b.__name__[6:] for b in BREAKERS])
def test_broken_input_is_named(tree, breaker, tmp_path, caplog):
    case, file_hint = breaker(tree)
    with pytest.raises(InvalidCaseError) as err:
        build_datalist(tree, folds=3, check=True)
    assert str(err.value).startswith(f"{case}:") and file_hint in str(err.value), str(err.value)

    with caplog.at_level(logging.WARNING):
        datalist = build_datalist(tree, folds=3, check=True, skip_invalid=True)
    assert case not in [item["case"] for item in datalist["training"]]
    assert len(datalist["training"]) == 9
    assert len(datalist["skipped"]) == 1 and case in datalist["skipped"][0] and case in caplog.text

    out = tmp_path / "datalist.json"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.tools.prepare_datalist", "--data_root", tree, "--output", str(out), "--check"],
        cwd=os.path.dirname(os.path.dirname(__file__)),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and f"error: {case}:" in result.stderr, result.stderr
    assert not out.exists(), "nothing is written for broken input"


def test_never_overwrites_a_datalist(synthetic_tree, tmp_path):
    out = tmp_path / "datalist.json"
    out.write_text("{}")
    cmd = [sys.executable, "-m", "scripts.tools.prepare_datalist", "--data_root", synthetic_tree, "--output", str(out)]
    cwd = os.path.dirname(os.path.dirname(__file__))
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert result.returncode != 0 and "--overwrite" in result.stderr
    assert out.read_text() == "{}"
    subprocess.run(cmd + ["--overwrite"], cwd=cwd, check=True, capture_output=True)
    assert len(json.loads(out.read_text())["training"]) == 10


def test_load_fold_splits_and_reports_bad_values(synthetic_tree, tmp_path):
    out = tmp_path / "datalist.json"
    with open(out, "w") as f:
        json.dump(build_datalist(synthetic_tree, folds=3, seed=0), f)
    split = load_fold(str(out), synthetic_tree, fold=1)
    assert split["validation"] and split["train"]
    assert {i["fold"] for i in split["validation"]} == {1} and 1 not in {i["fold"] for i in split["train"]}
    assert len(split["train"]) + len(split["validation"]) == 10
    assert os.path.isabs(split["train"][0]["image"][0])
    with pytest.raises(ValueError, match="fold 7 is not in"):
        load_fold(str(out), synthetic_tree, fold=7)
    with pytest.raises(FileNotFoundError, match="prepare_datalist"):
        load_fold(str(tmp_path / "missing.json"), synthetic_tree, fold=0)


@pytest.mark.parametrize("offset", [1e-9, 2e-4], ids=["rounding", "off_grid"])
def test_check_refuses_exactly_the_affines_monai_cannot_stack(tree, offset):
    """One rule for check and pipeline: a map is accepted by the check if and only if MONAI's NIfTI reader stacks it
    (``NibabelReader``, which ``LoadImage`` picks for these files)."""
    from monai.data import NibabelReader

    path = map_file(tree, "case_4", "CBV")

    def nudge(data, affine):
        affine[0, 1] += offset
        return data, affine

    rewrite(path, nudge)
    item = next(i for i in build_datalist(tree, folds=2)["training"] if i["case"] == "case_4")
    item = dict(item, image=[os.path.join(tree, p) for p in item["image"]], label=os.path.join(tree, item["label"]))
    try:
        reader = NibabelReader()
        reader.get_data(reader.read(item["image"]))
        loads = True
    except RuntimeError as err:
        assert "affine matrix of all images should be the same" in str(err)
        loads = False
    try:
        LoadCased(("image", "label"))(item)
        checked = True
    except InvalidCaseError as err:
        assert str(err).startswith("case_4:") and os.path.basename(path) in str(err)
        checked = False
    assert checked == loads == (offset < 1e-6)


def test_patients_csv_with_conflicting_rows_is_refused(tree, tmp_path):
    rows = "case,patient\n" + "".join(f"case_{i},p{i}\n" for i in range(1, 11))
    same = tmp_path / "same.csv"
    same.write_text(rows + "case_3,p3\n")  # a repeated identical row is harmless
    assert {i["patient"] for i in build_datalist(tree, patients_csv=str(same))["training"]} >= {"p3"}
    conflict = tmp_path / "conflict.csv"
    conflict.write_text(rows + "case_3,p7\n")
    with pytest.raises(ValueError, match=r"line 12: case case_3 is given to patient p7, an earlier line gave it to p"):
        build_datalist(tree, patients_csv=str(conflict))


def write_datalist(path, tree, change):
    datalist = build_datalist(tree, folds=3, seed=0)
    change(datalist["training"][1])
    with open(path, "w") as f:
        json.dump(datalist, f)
    return datalist["training"][1]["case"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda item: item.pop("label"), "no 'label' file"),
        (lambda item: item.pop("fold"), "'fold' in .* must be an integer, got None"),
        (lambda item: item.update(fold="0"), "'fold' in .* must be an integer, got '0'"),
        (lambda item: item["image"].pop(), "lists 4 files, expected one 4D file or the 5 inputs"),
        (lambda item: item["image"].append(item["image"][0]), "lists 6 files"),
        (lambda item: item["image"].insert(1, item["image"].pop(2)), "gives .*CBV.*, a CBV map, as channel 2"),
    ],
    ids=["no_label", "no_fold", "string_fold", "four_images", "six_images", "channels_swapped"],
)
def test_malformed_datalist_entries_are_named_before_training(tree, tmp_path, change, message):
    path = tmp_path / "datalist.json"
    case = write_datalist(path, tree, change)
    with pytest.raises(InvalidCaseError, match=f"^{case}: .*{message}"):
        load_fold(str(path), tree, fold=0)


def test_a_fold_whose_training_labels_are_all_empty_is_refused(tree, tmp_path):
    """As training starts: the labels counted as CacheDataset loaded them (each file read once), before any epoch."""
    for label in glob.glob(os.path.join(tree, "TRAINING", "*", "*.OT.*", "*.nii*")):
        rewrite(label, lambda d, a: (np.zeros_like(d), a))
    workflow = tiny_training(tmp_path, tree)
    workflow.initialize()
    refuse_empty_fold(workflow.parser.get_parsed_content("train#dataset"), 0, check=False)  # without the check
    with pytest.raises(Exception) as excinfo:
        workflow.run()
    assert re.search(
        "InvalidCaseError: the labels of all [0-9]+ training cases of fold 0 are empty", raised_messages(excinfo)
    )
    assert not glob.glob(str(tmp_path / "models" / "*.pt")), "no epoch ran"


@pytest.mark.parametrize("content", ["", "{bad", "training: []\n"], ids=["empty", "truncated", "yaml"])
def test_a_datalist_that_is_no_json_is_named(synthetic_tree, tmp_path, content):
    path = tmp_path / "datalist.json"
    path.write_text(content)
    for read in (lambda: load_fold(str(path), synthetic_tree, 0), lambda: load_section(str(path), synthetic_tree)):
        with pytest.raises(InvalidCaseError, match=f"{path} is not a datalist: it is not valid JSON"):
            read()
    with pytest.raises(InvalidCaseError, match=f"{path} is not a datalist"):
        find_inputs(str(path))


def test_a_datalist_that_contradicts_itself_is_refused(tree, tmp_path):
    datalist = build_datalist(tree, folds=3, seed=0)
    twice = dict(datalist["training"][0], fold=(datalist["training"][0]["fold"] + 1) % 3)
    path = tmp_path / "twice.json"
    path.write_text(json.dumps(dict(datalist, training=datalist["training"] + [twice])))
    with pytest.raises(InvalidCaseError, match=f"^{twice['case']}: listed twice .* a case in two folds is trained on"):
        load_fold(str(path), tree, fold=0)
    path = tmp_path / "order.json"
    path.write_text(json.dumps(dict(datalist, channels=["CT", "CBV", "CBF", "MTT", "Tmax"])))
    for read in (lambda: load_fold(str(path), tree, 0), lambda: load_section(str(path), tree, "training")):
        with pytest.raises(InvalidCaseError, match=f"^{path} lists its images in the channel order"):
            read()


def test_inference_takes_one_case_folder_and_names_a_datalist_away_from_its_files(tree, tmp_path):
    (item,) = find_inputs(os.path.join(tree, "TRAINING", "case_4"))
    assert (
        item["case"] == "case_4"
        and item["image"] == read_case("case_4", os.path.join(tree, "TRAINING", "case_4"), False)["image"]
    )
    away = tmp_path / "elsewhere" / "datalist.json"
    away.parent.mkdir()
    away.write_text(json.dumps(build_datalist(tree, folds=3, seed=0)))
    with pytest.raises(
        InvalidCaseError, match=r"^case_1: .* listed in .*datalist.json, does not exist; the relative paths"
    ):
        find_inputs(str(away))
    inside = os.path.join(tree, "datalist.json")
    shutil.copy(away, inside)
    assert [i["case"] for i in find_inputs(inside)] == ["case_1", "case_2"]

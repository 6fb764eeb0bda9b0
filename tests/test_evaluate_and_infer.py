"""End to end on synthetic ISLES data: train a tiny model, `run evaluating` (configs/evaluate.json), then inference
(configs/inference.json) on new scans; the written masks and CSVs are checked against the source files."""

import csv
import glob
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import TINY_NETWORK, challenge_scoring, initialize_and_run, raised_messages
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor
from monai.transforms import Invertd
from PIL import Image
from scipy import ndimage
from scripts.data.channels import CHANNELS
from scripts.data.datalist import build_datalist, find_inputs, load_section
from scripts.data.isles18 import read_case
from scripts.data.readers import InvalidCaseError
from scripts.engine.inferers import FlipInferer
from scripts.report.cases import PER_CASE, SUMMARY, THRESHOLD_CORE, prepare_outputs, table_columns
from scripts.report.metrics import METRIC_NAMES
from scripts.report.overlay import overlay_image
from scripts.report.perfusion import perfusion_regions
from scripts.safe_files import hold_folder, release_folder
from scripts.synthetic.isles import generate

TINY = TINY_NETWORK
COLUMNS = list(METRIC_NAMES)  # the metrics evaluation scores, in their order
MAPS = ("CBF", "Tmax")  # the maps of the threshold core
EVALUATE = ("inference.json", "evaluate.json")


def workflow(repo_root, configs, workflow_type, **override):
    return ConfigWorkflow(
        config_file=[os.path.join(repo_root, "configs", name) for name in configs],
        meta_file=os.path.join(repo_root, "configs", "metadata.json"),
        workflow_type=workflow_type,
        **override,
    )


def run_all(wf):
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def bundle_run(repo_root, *args):
    """`python -m monai.bundle run ARGS` in the repo root, as a user types it; its stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=repo_root,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def cli(**override):
    return [x for key, value in override.items() for x in (f"--{key}", str(value))]


def raises_file_exists(wf, path):
    """initialize() stops with a FileExistsError naming a file under ``path`` (config expressions wrap errors)."""
    with pytest.raises(Exception) as excinfo:
        wf.initialize()
    err = excinfo.value
    while err is not None and not isinstance(err, FileExistsError):
        err = err.__cause__ or err.__context__
    assert err is not None and str(path) in str(err) and "--overwrite" in str(err), excinfo.value


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(path):
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.affine


@pytest.fixture(scope="module")
def trained(tiny_model, synthetic_tree):
    """The session's tiny bundle root (conftest ``tiny_model``: one epoch on the synthetic tree, fold 0 held out) and
    the settings that go with it."""
    assert (tiny_model / "models" / "checkpoint_epoch=1.pt").is_file()
    return tiny_model, {**TINY, "dataset_dir": synthetic_tree, "data_list_file_path": str(tiny_model / "datalist.json")}


def reference_metrics(pred, label, spacing):
    """The metrics of docs/evaluation.md recomputed with numpy and scipy from the written mask and the label file."""
    tp, fp, fn = (pred & label).sum(), (pred & ~label).sum(), (~pred & label).sum()
    voxel_ml = float(np.prod(spacing)) / 1000
    both_empty = not pred.any() and not label.any()
    values = {
        "dice": 1.0 if both_empty else 2 * tp / (2 * tp + fp + fn),
        "jaccard": 1.0 if both_empty else tp / (tp + fp + fn),
        "precision": tp / (tp + fp) if pred.any() else math.nan,
        "recall": tp / (tp + fn) if label.any() else math.nan,
        "hd95_mm": 0.0 if both_empty else math.nan,
        "assd_mm": 0.0 if both_empty else math.nan,
        "volume_true_ml": label.sum() * voxel_ml,
        "volume_pred_ml": pred.sum() * voxel_ml,
        "volume_abs_diff_ml": abs(int(pred.sum()) - int(label.sum())) * voxel_ml,
    }
    values["lesion_f1"], values["lesion_count_diff"] = challenge_scoring(pred, label, voxel_ml)[:2]
    if pred.any() and label.any():
        edge_pred, edge_label = (m & ~ndimage.binary_erosion(m) for m in (pred, label))
        to_label = ndimage.distance_transform_edt(~edge_label, sampling=spacing)[edge_pred]
        to_pred = ndimage.distance_transform_edt(~edge_pred, sampling=spacing)[edge_label]
        values["hd95_mm"] = max(np.percentile(to_label, 95), np.percentile(to_pred, 95))
        values["assd_mm"] = np.concatenate([to_label, to_pred]).mean()
    return values


def close(written, expected):
    value = float(written)
    return math.isnan(expected) and math.isnan(value) or math.isclose(value, expected, rel_tol=1e-4, abs_tol=1e-5)


@pytest.fixture(scope="module")
def evaluated(repo_root, trained):
    """`run evaluating` through the command line, exactly as the README gives it."""
    root, settings = trained
    stdout = bundle_run(
        repo_root,
        "evaluating",
        "--config_file",
        "['configs/inference.json','configs/evaluate.json']",
        "--bundle_root",
        str(root),
        *cli(**settings),
    )
    return root / "runs" / "eval", stdout


def test_evaluation_csv_matches_metrics_recomputed_from_the_written_masks(trained, evaluated):
    """Each case's row: the metrics of its written mask and of the threshold core (recomputed here from the map
    files), against the label file, by numpy and scipy; the summary's statistics from those rows."""
    (_, settings), (eval_dir, stdout) = trained, evaluated
    with open(settings["data_list_file_path"]) as f:
        datalist = json.load(f)
    validation = {item["case"]: item for item in datalist["training"] if item["fold"] == 0}
    rows = read_csv(eval_dir / PER_CASE)
    assert list(rows[0]) == table_columns(scored=True, baselines=[THRESHOLD_CORE])
    assert sorted(row["case"] for row in rows) == sorted(validation)
    for row in rows:
        item = validation[row["case"]]
        label, label_affine = load(os.path.join(settings["dataset_dir"], item["label"]))
        mask_img = nib.load(eval_dir / "masks" / f"{row['case']}.nii.gz")
        mask = np.asanyarray(mask_img.dataobj)
        assert mask.shape == label.shape and np.array_equal(mask_img.affine, label_affine), row["case"]
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        spacing = mask_img.header.get_zooms()[:3]
        expected = reference_metrics(mask > 0, label > 0, spacing)
        cbf, tmax = (load(os.path.join(settings["dataset_dir"], item["image"][CHANNELS.index(c)]))[0] for c in MAPS)
        regions, _ = perfusion_regions(cbf, tmax)
        core = regions["core"] if regions is not None else np.zeros(label.shape, bool)
        expected_core = reference_metrics(core, label > 0, spacing)
        for name in COLUMNS:
            assert close(row[name], expected[name]), (row["case"], name, row[name], expected[name])
            baseline = row[f"{THRESHOLD_CORE}_{name}"]
            assert close(baseline, expected_core[name]), (row["case"], name, baseline, expected_core[name])
    summary = read_csv(eval_dir / SUMMARY)
    assert [(r["mask"], r["metric"]) for r in summary] == [
        (m, n) for m in ("ModifiedUNet", THRESHOLD_CORE) for n in COLUMNS
    ]
    for entry in summary:
        prefix = "" if entry["mask"] == "ModifiedUNet" else f"{THRESHOLD_CORE}_"
        values = [float(row[prefix + entry["metric"]]) for row in rows]
        defined = [v for v in values if not math.isnan(v)]
        assert int(entry["notnans"]) == len(defined) and close(entry["mean"], np.mean(defined) if defined else math.nan)
        assert close(entry["median"], np.median(defined) if defined else math.nan), entry
    assert f"{eval_dir / SUMMARY}: {len(rows)} cases" in stdout and "median" in stdout


def test_evaluation_refuses_to_overwrite_and_scores_tta_and_ensembles(repo_root, trained, evaluated, tmp_path):
    (root, settings), (eval_dir, _) = trained, evaluated
    raises_file_exists(workflow(repo_root, EVALUATE, "infer", bundle_root=str(root), **settings), eval_dir)

    model, latest = str(root / "models" / "model.pt"), str(root / "models" / "checkpoint_epoch=1.pt")
    # an ensemble of one model with itself is that model: the same masks
    twice = run_all(
        workflow(
            repo_root,
            EVALUATE,
            "infer",
            bundle_root=str(root),
            output_dir=str(tmp_path),
            ensemble_checkpoints=[model, model],
            **settings,
        )
    )
    assert twice.parser.get_parsed_content("pred_keys") == ["pred_0", "pred_1"]
    for row in read_csv(eval_dir / PER_CASE):
        name = f"{row['case']}.nii.gz"
        assert np.array_equal(load(tmp_path / "eval" / "masks" / name)[0], load(eval_dir / "masks" / name)[0])

    before = os.path.getmtime(eval_dir / PER_CASE)
    tta = run_all(
        workflow(
            repo_root,
            EVALUATE,
            "infer",
            bundle_root=str(root),
            overwrite=True,
            tta_flips=True,
            ensemble_checkpoints=[model, latest],
            **settings,
        )
    )
    # the suite runs as on a CPU without native bfloat16 (tests/conftest.py): float32, no autocast wrapper
    assert isinstance(tta.parser.get_parsed_content("evaluator").inferer, FlipInferer)
    rows = read_csv(eval_dir / PER_CASE)
    assert (
        os.path.getmtime(eval_dir / PER_CASE) > before
        and len(rows) == len(os.listdir(eval_dir / "masks"))
        and all(row[name] != "" for row in rows for name in COLUMNS)
    )


@pytest.fixture(scope="module")
def new_scans(tmp_path_factory):
    """Unlabelled scans the model never saw, as a datalist .json: ISLES 5-map cases of 256 x 256 x {2, 7, 22} (an
    ISLES root's TESTING cases case_2, case_7, case_22), the same grids at 512 in-plane as 4D (x, y, z, 5) files, and
    the 2-slice case again as a 4D file, plain and with its x axis stored reversed (an LPS-like affine)."""
    folder = tmp_path_factory.mktemp("new_scans")
    testing = folder / "isles" / "TESTING"
    testing.mkdir(parents=True)
    items = []
    for depth in (2, 7, 22):
        generated = folder / f"generated_{depth}"
        generate(str(generated), num_train=0, num_test=1, seed=depth, in_plane=256, slices=depth)
        shutil.move(generated / "TESTING" / "case_1", testing / f"case_{depth}")
        item = read_case(f"case_{depth}", str(testing / f"case_{depth}"), with_label=False)
        items.append(item)
        maps = [nib.load(path) for path in item["image"]]
        stack = np.stack([np.asanyarray(m.dataobj).astype(np.float32) for m in maps], axis=-1)
        affine = maps[0].affine
        big = stack.repeat(2, axis=0).repeat(2, axis=1)
        nib.save(nib.Nifti1Image(big, affine @ np.diag([0.5, 0.5, 1.0, 1.0])), folder / f"ctp_512x{depth}.nii")
        items.append({"image": str(folder / f"ctp_512x{depth}.nii"), "case": f"ctp_512x{depth}"})
        if depth == 2:
            nib.save(nib.Nifti1Image(stack, affine), folder / "ctp_256x2.nii.gz")
            flipped = affine @ np.array([[-1, 0, 0, stack.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
            nib.save(nib.Nifti1Image(stack[::-1].copy(), flipped), folder / "ctp_256x2_lps.nii.gz")
            items += [{"image": str(folder / f"ctp_256x2{s}.nii.gz"), "case": f"ctp_256x2{s}"} for s in ("", "_lps")]
    datalist = folder / "new_scans.json"
    datalist.write_text(json.dumps({"testing": [{"image": item["image"]} for item in items]}))
    return datalist, items


def source_grid(image):
    img = nib.load(image if isinstance(image, str) else image[0])
    return img.shape[:3], img.affine


def test_inference_masks_lie_exactly_on_the_source_scans(repo_root, trained, new_scans, tmp_path):
    (root, settings), (datalist, items) = trained, new_scans
    wf = workflow(  # in float32: the masks are compared with a float32 forward below
        repo_root,
        ("inference.json",),
        "infer",
        bundle_root=str(root),
        dataset_dir=str(datalist),
        output_dir=str(tmp_path),
        amp=False,
        **{k: settings[k] for k in TINY},
    )
    wf.initialize()
    assert wf.check_properties() == [], "inference.json must define every property of MONAI's inference workflow"
    wf.run()
    wf.finalize()
    out = tmp_path / "predictions"
    volumes = {row["case"]: float(row["volume_pred_ml"]) for row in read_csv(out / PER_CASE)}
    assert sorted(volumes) == sorted(item["case"] for item in items)
    masks = {}
    for item in items:
        case = item["case"]
        shape, affine = source_grid(item["image"])
        img = nib.load(out / "masks" / f"{case}.nii.gz")
        masks[case] = np.asanyarray(img.dataobj)
        assert masks[case].shape == shape and np.array_equal(img.affine, affine), case
        assert masks[case].dtype == np.uint8 and set(np.unique(masks[case])) <= {0, 1}
        assert math.isclose(
            volumes[case], masks[case].sum() * np.prod(img.header.get_zooms()[:3]) / 1000, rel_tol=1e-5, abs_tol=1e-6
        )
        with Image.open(out / "overlays" / f"{case}.png") as png:
            assert png.size[0] > 256 and png.size[1] > 2 * 128
    assert {m.shape for m in masks.values()} >= {
        (256, 256, 2),
        (256, 256, 7),
        (256, 256, 22),
        (512, 512, 2),
        (512, 512, 7),
        (512, 512, 22),
    }
    # the 5 maps and the same maps in one 4D file give the same mask; so does the file stored mirrored along x
    assert np.array_equal(masks["ctp_256x2"], masks["case_2"])
    assert np.array_equal(masks["ctp_256x2_lps"], masks["ctp_256x2"][::-1])
    # the mask is the argmax of both softmax channels mapped back to the scan: the configs map back only the lesion
    # channel and threshold it at 0.5 (the same for two classes, and torch.argmax over channels is slow on a CPU)
    preprocessing = wf.parser.get_parsed_content("preprocessing")
    data = preprocessing({"image": next(item["image"] for item in items if item["case"] == "case_7")})
    with torch.no_grad():
        logits = wf.parser.get_parsed_content("network").eval()(data["image"][None].as_tensor())
    data["pred"] = MetaTensor(torch.softmax(logits, dim=1)[0])
    inverted = Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(data)["pred"]
    assert inverted.shape == (2, 256, 256, 7)
    assert 0 < masks["case_7"].sum() < masks["case_7"].size, "a mask with both classes"
    assert np.array_equal(torch.argmax(inverted, dim=0).numpy(), masks["case_7"])


def test_inference_command_on_an_isles_root(repo_root, trained, synthetic_tree):
    root, settings = trained
    stdout = bundle_run(
        repo_root,
        "--config_file",
        "configs/inference.json",
        "--dataset_dir",
        synthetic_tree,
        "--bundle_root",
        str(root),
        *cli(**{k: settings[k] for k in TINY}),
    )
    out = root / "runs" / "predictions"
    testing = find_inputs(synthetic_tree)
    assert [row["case"] for row in read_csv(out / PER_CASE)] == [item["case"] for item in testing]
    for item in testing:
        shape, affine = source_grid(item["image"])
        img = nib.load(out / "masks" / f"{item['case']}.nii.gz")
        assert img.shape == shape and np.array_equal(img.affine, affine)
        assert (out / "overlays" / f"{item['case']}.png").is_file()
    assert PER_CASE in stdout
    raises_file_exists(
        workflow(
            repo_root,
            ("inference.json",),
            "infer",
            bundle_root=str(root),
            dataset_dir=synthetic_tree,
            **{k: settings[k] for k in TINY},
        ),
        out,
    )


def test_find_inputs_accepts_the_documented_layouts(synthetic_tree, new_scans):
    datalist, items = new_scans
    root_cases = find_inputs(synthetic_tree)
    assert [item["case"] for item in root_cases] == ["case_1", "case_2"]
    assert all(len(item["image"]) == len(CHANNELS) for item in root_cases)
    assert find_inputs(os.path.join(synthetic_tree, "TESTING")) == root_cases
    files = find_inputs(os.path.dirname(datalist), check=True)
    assert [item["case"] for item in files] == ["ctp_256x2", "ctp_256x2_lps", "ctp_512x2", "ctp_512x22", "ctp_512x7"]
    assert find_inputs(str(datalist)) == items
    assert [item["case"] for item in find_inputs(str(datalist.parent / "isles"))] == ["case_2", "case_7", "case_22"]


@pytest.mark.parametrize(
    "broken, message",
    [
        ("shape", "must be (x, y, z, 5)"),
        ("names", "two cases are named scan"),
        ("maps", "lists 3 files"),
        ("training_only", "no TESTING folder"),
    ],
)
def test_find_inputs_names_the_problem(tmp_path, broken, message):
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2, 5 if broken != "shape" else 3), np.float32), np.eye(4)), scan)
    source = tmp_path
    if broken in ("names", "maps"):
        items = [{"image": str(scan)}, {"image": str(scan)}] if broken == "names" else [{"image": [str(scan)] * 3}]
        source = tmp_path / "list.json"
        source.write_text(json.dumps({"testing": items}))
    elif broken == "training_only":
        scan.unlink()
        (tmp_path / "TRAINING" / "case_1").mkdir(parents=True)
    with pytest.raises(InvalidCaseError, match=re.escape(message)) as excinfo:
        find_inputs(str(source), check=True)
    assert broken in ("names", "maps", "training_only") or str(scan) in str(excinfo.value)


def test_evaluation_sections(synthetic_tree, tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(build_datalist(synthetic_tree, folds=3, seed=0)))
    validation = load_section(str(path), synthetic_tree, "validation", fold=1, check=True)
    assert validation and {item["fold"] for item in validation} == {1}
    assert len(load_section(str(path), synthetic_tree, "training")) == 10
    with pytest.raises(InvalidCaseError, match="section 'testing' has no label for case_1, case_2"):
        load_section(str(path), synthetic_tree, "testing")


def test_overlay_outlines_the_mask_and_refuses_arrays_off_one_grid():
    rng = np.random.default_rng(0)
    ct, cbf = rng.random((16, 16, 3)) * 100, rng.random((16, 16, 3)) * 50
    mask = np.zeros((16, 16, 3), bool)
    mask[4:9, 5:10, 1] = True
    affine = np.diag([0.9, 0.9, 5.0, 1.0])
    image = overlay_image("scan", ct, cbf, mask, affine, report="predicted 1.0 mL")
    assert (np.asarray(image.convert("RGB")) == (255, 0, 0)).all(-1).any(), "the lesion outline is drawn in red"
    with pytest.raises(ValueError, match="scan: CT .* are not on one grid"):
        overlay_image("scan", ct, cbf, mask[:, :, :2], affine)


def infer_expecting_error(repo_root, root, settings, dataset_dir, out, **override):
    wf = workflow(
        repo_root,
        ("inference.json",),
        "infer",
        bundle_root=str(root),
        dataset_dir=str(dataset_dir),
        output_dir=str(out),
        **{k: settings[k] for k in TINY},
        **override,
    )
    with pytest.raises(Exception) as excinfo:
        initialize_and_run(wf)
    assert not glob.glob(str(out / "predictions" / "masks" / "*")), "no mask is written"
    assert not (out / "predictions" / PER_CASE).exists(), "no volume is reported"
    return raised_messages(excinfo)


@pytest.mark.parametrize("check_inputs", [True, False])
def test_inference_refuses_an_input_that_is_not_finite_as_float32(
    repo_root, trained, synthetic_tree, tmp_path, check_inputs
):
    """A float64 Tmax with 1e300 is Inf as the float32 the network reads: no mask, no 0.0 mL, the case named."""
    root, settings = trained
    case_dir = tmp_path / "cases" / "case_9"
    shutil.copytree(os.path.join(synthetic_tree, "TESTING", "case_1"), case_dir)
    (tmax,) = glob.glob(str(case_dir / "*.CT_Tmax.*" / "*.nii"))
    img = nib.load(tmax)
    data = np.asanyarray(img.dataobj).astype(np.float64)
    data.flat[100] = 1e300
    nib.save(nib.Nifti1Image(data, img.affine), tmax)
    message = infer_expecting_error(
        repo_root, root, settings, tmp_path / "cases", tmp_path / "out", check_inputs=check_inputs
    )
    expected = (
        f"case_9: Tmax file {tmax} has 1 values that are NaN/Inf as float32"
        if check_inputs
        else "case_9: the input 'image' holds NaN or Inf in channel(s) Tmax"
    )
    assert expected in message, message


def test_inference_refuses_a_prediction_that_is_not_finite(repo_root, trained, synthetic_tree, tmp_path):
    root, settings = trained
    model = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    broken = tmp_path / "nan_model.pt"
    torch.save({k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in model.items()}, broken)
    message = infer_expecting_error(
        repo_root, root, settings, synthetic_tree, tmp_path / "out", ensemble_checkpoints=[str(broken)]
    )
    assert "case_1: the prediction 'pred' holds NaN or Inf" in message, message


@pytest.mark.parametrize("damage", ["truncated", "other_network"])
def test_inference_names_a_checkpoint_it_cannot_load(repo_root, trained, synthetic_tree, tmp_path, damage):
    root, settings = trained
    broken = tmp_path / "model.pt"
    if damage == "truncated":
        data = (root / "models" / "model.pt").read_bytes()
        broken.write_bytes(data[: len(data) // 2])
    else:
        torch.save(
            workflow(repo_root, ("inference.json",), "infer", features=[4, 8, 16, 32, 64])
            .parser.get_parsed_content("network_def")
            .state_dict(),
            broken,
        )
    message = infer_expecting_error(
        repo_root, root, settings, synthetic_tree, tmp_path / "out", ensemble_checkpoints=[str(broken)]
    )
    expected = "not a loadable PyTorch checkpoint" if damage == "truncated" else "does not fit the network"
    assert f"ValueError: {broken}: {expected}" in message, message


@pytest.fixture(scope="module")
def six_scans(tmp_path_factory):
    """An ISLES root with 6 small TESTING cases, for runs that stop part-way."""
    root = tmp_path_factory.mktemp("six_scans")
    generate(str(root), num_train=0, num_test=6, seed=11, in_plane=32, slices=(2, 4))
    return root


def case_outputs(out):
    """Per case in ``out``: (mask bytes, overlay bytes, row), for the cases with a row in per_case.csv; and the cases
    with a mask or overlay but no row."""
    rows = {row["case"]: row for row in read_csv(out / PER_CASE)} if (out / PER_CASE).exists() else {}
    files = {
        p.name.split(".")[0]
        for folder in ("masks", "overlays")
        if (out / folder).exists()
        for p in (out / folder).iterdir()
    }
    whole = {
        case: ((out / "masks" / f"{case}.nii.gz").read_bytes(), (out / "overlays" / f"{case}.png").read_bytes(), row)
        for case, row in rows.items()
    }
    return whole, files - set(rows)


def test_a_run_stopped_by_a_bad_case_is_finished_by_the_same_command(repo_root, trained, six_scans, tmp_path):
    """A case that fails part-way (a NaN map, not checked up front) stops inference: the cases before it are whole
    (mask, overlay, row), it has nothing. Once the file is mended, the same command finishes the others and keeps
    the finished ones; then the finished run is refused, and so is an unfinished one with other settings."""
    root, settings = trained
    data = tmp_path / "isles"
    shutil.copytree(six_scans, data)
    (tmax,) = glob.glob(str(data / "TESTING" / "case_4" / "*.CT_Tmax.*" / "*.nii"))
    intact = nib.load(tmax)
    intact_data = np.asarray(intact.dataobj).copy()  # a copy: the file is memory-mapped and is about to be replaced
    broken = intact_data.astype(np.float32)
    broken.flat[7] = np.nan
    nib.save(nib.Nifti1Image(broken, intact.affine), tmax)
    common = dict(bundle_root=str(root), dataset_dir=str(data), output_dir=str(tmp_path / "runs"), check_inputs=False)
    common.update({k: settings[k] for k in TINY})
    with pytest.raises(Exception) as excinfo:
        run_all(workflow(repo_root, ("inference.json",), "infer", **common))
    assert "case_4" in raised_messages(excinfo)
    out = tmp_path / "runs" / "predictions"
    whole, stray = case_outputs(out)
    assert sorted(whole) == ["case_1", "case_2", "case_3"] and not stray
    with pytest.raises(Exception) as excinfo:  # an unfinished run is continued only with its own settings
        workflow(repo_root, ("inference.json",), "infer", tta_flips=True, **common).initialize()
    assert "other tta_flips" in raised_messages(excinfo) and "--overwrite true" in raised_messages(excinfo)

    nib.save(nib.Nifti1Image(intact_data, intact.affine), tmax)
    run_all(workflow(repo_root, ("inference.json",), "infer", **common))
    finished, stray = case_outputs(out)
    assert sorted(finished) == [f"case_{n}" for n in range(1, 7)] and not stray
    assert all(finished[case] == whole[case] for case in whole), "finished cases are kept as they were"
    raises_file_exists(workflow(repo_root, ("inference.json",), "infer", **common), out)

    (out / "notes.txt").write_text("mine")
    run_all(workflow(repo_root, ("inference.json",), "infer", overwrite=True, tta_flips=True, **common))
    again, stray = case_outputs(out)
    assert sorted(again) == sorted(finished) and not stray
    assert (out / "notes.txt").read_text() == "mine", "--overwrite replaces what the earlier run wrote, nothing else"


def test_an_unfinished_run_without_a_finished_case_is_replaced_and_one_with_cases_is_kept(tmp_path):
    """prepare_outputs on a real folder: a stopped run that finished no case (a run without weights, a first case
    that failed) is no work to keep, so a run with other settings replaces it without --overwrite; once a case is
    finished (its row, mask and overlay), other settings are refused and the same settings keep the case."""
    out = tmp_path / "out"
    items = [
        {"case": f"case_{n}", "image": [str(tmp_path / f"case_{n}" / f"SMIR.Brain.XX.O.CT.{n}" / "ct.nii")]}
        for n in (1, 2)
    ]
    lock = hold_folder(str(out))
    try:
        assert prepare_outputs(str(out), items, {"model": "a"}, lock=lock) == items
        assert prepare_outputs(str(out), items, {"model": "b"}, lock=lock) == items
        assert json.loads((out / "run.json").read_text()) == {"settings": {"model": "b"}, "finished": False}
        for folder, name in (("masks", "case_1.nii.gz"), ("overlays", "case_1.png")):
            (out / folder).mkdir(exist_ok=True)
            (out / folder / name).write_bytes(b"whole")
        (out / PER_CASE).write_text("case,volume_pred_ml\ncase_1,1.5\n")
        with pytest.raises(FileExistsError, match="holds an unfinished run with other model"):
            prepare_outputs(str(out), items, {"model": "c"}, lock=lock)
        assert prepare_outputs(str(out), items, {"model": "b"}, lock=lock) == items[1:]
        assert (out / "masks" / "case_1.nii.gz").read_bytes() == b"whole"
    finally:
        release_folder(str(out))
    with pytest.raises(ValueError, match="hold it first"):
        prepare_outputs(str(out), items, {"model": "b"}, lock=lock)


KILLED_INFERENCE = """
import sys
from monai.bundle import ConfigWorkflow
wf = ConfigWorkflow(config_file=sys.argv[1], workflow_type="infer", **eval(sys.argv[2]))
wf.initialize()
wf.run()
"""


def test_kill_9_at_random_moments_of_inference_then_rerun_until_done(repo_root, trained, six_scans, tmp_path):
    """kill -9 of `run` at random moments, then the same command again until it finishes: every case whole and
    exactly once, each mask identical to an uninterrupted run's."""
    import random
    import signal
    import time

    root, settings = trained
    common = dict(bundle_root=str(root), dataset_dir=str(six_scans), **{k: settings[k] for k in TINY})
    run_all(workflow(repo_root, ("inference.json",), "infer", output_dir=str(tmp_path / "reference"), **common))
    reference, _ = case_outputs(tmp_path / "reference" / "predictions")
    config = os.path.join(repo_root, "configs", "inference.json")
    args = repr({**common, "output_dir": str(tmp_path / "killed")})
    cmd = [sys.executable, "-c", KILLED_INFERENCE, config, args]
    manifest = tmp_path / "killed" / "predictions" / "run.json"
    rng, kills = random.Random(7), 0
    for attempt in range(12):
        before = manifest.stat().st_mtime_ns if manifest.exists() else None
        process = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if attempt < 4:  # once the run has checked its folder (it rewrites run.json), at a random moment of the cases
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                if manifest.exists() and manifest.stat().st_mtime_ns != before:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
        stderr = process.communicate(timeout=300)[1]
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, stderr[-3000:]
        if manifest.exists() and json.loads(manifest.read_text())["finished"]:
            break  # killed after it had finished: the same command again is refused, as it must be
    out = tmp_path / "killed" / "predictions"
    whole, stray = case_outputs(out)
    assert kills >= 1 and not stray
    assert sorted(whole) == sorted(reference)
    for case, (mask, _, row) in whole.items():
        assert np.array_equal(
            np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(mask)).dataobj),
            np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(reference[case][0])).dataobj),
        ), case
        assert row == reference[case][2], case
    assert json.loads((out / "run.json").read_text())["finished"]


def test_scans_monais_writer_cannot_write_get_their_masks_and_a_2d_map_is_refused(repo_root, trained, tmp_path):
    """A one-slice scan and one stored with its first array axis head-foot (MONAI 1.6.1's NIfTI writer fails on
    both) get masks on their own grids, the latter the same mask as the scan stored axially; a 2-D map is refused
    up front, naming the case and the file."""
    root, settings = trained
    source = tmp_path / "source"
    generate(str(source), num_train=0, num_test=1, seed=5, in_plane=32, slices=4)
    (item,) = find_inputs(str(source))
    maps = [nib.load(path) for path in item["image"]]
    stack = np.stack([np.asanyarray(m.dataobj).astype(np.float32) for m in maps], axis=-1)
    affine = maps[0].affine
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(nib.Nifti1Image(stack, affine), scans / "axial.nii.gz")
    nib.save(nib.Nifti1Image(stack[:, :, 1:2], affine), scans / "one_slice.nii.gz")
    nib.save(nib.Nifti1Image(stack.transpose(2, 0, 1, 3).copy(), affine[:, [2, 0, 1, 3]]), scans / "head_foot.nii.gz")
    common = dict(bundle_root=str(root), output_dir=str(tmp_path / "out"), **{k: settings[k] for k in TINY})
    run_all(workflow(repo_root, ("inference.json",), "infer", dataset_dir=str(scans), **common))
    masks = {}
    for name in ("axial", "one_slice", "head_foot"):
        scan, mask = nib.load(scans / f"{name}.nii.gz"), nib.load(
            tmp_path / "out" / "predictions" / "masks" / f"{name}.nii.gz"
        )
        assert mask.shape == scan.shape[:3] and np.allclose(mask.affine, scan.affine), name
        masks[name] = np.asanyarray(mask.dataobj)
    assert np.array_equal(masks["head_foot"], masks["axial"].transpose(2, 0, 1))
    assert masks["axial"].any(), "a mask with a lesion, so the comparison means something"

    flat = tmp_path / "flat" / "case_3"
    shutil.copytree(os.path.dirname(os.path.dirname(item["image"][0])), flat)
    (ct,) = glob.glob(str(flat / "SMIR.Brain.XX.O.CT.*" / "*.nii"))
    nib.save(nib.Nifti1Image(np.asanyarray(nib.load(ct).dataobj)[:, :, 0].copy(), affine), ct)
    with pytest.raises(Exception) as excinfo:
        workflow(repo_root, ("inference.json",), "infer", dataset_dir=str(flat.parent), **common).initialize()
    assert f"case_3: CT file {ct} has shape (32, 32); a map must be a 3-D grid" in raised_messages(excinfo)


HOLDER = """
import sys, time
from scripts.safe_files import hold_folder
lock = hold_folder(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_inference_refuses_a_prediction_dir_another_live_run_holds(repo_root, trained, six_scans, tmp_path):
    """The lock of a live process (a stand-in that holds it) refuses the run, naming the folder and the process;
    once that process is killed (-9), the system has freed its lock and the run goes ahead."""
    root, settings = trained
    out = tmp_path / "runs" / "predictions"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], cwd=repo_root, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        common = dict(bundle_root=str(root), dataset_dir=str(six_scans), output_dir=str(tmp_path / "runs"))
        common.update({k: settings[k] for k in TINY})
        with pytest.raises(Exception) as excinfo:
            workflow(repo_root, ("inference.json",), "infer", **common).initialize()
        assert f"{out} is in use by another run (process {holder.pid}: -c {out})" in raised_messages(excinfo)
    finally:
        holder.kill()
        holder.wait()
    run_all(workflow(repo_root, ("inference.json",), "infer", **common))
    assert len(read_csv(out / PER_CASE)) == 6

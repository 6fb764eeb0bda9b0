"""scripts/tools/cross_validate.py on a tiny synthetic tree: every case scored out-of-fold once by a model that never saw its
patient, the table from the per-case CSV, overrides reaching the runs, refusals, and a killed run resumed."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from scripts.data.datalist import find_inputs
from scripts.report.cases import PER_CASE, THRESHOLD_CORE
from scripts.report.metrics import METRIC_NAMES
from scripts.report.tables import read_csv

TINY = ["--features", "[2,4,8,16,32]", "--spatial_size", "[32,32,16]", "--num_workers", "0", "--val_interval", "1"]


def cross_validate(repo_root, *args, **popen):
    cmd = [sys.executable, "-m", "scripts.tools.cross_validate", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=repo_root, start_new_session=True, **popen)
    return subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=1800, check=False)


@pytest.fixture(scope="module")
def finished(repo_root, synthetic_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv") / "out"
    args = ["--dataset_dir", synthetic_tree, "--output_dir", str(out), "--folds", "2", "--epochs", "1", *TINY]
    result = cross_validate(repo_root, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, args, result


def test_every_case_is_scored_out_of_fold_once_by_a_model_that_never_saw_its_patient(finished):
    out, _, result = finished
    datalist = json.load(open(out / "datalist.json"))["training"]
    fold_of, patient_of = {i["case"]: i["fold"] for i in datalist}, {i["case"]: i["patient"] for i in datalist}
    rows = read_csv(out / "per_case.csv")
    for network in ("modified", "classic"):
        test = [r for r in rows if r["network"] == network and r["split"] == "test"]
        assert sorted(r["case"] for r in test) == sorted(fold_of), "each case once, out of fold"
        for row in test:
            trained_on = {patient_of[c] for c, f in fold_of.items() if f != int(row["fold"])}
            assert int(row["fold"]) == fold_of[row["case"]] and row["patient"] not in trained_on
        train = [r for r in rows if r["network"] == network and r["split"] == "train"]
        assert all(fold_of[r["case"]] != int(r["fold"]) for r in train) and len(train) == len(fold_of)
    assert "[4/4] classic fold 1: done" in result.stdout and "left" in result.stdout


def test_the_per_case_table_is_the_evaluations_rows(finished):
    """Each row of the cross-validation's per-case table is a row of the per_case.csv its evaluation wrote: the
    network's metrics, and the threshold core's (its <baseline>_<metric> columns) on the held-out cases."""
    out, _, _ = finished
    rows = read_csv(out / "per_case.csv")
    scored = [("classic", "classic", "train", ""), ("modified", "modified", "test", "")]
    scored.append((THRESHOLD_CORE, "modified", "test", f"{THRESHOLD_CORE}_"))
    for name, network, split, prefix in scored:
        for fold in (0, 1):
            written = read_csv(out / network / f"fold{fold}" / f"eval_{split}" / PER_CASE)
            ours = [r for r in rows if (r["network"], r["split"], r["fold"]) == (name, split, str(fold))]
            assert [r["case"] for r in ours] == [r["case"] for r in written] and ours
            for mine, theirs in zip(ours, written):
                for metric in METRIC_NAMES:
                    assert float(mine[metric]) == pytest.approx(float(theirs[prefix + metric]), nan_ok=True)


def test_the_table_is_the_mean_of_the_per_case_values(finished):
    out, _, _ = finished
    rows = read_csv(out / "per_case.csv")
    table = [r for r in read_csv(out / "table.csv") if r["source"] == "this run"]
    assert len(table) == 5 and table[-1]["network"] == THRESHOLD_CORE and table[-1]["cases"] == "10"
    for entry in table:
        cases = [r for r in rows if r["network"] == entry["network"] and r["split"] == entry["split"]]
        assert int(entry["cases"]) == len(cases)
        for metric in ("dice", "precision", "recall", "jaccard", "hd95_mm", "volume_abs_diff_ml", "lesion_f1"):
            values = [float(r[metric]) for r in cases if not math.isnan(float(r[metric]))]
            expected = np.mean(values) if values else math.nan
            assert float(entry[metric]) == pytest.approx(expected, nan_ok=True), (entry, metric)
    paper = [r for r in read_csv(out / "table.csv") if r["source"].startswith("paper")]
    assert {(r["network"], r["split"], r["dice"]) for r in paper} >= {("modified", "test", "0.58")}
    text = (out / "table.md").read_text()
    assert "paper (Omarov 2022, Tab. 1)" in text and "wilcoxon_p" in text and "ensemble.json" in text
    comparison = (out / "comparison.md").read_text()
    assert "mean_difference" in comparison and "ci95_low" in comparison and "wilcoxon_p" in comparison
    with Image.open(out / "dice.png") as png:
        assert png.size[0] > 300 and png.size[1] > 300


def test_overrides_reach_every_run(finished):
    out, args, _ = finished
    for network in ("modified", "classic"):
        for fold in (0, 1):
            models = out / network / f"fold{fold}" / "models"
            assert sorted(p.name for p in models.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=1.pt"]
            weights = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
            first = next(w for k, w in weights.items() if k.endswith("weight") and w.dim() == 5)
            assert first.shape[:2] == (2, 5), "features [2, ...]: 2 maps out of the 5 inputs in the first conv"
    ensemble = json.load(open(out / "ensemble.json"))
    assert ensemble["features"] == [2, 4, 8, 16, 32] and len(ensemble["ensemble_checkpoints"]) == 2
    assert all(os.path.isfile(p) for p in ensemble["ensemble_checkpoints"])
    # the ensemble segments the datalist's testing cases only: every other case trained one of its models
    assert ensemble["dataset_dir"] == str(out / "testing.json") and ensemble["data_list_key"] == "testing"
    datalist, datalist_root = json.load(open(out / "datalist.json")), args[1]
    testing = find_inputs(ensemble["dataset_dir"])
    assert [i["case"] for i in testing] == [i["case"] for i in datalist["testing"]] and testing
    trained = {os.path.join(datalist_root, i["image"][0]) for i in datalist["training"]}
    assert all(i["image"][0] not in trained for i in testing)


def test_a_finished_or_different_run_is_not_overwritten_and_typos_are_refused(repo_root, finished, tmp_path):
    out, args, _ = finished
    before = (out / "table.md").read_text()
    again = cross_validate(repo_root, *args)
    assert again.returncode == 1 and "holds a finished cross-validation" in again.stderr
    other = cross_validate(repo_root, *[a if a != "1" else "2" for a in args])
    assert other.returncode == 1 and "with other settings" in other.stderr
    assert (out / "table.md").read_text() == before
    typo = cross_validate(repo_root, "--dataset_dir", args[1], "--output_dir", str(tmp_path / "new"), "--epoch", "1")
    assert typo.returncode == 1 and "unknown config ID(s) --epoch" in typo.stderr
    near = cross_validate(repo_root, "--dataset_dir", args[1], "--output_dir", str(tmp_path / "new"), "--network", "x")
    assert near.returncode == 1 and "--network: did you mean this command's --networks?" in near.stderr
    for bad in (["--folds", "99"], ["--datalist", str(tmp_path / "missing.json")]):
        refused = cross_validate(repo_root, "--dataset_dir", args[1], "--output_dir", str(tmp_path / "new"), *bad)
        assert refused.returncode == 1 and (
            "folds must be between" in refused.stderr or "is not a file" in refused.stderr
        )
    assert not (tmp_path / "new").exists(), "nothing is written for a refused command line"


def test_overwrite_replaces_only_what_a_cross_validation_wrote(repo_root, finished, tmp_path):
    out, args, _ = finished
    keep = tmp_path / "kept"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    refused = cross_validate(repo_root, "--dataset_dir", args[1], "--output_dir", str(keep), "--overwrite", "true")
    assert refused.returncode == 1 and "notes.txt" in refused.stderr
    assert (keep / "notes.txt").read_text() == "mine", "a folder with other files is never emptied"


def test_a_killed_run_resumes_where_it_stopped(repo_root, synthetic_tree, tmp_path):
    out = tmp_path / "out"
    args = ["--dataset_dir", synthetic_tree, "--output_dir", str(out), "--folds", "2", "--networks", "modified"]
    args += ["--epochs", "30", *TINY]
    process = cross_validate(repo_root, *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fold1 = out / "modified" / "fold1"
    deadline = time.monotonic() + 600
    while not list((fold1 / "models").glob("checkpoint_epoch=*.pt")) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and the training it runs
    process.wait()
    assert (out / "modified" / "fold0" / "scored_train.json").exists() and not (fold1 / "trained.json").exists()
    shutil.copy(out / "modified" / "fold0" / "log.txt", tmp_path / "fold0_log_before.txt")
    result = cross_validate(repo_root, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[1/2] modified fold 0: already done" in result.stdout
    assert (out / "modified" / "fold0" / "log.txt").read_text() == (tmp_path / "fold0_log_before.txt").read_text()
    assert "'resume': True" in (fold1 / "log.txt").read_text(), "fold 1 continued from its checkpoint"
    state = torch.load(fold1 / "models" / "checkpoint_epoch=30.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 30 * state["trainer"]["epoch_length"]
    assert len([r for r in read_csv(out / "per_case.csv") if r["split"] == "test" and r["network"] == "modified"]) == 10

"""The MONAI model zoo's unit tests of a bundle, run as the zoo runs them (its ci/unit_tests/, read at model-zoo commit
dfae206: test_spleen_ct_segmentation.py and utils.check_workflow): from the zoo's root, with a copy of the bundle at
models/<bundle> (configs, scripts, docs, LICENSE; no weights) and a relative ``bundle_root``, each workflow
initialized, its properties checked, run and finalized. Inference first, as the zoo's own call with no weights
(``handlers#0#_disabled_``: the checkpoint loader off); then training and evaluation, as the zoo's
``test_train_eval_config`` does for a bundle (the evaluation configs are this bundle's, inference.json +
evaluate.json, an infer workflow); and the zoo's multi-GPU command line (``--meta_file``, ``--logging_file``)."""

import json
import os
import shutil

import monai.bundle
import pytest
from monai.bundle import ConfigWorkflow
from scripts.data.datalist import build_datalist
from scripts.flags import refuse_unknown_overrides
from scripts.report.cases import PER_CASE, SUMMARY

BUNDLE = "isles_ctp_segmentation"
TINY = {"features": [2, 4, 8, 16, 32], "spatial_size": [32, 32, 16], "num_workers": 0}


def check_workflow(workflow: ConfigWorkflow, check_properties: bool = False):
    """The zoo's ci/unit_tests/utils.check_workflow."""
    workflow.initialize()
    if check_properties is True:
        check_result = workflow.check_properties()
        if check_result is not None and len(check_result) > 0:
            raise ValueError(f"check properties for workflow failed: {check_result}")
    workflow.run()
    workflow.finalize()


@pytest.fixture
def zoo_root(repo_root, tmp_path, monkeypatch):
    """A model-zoo checkout holding a copy of the bundle as models/<BUNDLE>, the working folder."""
    root = tmp_path / "model-zoo"
    bundle = root / "models" / BUNDLE
    for folder in ("configs", "scripts", "docs"):
        shutil.copytree(os.path.join(repo_root, folder), bundle / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (bundle / "models").mkdir()
    shutil.copy(os.path.join(repo_root, "models", "README.md"), bundle / "models")
    shutil.copy(os.path.join(repo_root, "LICENSE"), bundle)
    monkeypatch.chdir(root)
    return root


def zoo_workflow(workflow_type, config_names, **override):
    bundle_root = override["bundle_root"]
    return ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=[os.path.join(bundle_root, "configs", name) for name in config_names],
        logging_file=os.path.join(bundle_root, "configs/logging.conf"),
        meta_file=os.path.join(bundle_root, "configs/metadata.json"),
        **override,
    )


def test_the_zoo_inference_call_without_weights(zoo_root, synthetic_tree):
    """The zoo's test_infer_config: inference.json with the checkpoint loader disabled and no models/model.pt, at
    the bundle's own network size; its outputs go into the bundle's runs/predictions."""
    bundle_root = os.path.join("models", BUNDLE)
    override = {"bundle_root": bundle_root, "dataset_dir": synthetic_tree, "handlers#0#_disabled_": True}
    check_workflow(zoo_workflow("infer", ["inference.json"], **override), check_properties=True)
    out = zoo_root / bundle_root / "runs" / "predictions"
    assert not (zoo_root / bundle_root / "models" / "model.pt").exists()
    assert sorted(os.listdir(out / "masks")) == ["case_1.nii.gz", "case_2.nii.gz"]
    with open(out / "run.json") as f:
        manifest = json.load(f)
    (stamp,) = manifest["settings"]["checkpoints"]
    assert manifest["finished"] and stamp[0].endswith(os.path.join(BUNDLE, "models", "model.pt"))
    assert stamp[1:] == [None, None], "the run records that it had no weights"


def test_the_zoo_train_then_evaluate_calls(zoo_root, synthetic_tree, tmp_path):
    """The zoo's test_train_eval_config with tiny settings (as the zoo's tests make theirs), the datalist given as
    the lung-nodule bundle's test gives its own; then inference of the trained model, the loader on."""
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(build_datalist(synthetic_tree, folds=3, seed=0)))
    bundle_root = os.path.join("models", BUNDLE)
    override = {"bundle_root": bundle_root, "dataset_dir": synthetic_tree, "data_list_file_path": str(datalist)}
    override.update(TINY)
    check_workflow(zoo_workflow("train", ["train.json"], epochs=1, val_interval=1, **override), check_properties=True)
    check_workflow(zoo_workflow("infer", ["inference.json", "evaluate.json"], **override), check_properties=True)
    check_workflow(zoo_workflow("infer", ["inference.json"], **override), check_properties=True)
    bundle = zoo_root / bundle_root
    assert (bundle / "models" / "model.pt").is_file()
    assert (bundle / "runs" / "eval" / PER_CASE).is_file() and (bundle / "runs" / "eval" / SUMMARY).is_file()
    assert sorted(os.listdir(bundle / "runs" / "predictions" / "masks")) == ["case_1.nii.gz", "case_2.nii.gz"]
    assert sorted(os.listdir(zoo_root)) == ["models"], "nothing is written into the working folder"


def test_the_zoo_multi_gpu_command_line_is_not_refused(repo_root):
    """The zoo's multi-GPU tests run ``torchrun ... -m monai.bundle run --config_file C --meta_file M
    --logging_file L`` (utils.produce_mgpu_cmd): every argument of ``monai.bundle run`` itself passes the check of
    overrides; an id no config defines is still refused."""
    main = os.path.join(os.path.dirname(monai.bundle.__file__), "__main__.py")
    config = os.path.join(repo_root, "configs", "train.json")
    own = ["--config_file", config, "--meta_file", "m.json", "--logging_file", "l.conf", "--workflow_type", "train"]
    refuse_unknown_overrides([main, "run", "training", *own, "--epochs", "1"])
    with pytest.raises(ValueError, match="--epoch: no config of this run defines that id"):
        refuse_unknown_overrides([main, "run", "training", *own, "--epoch", "1"])

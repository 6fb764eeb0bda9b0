"""The MONAI model zoo's unit-test pattern (its ci/unit_tests): train, then `run evaluating` with train.json +
evaluate.json, then inference, each a ConfigWorkflow whose required properties are checked, run from another
working folder than the bundle's (the zoo runs them from its own root)."""

import json
import os

from monai.bundle import ConfigWorkflow
from scripts.data.datalist import build_datalist

TINY = {"features": [2, 4, 8, 16, 32], "spatial_size": [32, 32, 16], "num_workers": 0}


def checked_run(workflow):
    workflow.initialize()
    assert workflow.check_properties() == [], "the workflow defines every property MONAI requires of its type"
    workflow.run()
    workflow.finalize()
    return workflow


def test_train_evaluate_and_infer_from_the_zoo_root(repo_root, synthetic_tree, tmp_path, monkeypatch):
    zoo_root = tmp_path / "model-zoo"
    zoo_root.mkdir()
    monkeypatch.chdir(zoo_root)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(build_datalist(synthetic_tree, folds=3, seed=0)))
    configs = os.path.join(repo_root, "configs")
    common = {
        "meta_file": os.path.join(configs, "metadata.json"),
        "logging_file": os.path.join(configs, "logging.conf"),
        "bundle_root": repo_root,
        "dataset_dir": synthetic_tree,
        "data_list_file_path": str(datalist),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "runs"),
        **TINY,
    }
    train = [os.path.join(configs, "train.json")]
    checked_run(ConfigWorkflow(workflow_type="train", config_file=train, epochs=1, val_interval=1, **common))
    checked_run(
        ConfigWorkflow(
            workflow_type="infer",
            config_file=[os.path.join(configs, name) for name in ("inference.json", "evaluate.json")],
            **common,
        )
    )
    assert (tmp_path / "runs" / "eval" / "metrics_per_case.csv").is_file()
    infer = os.path.join(configs, "inference.json")
    checked_run(ConfigWorkflow(workflow_type="infer", config_file=infer, **common))
    assert len(os.listdir(tmp_path / "runs" / "predictions" / "masks")) == 2
    assert not os.listdir(zoo_root), "nothing is written into the working folder"

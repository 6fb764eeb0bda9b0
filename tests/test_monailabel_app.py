"""scripts/monailabel_app.py: the bundle and a model put into a MONAI Label app folder (no MONAI Label needed here)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser

from scripts.monailabel_app import install

TINY = [2, 4, 8, 16, 32]


@pytest.fixture
def sample_app(tmp_path):
    """A stand-in for the monaibundle sample app: what install() needs of it is a folder with main.py."""
    folder = tmp_path / "sample-apps" / "monaibundle"
    (folder / "lib").mkdir(parents=True)
    (folder / "main.py").write_text("# MONAI Label app\n")
    return str(folder)


def network(features, spatial_size=(32, 32, 16)):
    parser = ConfigParser()
    parser.read_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "inference.json"))
    parser.update({"features": list(features), "spatial_size": list(spatial_size)})
    return parser.get_parsed_content("network_def")


@pytest.fixture
def tiny_model(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(network(TINY).state_dict(), path)
    return str(path)


def test_install_writes_the_models_settings_into_both_configs(tmp_path, sample_app, tiny_model):
    app = tmp_path / "app"
    bundle = install(str(app), tiny_model, "isles_ctp", features=TINY, spatial_size=[32, 32, 16],
                     settings={"num_workers": 0, "val_interval": 1}, sample_app=sample_app)
    assert bundle == str(app / "model" / "isles_ctp")
    assert (app / "main.py").is_file() and (app / "lib").is_dir()
    for name in ("configs/inference.json", "configs/train.json", "configs/metadata.json", "scripts/networks.py",
                 "scripts/make_studies.py", "models/model.pt", "LICENSE", "docs/README.md"):
        assert os.path.isfile(os.path.join(bundle, name)), name
    assert not [f for f in os.listdir(os.path.join(bundle, "configs")) if f.startswith("datalist")]
    assert sorted(os.listdir(app / "model")) == ["isles_ctp"]  # no staging folder left
    with open(os.path.join(bundle, "configs", "inference.json")) as f:
        inference = json.load(f)
    with open(os.path.join(bundle, "configs", "train.json")) as f:
        train = json.load(f)
    assert inference["features"] == train["features"] == TINY
    assert inference["spatial_size"] == train["spatial_size"] == [32, 32, 16]
    assert inference["num_workers"] == train["num_workers"] == 0 and train["val_interval"] == 1
    copied, source = torch.load(os.path.join(bundle, "models", "model.pt")), torch.load(tiny_model)
    assert copied.keys() == source.keys() and all(torch.equal(copied[k], source[k]) for k in source)


def test_a_model_that_does_not_fit_the_configs_is_refused(tmp_path, sample_app, tiny_model):
    """MONAI Label would load it non-strictly and serve an untrained network; install() says what to pass."""
    with pytest.raises(ValueError, match=r"does not fit the network.*--features"):
        install(str(tmp_path / "app"), tiny_model, sample_app=sample_app)  # configs' default features
    assert not os.path.exists(tmp_path / "app"), "nothing is written for a refused model"
    with pytest.raises(ValueError, match="unknown setting.*epoch"):
        install(str(tmp_path / "app"), tiny_model, features=TINY, settings={"epoch": 3}, sample_app=sample_app)


def test_existing_bundle_is_replaced_only_with_overwrite(tmp_path, sample_app, tiny_model):
    app = tmp_path / "app"
    install(str(app), tiny_model, features=TINY, sample_app=sample_app)
    (app / "main.py").write_text("# edited by the user\n")
    with pytest.raises(FileExistsError, match="--overwrite"):
        install(str(app), tiny_model, features=TINY, sample_app=sample_app)
    install(str(app), tiny_model, features=TINY, sample_app=sample_app, overwrite=True)
    assert (app / "main.py").read_text() == "# edited by the user\n", "an existing app keeps its own files"


def test_cli_errors_are_one_line(repo_root, tmp_path, sample_app):
    cmd = [sys.executable, "-m", "scripts.monailabel_app", "--app_dir", str(tmp_path / "app"), "--model",
           str(tmp_path / "missing.pt"), "--sample_app", sample_app]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: no trained model at")

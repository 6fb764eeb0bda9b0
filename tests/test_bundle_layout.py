"""The bundle's layout and metadata promises: what MONAI `run`, MONAI Label and the README rely on."""

import json
import os
import re

import monai

from scripts.isles import CHANNELS


def load(repo_root, *parts):
    with open(os.path.join(repo_root, *parts)) as f:
        return json.load(f)


def test_model_zoo_layout(repo_root):
    for name in ("configs", "models", "scripts", "docs", "tests"):
        assert os.path.isdir(os.path.join(repo_root, name)), name
    for name in ("LICENSE", "README.md", "docs/README.md", "docs/data_license.txt", "models/README.md",
                 "configs/train.json", "configs/logging.conf", "requirements.txt", "requirements-dev.txt"):
        assert os.path.isfile(os.path.join(repo_root, name)), name
    assert "Apache License" in open(os.path.join(repo_root, "LICENSE")).read()


def test_root_metadata_is_a_link_to_the_configs_one(repo_root):
    root = os.path.join(repo_root, "metadata.json")
    assert os.path.islink(root) and os.path.realpath(root) == os.path.realpath(
        os.path.join(repo_root, "configs", "metadata.json"))
    assert load(repo_root, "metadata.json") == load(repo_root, "configs", "metadata.json")


def test_metadata_matches_the_configs(repo_root):
    meta = load(repo_root, "configs", "metadata.json")
    train = load(repo_root, "configs", "train.json")
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] == monai.__version__
    image = meta["network_data_format"]["inputs"]["image"]
    assert [image["channel_def"][str(i)] for i in range(image["num_channels"])] == list(CHANNELS) == train["channels"]
    assert image["spatial_shape"] == train["spatial_size"] == [128, 128, 32]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "lesion"}
    assert pred["num_channels"] == train["network_def"]["out_channels"]
    assert image["num_channels"] == train["network_def"]["in_channels"]
    assert any("Omarov" in ref for ref in meta["references"]) and any("ISLES" in ref for ref in meta["references"])


def test_ci_runs_the_readme_test_command(repo_root):
    readme = open(os.path.join(repo_root, "README.md")).read()
    ci = open(os.path.join(repo_root, ".ci", "run")).read()
    (test_cmd,) = re.findall(r"pip install -r requirements-dev\.txt && (python -m pytest[^\n`]*)", readme)
    assert test_cmd in ci
    assert "pip install --quiet torch==2.13.0" in ci and "requirements-dev.txt" in ci

"""scripts/tools/monailabel_app.py: the bundle and a model put into a MONAI Label app folder (no MONAI Label needed here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from scripts.tools.monailabel_app import install

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
    bundle = install(
        str(app),
        tiny_model,
        "isles_ctp",
        features=TINY,
        spatial_size=[32, 32, 16],
        settings={"num_workers": 0, "val_interval": 1},
        sample_app=sample_app,
    )
    assert bundle == str(app / "model" / "isles_ctp")
    assert (app / "main.py").is_file() and (app / "lib").is_dir()
    for name in (
        "configs/inference.json",
        "configs/train.json",
        "configs/metadata.json",
        "scripts/engine/networks.py",
        "scripts/report/cases.py",
        "models/model.pt",
        "LICENSE",
        "docs/README.md",
    ):
        assert os.path.isfile(os.path.join(bundle, name)), name
    for tool in ("cli", "make_studies", "monailabel_app", "cross_validate", "prepare_datalist"):
        assert not os.path.exists(os.path.join(bundle, "scripts", f"{tool}.py")), "the app gets the runtime only"
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


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_no_app_is_never_written_over(tmp_path, sample_app, tiny_model, overwrite):
    """An --app_dir that holds files but no main.py is refused, whatever --overwrite says: nothing in it changes."""
    app = tmp_path / "mine"
    (app / "lib").mkdir(parents=True)
    (app / "README.md").write_text("my notes\n")
    (app / "lib" / "mine.py").write_text("x = 1\n")
    before = snapshot(app)
    with pytest.raises(FileExistsError, match="no MONAI Label app"):
        install(str(app), tiny_model, features=TINY, sample_app=sample_app, overwrite=overwrite)
    assert snapshot(app) == before


def snapshot(folder):
    """Every file, folder and link under ``folder``: ``{relative path: the file's bytes, "folder" or the link}``."""
    found = {}
    for parent, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(parent, name)
            if os.path.islink(path):
                found[os.path.relpath(path, folder)] = f"link to {os.readlink(path)}"
            else:
                found[os.path.relpath(path, folder)] = "folder" if os.path.isdir(path) else Path(path).read_bytes()
    return found


@pytest.mark.parametrize("name", [".", "..", "", "../app", "model/../..", "a/b", "-x", ".isles_ctp.partial", "a b"])
def test_only_a_plain_folder_name_is_accepted(tmp_path, sample_app, tiny_model, name):
    """With --overwrite, "." would have replaced the whole model/ folder and ".." the app folder."""
    app = tmp_path / "app"
    install(str(app), tiny_model, features=TINY, sample_app=sample_app)  # a sibling bundle: model/isles_ctp
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"--name must be a plain folder name \(letters, digits, '\.', '_' and '-',"):
        install(str(app), tiny_model, name, features=TINY, sample_app=sample_app, overwrite=True)
    assert snapshot(tmp_path) == before, "the app folder, its bundles and what lies beside it are untouched"


@pytest.mark.parametrize("points_to", ["a_folder_elsewhere", "a_sibling_bundle"])
def test_overwrite_never_removes_through_a_link(tmp_path, sample_app, tiny_model, points_to):
    app = tmp_path / "app"
    install(str(app), tiny_model, features=TINY, sample_app=sample_app)
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "data.txt").write_text("keep me\n")
    link = app / "model" / "linked"
    link.symlink_to(elsewhere if points_to == "a_folder_elsewhere" else app / "model" / "isles_ctp")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="linked resolves to .*, not to a folder of its own in .*model; --overwrite"):
        install(str(app), tiny_model, "linked", features=TINY, sample_app=sample_app, overwrite=True)
    assert snapshot(tmp_path) == before


def monailabel_app(repo_root, *args):
    """``python -m scripts.tools.monailabel_app`` with ``args`` (as text): the finished process."""
    cmd = [sys.executable, "-m", "scripts.tools.monailabel_app", *map(str, args)]
    return subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300, check=False)


def test_cli_refuses_a_name_that_is_no_folder_of_its_own(repo_root, tmp_path, sample_app, tiny_model):
    app = tmp_path / "app"
    install(str(app), tiny_model, features=TINY, sample_app=sample_app)
    before = snapshot(tmp_path)
    args = ["--app_dir", app, "--model", tiny_model, "--features", TINY, "--sample_app", sample_app]
    result = monailabel_app(repo_root, *args, "--name", "..", "--overwrite")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        (
            "error: --name must be a plain folder name (letters, digits, '.', '_' and '-', starting with a letter or"
            " digit), got '..'"
        )
    ]
    assert snapshot(tmp_path) == before


BROKEN_CHECKPOINTS = {  # how to write each, from a good checkpoint
    "empty": lambda path, good: path.write_bytes(b""),
    "truncated": lambda path, good: path.write_bytes(good.read_bytes()[: good.stat().st_size // 2]),
    "text": lambda path, good: path.write_text("not a checkpoint\n"),
    "a_list": lambda path, good: torch.save([1, 2], path),
}


@pytest.mark.parametrize("kind", BROKEN_CHECKPOINTS)
def test_a_file_that_is_no_checkpoint_is_named_in_one_line(repo_root, tmp_path, sample_app, tiny_model, kind):
    model = tmp_path / f"{kind}.pt"
    BROKEN_CHECKPOINTS[kind](model, Path(tiny_model))
    args = ["--app_dir", tmp_path / "app", "--model", model, "--features", TINY, "--sample_app", sample_app]
    result = monailabel_app(repo_root, *args)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {model}: not a ") and " PyTorch checkpoint " in line, line
    assert not os.path.exists(tmp_path / "app")


def test_cli_errors_are_one_line(repo_root, tmp_path, sample_app):
    args = ["--app_dir", tmp_path / "app", "--model", tmp_path / "missing.pt", "--sample_app", sample_app]
    result = monailabel_app(repo_root, *args)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: no trained model at")

"""configs/train.json (and its classic-UNet and demo overrides) run through MONAI's ConfigWorkflow on tiny data."""

import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import bundle_run_command, initialize_and_run, raised_messages
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from PIL import Image
from scripts.data.datalist import build_datalist
from scripts.safe_files import release_folder

# Small enough for this CPU: 5 levels still need every spatial size divisible by 16.
TINY = {
    "features": [2, 4, 8, 16, 32],
    "spatial_size": [32, 32, 16],
    "batch_size": 2,
    "num_workers": 0,
    "epochs": 2,
    "val_interval": 1,
    "cache_rate": 1.0,
}


@pytest.fixture(scope="module")
def datalist_file(synthetic_tree, tmp_path_factory):
    path = tmp_path_factory.mktemp("datalist") / "datalist.json"
    with open(path, "w") as f:
        json.dump(build_datalist(synthetic_tree, folds=3, seed=0), f)
    return str(path)


def workflow(repo_root, bundle_root, configs=("train.json",), **override):
    """A ConfigWorkflow over the repo's configs that writes into ``bundle_root`` (not into the repo)."""
    files = [os.path.join(repo_root, "configs", name) for name in configs]
    wf = ConfigWorkflow(
        config_file=files,
        meta_file=os.path.join(repo_root, "configs", "metadata.json"),
        workflow_type="train",
        bundle_root=str(bundle_root),
        **override,
    )
    return wf


def run_all(wf):
    wf.initialize()
    assert wf.check_properties() == [], "train.json must define every required train property"
    wf.run()
    wf.finalize()
    return wf


def tiny(synthetic_tree, datalist_file, **extra):
    return {**TINY, "dataset_dir": synthetic_tree, "data_list_file_path": datalist_file, **extra}


@pytest.mark.parametrize("configs", [("train.json",), ("train.json", "classic_unet.json")], ids=["modified", "classic"])
def test_training_writes_checkpoints_and_metrics(repo_root, synthetic_tree, datalist_file, tmp_path, configs):
    wf = run_all(workflow(repo_root, tmp_path, configs, **tiny(synthetic_tree, datalist_file)))
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2
    metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    assert set(metrics) == {"val_mean_dice", "val_jaccard", "val_precision", "val_recall", "val_lesion_f1"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    curves = list(csv.DictReader(open(tmp_path / "models" / "curves.csv")))
    assert [int(row["epoch"]) for row in curves] == [1, 2] and all(float(row["train_loss"]) > 0 for row in curves)
    assert float(curves[-1]["val_mean_dice"]) == pytest.approx(metrics["val_mean_dice"], abs=1e-6)
    assert float(curves[-1]["val_lesion_f1"]) == pytest.approx(metrics["val_lesion_f1"], abs=1e-6)
    assert Image.open(tmp_path / "models" / "curves.png").size[0] > 0
    best = torch.load(tmp_path / "models" / "model.pt", map_location="cpu")
    net = wf.parser.get_parsed_content("network_def")
    net.load_state_dict(best)  # strict: the best checkpoint is exactly the network's state_dict
    trained = wf.parser.get_parsed_content("network")
    conv = next(m for m in trained.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d), "channels_last is on by default"
    (latest,) = glob.glob(str(tmp_path / "models" / "checkpoint_epoch=*.pt"))
    assert latest.endswith("checkpoint_epoch=2.pt")
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(torch.load(latest, map_location="cpu"))
    assert glob.glob(str(tmp_path / "runs" / "events.out.tfevents.*"))


def _layers(net):
    """Each layer of a network as (type name, its shape-defining attributes), in module order."""
    layers = []
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            layers.append(
                ("conv", type(m).__name__, m.in_channels, m.out_channels, m.kernel_size, m.stride, m.dilation)
            )
        elif isinstance(m, (torch.nn.ReLU, torch.nn.LeakyReLU)):
            layers.append(("act", type(m).__name__))
        elif isinstance(m, (torch.nn.BatchNorm3d, torch.nn.GroupNorm, torch.nn.InstanceNorm3d)):
            layers.append(("norm", type(m).__name__))
        elif isinstance(m, torch.nn.Dropout3d):
            layers.append(("dropout", m.p))
        elif isinstance(m, torch.nn.MaxPool3d):
            layers.append(("pool", m.kernel_size))
    return layers


def test_classic_unet_is_the_modified_one_with_the_papers_modifications_off(repo_root, tmp_path):
    """The ablation: same class, levels, up-path and head; only activation, norm, dilation and dropout differ."""
    features = dict(features=[2, 4, 8, 16, 32])
    modified = workflow(repo_root, tmp_path / "m", ("train.json",), **features)
    classic = workflow(repo_root, tmp_path / "c", ("train.json", "classic_unet.json"), **features)
    nets = [wf.parser.get_parsed_content("network_def") for wf in (modified, classic)]
    assert [type(n) for n in nets] == [type(nets[0])] * 2
    assert classic.parser.get_parsed_content("network_name") == "ClassicUNet"
    assert modified.parser.get_parsed_content("network_name") == "ModifiedUNet"
    layers = [[layer for layer in _layers(n) if layer[0] != "dropout"] for n in nets]
    assert len(layers[0]) == len(layers[1])
    for a, b in zip(*layers):
        if a[0] == "conv":  # same convolutions but for the dilation, which the classic network has nowhere
            assert a[:-1] == b[:-1] and max(b[-1]) == 1
        else:
            assert a[0] == b[0]
    convs = [layer for layer in layers[1] if layer[0] == "conv"]
    assert len(convs) == 23 and any(max(layer[-1]) > 1 for layer in layers[0] if layer[0] == "conv")
    assert {layer[1] for layer in layers[1] if layer[0] in ("act", "norm")} == {"ReLU", "BatchNorm3d"}
    assert {layer[1] for layer in layers[0] if layer[0] in ("act", "norm")} == {"LeakyReLU", "GroupNorm"}
    assert not [layer for layer in _layers(nets[1]) if layer[0] == "dropout"]
    assert [layer for layer in _layers(nets[0]) if layer[0] == "dropout"]
    assert sum(p.numel() for p in nets[0].parameters()) == sum(p.numel() for p in nets[1].parameters())


def test_augmentation_rotates_in_plane_and_hands_plain_tensors_to_the_network(repo_root, tmp_path):
    """Thick-slice slabs: a rotation may turn each axial slice, never tilt one slice into the next."""
    from monai.data import MetaTensor
    from monai.transforms import Compose, RandRotated

    wf = workflow(repo_root, tmp_path)
    augment = Compose(wf.parser.get_parsed_content("train#random_transforms"))
    (rotate,) = [t for t in augment.transforms if isinstance(t, RandRotated)]
    rotate.set_random_state(seed=1).prob = 1.0  # always rotate, by -0.10 rad with this seed
    slab = torch.arange(1.0, 9.0).repeat(1, 32, 32, 1)  # slice z holds the value z + 1 everywhere
    item = augment({"image": MetaTensor(slab.repeat(5, 1, 1, 1)), "label": MetaTensor(slab)})
    label = item["label"]
    assert type(label) is torch.Tensor and type(item["image"]) is torch.Tensor  # no MetaTensor overhead
    for z in range(8):  # flips may reverse the slice order; each slice still holds one value (or padding)
        assert len(set(label[0, :, :, z].unique().tolist()) - {0.0}) == 1, f"slice {z} mixes slices"
    assert (label == 0).any(), "the rotation was applied (corners padded)"


def final_weights(bundle_root):
    return torch.load(glob.glob(str(bundle_root / "models" / "checkpoint_epoch=*.pt"))[0], map_location="cpu")["model"]


def test_resume_continues_a_killed_run_at_the_next_epoch(repo_root, synthetic_tree, datalist_file, tmp_path):
    first = workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, epochs=3))
    first.initialize()
    killed = first.parser.get_parsed_content("train#trainer")
    killed.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda engine: engine.terminate())
    first.run()
    assert killed.state.epoch == 2
    saved = torch.load(tmp_path / "models" / "checkpoint_epoch=2.pt", map_location="cpu")

    wf = workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, epochs=3, resume=True))
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    started = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: started.append(engine.state.epoch))
    wf.run()
    wf.finalize()
    assert started == [3], "a resumed run trains only the epochs it had not done"
    assert trainer.state.iteration == 3 * len(trainer.data_loader)
    resumed = torch.load(tmp_path / "models" / "checkpoint_epoch=3.pt", map_location="cpu")
    assert resumed["lr_scheduler"]["last_epoch"] == saved["lr_scheduler"]["last_epoch"] + 1
    assert resumed["optimizer"]["state"][0]["step"] == saved["optimizer"]["state"][0]["step"] + len(trainer.data_loader)
    assert not all(torch.equal(saved["model"][k], v) for k, v in resumed["model"].items())
    curves = list(csv.DictReader(open(tmp_path / "models" / "curves.csv")))
    assert [int(row["epoch"]) for row in curves] == [1, 2, 3], "the resumed run continues the killed run's curves"
    assert [float(row["train_loss"]) for row in curves[:2]] == pytest.approx(
        [row["train_loss"] for row in saved["curves"]["rows"]]
    )


def test_resume_without_checkpoint_says_so(repo_root, synthetic_tree, datalist_file, tmp_path):
    wf = workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, resume=True))
    with pytest.raises(Exception) as excinfo:
        wf.initialize()
    assert "FileNotFoundError: no loadable checkpoint_epoch=*.pt in" in raised_messages(excinfo)


def test_resume_loads_onto_the_device_given_as_a_string(repo_root, synthetic_tree, datalist_file, tmp_path):
    """`--device cpu` on the command line is a string, not a torch.device: every use of the id must take it."""
    first = workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file))
    first.initialize()
    first.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate()
    )
    first.run()
    wf = workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, device="cpu", resume=True))
    run_all(wf)
    assert wf.parser.get_parsed_content("train#checkpoint_loader").map_location == "cpu"
    assert wf.parser.get_parsed_content("train#trainer").state.epoch == 2


def test_same_seed_gives_identical_runs(repo_root, synthetic_tree, datalist_file, tmp_path):
    for name in ("a", "b"):
        run_all(workflow(repo_root, tmp_path / name, **tiny(synthetic_tree, datalist_file, epochs=1)))
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "override, error, message",
    [
        ({"fold": 7}, ValueError, "fold 7 is not in"),
        ({"data_list_file_path": "/nonexistent/datalist.json"}, FileNotFoundError, "prepare_datalist"),
        ({"spatial_size": [32, 32, 30]}, ValueError, "divisible by 16"),
        ({"lesion_threshold": 1.01}, ValueError, "at or above 1 every mask is empty"),
        ({"lesion_threshold": 0}, ValueError, "at or below 0 every mask is full"),
    ],
    ids=["unknown_fold", "missing_datalist", "spatial_size", "threshold_above_1", "threshold_0"],
)
def test_bad_config_values_fail_clearly(repo_root, synthetic_tree, datalist_file, tmp_path, override, error, message):
    wf = workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, **override))
    with pytest.raises(Exception) as excinfo:
        initialize_and_run(wf)
    assert f"{error.__name__}: " in raised_messages(excinfo) and message in raised_messages(excinfo)
    assert not os.path.exists(tmp_path / "models" / "model.pt")


def test_demo_learns(demo_run):
    """A shorter demo through `monai.bundle run`: validation Dice well above trivial all-background/all-lesion."""
    bundle_root, result, _ = demo_run
    assert "best model:" in result.stdout and "TensorBoard logs:" in result.stdout
    datalist = json.load(open(bundle_root / "demo_data" / "datalist.json"))
    assert len(datalist["training"]) == 12
    dice = float(result.stdout.rsplit("| best val_mean_dice ", 1)[1].split()[0])
    # all-lesion guess: Dice = 2|L| / (|L| + N) on the validation fold's labels; all-background scores 0
    fractions = [
        np.asanyarray(nib.load(bundle_root / "demo_data" / "isles" / item["label"]).dataobj).mean()
        for item in datalist["training"]
        if item["fold"] == 0
    ]
    all_lesion = max(2 * f / (f + 1) for f in fractions)
    assert dice > max(0.1, 5 * all_lesion), (dice, all_lesion)


def killed_after(repo_root, bundle_root, synthetic_tree, datalist_file, epoch, **override):
    """A run of train.json stopped at the end of ``epoch`` (its checkpoint written), as a kill there would leave it."""
    wf = workflow(repo_root, bundle_root, **tiny(synthetic_tree, datalist_file, **override))
    wf.initialize()
    wf.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.EPOCH_COMPLETED(once=epoch), lambda engine: engine.terminate()
    )
    wf.run()
    release_folder(wf.parser.get_parsed_content("ckpt_dir"))  # a killed process's OS lock is freed with it
    return wf


def test_a_second_run_never_replaces_a_trained_model_unasked(repo_root, synthetic_tree, datalist_file, tmp_path):
    killed_after(repo_root, tmp_path, synthetic_tree, datalist_file, 1, epochs=3)
    model, latest = tmp_path / "models" / "model.pt", tmp_path / "models" / "checkpoint_epoch=1.pt"
    before = model.read_bytes()
    with pytest.raises(Exception) as excinfo:
        workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file)).initialize()
    message = raised_messages(excinfo)
    assert (
        f"FileExistsError: {model} exists" in message and "--resume true" in message and "--overwrite true" in message
    )
    assert model.read_bytes() == before and latest.exists()
    with pytest.raises(Exception) as excinfo:
        workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, resume=True, overwrite=True)).initialize()
    assert "pass one of them" in raised_messages(excinfo)

    wf = workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, epochs=1, overwrite=True))
    wf.initialize()
    assert not latest.exists(), "the replaced run's checkpoint is gone: a later --resume must not continue it"
    assert model.read_bytes() == before, "the earlier model stays until this run's first validation replaces it"
    inference = ConfigWorkflow(
        config_file=os.path.join(repo_root, "configs", "inference.json"),
        workflow_type="infer",
        ckpt_dir=str(tmp_path / "models"),
    )
    with pytest.raises(Exception) as excinfo:  # meanwhile no prediction passes it off as the new run's model
        inference.parser.get_parsed_content("checkpoints")
    assert f"{model} is outdated" in raised_messages(excinfo) and "--resume true" in raised_messages(excinfo)
    wf.run()
    assert model.read_bytes() != before and latest.exists()
    assert inference.parser.get_parsed_content("checkpoints", lazy=False) == [str(model)]


@pytest.mark.parametrize("epochs, val_interval, validated", [(1, 5, [1]), (3, 2, [2, 3]), (4, 2, [2, 4])])
def test_a_finished_run_is_validated_at_its_last_epoch_whatever_the_interval(
    repo_root, synthetic_tree, datalist_file, tmp_path, epochs, val_interval, validated
):
    wf = workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, epochs=epochs, val_interval=val_interval))
    wf.initialize()
    seen = []
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    evaluator.add_event_handler(Events.COMPLETED, lambda engine: seen.append(engine.state.epoch))
    wf.run()
    assert seen == validated
    assert (tmp_path / "models" / "model.pt").is_file(), "a finished run always has its model"


def test_resume_keeps_the_best_validation_so_far(repo_root, synthetic_tree, datalist_file, tmp_path):
    """A resumed run compares its validations with the best one before the kill, and replaces model.pt only for a
    better one (the best so far is set out of reach here, so no resumed epoch may replace model.pt)."""
    killed_after(repo_root, tmp_path, synthetic_tree, datalist_file, 2, epochs=4)
    path = tmp_path / "models" / "checkpoint_epoch=2.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["validation"]["best_metric_epoch"] in (1, 2)
    state["validation"]["best_metric"] = 2.0
    state["validation"]["saver"]["_saved"] = [(2.0, name) for _, name in state["validation"]["saver"]["_saved"]]
    torch.save(state, path)
    model = (tmp_path / "models" / "model.pt").read_bytes()

    wf = run_all(workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, epochs=4, resume=True)))
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.epoch == 4, "the resumed run validated epochs 3 and 4"
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (
        2.0,
        state["validation"]["best_metric_epoch"],
    )
    assert (tmp_path / "models" / "model.pt").read_bytes() == model


def test_resume_refuses_other_epochs_and_finished_runs(repo_root, synthetic_tree, datalist_file, tmp_path):
    killed_after(repo_root, tmp_path, synthetic_tree, datalist_file, 1, epochs=2)
    with pytest.raises(Exception) as excinfo:
        workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, epochs=5, resume=True)).initialize()
    assert "is from a run of 2 epochs" in raised_messages(excinfo) and "--epochs 2" in raised_messages(excinfo)
    run_all(workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, epochs=2, resume=True)))
    with pytest.raises(Exception) as excinfo:
        workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, epochs=2, resume=True)).initialize()
    assert "finished all its 2 epochs" in raised_messages(excinfo)


def test_resume_falls_back_from_a_damaged_checkpoint(repo_root, synthetic_tree, datalist_file, tmp_path, capsys):
    killed_after(repo_root, tmp_path, synthetic_tree, datalist_file, 1, epochs=3)
    damaged = tmp_path / "models" / "checkpoint_epoch=2.pt"
    damaged.write_bytes(b"")  # what MONAI's own saver leaves when killed while writing
    wf = workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, epochs=3, resume=True))
    wf.initialize()
    assert f"cannot resume from {damaged} (EOFError: the file is empty)" in capsys.readouterr().out  # bundle logging
    trainer = wf.parser.get_parsed_content("train#trainer")
    started = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: started.append(engine.state.epoch))
    wf.run()
    assert started == [2, 3]


# Run in a subprocess: train.json through monai.bundle, with torch.save replaced by one that writes a part of the
# file and then kills the process (SIGKILL) on the KILL_AT-th save.
DYING_SAVE = """
import os, signal, sys
import torch
sys.path.insert(0, os.getcwd())
saves, save = [0], torch.save
def dying_save(obj, f, *args, **kwargs):
    saves[0] += 1
    if saves[0] == int(os.environ["KILL_AT"]):
        out = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        out.write(b"PK" + bytes(500))
        out.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *args, **kwargs)
torch.save = dying_save
from monai.bundle.scripts import run
run(sys.argv[1], config_file="configs/train.json", meta_file="configs/metadata.json", **eval(sys.argv[2]))
"""


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 5])
def test_a_kill_while_a_checkpoint_is_written_leaves_loadable_files(
    repo_root, synthetic_tree, datalist_file, tmp_path, kill_at
):
    """Per validated epoch the run saves model.pt (when the metric improves), then checkpoint_epoch=N.pt; the kill
    lands in one of them (5 epochs: at least 6 saves, whatever the metric does). Every file left loads; a resume
    continues from the latest checkpoint or, before the first one, says there is none, and a new run then replaces
    the killed one."""
    script = tmp_path / "dying_save.py"
    script.write_text(DYING_SAVE)
    override = {**tiny(synthetic_tree, datalist_file, epochs=5), "bundle_root": str(tmp_path)}

    def run(kill_at, **extra):
        return subprocess.run(
            [sys.executable, str(script), "training", repr({**override, **extra})],
            cwd=repo_root,
            env={**os.environ, "KILL_AT": str(kill_at)},
            capture_output=True,
            text=True,
            timeout=600,
        )

    killed = run(kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    models = tmp_path / "models"
    for path in glob.glob(str(models / "*.pt")):
        torch.load(path, map_location="cpu", weights_only=True)
    latest = glob.glob(str(models / "checkpoint_epoch=*.pt"))
    resumed = run(0, resume=True)
    if latest:
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    else:
        assert resumed.returncode != 0 and "no loadable checkpoint_epoch=*.pt in" in resumed.stderr
        restarted = run(0, overwrite=True)
        assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert os.path.exists(models / "checkpoint_epoch=5.pt")
    torch.load(models / "model.pt", map_location="cpu", weights_only=True)


def test_a_non_finite_loss_stops_training_before_anything_is_saved(repo_root, synthetic_tree, datalist_file, tmp_path):
    wf = workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, learning_rate=1e30))
    wf.initialize()
    with pytest.raises(Exception) as excinfo:
        wf.run()
    assert re.search(r"FloatingPointError: training loss is nan at epoch 1, iteration \d", raised_messages(excinfo))
    assert glob.glob(str(tmp_path / "models" / "*.pt")) == []


def test_a_flt_max_marker_never_reaches_the_network(repo_root, synthetic_tree, tmp_path):
    """A float32 'no value' marker (FLT_MAX) in a Tmax map: the check names the file; without the check, the
    pipeline names the case and the map (a float32 z-score of it is NaN) before training starts."""
    tree = tmp_path / "isles"
    shutil.copytree(synthetic_tree, tree)
    (tmax,) = glob.glob(str(tree / "TRAINING" / "case_3" / "*.CT_Tmax.*" / "*.nii"))
    img = nib.load(tmax)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data.flat[:20] = np.finfo(np.float32).max
    nib.save(nib.Nifti1Image(data, img.affine), tmax)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(build_datalist(str(tree), folds=3, seed=0)))
    for check, message in (
        (True, f"InvalidCaseError: case_3: Tmax file {tmax} has 20 values beyond"),
        (False, "ValueError: case_3: the input 'image' holds NaN or Inf in channel(s) Tmax"),
    ):
        wf = workflow(repo_root, tmp_path / str(check), **tiny(str(tree), str(datalist), check_inputs=check))
        with pytest.raises(Exception) as excinfo:
            initialize_and_run(wf)
        assert message in raised_messages(excinfo)
        assert glob.glob(str(tmp_path / str(check) / "models" / "*.pt")) == []


def bundle_training(repo_root, bundle_root, synthetic_tree, datalist_file, **override):
    """`python -m monai.bundle run training` with train.json, as a user types it (values as text)."""
    args = {**tiny(synthetic_tree, datalist_file), "bundle_root": str(bundle_root), **override}
    cmd = bundle_run_command("training", "configs/train.json", meta_file="configs/metadata.json", **args)
    return subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_flags_typed_false_on_the_command_line_are_false(repo_root, synthetic_tree, datalist_file, tmp_path):
    """`--overwrite false` reaches the config as the text 'false', which Python takes for true."""
    killed_after(repo_root, tmp_path, synthetic_tree, datalist_file, 1, epochs=2)
    before = (tmp_path / "models" / "model.pt").read_bytes()
    _, stderr = bundle_training(
        repo_root, tmp_path, synthetic_tree, datalist_file, epochs=2, resume="false", overwrite="false"
    ).communicate(timeout=600)
    assert "FileExistsError" in stderr and "holds an earlier training run" in stderr, stderr[-2000:]
    assert (tmp_path / "models" / "model.pt").read_bytes() == before


def test_kill_9_at_random_moments_then_resume(repo_root, synthetic_tree, datalist_file, tmp_path):
    """SIGKILL of `monai.bundle run training` at seeded random moments: once in its start-up (about 4 s here), then
    twice at a random moment within 0.3 s of a checkpoint it saved (an epoch with its validation and checkpoints
    takes about 0.1 s). After each kill every checkpoint and model.pt there loads, and the next start resumes (or,
    before the first checkpoint, starts again) until the run is done."""
    rng = np.random.default_rng(12)
    models, kills = tmp_path / "models", 3
    for start in range(kills + 1):
        before = set(glob.glob(str(models / "checkpoint_epoch=*.pt")))
        mode = {"resume": True} if before else {"overwrite": True}
        process = bundle_training(repo_root, tmp_path, synthetic_tree, datalist_file, epochs=40, **mode)
        wait = float(rng.uniform(0.5, 3.5)) if start == 0 else 0.05
        deadline = time.monotonic() + 300
        while start < kills:
            try:
                process.communicate(timeout=wait)  # retried on timeout without losing output (subprocess docs)
                pytest.fail(f"start {start} ended before it could be killed")
            except subprocess.TimeoutExpired:
                pass
            if start == 0 or set(glob.glob(str(models / "checkpoint_epoch=*.pt"))) - before:
                time.sleep(0 if start == 0 else float(rng.uniform(0, 0.3)))
                process.kill()  # SIGKILL
                break
            assert time.monotonic() < deadline, f"start {start} saved no checkpoint in 300 s"
        _, stderr = process.communicate(timeout=600)
        for path in glob.glob(str(models / "*.pt")):
            torch.load(path, map_location="cpu", weights_only=True)
        assert process.returncode == (0 if start == kills else -9), stderr[-2000:]
    final = torch.load(models / "checkpoint_epoch=40.pt", map_location="cpu", weights_only=True)
    assert final["trainer"]["iteration"] == 40 * final["trainer"]["epoch_length"]


def test_one_run_per_checkpoint_folder_and_a_killed_runs_lock_is_taken_over(
    repo_root, synthetic_tree, datalist_file, tmp_path
):
    """A second training into the ckpt_dir of a running one is refused, naming its process; once that run is
    killed (-9), its lock is taken over and the folder is usable again."""
    import signal

    settings = tiny(synthetic_tree, datalist_file, bundle_root=tmp_path, epochs=500)
    cmd = bundle_run_command("training", "configs/train.json", **settings)
    first = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / "models" / ".in_use"
    deadline = time.monotonic() + 300
    while not lock.exists() and time.monotonic() < deadline:
        assert first.poll() is None, "the first run ended before it could be seen running"
        time.sleep(0.05)
    try:
        with pytest.raises(Exception) as excinfo:
            workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, overwrite=True)).initialize()
        assert f"is in use by another run (process {first.pid}" in raised_messages(excinfo)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock.exists(), "a killed run leaves its lock"
    run_all(workflow(repo_root, tmp_path, **tiny(synthetic_tree, datalist_file, overwrite=True)))
    assert (tmp_path / "models" / "model.pt").is_file()

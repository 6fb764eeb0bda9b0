"""nnU-Net v2 as the peer: the bundle's networks, nnU-Net and the threshold core on the same held-out cases.

    bash benchmarks/peers-env    # once: nnU-Net's own environment (.venv-nnunet), never the bundle's
    python benchmarks/peers.py --dataset_dir D --output_dir OUT [--fold 0] [--profile demo|isles24|isles24_native]
        [--datalist FILE] [--seed 0] [--threads N] [--nnunet_configuration 2d] [--nnunet_batch_size 4]
        [--nnunet_iterations 20] [--nnunet_val_iterations 2] [--nnunet_data_processes 1] [--budget_factors "[1]"]
        [--budget_clock wall|cpu] [--data_label TEXT] [--overwrite true] [--ID VALUE ...]

One fold of the datalist (built from ``D`` with 5 folds by patient, as the demo and scripts.tools.prepare_datalist
build it, or ``--datalist``), and in ``OUT``:
- the bundle's modified and classic networks, each trained, evaluated and run for inference through its own configs
  (``python -m monai.bundle run training`` / ``evaluating`` / ``run``: configs/train.json or configs/inference.json +
  configs/evaluate.json, + configs/classic_unet.json for the classic one, + the profile's config), training and
  inference timed as whole commands; any ``--ID VALUE`` goes to those runs as a config override;
- nnU-Net v2: the same tree as nnU-Net's raw dataset (``nnunet_raw_dataset``: dataset.json, imagesTr with one file
  per channel, labelsTr, and the bundle's folds as ``splits_final.json``), planned and preprocessed, trained on the CPU
  by ``nnUNetTrainerWallClock`` (benchmarks/peers_nnunet.py) for the wall-clock time the modified network's training
  took (times each of ``--budget_factors``), then predicting the fold's held-out cases; all in nnU-Net's own
  environment (``--nnunet_python``), as subprocesses;
- the per-voxel classifier of benchmarks/voxel_classifier.py, fitted on the fold's training cases (its fit and
  prediction timed in-process: wall-clock for both columns);
- the threshold core (rCBF < 30 %), which the bundle's evaluation scores as a baseline;
all scored with scripts.report.metrics.score_case on each case's own grid: ``per_case.csv``, ``table.md`` (means over
the cases), ``results.json``. nnU-Net's masks are scored here (``score_case``); the bundle's rows are its evaluation's
own figures, and ``score_case`` is checked against them on the masks that evaluation wrote.

``--budget_clock cpu`` gives nnU-Net's training the CPU seconds (user + system, of every process of the command) that
the modified network's training took instead of its wall-clock time: on a machine that other work shares, each
process gets a share of the cores that changes from minute to minute, so equal wall-clock is not equal work.
``--threads N`` runs every process with N OpenMP/MKL threads (and nnU-Net's planning with N processes): on a machine
that other work shares, 2-thread kernels wait on each other's time slices. ``--nnunet_data_processes``: nnU-Net's
background processes for data augmentation (0: in its training process, as the demo's ``num_workers`` 0).
Each step leaves a marker file; a rerun with the same settings skips the steps done, one with other settings (or of a
finished run) needs ``--overwrite true``, which removes ``OUT`` first (only a folder that this script wrote).
Not part of the tests: no timing is asserted anywhere.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from monai.bundle import ConfigParser  # noqa: E402
from monai.data.utils import affine_to_spacing  # noqa: E402
from scripts.data.datalist import build_datalist, case_name, load_fold, load_section  # noqa: E402
from scripts.flags import as_bool  # noqa: E402
from scripts.report import metrics  # noqa: E402
from scripts.report.cases import MASKS, PER_CASE, THRESHOLD_CORE  # noqa: E402
from scripts.report.tables import read_csv, write_csv  # noqa: E402
from scripts.safe_files import LOCK, hold_folder, write_atomically  # noqa: E402
from scripts.tools.cli import run  # noqa: E402
from scripts.tools.cross_validate import EVALUATE, NETWORKS, PROFILES, TRAIN, check_overrides  # noqa: E402

from benchmarks import voxel_classifier  # noqa: E402

DATASET_ID = 501
DATASET_NAME = f"Dataset{DATASET_ID}_Peers"
DRIVER = os.path.join(REPO_ROOT, "benchmarks", "peers_nnunet.py")
# nnU-Net picks each channel's normalisation by its name in dataset.json: "CT" is its CT scheme (clipping to the
# foreground's 0.5-99.5 percentiles, then the foreground's mean and deviation); any other name is a per-case z-score
NNUNET_CHANNEL_NAMES = {"CT": "CT", "CTA": "CT"}
TABLE_METRICS = {
    "dice": "Dice",
    "lesion_f1": "lesion F1",
    "lesion_count_diff": "count difference",
    "volume_abs_diff_ml": "volume difference (mL)",
}
SETTINGS_FILE, FINISHED_FILE = "peers.json", "table.md"
THRESHOLD_CORE_NAME = "threshold core (rCBF < 30 %)"


def _write_json(path, content):
    write_atomically(path, lambda f: f.write((json.dumps(content, indent=2) + "\n").encode()))


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _save_nifti_gz(path, image):
    """``image`` as one gzipped NIfTI file at ``path``, written whole (temporary name, then rename)."""
    write_atomically(path, lambda f: f.write(gzip.compress(image.to_bytes(), compresslevel=1)))


def nnunet_raw_dataset(datalist_path, dataset_dir, raw_dir, description) -> dict:
    """Write the labelled cases of a datalist as nnU-Net v2's raw dataset ``raw_dir`` (``DatasetNNN_Name``).

    Each case (identifier: its ``case_name``) becomes ``imagesTr/<case>_<i:04d>.nii.gz``, one file per channel in the
    datalist's ``channels`` order, voxels and header as read, and ``labelsTr/<case>.nii.gz``, the label as uint8 0/1
    (lesion wherever positive, as the bundle reads it) on the label's grid. ``dataset.json`` names the channels
    (``NNUNET_CHANNEL_NAMES``: nnU-Net's CT normalisation for CT and CTA, a z-score for the maps) and the labels
    (background 0, lesion 1); ``splits_final.json`` holds the datalist's folds in order, fold ``k`` validating on the
    cases of fold ``k`` and training on the others, as the bundle's fold ``k`` does.

    Args:
        datalist_path: the datalist (``training`` items with ``fold``).
        dataset_dir: the folder its paths are relative to.
        raw_dir: the dataset folder to write (created; files in it are replaced).
        description: dataset.json's description.

    Returns:
        ``{"channels": [...], "folds": {fold: {"train": [...], "val": [...]}}, "files": {case: {"images": [...],
        "label": path}}}`` (paths of the written files).
    """
    channels = list(_read_json(datalist_path).get("channels", []))
    items = load_section(datalist_path, dataset_dir, section="training", channels=channels)
    files = {}
    for item in items:
        case = case_name(item["image"])
        images = [os.path.join(raw_dir, "imagesTr", f"{case}_{i:04d}.nii.gz") for i in range(len(channels))]
        for source, target in zip(item["image"], images):
            _save_nifti_gz(target, nib.load(source))
        label = nib.load(item["label"])
        mask = (np.asanyarray(label.dataobj) > 0).astype(np.uint8)
        header = label.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)
        label_path = os.path.join(raw_dir, "labelsTr", f"{case}.nii.gz")
        _save_nifti_gz(label_path, nib.Nifti1Image(mask, label.affine, header))
        files[case] = {"images": images, "label": label_path, "fold": item["fold"]}
    folds = {
        fold: {
            "train": sorted(c for c, f in files.items() if f["fold"] != fold),
            "val": sorted(c for c, f in files.items() if f["fold"] == fold),
        }
        for fold in sorted({f["fold"] for f in files.values()})
    }
    dataset_json = {
        "name": os.path.basename(raw_dir),
        "description": description,
        "channel_names": {str(i): NNUNET_CHANNEL_NAMES.get(c, c) for i, c in enumerate(channels)},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": len(files),
        "file_ending": ".nii.gz",
    }
    _write_json(os.path.join(raw_dir, "dataset.json"), dataset_json)
    # nnU-Net's fold k is the k-th entry: one entry per fold number, from 0, as the datalist's folds are numbered
    if list(folds) != list(range(len(folds))):
        raise ValueError(f"{datalist_path}: folds {list(folds)} are not numbered 0 to {len(folds) - 1}")
    _write_json(os.path.join(raw_dir, "splits_final.json"), [folds[k] for k in sorted(folds)])
    return {"channels": channels, "folds": folds, "files": files}


def score_case(prediction_path, label_path) -> dict:
    """Every metric of scripts.report.metrics.score_case for one predicted mask against its label, on the label's grid
    (the scan's own), as configs/evaluate.json computes them: lesion wherever a voxel is positive, the voxel spacing
    from the affine.

    Raises:
        ValueError: when the mask is not on the label's grid (shape or affine).
    """
    label, prediction = nib.load(label_path), nib.load(prediction_path)
    if prediction.shape != label.shape or not np.allclose(prediction.affine, label.affine, atol=1e-3):
        raise ValueError(
            f"{prediction_path}: shape {prediction.shape}, affine {prediction.affine.tolist()} is not the grid of"
            f" {label_path} (shape {label.shape}, affine {label.affine.tolist()})"
        )
    spacing = [float(s) for s in affine_to_spacing(torch.as_tensor(label.affine), r=3)]
    return metrics.score_case(*(np.asanyarray(i.dataobj) > 0 for i in (prediction, label)), spacing)


def _child_env(threads, **variables):
    """The environment of every process this script starts: its own, with ``variables``, and with ``threads`` (when
    set) as the OpenMP and MKL thread counts, which torch's CPU kernels take."""
    limits = {} if threads is None else {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return {**os.environ, **limits, **variables}


def _timed(cmd, log_path, env):
    """Run ``cmd`` from the repository root, its output appended to ``log_path``; returns its wall-clock seconds and
    the CPU seconds (user + system) of it and the processes it waited for."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        started, cpu_started = time.monotonic(), _children_cpu_seconds()
        result = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
        timing = {"seconds": time.monotonic() - started, "cpu_seconds": _children_cpu_seconds() - cpu_started}
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[:6])} ...` failed (exit {result.returncode}); see {log_path}")
    return timing


def _children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _as_text(value):
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


def _bundle_run(run_id, files, overrides, log_path, env):
    """``python -m monai.bundle run RUN_ID`` of the config ``files`` with the ``overrides`` they define, timed."""
    parser = ConfigParser()
    parser.read_config(files)
    args = [x for key, value in overrides.items() if key in parser for x in (f"--{key}", _as_text(value))]
    command = [sys.executable, "-m", "monai.bundle", "run", *([run_id] if run_id else [])]
    return _timed([*command, "--config_file", repr(files), *args], log_path, env)


def _config_files(base, network, profile):
    return [os.path.join(REPO_ROOT, f) for f in base + NETWORKS[network] + PROFILES[profile]]


def network_name(network, profile) -> str:
    """The ``network_name`` of the config that builds ``network`` (the name every output gives it)."""
    parser = ConfigParser()
    parser.read_config(_config_files(TRAIN, network, profile))
    return parser.get_parsed_content("network_name")


def _step(marker, work):
    """``work()``'s result, stored in ``marker`` with the machine's 1-minute load average before and after it; an
    earlier run's stored result when ``marker`` exists."""
    if os.path.isfile(marker):
        return _read_json(marker)
    before = os.getloadavg()[0]
    result = {**work(), "load_average": [before, os.getloadavg()[0]]}
    _write_json(marker, result)
    return result


def _bundle_network(out, network, profile, common, heldout_path, env):
    """Train, evaluate and run inference of one of the bundle's networks; their stored results."""
    folder = os.path.join(out, "bundle", network)
    os.makedirs(folder, exist_ok=True)
    log = os.path.join(folder, "log.txt")
    paths = {
        "ckpt_dir": os.path.join(folder, "models"),
        "output_dir": os.path.join(folder, "runs"),
        "overwrite": True,  # a step without its marker left incomplete outputs
    }
    trained = _step(
        os.path.join(folder, "trained.json"),
        lambda: _bundle_run("training", _config_files(TRAIN, network, profile), {**common, **paths}, log, env),
    )
    evaluation = {**common, **paths, "prediction_dir": os.path.join(folder, "eval"), "eval_section": "validation"}
    _step(
        os.path.join(folder, "evaluated.json"),
        lambda: _bundle_run("evaluating", _config_files(EVALUATE, network, profile), evaluation, log, env),
    )
    inference = {**common, **paths, "dataset_dir": heldout_path, "prediction_dir": os.path.join(folder, "predictions")}
    inferred = _step(
        os.path.join(folder, "inferred.json"),
        lambda: _bundle_run(None, _config_files(EVALUATE[:1], network, profile), inference, log, env),
    )
    return {
        "folder": folder,
        "train": [trained["seconds"], trained["cpu_seconds"]],
        "train_load_average": trained["load_average"],
        "inference": [inferred["seconds"], inferred["cpu_seconds"]],
    }


def _nnunet(out, settings, datalist_path, budgets, heldout):
    """nnU-Net's raw dataset, planning and preprocessing, then one training and prediction per budget."""
    folder = os.path.join(out, "nnunet")
    env = _child_env(
        settings["threads"],
        nnUNet_raw=os.path.join(folder, "raw"),
        nnUNet_preprocessed=os.path.join(folder, "preprocessed"),
        nnUNet_results=os.path.join(folder, "results"),
        nnUNet_n_proc_DA=str(settings["nnunet_data_processes"]),
    )
    os.makedirs(folder, exist_ok=True)
    log = os.path.join(folder, "log.txt")
    python, configuration, clock = settings["nnunet_python"], settings["nnunet_configuration"], settings["budget_clock"]
    raw_dir = os.path.join(env["nnUNet_raw"], DATASET_NAME)
    description = f"{settings['dataset_dir']} ({settings['data_label']}), fold {settings['fold']} held out"
    converted = _step(
        os.path.join(folder, "converted.json"),
        lambda: nnunet_raw_dataset(datalist_path, settings["dataset_dir"], raw_dir, description),
    )

    def driver(step, *args):
        result = os.path.join(folder, f".{step}-result.json")
        timing = _timed([python, DRIVER, step, *map(str, args), "--result", result], log, env)
        return {"command": [timing["seconds"], timing["cpu_seconds"]], **_read_json(result)}

    planned = _step(
        os.path.join(folder, "planned.json"),
        lambda: driver(
            "plan",
            *("--dataset_id", DATASET_ID, "--configuration", configuration),
            *("--processes", settings["threads"] or os.cpu_count()),
        ),
    )
    runs = []
    for factor, budget in budgets:
        run_dir = os.path.join(folder, f"budget{factor:g}x")
        os.makedirs(run_dir, exist_ok=True)
        trained = _step(
            os.path.join(run_dir, "trained.json"),
            lambda: driver(
                "train",
                *("--dataset_id", DATASET_ID, "--configuration", configuration, "--fold", settings["fold"]),
                *(("--deadline", time.time() + budget) if clock == "wall" else ("--cpu_budget", budget)),
                *("--iterations", settings["nnunet_iterations"]),
                *("--val_iterations", settings["nnunet_val_iterations"], "--batch_size", settings["nnunet_batch_size"]),
            ),
        )
        # the trainer's folder is named by trainer, plans and configuration: each budget moves its model aside
        model_dir = os.path.join(run_dir, "model")
        if not os.path.isdir(model_dir):
            shutil.move(trained["model_dir"], model_dir)
        predictions = os.path.join(run_dir, "predictions")
        cases_file = os.path.join(run_dir, "cases.json")
        _write_json(
            cases_file,
            {
                "inputs": [converted["files"][case]["images"] for case in heldout],
                "outputs": [os.path.join(predictions, case) for case in heldout],
            },
        )
        predicted = _step(
            os.path.join(run_dir, "predicted.json"),
            lambda: driver("predict", "--model_dir", model_dir, "--fold", settings["fold"], "--cases", cases_file),
        )
        runs.append({"factor": factor, "budget_s": budget, "train": trained, "predict": predicted, "folder": run_dir})
    return {"plan": planned["command"], "runs": runs}


def _nnunet_version(python):
    cmd = [python, "-c", "from importlib.metadata import version; print(version('nnunetv2'))"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def _mean(rows, metric):
    values = [float(r[metric]) for r in rows if not math.isnan(float(r[metric]))]
    return sum(values) / len(values) if values else math.nan


def _markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]) + "\n"


def _prepare_output(output_dir, settings, overwrite):
    """Reuse ``output_dir`` for the same settings (a finished one only with ``overwrite``), else refuse; with
    ``overwrite`` remove a folder this script wrote (``peers.json`` in it), never another."""
    settings_path = os.path.join(output_dir, SETTINGS_FILE)
    if os.path.isdir(output_dir) and set(os.listdir(output_dir)) - {LOCK}:
        earlier = _read_json(settings_path) if os.path.isfile(settings_path) else None
        if earlier is None:
            raise FileExistsError(f"{output_dir} holds files this script did not write; choose another --output_dir")
        finished = os.path.isfile(os.path.join(output_dir, FINISHED_FILE))
        if not overwrite and (earlier != settings or finished):
            what = "a finished run" if earlier == settings else f"a run with other settings ({settings_path})"
            raise FileExistsError(f"{output_dir} holds {what}; choose another --output_dir or pass --overwrite true")
        if overwrite:
            for name in set(os.listdir(output_dir)) - {LOCK}:
                path = os.path.join(output_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    hold_folder(output_dir)
    _write_json(settings_path, settings)


def peers(
    dataset_dir,
    output_dir,
    fold=0,
    profile="demo",
    datalist=None,
    seed=0,
    data_label=None,
    threads=None,
    nnunet_python=".venv-nnunet/bin/python",
    nnunet_configuration="2d",
    nnunet_batch_size=4,
    nnunet_iterations=20,
    nnunet_val_iterations=2,
    nnunet_data_processes=1,
    budget_factors=(1,),
    budget_clock="wall",
    overwrite=False,
    **overrides,
):
    """Run every step (see the module docstring) and write the tables; returns ``results.json``'s content."""
    if profile not in PROFILES or profile is None:
        raise ValueError(f"--profile must be one of {', '.join(p for p in PROFILES if p)}, got {profile!r}")
    dataset_dir, output_dir = os.path.abspath(dataset_dir), os.path.abspath(output_dir)
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"--dataset_dir {dataset_dir} is not a folder")
    nnunet_python = os.path.join(REPO_ROOT, nnunet_python)
    if not os.access(nnunet_python, os.X_OK):
        raise FileNotFoundError(f"--nnunet_python {nnunet_python} not found; build it with: bash benchmarks/peers-env")
    if nnunet_configuration not in ("2d", "3d_fullres", "3d_lowres"):
        raise ValueError(f"--nnunet_configuration must be 2d, 3d_fullres or 3d_lowres, got {nnunet_configuration!r}")
    factors = [float(f) for f in ([budget_factors] if isinstance(budget_factors, (int, float)) else budget_factors)]
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"--threads must be a positive integer, got {threads!r}")
    if budget_clock not in ("wall", "cpu"):
        raise ValueError(f"--budget_clock must be wall or cpu, got {budget_clock!r}")
    if not factors or min(factors) <= 0:
        raise ValueError(f"--budget_factors must be positive numbers, got {budget_factors!r}")
    check_overrides(overrides, list(NETWORKS), profile)
    built = None if datalist else build_datalist(dataset_dir, folds=5, seed=seed, check=True)
    synthetic = profile == "demo" or "synthetic" in dataset_dir.lower()
    settings = {
        "dataset_dir": dataset_dir,
        "fold": fold,
        "profile": profile,
        "datalist": os.path.abspath(datalist) if datalist else None,
        "seed": seed,
        "data_label": data_label or ("synthetic data" if synthetic else dataset_dir),
        "threads": threads,
        "nnunet_python": nnunet_python,
        "nnunet_configuration": nnunet_configuration,
        "nnunet_batch_size": nnunet_batch_size,
        "nnunet_iterations": nnunet_iterations,
        "nnunet_val_iterations": nnunet_val_iterations,
        "nnunet_data_processes": nnunet_data_processes,
        "budget_factors": factors,
        "budget_clock": budget_clock,
        "overrides": overrides,
    }
    _prepare_output(output_dir, settings, as_bool(overwrite, "overwrite"))
    datalist_path = os.path.join(output_dir, "datalist.json")
    if not os.path.isfile(datalist_path):
        if datalist:
            shutil.copyfile(datalist, datalist_path)
        else:
            _write_json(datalist_path, built)
    channels = _read_json(datalist_path).get("channels")
    heldout_items = load_fold(datalist_path, dataset_dir, fold, channels=channels)["validation"]
    heldout = [case_name(item["image"]) for item in heldout_items]
    labels = {case_name(item["image"]): item["label"] for item in heldout_items}
    heldout_path = os.path.join(output_dir, "heldout.json")
    testing = [{"image": item["image"]} for item in heldout_items]
    _write_json(heldout_path, {"channels": channels, "testing": testing})
    common = {
        **overrides,
        "dataset_dir": dataset_dir,
        "data_list_file_path": datalist_path,
        "fold": fold,
        "seed": seed,
        "prepare_data": "[]",
    }
    env = _child_env(threads)
    bundle = {net: _bundle_network(output_dir, net, profile, common, heldout_path, env) for net in NETWORKS}
    budget_s = bundle["modified"]["train"][0 if budget_clock == "wall" else 1]
    nnunet = _nnunet(output_dir, settings, datalist_path, [(f, f * budget_s) for f in factors], heldout)
    voxel = voxel_classifier.evaluate(datalist_path, dataset_dir, fold, channels)
    return _write_tables(output_dir, settings, bundle, nnunet, voxel, heldout, labels)


def _write_tables(out, settings, bundle, nnunet, voxel, heldout, labels):
    """per_case.csv, results.json and table.md (written last: it marks the run finished)."""
    per_case, rows, checks, loads = [], [], {}, {}
    clock = {"wall": "wall-clock", "cpu": "CPU"}[settings["budget_clock"]]  # what the budget counts
    names = {net: network_name(net, settings["profile"]) for net in bundle}
    for net, result in bundle.items():
        report = read_csv(os.path.join(result["folder"], "eval", PER_CASE))
        evaluated = [{"case": r["case"], **{m: r[m] for m in metrics.METRIC_NAMES}} for r in report]
        per_case += [{"method": names[net], **r} for r in evaluated]
        # score_case against the evaluation's own figures, on the masks that evaluation wrote
        own = {r["case"]: r for r in evaluated}
        masks = os.path.join(result["folder"], "eval", MASKS)
        checks[names[net]] = max(
            abs(score_case(os.path.join(masks, f"{c}.nii.gz"), labels[c])[m] - float(own[c][m]))
            for c in heldout
            for m in TABLE_METRICS
        )
        rows.append((names[net], evaluated, result["train"], [t / len(heldout) for t in result["inference"]]))
        loads[names[net]] = result["train_load_average"]
    report = read_csv(os.path.join(bundle["modified"]["folder"], "eval", PER_CASE))
    baseline = [{"case": r["case"], **{m: r[f"{THRESHOLD_CORE}_{m}"] for m in metrics.METRIC_NAMES}} for r in report]
    version = _nnunet_version(settings["nnunet_python"])
    for item in nnunet["runs"]:
        train = item["train"]
        name = (
            f"nnU-Net v2 {version} {settings['nnunet_configuration']}, {train['trainer']} ({train['epochs']} epochs"
            f" x {train['iterations_per_epoch']} iterations, batch {train['batch_size']};"
            f" budget {item['budget_s']:.0f} {clock} s = {item['factor']:g} x the modified network's training)"
        )
        scored = [
            {"case": c, **score_case(os.path.join(item["folder"], "predictions", f"{c}.nii.gz"), labels[c])}
            for c in heldout
        ]
        per_case += [{"method": name, **r} for r in scored]
        rows.append((name, scored, train["command"], [t / len(heldout) for t in item["predict"]["command"]]))
        loads[f"nnU-Net ({item['factor']:g} x)"] = train["load_average"]
    per_case += [{"method": voxel_classifier.NAME, **r} for r in voxel["rows"]]
    fit_s, predict_s = voxel["fit_s"], voxel["predict_s_per_case"]
    rows.append((voxel_classifier.NAME, voxel["rows"], (fit_s, fit_s), (predict_s, predict_s)))
    per_case += [{"method": THRESHOLD_CORE_NAME, **r} for r in baseline]
    rows.append((THRESHOLD_CORE_NAME, baseline, None, None))
    write_csv(os.path.join(out, "per_case.csv"), ["method", "case", *metrics.METRIC_NAMES], per_case)
    header = ["method", *TABLE_METRICS.values(), "training, wall (CPU) s", "inference per case, wall (CPU) s", "cases"]
    table = [
        [
            name,
            *(f"{_mean(scored, m):.3f}" for m in TABLE_METRICS),
            "-" if train is None else f"{train[0]:.0f} ({train[1]:.0f})",
            "-" if infer is None else f"{infer[0]:.1f} ({infer[1]:.1f})",
            len(scored),
        ]
        for name, scored, train, infer in rows
    ]
    results = {
        "settings": settings,
        "heldout": heldout,
        "bundle": bundle,
        "nnunet": nnunet,
        "nnunet_version": version,
        "score_case_check_max_abs_difference": checks,
        "table": [dict(zip(header, row)) for row in table],
    }
    _write_json(os.path.join(out, "results.json"), results)
    text = (
        f"# Peers on fold {settings['fold']} of `{settings['dataset_dir']}` ({settings['data_label']}), profile"
        f" {settings['profile']}\n\nMeans of per-case values over the same {len(heldout)} held-out cases"
        f" ({', '.join(heldout)}), each scored on its own grid by scripts.report.metrics.score_case. Training: the"
        f" whole command, wall-clock and (in brackets) the CPU seconds of its processes (nnU-Net: its training"
        f" process, its budget in {clock} seconds; planning and preprocessing took {nnunet['plan'][0]:.0f}"
        f" ({nnunet['plan'][1]:.0f}) s more); inference: the whole command (start-up and model loading included)"
        f" divided by the cases. Threads per process: {settings['threads'] or 'the libraries default'}."
        f" nnU-Net predicts as its predictor does by default (sliding window,"
        f" Gaussian weighting, test-time mirroring), from the final checkpoint; the bundle's networks with"
        f" their configs' settings, from the best validation checkpoint.\n\n"
        + _markdown(header, table)
        + "\nThe machine's 1-minute load average at the start and end of each training: "
        + "; ".join(f"{k} {v[0]:.1f} -> {v[1]:.1f}" for k, v in loads.items() if v)
        + ". score_case (which scores nnU-Net's masks) against the bundle's own evaluation, on the masks that"
        + " evaluation wrote: largest difference "
        + ", ".join(f"{k} {v:.1e}" for k, v in checks.items())
        + ".\n"
    )
    write_atomically(os.path.join(out, FINISHED_FILE), lambda f: f.write(text.encode()))
    print(text)
    return results


def main(
    dataset_dir: str,
    output_dir: str,
    fold: int = 0,
    profile: str = "demo",
    datalist: str | None = None,
    seed: int = 0,
    data_label: str | None = None,
    threads: int | None = None,
    nnunet_python: str = ".venv-nnunet/bin/python",
    nnunet_configuration: str = "2d",
    nnunet_batch_size: int = 4,
    nnunet_iterations: int = 20,
    nnunet_val_iterations: int = 2,
    nnunet_data_processes: int = 1,
    budget_factors: list | tuple | float = (1,),
    budget_clock: str = "wall",
    overwrite: bool = False,
    **overrides,
):
    """CLI: see the module docstring."""
    peers(**{k: v for k, v in locals().items() if k != "overrides"}, **overrides)


if __name__ == "__main__":
    run(main)

"""The paper's Tab. 1 in one command: patient-grouped cross-validation of the modified and the classic 3D UNet.

    python -m scripts.tools.cross_validate --dataset_dir DIR --output_dir OUT [--networks "['modified','classic']"]
        [--folds 5] [--seed 0] [--config demo|isles24|isles24_native] [--overwrite true] [--ID VALUE ...]

For every network and fold, in this process (MONAI's ``ConfigWorkflow``, as ``monai.bundle run`` runs it): ``run
training`` (configs/train.json, + configs/classic_unet.json for the classic UNet, + the profile of ``--config``:
configs/demo.json, configs/isles24.json or configs/isles24_native.json) into ``OUT/<network>/fold<k>/``, then ``run
evaluating`` (configs/inference.json + configs/evaluate.json, the same profile and overrides after them) of that
fold's model on the fold it held out ("test") and on the cases it trained on ("train"), each on the scans' own
grids; each run's output goes to ``OUT/<network>/fold<k>/log.txt``. Folds keep every slab of a patient together
(the datalist builder's folds, ``OUT/datalist.json``, or ``--datalist``). Any other ``--ID VALUE`` is passed to every
run as a config override (``--epochs 2 --features "[4,8,16,32,64]"``); an ID that none of the configs has, or one
close to this command's own flags, is refused. Every setting (the datalist and its folds included) is checked
before anything is written. A rerun with the same settings skips the steps already done and resumes an interrupted
training from its checkpoint; a finished ``OUT`` is replaced only with ``--overwrite true``, which removes only what
a cross-validation wrote there (a folder holding other files is refused). Outputs (scripts/report/cross_validation.py,
from each evaluation's per_case.csv): ``per_case.csv``, ``table.md``/``table.csv`` beside the paper's Tab. 1,
``comparison.md`` (paired, modified against classic), ``dice.png``, and ``ensemble.json``: an override of
configs/inference.json with the fold models as ``ensemble_checkpoints``, for the testing cases.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import inspect
import json
import logging
import os
import shutil
import time
import traceback

from monai.bundle import ConfigParser, ConfigWorkflow
from scripts import BUNDLE_ROOT
from scripts.data.datalist import build_datalist
from scripts.engine.checkpoints import latest_training_state
from scripts.flags import as_bool
from scripts.report.cross_validation import TESTING_FILE, write_outputs
from scripts.safe_files import LOCK, hold_folder, release_folder, require_held, write_atomically
from scripts.tools.cli import run

__all__ = ["NETWORKS", "cross_validate", "main"]

NETWORKS = {"modified": [], "classic": ["configs/classic_unet.json"]}  # overrides after the base configs
PROFILES = {
    None: [],
    "demo": ["configs/demo.json"],
    "isles24": ["configs/isles24.json"],
    "isles24_native": ["configs/isles24_native.json"],
}
TRAIN, EVALUATE = ["configs/train.json"], ["configs/inference.json", "configs/evaluate.json"]
# each fold's steps, in order: (name, marker file written when it is done)
STEPS = (("train", "trained.json"), ("test", "scored_test.json"), ("train_cases", "scored_train.json"))
SETTINGS_FILE = "cross_validation.json"
FINISHED_FILE = "table.md"
# what scripts.report.cross_validation.write_outputs writes besides table.md and the ensemble overrides
OUTPUTS = ("per_case.csv", "table.csv", "dice.png", "comparison.md", TESTING_FILE)


def _config_files(network, profile, evaluate=False):
    files = (EVALUATE if evaluate else TRAIN) + NETWORKS[network] + PROFILES[profile]
    return [os.path.join(BUNDLE_ROOT, f) for f in files]


def check_overrides(overrides, networks, profile):
    """Refuse a config override that none of the configs a run reads has (a typo would otherwise do nothing).

    Args:
        overrides: ``{id: value}`` as given on the command line.
        networks: the networks to train.
        profile: None or a key of ``PROFILES``.

    Raises:
        ValueError: naming the unknown IDs.
    """
    own = [p for p in inspect.signature(main).parameters if p != "overrides"]
    for key in overrides:
        near = difflib.get_close_matches(key, own, n=1, cutoff=0.8)
        if near:
            raise ValueError(
                f"--{key}: did you mean this command's --{near[0]}? (a config override of that name is refused)"
            )
    known = set()
    for network in networks:
        for evaluate in (False, True):
            parser = ConfigParser()
            parser.read_config(_config_files(network, profile, evaluate))
            known |= {key for key in overrides if key in parser}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown config ID(s) {', '.join('--' + k for k in unknown)}: not in train.json nor inference.json + evaluate.json"
        )


def _bundle_run(run_id, configs, overrides, log_path):
    """Run ``run_id`` of the bundle ``configs`` in this process (MONAI's ``ConfigWorkflow``, as ``monai.bundle run``
    does) with the ``overrides`` its configs define (training settings are no evaluation's), its output appended to
    ``log_path``."""
    parser = ConfigParser()
    parser.read_config(configs)
    settings = {key: value for key, value in overrides.items() if key in parser}
    workflow_type = "train" if run_id == "training" else "infer"
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"\n$ run {run_id} of {[os.path.relpath(c, BUNDLE_ROOT) for c in configs]}: {settings}", flush=True)
        try:  # the workflow's logging (configs/logging.conf) writes to sys.stdout, here the log
            workflow = ConfigWorkflow(
                config_file=configs,
                meta_file=os.path.join(BUNDLE_ROOT, "configs", "metadata.json"),
                logging_file=os.path.join(BUNDLE_ROOT, "configs", "logging.conf"),
                workflow_type=workflow_type,
                run_id=run_id,
                **settings,
            )
            workflow.initialize()
            workflow.run()
            workflow.finalize()
        except Exception as err:
            traceback.print_exc()
            raise RuntimeError(f"`run {run_id}` failed ({type(err).__name__}: {err}); see {log_path}") from err
        finally:
            for handler in logging.root.handlers[:]:  # nothing logs into the log once it is closed
                if getattr(handler, "stream", None) is log:
                    logging.root.removeHandler(handler)
            workflow = None
            gc.collect()  # the run's datasets and networks, before the next run builds its own


def _train_fold(fold_dir, network, profile, common, log_path):
    """Train one fold, resuming an interrupted run from its checkpoint (or starting it again before the first)."""
    ckpt_dir = os.path.join(fold_dir, "models")
    latest = latest_training_state(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    if latest is not None and latest[1] >= latest[2]:
        return  # killed after its last checkpoint, before its marker: training is done
    mode = {"resume": True} if latest is not None else {"overwrite": True}
    overrides = {**common, "ckpt_dir": ckpt_dir, "output_dir": os.path.join(fold_dir, "runs"), **mode}
    _bundle_run("training", _config_files(network, profile), overrides, log_path)


def _score_fold(fold_dir, network, profile, common, section, log_path):
    """`run evaluating` of the fold's model on ``section`` ("validation": the held-out cases, or "train")."""
    name = "test" if section == "validation" else "train"
    overrides = {
        **common,
        "ckpt_dir": os.path.join(fold_dir, "models"),
        "output_dir": os.path.join(fold_dir, "runs"),
        "prediction_dir": os.path.join(fold_dir, f"eval_{name}"),
        "eval_section": section,
        "overwrite": True,  # an unfinished step's outputs are incomplete
    }
    _bundle_run("evaluating", _config_files(network, profile, evaluate=True), overrides, log_path)


def _outputs_of_a_run(output_dir):
    """What a cross-validation writes at the top of ``output_dir`` (and nothing else there)."""
    names = {SETTINGS_FILE, FINISHED_FILE, "datalist.json", *OUTPUTS, *NETWORKS}
    return {name for name in os.listdir(output_dir) if name in names or name.startswith("ensemble")}


def _prepare_output(output_dir, settings, overwrite, lock):
    """Check ``output_dir`` (reused for the same settings, a finished one only with ``overwrite``), held by ``lock``
    (``hold_folder``). ``overwrite`` removes only what a cross-validation wrote there and refuses a folder that holds
    anything else."""
    require_held(output_dir, lock)
    path = os.path.join(output_dir, SETTINGS_FILE)
    if set(os.listdir(output_dir)) - {LOCK}:
        earlier = None
        if os.path.isfile(path):
            with open(path) as f:
                earlier = json.load(f)
        finished = os.path.exists(os.path.join(output_dir, FINISHED_FILE))
        if not overwrite and earlier != settings:
            what = f"a cross-validation with other settings ({path})" if earlier else "other files"
            raise FileExistsError(f"{output_dir} holds {what}; choose another --output_dir or pass --overwrite true")
        if not overwrite and finished:
            raise FileExistsError(
                f"{output_dir} holds a finished cross-validation ({FINISHED_FILE}); pass"
                f" --overwrite true to run it again"
            )
        if overwrite:
            others = sorted(set(os.listdir(output_dir)) - _outputs_of_a_run(output_dir) - {LOCK})
            if others or earlier is None:
                raise FileExistsError(
                    f"{output_dir} holds files no cross-validation wrote ({', '.join(others[:5]) or 'no ' + SETTINGS_FILE});"
                    " --overwrite true replaces only a cross-validation's outputs: choose another --output_dir"
                )
            for name in _outputs_of_a_run(output_dir):
                target = os.path.join(output_dir, name)
                shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    write_atomically(path, lambda f: f.write(json.dumps(settings, indent=4).encode()))


def _datalist(dataset_dir, datalist, folds, seed):
    """The datalist the folds come from, checked before anything is written: ``(path, None)`` for ``--datalist``,
    else ``(None, the datalist built and checked from dataset_dir)``, to be written into ``OUT/datalist.json``."""
    if datalist:
        path = os.path.abspath(datalist)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--datalist {path} is not a file")
        with open(path) as f:
            content = json.load(f)
        if not content.get("training") or any("fold" not in item for item in content["training"]):
            raise ValueError(f"--datalist {path}: its 'training' section has no cases with a 'fold'")
        return path, None
    return None, build_datalist(dataset_dir, folds=folds, seed=seed, check=True)


def cross_validate(
    dataset_dir,
    output_dir,
    networks=("modified", "classic"),
    folds=5,
    seed=0,
    datalist=None,
    config=None,
    overwrite=False,
    **overrides,
):
    """Train and score every fold of every network; see the module docstring. Returns the paths of the outputs."""
    networks = [networks] if isinstance(networks, str) else list(networks)
    unknown = [n for n in networks if n not in NETWORKS]
    if unknown or not networks:
        raise ValueError(f"--networks must name some of {', '.join(NETWORKS)}, got {networks}")
    if config not in PROFILES:
        raise ValueError(f"--config must be one of {', '.join(str(p) for p in PROFILES if p)}, got {config!r}")
    dataset_dir, output_dir = os.path.abspath(dataset_dir), os.path.abspath(output_dir)
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"--dataset_dir {dataset_dir} is not a folder")
    check_overrides(overrides, networks, config)
    datalist_path, built = _datalist(dataset_dir, datalist, folds, seed)
    settings = {
        "dataset_dir": dataset_dir,
        "networks": networks,
        "folds": folds,
        "seed": seed,
        "datalist": datalist,
        "config": config,
        "overrides": overrides,
    }
    lock = hold_folder(output_dir)  # one cross-validation per folder at a time
    try:
        return _run_folds(output_dir, settings, as_bool(overwrite, "overwrite"), lock, datalist_path, built)
    finally:
        release_folder(output_dir)


def _run_folds(output_dir, settings, overwrite, lock, datalist_path, built):
    """Check ``output_dir`` and run each step of each fold not done yet, then write the outputs."""
    _prepare_output(output_dir, settings, overwrite, lock)
    networks, config, overrides = settings["networks"], settings["config"], settings["overrides"]
    dataset_dir, seed = settings["dataset_dir"], settings["seed"]
    if built is not None:
        datalist_path = os.path.join(output_dir, "datalist.json")
        if not os.path.isfile(datalist_path):  # a rerun keeps the folds it started with
            write_atomically(datalist_path, lambda f: f.write(json.dumps(built, indent=2).encode()))
    with open(datalist_path) as f:
        fold_ids = sorted({item["fold"] for item in json.load(f)["training"]})
    common = {
        **overrides,
        "dataset_dir": dataset_dir,
        "data_list_file_path": datalist_path,
        "seed": seed,
        "prepare_data": [],
    }
    jobs = [(network, fold) for network in networks for fold in fold_ids]
    started, done_times = time.monotonic(), []
    for index, (network, fold) in enumerate(jobs, start=1):
        fold_dir = os.path.join(output_dir, network, f"fold{fold}")
        os.makedirs(fold_dir, exist_ok=True)
        log_path, step_start = os.path.join(fold_dir, "log.txt"), time.monotonic()
        ran = False
        for step, marker in STEPS:
            if os.path.exists(os.path.join(fold_dir, marker)):
                continue
            ran = True
            if step == "train":
                _train_fold(fold_dir, network, config, {**common, "fold": fold}, log_path)
            else:
                section = "validation" if step == "test" else "train"
                _score_fold(fold_dir, network, config, {**common, "fold": fold}, section, log_path)
            write_atomically(os.path.join(fold_dir, marker), lambda f: f.write(b"{}"))
        took = time.monotonic() - step_start
        if ran:
            done_times.append(took)
        left = (len(jobs) - index) * (sum(done_times) / len(done_times)) if done_times else 0.0
        print(
            f"[{index}/{len(jobs)}] {network} fold {fold}: {'done' if ran else 'already done'} in {took:.0f} s;"
            f" {time.monotonic() - started:.0f} s so far, about {left:.0f} s left",
            flush=True,
        )
    return write_outputs(output_dir, networks, fold_ids, datalist_path, dataset_dir, PROFILES[config], overrides)


def main(
    dataset_dir: str,
    output_dir: str,
    networks: str | list | tuple = ("modified", "classic"),
    folds: int = 5,
    seed: int = 0,
    datalist: str | None = None,
    config: str | None = None,
    overwrite: bool = False,
    **overrides,
):
    """CLI: see the module docstring."""
    outputs = cross_validate(dataset_dir, output_dir, networks, folds, seed, datalist, config, overwrite, **overrides)
    print("\n".join(f"{name}: {path}" for name, path in outputs.items()))


if __name__ == "__main__":
    run(main)

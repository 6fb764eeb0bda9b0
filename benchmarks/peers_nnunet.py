"""The nnU-Net v2 side of benchmarks/peers.py, run by nnU-Net's own Python (``.venv-nnunet``, built by
benchmarks/peers-env) as a subprocess, never imported by the bundle's environment.

    python benchmarks/peers_nnunet.py plan --dataset_id 501 --configuration 2d
    python benchmarks/peers_nnunet.py train --dataset_id 501 --configuration 2d --fold 0 --deadline T --result R.json
        (or --cpu_budget S: seconds of this process's CPU time)
    python benchmarks/peers_nnunet.py predict --model_dir DIR --fold 0 --cases C.json --result R.json

``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` come from the environment, as nnU-Net reads them.
Everything goes through nnU-Net's Python API: planning and preprocessing (``plan_and_preprocess_api``), a trainer
subclass defined here (``nnUNetTrainerWallClock``: no file inside nnU-Net's package), and ``nnUNetPredictor``
initialised with that trainer's network (nnU-Net's own model-folder loader looks trainers up inside its package).
"""

import argparse
import json
import os
import shutil
import time

import torch
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

SPLITS = "splits_final.json"  # the bundle's folds, written by benchmarks/peers.py beside dataset.json
PLANS = "nnUNetPlans"
CPU = torch.device("cpu")
MAX_EPOCHS = 1000  # nnU-Net's own; the wall-clock budget decides how many run


class nnUNetTrainerWallClock(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming of trainers)
    """nnU-Net's default trainer (network, loss, augmentation, sampling, optimiser and poly learning-rate schedule
    as planned) with a short epoch, a set batch size and a time budget: a wall-clock ``deadline`` (``time.time()``)
    or a ``cpu_budget`` (seconds of this process's CPU time, ``time.process_time()``). After each epoch the number of
    epochs is set to what fits in the time left at the mean epoch time so far (the poly schedule decays over that
    number), and training ends at the first epoch that would not fit, or at ``MAX_EPOCHS``. Set the class attributes
    (``configure``) before building one: nnU-Net saves and restores a trainer by its constructor's arguments."""

    deadline = None
    cpu_budget = None
    iterations_per_epoch = 20
    val_iterations_per_epoch = 2
    batch_size_setting = 4

    @classmethod
    def configure(cls, deadline, cpu_budget, iterations_per_epoch, val_iterations_per_epoch, batch_size):
        """Set the budget (one of ``deadline`` and ``cpu_budget``), the training and validation iterations per epoch
        and the batch size."""
        if (deadline is None) == (cpu_budget is None):
            raise ValueError("give one of a deadline and a CPU budget")
        cls.deadline, cls.cpu_budget, cls.iterations_per_epoch = deadline, cpu_budget, int(iterations_per_epoch)
        cls.val_iterations_per_epoch, cls.batch_size_setting = int(val_iterations_per_epoch), int(batch_size)

    def __init__(self, plans, configuration, fold, dataset_json, device=CPU):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = self.iterations_per_epoch
        self.num_val_iterations_per_epoch = self.val_iterations_per_epoch
        self.num_epochs = MAX_EPOCHS
        self.epoch_seconds = []

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        self.batch_size = self.batch_size_setting

    def _clock(self):
        return time.time() if self.cpu_budget is None else time.process_time()

    def _fit_epochs_to_budget(self):
        """The number of epochs that fit in the time left at the mean epoch time so far (at least the ones run)."""
        left = (self.deadline if self.cpu_budget is None else self.cpu_budget) - self._clock()
        mean = sum(self.epoch_seconds) / len(self.epoch_seconds)
        self.num_epochs = min(MAX_EPOCHS, self.current_epoch + max(0, int(left // mean)))
        self.lr_scheduler.max_steps = max(self.num_epochs, 1)

    def run_training(self):
        """nnU-Net's ``run_training`` loop, with the number of epochs fitted to the budget after each epoch."""
        self.on_train_start()
        while self.current_epoch < self.num_epochs:
            epoch_started = self._clock()
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                outputs = [
                    self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)
                ]
                self.on_validation_epoch_end(outputs)
            self.on_epoch_end()
            self.epoch_seconds.append(self._clock() - epoch_started)
            self._fit_epochs_to_budget()
        self.on_train_end()


def _write_result(path, result):
    with open(path + ".partial", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".partial", path)


def plan(args):
    """Fingerprint (with nnU-Net's dataset integrity check), plan and preprocess one configuration; then the bundle's
    folds as nnU-Net's ``splits_final.json``."""
    started = time.monotonic()
    extract_fingerprints([args.dataset_id], num_processes=args.processes, check_dataset_integrity=True)
    plan_experiments([args.dataset_id])
    preprocess([args.dataset_id], configurations=(args.configuration,), num_processes=(args.processes,))
    name = convert_id_to_dataset_name(args.dataset_id)
    shutil.copyfile(os.path.join(nnUNet_raw, name, SPLITS), os.path.join(nnUNet_preprocessed, name, SPLITS))
    _write_result(args.result, {"seconds": time.monotonic() - started})


def train(args):
    """Train ``nnUNetTrainerWallClock`` on one fold of the splits; the final checkpoint is the model."""
    name = convert_id_to_dataset_name(args.dataset_id)
    folder = os.path.join(nnUNet_preprocessed, name)
    with open(os.path.join(folder, PLANS + ".json")) as f:
        plans = json.load(f)
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    plans["continue_training"] = False  # as nnU-Net's own run_training passes it: a new training
    nnUNetTrainerWallClock.configure(
        args.deadline, args.cpu_budget, args.iterations, args.val_iterations, args.batch_size
    )
    trainer = nnUNetTrainerWallClock(plans, args.configuration, args.fold, dataset_json, CPU)
    started = time.monotonic()
    trainer.run_training()
    seconds, cpu_seconds = time.monotonic() - started, time.process_time()
    config = trainer.configuration_manager
    _write_result(
        args.result,
        {
            "seconds": seconds,
            "process_cpu_seconds": cpu_seconds,
            "clock": "wall" if args.cpu_budget is None else "cpu",
            "trainer": type(trainer).__name__,
            "epochs": trainer.current_epoch,
            "epoch_seconds": trainer.epoch_seconds,
            "iterations_per_epoch": trainer.num_iterations_per_epoch,
            "val_iterations_per_epoch": trainer.num_val_iterations_per_epoch,
            "batch_size": trainer.batch_size,
            "patch_size": list(config.patch_size),
            "spacing": list(config.spacing),
            "network": config.network_arch_class_name,
            "features_per_stage": config.network_arch_init_kwargs.get("features_per_stage"),
            "normalization": config.normalization_schemes,
            "model_dir": trainer.output_folder_base,
            "torch_threads": torch.get_num_threads(),
        },
    )


def predict(args):
    """Segment the cases of ``--cases`` (``{"inputs": [[channel files], ...], "outputs": [file name without
    .nii.gz, ...]}``) with the fold's final checkpoint, as nnU-Net's predictor does by default (sliding window, step
    0.5, Gaussian weighting, mirroring)."""
    started = time.monotonic()
    with open(os.path.join(args.model_dir, "plans.json")) as f:
        plans_manager = PlansManager(json.load(f))
    with open(os.path.join(args.model_dir, "dataset.json")) as f:
        dataset_json = json.load(f)
    with open(args.cases) as f:
        cases = json.load(f)
    checkpoint = torch.load(
        os.path.join(args.model_dir, f"fold_{args.fold}", "checkpoint_final.pth"), map_location=CPU, weights_only=False
    )
    config = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
    network = nnUNetTrainerWallClock.build_network_architecture(
        plans_manager,
        config,
        determine_num_input_channels(plans_manager, config, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False,
    )
    network.load_state_dict(checkpoint["network_weights"])
    predictor = nnUNetPredictor(device=CPU, allow_tqdm=False)
    predictor.manual_initialization(
        network,
        plans_manager,
        config,
        [checkpoint["network_weights"]],
        dataset_json,
        checkpoint["trainer_name"],
        checkpoint["inference_allowed_mirroring_axes"],
    )
    for folder in {os.path.dirname(path) for path in cases["outputs"]}:
        os.makedirs(folder, exist_ok=True)
    loaded = time.monotonic()
    predictor.predict_from_files_sequential(cases["inputs"], cases["outputs"], save_probabilities=False, overwrite=True)
    done = time.monotonic()
    _write_result(
        args.result, {"load_seconds": loaded - started, "predict_seconds": done - loaded, "cases": len(cases["inputs"])}
    )


def main():
    """Parse the command line and run its step."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    step = steps.add_parser("plan")
    step.add_argument("--dataset_id", type=int, required=True)
    step.add_argument("--configuration", required=True)
    step.add_argument("--processes", type=int, default=2)
    step.add_argument("--result", required=True)
    step = steps.add_parser("train")
    step.add_argument("--dataset_id", type=int, required=True)
    step.add_argument("--configuration", required=True)
    step.add_argument("--fold", type=int, required=True)
    budget = step.add_mutually_exclusive_group(required=True)
    budget.add_argument("--deadline", type=float, help="time.time() by which training ends")
    budget.add_argument("--cpu_budget", type=float, help="seconds of this process's CPU time")
    step.add_argument("--iterations", type=int, default=20)
    step.add_argument("--val_iterations", type=int, default=2)
    step.add_argument("--batch_size", type=int, default=4)
    step.add_argument("--result", required=True)
    step = steps.add_parser("predict")
    step.add_argument("--model_dir", required=True)
    step.add_argument("--fold", type=int, required=True)
    step.add_argument("--cases", required=True)
    step.add_argument("--result", required=True)
    args = parser.parse_args()
    {"plan": plan, "train": train, "predict": predict}[args.step](args)


if __name__ == "__main__":
    main()

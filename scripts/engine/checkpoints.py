"""Training checkpoints that survive a kill at any moment, and resumes that continue the run they resume.

MONAI's ``CheckpointSaver`` writes in place (its ``DiskSaver`` has ``atomic=False``) after ignite has removed the file
it replaces, so a kill while ``checkpoint_epoch=N.pt`` is written leaves a part of it and no previous one. Its
key-metric record (which ``model.pt`` is the best so far) and the evaluator's best metric are not in the training
state, so a resumed run takes its first validation for a new best. And a resume restores a learning-rate schedule
that ends where the checkpointed run ended, whatever ``epochs`` now says.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import sys

import torch
from ignite.engine import Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader, CheckpointSaver, ValidationHandler
from scripts.flags import as_bool
from scripts.safe_files import rank, require_held, write_atomically

__all__ = [
    "BestMetricRecord",
    "EnsembleCheckpointLoader",
    "NamedCheckpointLoader",
    "SafeCheckpointSaver",
    "latest_training_state",
    "prepare_ckpt_dir",
    "refuse_outdated",
    "resume_checkpoint",
    "ValidationAtIntervalAndEnd",
]

logger = logging.getLogger(__name__)

LATEST_PATTERN = "checkpoint_epoch=*.pt"  # what CheckpointSaver(save_interval=1) names the latest training state
BEST_MODEL = "model.pt"
# beside a model.pt that an --overwrite run will replace at its first validation; removed when it does
OUTDATED_MARKER = "model.pt.outdated"


class _KeepPreviousDiskSaver(BaseSaveHandler):
    """Ignite save handler: each file is written whole under a temporary name and renamed; the file that ignite asks
    to remove before a save (the one the new file replaces) is removed only after the new one is in place. As
    ignite's ``DiskSaver``, only one rank of a distributed run writes.

    Args:
        dirname: the folder to save into.
        filename: a fixed file name for every save (MONAI's ``key_metric_filename``), None for ignite's names.
        save_on_rank: the rank that writes.
    """

    def __init__(self, dirname: str, filename: str | None = None, save_on_rank: int = 0):
        self.dirname, self.filename, self.save_on_rank = dirname, filename, save_on_rank
        self._replaced: list[str] = []

    def __call__(self, checkpoint, filename, metadata=None):
        if rank() != self.save_on_rank:
            return
        name = self.filename or filename
        write_atomically(os.path.join(self.dirname, name), lambda f: torch.save(checkpoint, f))
        if name == BEST_MODEL and os.path.exists(os.path.join(self.dirname, OUTDATED_MARKER)):
            os.remove(os.path.join(self.dirname, OUTDATED_MARKER))
        for old in self._replaced:
            if old != name and os.path.exists(os.path.join(self.dirname, old)):
                os.remove(os.path.join(self.dirname, old))
        self._replaced = []

    def remove(self, filename):
        self._replaced.append(self.filename or filename)


class SafeCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) whose files are written atomically, the previous one kept until
    the new one is complete, and whose key-metric record can be saved (``state_dict``) as well as loaded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _KeepPreviousDiskSaver(self.save_dir, checkpoint.save_handler.filename)

    def state_dict(self) -> dict:
        """The key-metric record, ``{"_saved": [(score, filename)]}``, the counterpart of ``load_state_dict``."""
        if self._key_metric_checkpoint is None:
            raise ValueError("this CheckpointSaver does not save by key metric: it has no record to save")
        return self._key_metric_checkpoint.state_dict()


class NamedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` (same arguments) whose errors name the checkpoint file: torch's own messages for a
    truncated file or for weights of another network do not."""

    def __call__(self, engine) -> None:
        try:
            super().__call__(engine)
        except Exception as err:  # torch raises several types for damaged files and mismatched weights
            lines = str(err).strip().splitlines()
            reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
            if not reason.startswith("RuntimeError: Error(s) in loading state_dict"):
                raise ValueError(f"{self.load_path}: not a loadable PyTorch checkpoint ({reason})") from err
            raise ValueError(
                f"{self.load_path}: does not fit the network ({' '.join(lines[1:3]).strip()[:300]}); pass the"
                " --features and --spatial_size it was trained with (or the profile it was trained with last,"
                " e.g. configs/demo.json for the demo's model)"
            ) from err


class EnsembleCheckpointLoader:
    """Ignite handler: each checkpoint of ``load_paths`` loaded strictly into the network at its place in
    ``networks`` when the engine starts (one of each for a single model), by ``NamedCheckpointLoader``.

    Args:
        load_paths: the checkpoints (``model.pt`` state dicts, or training checkpoints with a ``"model"`` entry).
        networks: as many networks, e.g. an ``EnsembleEvaluator``'s.
        map_location: where the weights go (the ``device`` id).
    """

    def __init__(self, load_paths, networks, map_location=None):
        if len(load_paths) != len(networks):
            raise ValueError(f"{len(load_paths)} checkpoints for {len(networks)} networks")
        self.loaders = [
            NamedCheckpointLoader(load_path=path, load_dict={"model": network}, map_location=map_location)
            for path, network in zip(load_paths, networks)
        ]

    def attach(self, engine) -> None:
        for loader in self.loaders:
            loader.attach(engine)


class BestMetricRecord:
    """The record of the best validation so far, as one entry of the training checkpoint: the evaluator's best metric
    and its epoch and the best-model saver's record of it, so that a resumed run compares new validations with the
    real best.

    Args:
        evaluator: the validation engine (MONAI ``Evaluator``), whose ``state.best_metric(_epoch)`` are kept.
        saver: the ``SafeCheckpointSaver`` that writes the best model.
    """

    def __init__(self, evaluator, saver: SafeCheckpointSaver):
        self.evaluator, self.saver = evaluator, saver

    def state_dict(self) -> dict:
        state = self.evaluator.state
        return {
            "best_metric": float(state.best_metric),
            "best_metric_epoch": int(state.best_metric_epoch),
            "saver": self.saver.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        self.saver.load_state_dict(state["saver"])


class ValidationAtIntervalAndEnd(ValidationHandler):
    """MONAI's ``ValidationHandler`` (same arguments), which validates every ``interval`` epochs, and also after the
    last epoch when ``interval`` skipped it: a finished run always has a validated best model, whatever ``epochs``
    and ``val_interval`` are (with ``epochs < val_interval`` MONAI's handler alone never validates)."""

    def attach(self, engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.COMPLETED, self._validate_last_epoch)

    def _validate_last_epoch(self, engine) -> None:
        finished = engine.state.epoch == engine.state.max_epochs  # not a run ended early by terminate()
        if finished and engine.state.epoch % self.interval:
            self.validator.run(engine.state.epoch)


def _epoch_of(path):
    match = re.search(r"checkpoint_epoch=(\d+)\.pt$", path)
    return int(match.group(1)) if match else -1


def latest_training_state(ckpt_dir: str) -> tuple[str, int, int] | None:
    """The newest ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` (by N) that loads, with the epochs it has done and the
    epochs of its run; a damaged one is named in a warning and the next older one is taken.

    Args:
        ckpt_dir: the training run's checkpoint folder.

    Returns:
        ``(path, epoch, max_epochs)``, or None when no checkpoint loads.

    Raises:
        ValueError: the newest loadable file holds no trainer state.
    """
    candidates = sorted(glob.glob(os.path.join(ckpt_dir, LATEST_PATTERN)), key=_epoch_of, reverse=True)
    for path in candidates:
        try:
            if os.path.getsize(path) == 0:
                raise EOFError("the file is empty")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # truncated, empty and foreign files raise several types
            logger.warning("cannot resume from %s (%s: %s); trying an older checkpoint", path, type(err).__name__, err)
            continue
        trainer = state.get("trainer") if isinstance(state, dict) else None
        if not isinstance(trainer, dict) or "max_epochs" not in trainer:
            raise ValueError(f"{path} holds no trainer state: it is not a training checkpoint of train.json")
        done = (
            int(trainer["epoch"]) if "epoch" in trainer else int(trainer["iteration"]) // int(trainer["epoch_length"])
        )
        return path, done, int(trainer["max_epochs"])
    return None


def resume_checkpoint(ckpt_dir: str, epochs: int, resume=True) -> str | None:
    """The training state to resume: ``latest_training_state`` of ``ckpt_dir``.

    Args:
        ckpt_dir: the training run's checkpoint folder.
        epochs: the ``epochs`` of the resumed run, which must be the checkpointed run's: its learning-rate schedule
            ends there.
        resume: whether the run resumes (a bool, or true/false as typed on the command line).

    Returns:
        The path of the checkpoint; None when not ``resume``.

    Raises:
        FileNotFoundError: no loadable checkpoint in ``ckpt_dir``.
        ValueError: the checkpoint was saved by a run of other ``epochs``, or by one that had finished.
    """
    if not as_bool(resume, "resume"):
        return None
    latest = latest_training_state(ckpt_dir)
    if latest is None:
        damaged = sorted(glob.glob(os.path.join(ckpt_dir, LATEST_PATTERN)), key=_epoch_of, reverse=True)
        found = f" (damaged: {', '.join(damaged)})" if damaged else ""
        raise FileNotFoundError(f"no loadable {LATEST_PATTERN} in {ckpt_dir} to resume from{found}")
    path, epoch, run_epochs = latest
    if run_epochs != epochs:
        raise ValueError(
            f"{path} is from a run of {run_epochs} epochs, whose learning-rate schedule ends at epoch"
            f" {run_epochs}; resume it with --epochs {run_epochs} (a longer run would train at"
            f" learning rate 0), or start a new run with --overwrite true"
        )
    if epoch >= run_epochs:
        raise ValueError(f"{path}: that run finished all its {run_epochs} epochs; there is nothing to resume")
    return path


def prepare_ckpt_dir(ckpt_dir: str, resume=False, overwrite=False, lock=None) -> None:
    """Make sure a training run may write into ``ckpt_dir``, before any work is done.

    A new run (neither ``resume`` nor ``overwrite``) refuses a folder that holds a trained model or checkpoints.
    ``overwrite`` removes the earlier run's ``checkpoint_epoch=N.pt`` (a later resume would otherwise continue that
    run); its ``model.pt`` stays until this run's first validation replaces it (MONAI Label's training starts from
    it), marked outdated meanwhile (``OUTDATED_MARKER``, which ``refuse_outdated`` reads), and every finished run
    validates at least once (``ValidationAtIntervalAndEnd``).

    Args:
        ckpt_dir: the checkpoint folder (created if absent).
        resume: this run continues the run in ``ckpt_dir`` (a bool, or true/false as typed on the command line).
        overwrite: this run replaces the run in ``ckpt_dir`` (likewise).
        lock: this run's hold on ``ckpt_dir`` (``scripts.safe_files.hold_folder``), taken first and kept until the
            run ends, so that no other run writes there meanwhile.

    Raises:
        ValueError: both ``resume`` and ``overwrite``; ``ckpt_dir`` not held.
        FileExistsError: naming the file found, and the two ways on.
    """
    resume, overwrite = as_bool(resume, "resume"), as_bool(overwrite, "overwrite")
    if resume and overwrite:
        raise ValueError(
            "--resume true continues the run in the checkpoint folder and --overwrite true replaces it;"
            " pass one of them"
        )
    require_held(ckpt_dir, lock)
    if resume:
        return
    latest = sorted(glob.glob(os.path.join(ckpt_dir, LATEST_PATTERN)), key=_epoch_of)
    existing = [os.path.join(ckpt_dir, BEST_MODEL)] if os.path.exists(os.path.join(ckpt_dir, BEST_MODEL)) else []
    existing += latest
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} exists: {ckpt_dir} holds an earlier training run. Pass --resume true to"
            f" continue it, or --overwrite true to start a new run that replaces it (or choose"
            f" another --ckpt_dir)"
        )
    if rank() != 0:  # the ranks of one torchrun: rank 0 replaces the earlier run's files
        return
    if overwrite and existing and os.path.exists(os.path.join(ckpt_dir, BEST_MODEL)):
        command = " ".join(sys.argv)
        note = f"the run this folder held before; the run of `{command}` replaces it at its first validation\n"
        write_atomically(os.path.join(ckpt_dir, OUTDATED_MARKER), lambda f: f.write(note.encode()))
    for path in latest:
        os.remove(path)


def refuse_outdated(checkpoints: list) -> list:
    """``checkpoints``, after checking that none is a ``model.pt`` that a newer training run (``--overwrite``) is
    replacing and has not yet validated (``OUTDATED_MARKER`` beside it): predicting with it would pass the previous
    run's model off as the new one's.

    Raises:
        ValueError: naming the checkpoint and the run that replaces it.
    """
    for path in checkpoints:
        marker = os.path.join(os.path.dirname(os.path.abspath(path)), OUTDATED_MARKER)
        if os.path.basename(path) == BEST_MODEL and os.path.isfile(marker):
            with open(marker) as f:
                note = f.read().strip()
            raise ValueError(
                f"{path} is outdated ({marker}: {note}); finish that run (--resume true) or pass another checkpoint"
            )
    return list(checkpoints)

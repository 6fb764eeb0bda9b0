"""Each case's report made inside the engine, from what it already holds, and written all or nothing.

MONAI's evaluators hand their post-processing one case at a time, with its inverted mask and whatever the
pre-processing kept: here a copy of the CT, CBF and Tmax maps as read. ``PerfusionReportd`` (last in
configs/inference.json's ``postprocessing``) adds the case's perfusion figures and its threshold core (``baseline``,
which evaluation scores); ``CaseOutputsWriter`` (a handler) writes its overlay, its mask and its row of
``volumes.csv``. No map, mask or table is read back from disk. A case is finished when its row is in ``volumes.csv``:
its overlay and mask are written (each whole) first, so a run killed at any moment leaves the finished cases whole,
and ``prepare_outputs`` lets the same command finish the others.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import string_list_all_gather
from scripts.flags import as_bool
from scripts.report.overlay import overlay_image, report_line
from scripts.report.perfusion import COLUMNS, perfusion_figures, perfusion_regions
from scripts.report.tables import print_table, read_csv, write_csv
from scripts.safe_files import LOCK, hold_folder, write_atomically

__all__ = ["CaseOutputsWriter", "PerfusionReportd", "file_stamps", "mark_finished", "prepare_outputs"]

logger = logging.getLogger(__name__)

MANIFEST = "run.json"  # the settings of the run that writes a folder, and whether it finished
VOLUMES = "volumes.csv"
MASKS, OVERLAYS = "masks", "overlays"
# the tables inference (volumes.csv) and evaluation (configs/evaluate.json's report and baseline_report) write
HEADER = ("case", "volume_pred_ml", *COLUMNS)  # the columns of volumes.csv
TABLES = (VOLUMES, "metrics_per_case.csv", "metrics_summary.csv", "baseline_per_case.csv", "baseline_summary.csv")


def file_stamps(paths) -> list:
    """Each file's absolute path, size and modification time: a retrained model is another model."""
    stamps = []
    for path in paths:
        stat = os.stat(path)
        stamps.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    return stamps


def _rows(folder):
    """The rows of the volumes.csv an earlier run left in ``folder``."""
    path = os.path.join(folder, VOLUMES)
    return read_csv(path) if os.path.isfile(path) else []


def _finished_rows(folder):
    """The rows of an earlier run in ``folder`` whose case's mask and overlay are there too."""
    return [row for row in _rows(folder) if all(os.path.isfile(p) for p in _case_files(folder, row["case"]))]


def _case_files(folder, case):
    return os.path.join(folder, MASKS, f"{case}.nii.gz"), os.path.join(folder, OVERLAYS, f"{case}.png")


def _clear(folder, cases, kept_rows):
    """Remove what a run of this bundle wrote in ``folder`` except the cases of ``kept_rows``: the other ``cases``'
    masks and overlays, its tables and MetricsSaver's ``details/``; nothing else. The kept rows stay in volumes.csv."""
    kept = {row["case"] for row in kept_rows}
    for case in set(cases) - kept:
        for path in _case_files(folder, case):
            if os.path.isfile(path):
                os.remove(path)
    for name in TABLES:
        if os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    shutil.rmtree(os.path.join(folder, "details"), ignore_errors=True)
    if kept_rows:
        write_csv(os.path.join(folder, VOLUMES), list(kept_rows[0]), kept_rows)


def prepare_outputs(folder, items, settings, overwrite=False, resume=True) -> list:
    """Check ``folder`` before any case is segmented and return the datalist items still to do.

    A new or empty folder gets all items. A folder an unfinished run of the same ``settings`` wrote (its
    ``run.json``) is continued: with ``resume``, the cases finished there (row, mask and overlay) are kept and the
    others done; without (evaluation, whose metrics cover every case), every case is done again. A finished run, one
    with other settings, or a folder this bundle did not write is refused unless ``overwrite``, which replaces only
    what the earlier run wrote.

    Args:
        folder: the output folder (``prediction_dir``).
        items: the datalist items (``image``, maybe ``label``) of this run.
        settings: what the outputs depend on (checkpoints, inferer, thresholds, ...), JSON-serialisable.
        overwrite: replace a finished run or one with other settings.
        resume: keep the finished cases of an unfinished run.

    Returns:
        The items to segment, in datalist order.

    Raises:
        FileExistsError: naming the folder and why, with ``--overwrite true`` as the way to replace it.
    """
    overwrite = as_bool(overwrite, "overwrite")
    settings = json.loads(json.dumps(settings))  # tuples as lists, as the manifest reads back
    manifest = os.path.join(folder, MANIFEST)
    cases = [item["case"] for item in items]
    hold_folder(folder)  # one run per output folder at a time (rank 0 for all ranks)
    kept, earlier_cases = [], set()
    if os.path.isfile(manifest):
        with open(manifest) as f:
            earlier = json.load(f)
        changed = sorted(k for k in {*settings, *earlier["settings"]} if settings.get(k) != earlier["settings"].get(k))
        if not overwrite and earlier["finished"]:
            raise FileExistsError(f"{folder} holds a finished run ({manifest}); pass --overwrite true to replace it")
        if not overwrite and changed:
            raise FileExistsError(
                f"{folder} holds an unfinished run with other {', '.join(changed)} ({manifest}); pass --overwrite "
                "true to replace it, or rerun with its settings to finish it"
            )
        kept = _finished_rows(folder) if resume and not overwrite else []
        earlier_cases = {row["case"] for row in _rows(folder)}
    elif os.path.isdir(folder) and set(os.listdir(folder)) - {LOCK} and not overwrite:
        found = sorted(set(os.listdir(folder)) - {LOCK})[0]
        raise FileExistsError(
            f"{os.path.join(folder, found)} exists and {folder} has no {MANIFEST} of this bundle; pass --overwrite"
            " true to write into it anyway, or choose another output"
        )
    _barrier()  # every rank has read the folder before rank 0 changes it
    if _is_rank0():
        if os.path.isfile(manifest):
            _clear(folder, {*cases, *earlier_cases}, kept)
        os.makedirs(folder, exist_ok=True)
        write_atomically(manifest, lambda f: f.write(json.dumps({"settings": settings, "finished": False}).encode()))
    _barrier()
    if kept:
        logger.info("%s: %d case(s) an earlier run finished are kept", folder, len(kept))
    done = {row["case"] for row in kept}
    return [item for item, case in zip(items, cases) if case not in done]


def _is_rank0():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def mark_finished(folder) -> None:
    """Record in ``folder``'s ``run.json`` that its run finished (the last step of ``run``)."""
    if not _is_rank0():
        return
    path = os.path.join(folder, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    write_atomically(path, lambda f: f.write(json.dumps({**manifest, "finished": True}).encode()))


class PerfusionReportd(MapTransform):
    """The perfusion figures and the threshold core of one case, last in the post-processing: from the input maps
    the pre-processing kept (``map_keys``: CT, CBF, Tmax as read, on the scan's grid) and the inverted mask
    (``keys``), whose affine gives the voxel volume. Adds the figures (``report_key``, the perfusion columns of
    volumes.csv) and the threshold core as a mask like the prediction (``baseline_key``, which evaluation scores).

    Args:
        keys: the mask key (``pred``).
        map_keys: the kept CT, CBF and Tmax maps, in that order.
        thresholds: the perfusion thresholds (``scripts.report.perfusion.DEFAULT_THRESHOLDS``).
        baseline_key: where the threshold core goes.
        report_key: where the figures go.
    """

    def __init__(
        self, keys: KeysCollection, map_keys, thresholds=None, baseline_key="baseline", report_key="perfusion"
    ):
        super().__init__(keys)
        self.map_keys, self.thresholds = list(map_keys), thresholds
        self.baseline_key, self.report_key = baseline_key, report_key

    def __call__(self, data):
        d = dict(data)
        (key,) = self.keys
        pred = d[key]
        _, cbf, tmax = (d[k][0].detach().cpu().numpy() for k in self.map_keys)
        regions, note = perfusion_regions(cbf, tmax, self.thresholds)
        if note:
            logger.warning("%s: no perfusion figures: %s", d.get("case", "?"), note)
        baseline = pred.clone()
        baseline[0] = torch.as_tensor(regions["core"] if regions is not None else 0, dtype=baseline.dtype)
        d[self.baseline_key] = baseline
        d[self.report_key] = perfusion_figures(regions, note, _voxel_ml(pred))
        return d


def _voxel_ml(image):
    return float(abs(np.linalg.det(np.asarray(image.affine, dtype=np.float64)[:3, :3]))) / 1000.0


class CaseOutputsWriter:
    """Ignite handler that writes each case's outputs as soon as the evaluator has it: its overlay PNG
    (``prediction_dir/overlays``), its mask (``prediction_dir/masks``, uint8 NIfTI with the scan's affine) and its
    row of ``prediction_dir/volumes.csv`` (predicted volume and ``PerfusionReportd``'s figures), in that order, each
    file written whole under a temporary name; the table is rewritten after every case, so it always lists exactly
    the finished cases (under ``torch.distributed``, rank 0 writes every rank's rows when the run completes). Rows of
    cases an earlier run finished are kept. Prints the table at the end.

    The mask is written with nibabel: MONAI 1.6.1's NIfTI writer (``SaveImaged``) fails on a one-slice scan and on
    one whose first array axis runs head-foot ("Affine ... is not invertible").

    Args:
        prediction_dir: the output folder.
        map_keys: the kept CT, CBF and Tmax maps (the overlay shows CT and CBF).
        ct_window: the CT display window (HU) of the overlay.
        pred_key: the mask key.
        report_key: the key of ``PerfusionReportd``'s figures.
        case_writers: more writers of each case's outputs, called after its mask and before its row is written:
            each has ``write(case, mask, affine, row, overlay)`` (e.g. ``scripts.dicom.results.DicomResultsWriter``).
    """

    def __init__(
        self, prediction_dir, map_keys, ct_window=(0, 100), pred_key="pred", report_key="perfusion", case_writers=()
    ):
        self.prediction_dir, self.map_keys, self.ct_window = prediction_dir, list(map_keys), ct_window
        self.pred_key, self.report_key, self.case_writers = pred_key, report_key, list(case_writers)
        self.rows = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        self.rows = {row["case"]: row for row in _rows(self.prediction_dir)}

    def iteration_completed(self, engine: Engine) -> None:
        for batch, output in zip(engine.state.batch, engine.state.output):
            row = self._write_case({**batch, **output})  # the kept maps are in the batch, the mask in the output
            self.rows[row["case"]] = row
        if not _distributed():
            self._write_table()

    def _write_case(self, case_data):
        pred = case_data[self.pred_key]
        case = case_data["case"]
        mask = pred[0].detach().cpu().numpy() > 0
        ct, cbf = (case_data[k][0].detach().cpu().numpy() for k in self.map_keys[:2])
        affine = np.asarray(pred.affine, dtype=np.float64)
        row = {"case": case, "volume_pred_ml": round(float(mask.sum()) * _voxel_ml(pred), 4)}
        row.update(case_data[self.report_key])
        image = overlay_image(case, ct, cbf, mask, affine, self.ct_window, report_line(row))
        mask_path, overlay_path = _case_files(self.prediction_dir, case)
        # zlib level 1: a third of the default level's time for an overlay of the same size (18 vs 62 ms)
        write_atomically(overlay_path, lambda f: image.save(f, format="PNG", compress_level=1))
        nifti = nib.Nifti1Image(mask.astype(np.uint8), affine)
        nifti.header.set_qform(affine, code=1)
        nifti.header.set_sform(affine, code=1)
        write_atomically(mask_path, lambda f: f.write(gzip.compress(nifti.to_bytes(), compresslevel=6)))
        for writer in self.case_writers:
            writer.write(case, mask, affine, row, image)
        return row

    def completed(self, engine: Engine) -> None:
        if _distributed():
            gathered = string_list_all_gather([json.dumps(row) for row in self.rows.values()])
            if torch.distributed.get_rank() != 0:
                return
            self.rows = {row["case"]: row for row in map(json.loads, gathered)}
            self._write_table()
        if self.rows:
            title = f"{os.path.join(self.prediction_dir, VOLUMES)} (perfusion figures: research use, not a treatment decision):"
            print_table(title, HEADER, list(self.rows.values()))

    def _write_table(self):
        write_csv(os.path.join(self.prediction_dir, VOLUMES), HEADER, list(self.rows.values()))


def _distributed():
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1

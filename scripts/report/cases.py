"""Each case's report made inside the engine, from what it already holds, and written all or nothing.

MONAI's evaluators hand their post-processing one case at a time, with its inverted mask and whatever the
pre-processing kept: here a copy of the CT, CBF and Tmax maps as read. ``PerfusionReportd`` (last in
configs/inference.json's ``postprocessing``) adds the case's perfusion figures and its threshold core
(``threshold_core``, a baseline that evaluation scores); ``CaseOutputsWriter`` (a handler) builds the case's row of
``per_case.csv`` in memory (its volume and perfusion figures and, in evaluation, the metrics of its mask and of each
baseline's, ``scripts.report.metrics.score_case``) and writes its overlay, its mask and its row; at the end it writes
``summary.csv`` from the rows. No map, mask or table is read back from disk. A case is finished when its row is in
``per_case.csv``: its overlay and mask are written (each whole) first, so a run killed at any moment leaves the
finished cases whole, and ``prepare_outputs`` lets the same command finish the others.
"""

from __future__ import annotations

import gzip
import json
import logging
import os

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import string_list_all_gather
from scripts.data.channels import MAPS_SOURCE, VENDOR_MAPS
from scripts.flags import as_bool
from scripts.report.metrics import METRIC_NAMES, score_case, volume_ml
from scripts.report.overlay import overlay_image, report_line
from scripts.report.perfusion import COLUMNS, perfusion_figures, perfusion_regions
from scripts.report.tables import print_table, read_csv, summarize, write_csv
from scripts.safe_files import LOCK, rank, require_held, write_atomically

__all__ = ["CaseOutputsWriter", "PerfusionReportd", "file_stamps", "mark_finished", "prepare_outputs", "table_columns"]

logger = logging.getLogger(__name__)

MANIFEST = "run.json"  # the settings of the run that writes a folder, and whether it finished
PER_CASE, SUMMARY = "per_case.csv", "summary.csv"  # the report: one row per case; its summary (evaluation)
MASKS, OVERLAYS = "masks", "overlays"
THRESHOLD_CORE = "threshold_core"  # the engine key of the threshold core (PerfusionReportd), a baseline


def table_columns(scored=False, baselines=()) -> list:
    """The columns of per_case.csv: ``case``; the predicted volume (inference) or every metric (evaluation, with
    ``scored``); where the perfusion maps came from (``maps_source``: ``vendor``, or computed by the bundle from the
    raw series, with the method) and the perfusion figures; then each baseline's metrics, ``<baseline>_<metric>``."""
    measured = list(METRIC_NAMES) if scored else ["volume_pred_ml"]
    baseline_columns = (f"{key}_{name}" for key in baselines for name in METRIC_NAMES)
    return ["case", *measured, MAPS_SOURCE, *COLUMNS, *baseline_columns]


def file_stamps(paths) -> list:
    """Each file's absolute path, size and modification time (a retrained model is another model); ``None`` for both
    where the file is absent (a run without weights, as the model zoo's inference test makes)."""
    stamps = []
    for path in paths:
        stat = os.stat(path) if os.path.exists(path) else None
        stamps.append([os.path.abspath(path), stat and stat.st_size, stat and stat.st_mtime_ns])
    return stamps


def _rows(folder):
    """The rows of the per_case.csv an earlier run left in ``folder``."""
    path = os.path.join(folder, PER_CASE)
    return read_csv(path) if os.path.isfile(path) else []


def _finished_rows(folder):
    """The rows of an earlier run in ``folder`` whose case's mask and overlay are there too."""
    return [row for row in _rows(folder) if all(os.path.isfile(p) for p in _case_files(folder, row["case"]))]


def _case_files(folder, case):
    return os.path.join(folder, MASKS, f"{case}.nii.gz"), os.path.join(folder, OVERLAYS, f"{case}.png")


def _clear(folder, cases, kept_rows):
    """Remove what a run of this bundle wrote in ``folder`` except the cases of ``kept_rows``: the other ``cases``'
    masks and overlays and its tables; nothing else. The kept rows stay in per_case.csv."""
    kept = {row["case"] for row in kept_rows}
    for case in set(cases) - kept:
        for path in _case_files(folder, case):
            if os.path.isfile(path):
                os.remove(path)
    for name in (PER_CASE, SUMMARY):
        if os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    if kept_rows:
        write_csv(os.path.join(folder, PER_CASE), list(kept_rows[0]), kept_rows)


def prepare_outputs(folder, items, settings, overwrite=False, lock=None) -> list:
    """Check ``folder`` before any case is segmented and return the datalist items still to do.

    A new or empty folder gets all items. A folder an unfinished run of the same ``settings`` wrote (its
    ``run.json``) is continued: the cases finished there (row, mask and overlay) are kept and the others done. A
    finished run, an unfinished one with other settings that finished a case, or a folder this bundle did not write
    is refused unless ``overwrite``, which replaces only what the earlier run wrote.

    Args:
        folder: the output folder (``prediction_dir``).
        items: the datalist items (``image``, maybe ``label``) of this run.
        settings: what the outputs depend on (checkpoints, inferer, thresholds, ...), JSON-serialisable.
        overwrite: replace a finished run or one with other settings.
        lock: this run's hold on ``folder`` (``scripts.safe_files.hold_folder``), taken first and kept until the
            run ends (under ``torchrun``, rank 0's for all ranks).

    Returns:
        The items to segment, in datalist order.

    Raises:
        FileExistsError: naming the folder and why, with ``--overwrite true`` as the way to replace it.
        ValueError: ``folder`` is not held.
    """
    overwrite = as_bool(overwrite, "overwrite")
    require_held(folder, lock)
    settings = json.loads(json.dumps(settings))  # tuples as lists, as the manifest reads back
    manifest = os.path.join(folder, MANIFEST)
    cases = [item["case"] for item in items]
    kept, earlier_cases = [], set()
    if os.path.isfile(manifest):
        with open(manifest) as f:
            earlier = json.load(f)
        finished = [] if overwrite else _finished_rows(folder)
        changed = sorted(k for k in {*settings, *earlier["settings"]} if settings.get(k) != earlier["settings"].get(k))
        if not overwrite and earlier["finished"]:
            raise FileExistsError(f"{folder} holds a finished run ({manifest}); pass --overwrite true to replace it")
        if finished and changed:
            raise FileExistsError(
                f"{folder} holds an unfinished run with other {', '.join(changed)} ({manifest}); pass --overwrite "
                "true to replace it, or rerun with its settings to finish it"
            )
        kept = [] if changed else finished  # an unfinished run that finished no case is replaced
        earlier_cases = {row["case"] for row in _rows(folder)}
    elif os.path.isdir(folder) and set(os.listdir(folder)) - {LOCK} and not overwrite:
        found = sorted(set(os.listdir(folder)) - {LOCK})[0]
        raise FileExistsError(
            f"{os.path.join(folder, found)} exists and {folder} has no {MANIFEST} of this bundle; pass --overwrite"
            " true to write into it anyway, or choose another output"
        )
    _barrier()  # every rank has read the folder before rank 0 changes it
    if rank() == 0:
        if os.path.isfile(manifest):
            _clear(folder, {*cases, *earlier_cases}, kept)
        os.makedirs(folder, exist_ok=True)
        write_atomically(manifest, lambda f: f.write(json.dumps({"settings": settings, "finished": False}).encode()))
    _barrier()
    if kept:
        logger.info("%s: %d case(s) an earlier run finished are kept", folder, len(kept))
    done = {row["case"] for row in kept}
    return [item for item, case in zip(items, cases) if case not in done]


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def mark_finished(folder) -> None:
    """Record in ``folder``'s ``run.json`` that its run finished (the last step of ``run``)."""
    if rank() != 0:
        return
    path = os.path.join(folder, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    write_atomically(path, lambda f: f.write(json.dumps({**manifest, "finished": True}).encode()))


class PerfusionReportd(MapTransform):
    """The perfusion figures and the threshold core of one case, last in the post-processing: from the input maps
    the pre-processing kept (``map_keys``: CT, CBF, Tmax as read, on the scan's grid) and the inverted mask
    (``keys``), whose affine gives the voxel volume. Adds the figures (``report_key``, the perfusion columns of
    per_case.csv) and the threshold core as a mask like the prediction (``baseline_key``, a baseline that evaluation
    scores).

    Args:
        keys: the mask key (``pred``).
        map_keys: the kept CT, CBF and Tmax maps, in that order.
        thresholds: the perfusion thresholds (``scripts.report.perfusion.DEFAULT_THRESHOLDS``).
        baseline_key: where the threshold core goes.
        report_key: where the figures go.
    """

    def __init__(
        self, keys: KeysCollection, map_keys, thresholds=None, baseline_key=THRESHOLD_CORE, report_key="perfusion"
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
        d[self.report_key] = perfusion_figures(regions, note, float(np.prod(_spacing(pred))) / 1000.0)
        return d


def _spacing(image):
    """The voxel size in mm of a MetaTensor's grid (from its affine)."""
    return [float(s) for s in image.pixdim]


class CaseOutputsWriter:
    """Ignite handler that makes each case's report as soon as the evaluator has it: its row of
    ``prediction_dir/per_case.csv`` (``table_columns``: the predicted volume and ``PerfusionReportd``'s figures; with
    a ``reference_key``, every metric of the mask and of each baseline's, ``scripts.report.metrics.score_case``, on the
    scan's grid), its overlay PNG (``prediction_dir/overlays``) and its mask (``prediction_dir/masks``, uint8 NIfTI
    with the scan's affine). The overlay and the mask are written first, then the row, each file whole under a
    temporary name; the table is rewritten after every case, so it always lists exactly the finished cases (under
    ``torch.distributed``, rank 0 writes every rank's rows when the run completes). Rows of cases an earlier run
    finished are kept. At the end, with a ``reference_key``, ``prediction_dir/summary.csv``: per scored mask (the
    network's, then each baseline's) and metric, the statistics of ``scripts.report.tables.summarize``; the summary
    (evaluation) or the table (inference) is printed.

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
        reference_key: the key of the reference mask, on the scan's grid (evaluation); None: nothing is scored.
        baseline_keys: the keys of the baselines' masks, scored like the prediction (evaluation).
        network_name: names the network's mask in the summary.
    """

    def __init__(
        self,
        prediction_dir,
        map_keys,
        ct_window=(0, 100),
        pred_key="pred",
        report_key="perfusion",
        case_writers=(),
        reference_key=None,
        baseline_keys=(),
        network_name="model",
    ):
        self.prediction_dir, self.map_keys, self.ct_window = prediction_dir, list(map_keys), ct_window
        self.pred_key, self.report_key, self.case_writers = pred_key, report_key, list(case_writers)
        self.reference_key, self.baseline_keys, self.network_name = reference_key, list(baseline_keys), network_name
        if self.baseline_keys and reference_key is None:
            raise ValueError(f"baselines {self.baseline_keys} are scored against a label: give the reference_key")
        self.columns = table_columns(reference_key is not None, self.baseline_keys)
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

    def _row(self, case, case_data):
        """The case's row: its predicted volume and perfusion figures, and the metrics of each scored mask."""
        pred = case_data[self.pred_key]
        row = {"case": case, "volume_pred_ml": volume_ml(pred, _spacing(pred)), **case_data[self.report_key]}
        row[MAPS_SOURCE] = case_data.get(MAPS_SOURCE, VENDOR_MAPS)
        if self.reference_key is not None:
            label = case_data[self.reference_key]
            row.update(score_case(pred, label, _spacing(pred)))
            for key in self.baseline_keys:
                scores = score_case(case_data[key], label, _spacing(pred))
                row.update({f"{key}_{name}": value for name, value in scores.items()})
        return {column: row[column] for column in self.columns}

    def _write_case(self, case_data):
        pred = case_data[self.pred_key]
        case = case_data["case"]
        mask = pred[0].detach().cpu().numpy() > 0
        ct, cbf = (case_data[k][0].detach().cpu().numpy() for k in self.map_keys[:2])
        affine = np.asarray(pred.affine, dtype=np.float64)
        row = self._row(case, case_data)
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
            if rank() != 0:
                return
            self.rows = {row["case"]: row for row in map(json.loads, gathered)}
            self._write_table()
        rows = list(self.rows.values())
        if not rows:
            return
        per_case = os.path.join(self.prediction_dir, PER_CASE)
        if self.reference_key is None:
            print_table(f"{per_case} (perfusion figures: research use, not a treatment decision):", self.columns, rows)
            return
        summary = []
        for scored, prefix in [(self.network_name, ""), *((key, f"{key}_") for key in self.baseline_keys)]:
            for stats in summarize(rows, [prefix + name for name in METRIC_NAMES]):
                summary.append({"mask": scored, **stats, "metric": stats["metric"][len(prefix) :]})
        path = os.path.join(self.prediction_dir, SUMMARY)
        write_csv(path, list(summary[0]), summary)
        print_table(f"{path}: {len(rows)} cases, per-case values in {per_case}:", list(summary[0]), summary)

    def _write_table(self):
        write_csv(os.path.join(self.prediction_dir, PER_CASE), self.columns, list(self.rows.values()))


def _distributed():
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1

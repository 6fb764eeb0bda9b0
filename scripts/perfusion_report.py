"""The perfusion figures a stroke team reads beside the predicted core, from the input maps alone, and the threshold
core as a non-learned baseline. Research figures, not a treatment decision.

Per case, on the scan's own grid (voxel volume from its affine; the maps are 0 outside the brain):
- hypoperfusion: Tmax > ``tmax_s`` (6 s);
- threshold core: relative CBF < ``rcbf`` (30 %) of the healthy-tissue mean (the mean CBF where Tmax <= 6 s), within
  the hypoperfused region;
- mismatch volume (hypoperfusion minus core) and ratio (hypoperfusion / core), and the hypoperfusion intensity ratio
  (Tmax > ``tmax_severe_s`` (10 s) volume / Tmax > 6 s volume); a ratio with an empty denominator is left blank.
Tmax must be in seconds: a map whose 99th percentile in the brain exceeds ``TMAX_SECONDS_LIMIT`` looks like
milliseconds, and its figures are left blank with a note (and a warning) instead of being wrong by 1000x.
"""

from __future__ import annotations

import logging
import math
import os

import nibabel as nib
import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU
from scripts.isles import CHANNELS, case_name
from scripts.metrics import ConfusionRatioMetric, EmptyMaskRule, LesionVolumeMetric
from scripts.reports import print_table, read_csv, write_csv

__all__ = ["DEFAULT_THRESHOLDS", "perfusion_figures", "score_threshold_baseline", "write_perfusion_report"]

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = {"tmax_s": 6.0, "tmax_severe_s": 10.0, "rcbf": 0.3}
TMAX_SECONDS_LIMIT = 100.0
COLUMNS = (
    "hypoperfusion_ml",
    "core_rcbf_ml",
    "mismatch_ml",
    "mismatch_ratio",
    "hypoperfusion_intensity_ratio",
    "perfusion_note",
)
BASELINE_METRICS = (
    "dice",
    "jaccard",
    "precision",
    "recall",
    "hd95_mm",
    "volume_true_ml",
    "volume_pred_ml",
    "volume_abs_diff_ml",
)


def _maps(image):
    """CBF and Tmax as float arrays (header scaling applied), the affine, and a case's image (5 files or one 4D)."""
    if isinstance(image, str):
        img = nib.load(image)
        cbf, tmax = (np.asanyarray(img.dataobj[..., CHANNELS.index(c)], dtype=np.float64) for c in ("CBF", "Tmax"))
        return cbf, tmax, img.affine
    cbf, tmax = (nib.load(image[CHANNELS.index(c)]) for c in ("CBF", "Tmax"))
    return np.asanyarray(cbf.dataobj, dtype=np.float64), np.asanyarray(tmax.dataobj, dtype=np.float64), cbf.affine


def _regions(image, thresholds):
    """The brain, hypoperfusion, severe hypoperfusion and threshold-core masks, the voxel volume in mL and a note."""
    t = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    cbf, tmax, affine = _maps(image)
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    brain = (cbf > 0) | (tmax > 0)
    if not brain.any():
        return None, voxel_ml, "the CBF and Tmax maps are empty"
    p99 = float(np.percentile(tmax[brain], 99))
    if p99 > TMAX_SECONDS_LIMIT:
        return None, voxel_ml, f"Tmax looks like milliseconds (99th percentile {p99:.0f}), not seconds"
    hypo = brain & (tmax > t["tmax_s"])
    healthy = brain & ~hypo & (cbf > 0)
    if not healthy.any():
        return None, voxel_ml, "no healthy tissue (Tmax <= threshold) to take the reference CBF from"
    core = hypo & (cbf < t["rcbf"] * cbf[healthy].mean())
    return {"hypo": hypo, "severe": brain & (tmax > t["tmax_severe_s"]), "core": core}, voxel_ml, ""


def perfusion_figures(image, thresholds=None) -> dict:
    """The report's figures of one case (``image``: the 5 maps or one 4D file); blank ones with a note when the maps
    do not allow them."""
    regions, voxel_ml, note = _regions(image, thresholds)
    if regions is None:
        logger.warning("%s: no perfusion figures: %s", case_name(image), note)
        return {**dict.fromkeys(COLUMNS[:-1], ""), "perfusion_note": note}
    hypo, severe, core = (float(regions[k].sum()) * voxel_ml for k in ("hypo", "severe", "core"))
    return {
        "hypoperfusion_ml": round(hypo, 3),
        "core_rcbf_ml": round(core, 3),
        "mismatch_ml": round(hypo - core, 3),
        "mismatch_ratio": round(hypo / core, 3) if core else "",
        "hypoperfusion_intensity_ratio": round(severe / hypo, 3) if hypo else "",
        "perfusion_note": "",
    }


def write_perfusion_report(items, volumes_csv, thresholds=None):
    """Add the perfusion figures of each datalist item to ``volumes_csv`` (one row per case, by ``case``), or write
    them alone there when it does not exist yet. Returns the rows."""
    figures = {case_name(item["image"]): perfusion_figures(item["image"], thresholds) for item in items}
    rows = read_csv(volumes_csv) if os.path.exists(volumes_csv) else [{"case": case} for case in figures]
    header = [*(rows[0] if rows else {"case": ""}), *COLUMNS]
    rows = [{**row, **figures[row["case"]]} for row in rows]
    write_csv(volumes_csv, header, rows)
    print_table(f"{volumes_csv} (perfusion figures: research use, not a treatment decision):", header, rows)
    return rows


def _baseline_scores(core, label, spacing):
    """The metrics of ``run evaluating`` (scripts.metrics, MONAI's) of one threshold core against its label."""
    pred = torch.as_tensor(core[None, None], dtype=torch.float32)
    true = torch.as_tensor(label[None, None], dtype=torch.float32)
    metrics = {
        "dice": DiceMetric(include_background=True, ignore_empty=False),
        "jaccard": MeanIoU(include_background=True, ignore_empty=False),
        "precision": ConfusionRatioMetric("precision"),
        "recall": ConfusionRatioMetric("recall"),
        "hd95_mm": EmptyMaskRule(HausdorffDistanceMetric(include_background=True, percentile=95)),
        "volume_true_ml": LesionVolumeMetric("label"),
        "volume_pred_ml": LesionVolumeMetric("pred"),
        "volume_abs_diff_ml": LesionVolumeMetric("abs_difference"),
    }
    scores = {}
    for name, metric in metrics.items():
        value = metric(pred, true, spacing=spacing) if name.startswith(("hd95", "volume")) else metric(pred, true)
        scores[name] = float(torch.as_tensor(value).flatten()[0])
    return scores


def score_threshold_baseline(items, per_case_csv, thresholds=None):
    """Score the threshold core (rCBF < 30 % within Tmax > 6 s) of each labelled item against its label with the
    metrics of ``run evaluating``, as the ISLES 2018 challenge's non-learned baseline; write ``per_case_csv`` and
    print the means. Returns the rows."""
    rows = []
    for item in items:
        regions, _, note = _regions(item["image"], thresholds)
        label_img = nib.load(item["label"])
        label = np.asanyarray(label_img.dataobj) > 0
        core = regions["core"] if regions is not None else np.zeros_like(label)
        spacing = [float(s) for s in nib.affines.voxel_sizes(label_img.affine)]
        rows.append(
            {"case": case_name(item["image"]), **_baseline_scores(core, label, spacing), "perfusion_note": note}
        )
    header = ["case", *BASELINE_METRICS, "perfusion_note"]
    write_csv(per_case_csv, header, rows)
    means = {
        m: np.nanmean([r[m] for r in rows]) if any(not math.isnan(r[m]) for r in rows) else math.nan
        for m in BASELINE_METRICS
    }
    print_table(
        f"threshold baseline (rCBF core), {len(rows)} cases, per case in {per_case_csv}:",
        list(means),
        [{m: round(v, 4) for m, v in means.items()}],
    )
    return rows

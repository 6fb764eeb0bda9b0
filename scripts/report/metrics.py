"""The per-case lesion metrics of evaluation, in scanner units, for one pair of masks (``score_case``), which the case
report (``scripts.report.cases.CaseOutputsWriter``) calls for the model's mask and for each baseline's.

MONAI computes the overlap and distance metrics (``compute_dice``, ``compute_iou``, ``get_confusion_matrix``,
``compute_hausdorff_distance``, ``compute_average_surface_distance``) and ``panoptica`` the lesion-wise ones (the
ISLES 2024 scoring's library: connected components, naive IoU-threshold matching, one matching per pair for both
lesion columns). This module adds what they lack: the voxel spacing from the mask's affine, the volumes (MONAI has
no volume metric) and the empty-mask rules.

Empty masks (docs/evaluation.md): Dice and Jaccard are 1 when both masks are empty and 0 when one is (MONAI with
``ignore_empty=False``); precision is NaN for an empty prediction and recall NaN for an empty label (0/0); HD95 and
ASSD are 0 when both are empty and NaN when one is; volumes are always defined. Lesion-wise F1 is 1 when both are
empty and 0 when one is, as the ISLES 2024 scoring has it; the lesion-count difference is always defined.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import (
    CumulativeIterationMetric,
    compute_average_surface_distance,
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    get_confusion_matrix,
)
from panoptica import (
    ConnectedComponentsInstanceApproximator,
    InputType,
    NaiveThresholdMatching,
    Panoptica_Evaluator,
    disable_citation_reminder,
)
from scripts.monai_gaps import surface_distance_deprecation_ignored

__all__ = ["LESION_MATCHING_IOU", "METRIC_NAMES", "LesionF1Metric", "lesion_figures", "score_case", "volume_ml"]

disable_citation_reminder()  # else panoptica prints a banner in every process that imports it
# IoU from which a predicted lesion matches a reference lesion: the ISLES 2024 scoring code's
# (github:ezequieldlrosa/isles24, utils/eval_utils.py, NaiveThresholdMatching(matching_threshold=0.2) since
# December 2025; the 2024 leaderboard used panoptica's default, 0.5)
LESION_MATCHING_IOU = 0.2
# The per-case metrics, in the order of the report's columns
METRIC_NAMES = (
    "dice",
    "jaccard",
    "precision",
    "recall",
    "hd95_mm",
    "assd_mm",
    "volume_true_ml",
    "volume_pred_ml",
    "volume_abs_diff_ml",
    "lesion_f1",
    "lesion_count_diff",
)


def volume_ml(mask, spacing) -> float:
    """The volume of a binary mask in mL: its voxel count times the voxel volume (``spacing`` in mm; 1 mL = 1000
    mm^3)."""
    return float(np.count_nonzero(np.asarray(mask))) * float(np.prod(spacing)) / 1000.0


def _binary(mask, spatial_dims):
    """A mask (a tensor or an array, maybe with one channel first) as a boolean CPU tensor of its spatial dims."""
    mask = torch.as_tensor(mask).detach().cpu()
    return (mask[0] if mask.ndim == spatial_dims + 1 else mask) > 0


def score_case(pred, label, spacing, matching_iou=LESION_MATCHING_IOU) -> dict:
    """Every metric of ``METRIC_NAMES`` for one case.

    Args:
        pred: the predicted binary mask (spatial dims only, or one channel first), on the label's grid.
        label: the reference binary mask.
        spacing: the voxel size in mm, one value per spatial dim.
        matching_iou: the IoU from which a predicted lesion matches a reference lesion.

    Returns:
        ``{name: float}`` in ``METRIC_NAMES`` order (NaN where undefined).
    """
    pred, label = (_binary(m, len(spacing)) for m in (pred, label))
    y_pred, y = pred[None, None].float(), label[None, None].float()  # batch and channel, as MONAI's metrics take
    confusion = get_confusion_matrix(y_pred, y)
    values = {
        "dice": compute_dice(y_pred, y, ignore_empty=False),
        "jaccard": compute_iou(y_pred, y, ignore_empty=False),
        "precision": compute_confusion_matrix_metric("precision", confusion),  # NaN for 0/0
        "recall": compute_confusion_matrix_metric("recall", confusion),
    }
    values = {name: float(value.flatten()[0]) for name, value in values.items()}
    if pred.any() and label.any():
        with surface_distance_deprecation_ignored():
            hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
            assd = compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True, spacing=spacing)
        values.update(hd95_mm=float(hd95.flatten()[0]), assd_mm=float(assd.flatten()[0]))
    else:  # no surface to measure to: 0 when both are empty (they agree), NaN when one is
        values.update(dict.fromkeys(("hd95_mm", "assd_mm"), 0.0 if not (pred.any() or label.any()) else np.nan))
    true_ml, pred_ml = volume_ml(label, spacing), volume_ml(pred, spacing)
    values.update(volume_true_ml=true_ml, volume_pred_ml=pred_ml, volume_abs_diff_ml=abs(pred_ml - true_ml))
    values["lesion_f1"], values["lesion_count_diff"] = lesion_figures(pred, label, matching_iou)
    return {name: values[name] for name in METRIC_NAMES}


def lesion_figures(pred, label, matching_iou=LESION_MATCHING_IOU) -> tuple:
    """``(lesion_f1, lesion_count_diff)`` of two boolean masks from one panoptica matching: lesions are connected
    components, matched one to one where their IoU is at least ``matching_iou``; F1 is panoptica's recognition
    quality tp / (tp + (fp + fn) / 2), 1 when both masks are empty."""
    lesions = Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=NaiveThresholdMatching(matching_threshold=matching_iou),
    ).evaluate(np.asarray(pred).astype(np.int32), np.asarray(label).astype(np.int32), verbose=False)["ungrouped"]
    both_empty = lesions.n_ref_instances == 0 and lesions.n_pred_instances == 0
    return (1.0 if both_empty else float(lesions.rq)), float(abs(lesions.n_ref_instances - lesions.n_pred_instances))


class LesionF1Metric(CumulativeIterationMetric):
    """The lesion-wise F1 of ``lesion_figures`` as a MONAI metric, for the validation of training
    (``IgniteMetricHandler``): one value per case and channel of one-hot ``y_pred`` and ``y``, their mean.

    Args:
        matching_iou: the IoU from which a predicted lesion matches a reference lesion.
    """

    def __init__(self, matching_iou=LESION_MATCHING_IOU):
        super().__init__()
        self.matching_iou = matching_iou

    def _compute_tensor(self, y_pred, y=None):
        values = [
            [lesion_figures(p.cpu().numpy() > 0, t.cpu().numpy() > 0, self.matching_iou)[0] for p, t in zip(pc, tc)]
            for pc, tc in zip(y_pred, y)
        ]
        return torch.tensor(values, dtype=torch.float32, device=y_pred.device)

    def aggregate(self):
        """The mean over every case and channel seen since the last ``reset``."""
        return self.get_buffer().float().mean()

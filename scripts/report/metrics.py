"""Per-case lesion metrics in scanner units, for MONAI's evaluators and ``MetricsSaver`` (configs/evaluate.json).

MONAI has the metrics themselves (``DiceMetric``, ``MeanIoU``, ``ConfusionMatrixMetric``, ``HausdorffDistanceMetric``,
``SurfaceDistanceMetric``) and ``MetricsSaver``; this module fills the gaps around them:

- ``SpacingMetricHandler``: MONAI's metric handlers call ``metric_fn(y_pred, y)`` without the voxel spacing, so
  distances and volumes would come out in voxels.
- ``LesionVolumeMetric``: MONAI has no volume metric.
- ``ConfusionRatioMetric``: ``ConfusionMatrixMetric`` keeps each case's TP/FP/TN/FN counts, so the per-case report
  would hold counts instead of precision and recall.
- ``EmptyMaskRule``: MONAI's distance metrics give NaN or inf (depending on the metric) when a mask is empty.
- ``ChallengeLesionMetric``: MONAI has no lesion-wise (instance) metrics; ISLES 2024 scores with ``panoptica``
  (connected components, naive IoU-threshold matching), which this wraps as its scoring code calls it.

Empty masks (docs/evaluation.md): Dice and Jaccard are 1 when both masks are empty and 0 when one is (MONAI with
``ignore_empty=False``); precision is NaN for an empty prediction and recall NaN for an empty label (0/0); HD95 and
ASSD are 0 when both are empty and NaN when one is; volumes are always defined. NaNs are left out of the summary
statistics, whose ``notnans`` column counts the cases that entered them. Lesion-wise F1 is 1 when both are empty
and 0 when one is, as the ISLES 2024 scoring has it; the lesion-count difference is always defined.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict

import numpy as np
import torch
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import (
    ConfusionMatrixMetric,
    CumulativeIterationMetric,
    DiceMetric,
    HausdorffDistanceMetric,
    MeanIoU,
    SurfaceDistanceMetric,
)
from monai.metrics.confusion_matrix import compute_confusion_matrix_metric
from monai.metrics.utils import do_metric_reduction
from panoptica import (
    ConnectedComponentsInstanceApproximator,
    InputType,
    NaiveThresholdMatching,
    Panoptica_Evaluator,
    disable_citation_reminder,
)

__all__ = [
    "LESION_MATCHING_IOU",
    "METRICS",
    "METRIC_NAMES",
    "ChallengeLesionMetric",
    "ConfusionRatioMetric",
    "EmptyMaskRule",
    "LesionVolumeMetric",
    "SpacingMetricHandler",
    "metric_handlers",
]

disable_citation_reminder()  # else panoptica prints a banner in every process that imports it
# IoU from which a predicted lesion matches a reference lesion: the ISLES 2024 scoring code's
# (github:ezequieldlrosa/isles24, utils/eval_utils.py, NaiveThresholdMatching(matching_threshold=0.2) since
# December 2025; the 2024 leaderboard used panoptica's default, 0.5)
LESION_MATCHING_IOU = 0.2

# The one deprecation MONAI 1.6.1 warns of from its own call (metrics/utils.py), whatever the caller passes
DEPRECATED_BY_MONAI_ITSELF = r"monai\.metrics\.utils get_mask_edges:always_return_as_numpy: "


class SpacingMetricHandler(IgniteMetricHandler):
    """Metric handler that calls ``metric_fn`` case by case with ``spacing=`` that case's voxel size in mm.

    The spacing is read from the prediction's affine, which after ``Invertd`` is the scan's own. ``y`` may be None
    (inference: the predicted volume alone).
    """

    def update(self, output):
        y_pred, y = output
        for index, pred in enumerate(y_pred):
            if not isinstance(pred, MetaTensor):
                raise TypeError(f"{self._name}: predictions must be MetaTensors, their affine gives the voxel spacing")
            label = None if y is None else y[index][None]
            self.metric_fn(pred[None], label, spacing=[float(s) for s in pred.pixdim])


class _PerCaseMetric(CumulativeIterationMetric):
    """Buffers one value per case and channel; ``aggregate`` is the mean over the non-NaN values."""

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction

    def aggregate(self, reduction=None):
        return _mean_of_defined(self.get_buffer(), reduction or self.reduction)


def _mean_of_defined(values, reduction):
    """MONAI's reduction over the non-NaN values; NaN (where MONAI gives 0) when there are none."""
    reduced, not_nans = do_metric_reduction(values, reduction)
    return torch.where(not_nans > 0, reduced, torch.nan)


class LesionVolumeMetric(_PerCaseMetric):
    """Lesion volume in mL of binary masks (B, C, ...): voxel count times voxel volume (``spacing`` in mm, 1 mL =
    1000 mm^3). ``of``: ``"pred"``, ``"label"`` or ``"abs_difference"`` (|pred - label|, the ISLES volume error)."""

    def __init__(self, of="pred", reduction="mean"):
        super().__init__(reduction)
        if of not in ("pred", "label", "abs_difference"):
            raise ValueError(f"of must be 'pred', 'label' or 'abs_difference', got {of!r}")
        self.of = of

    def _compute_tensor(self, y_pred, y=None, spacing=None):
        if spacing is None:
            raise ValueError("LesionVolumeMetric needs the voxel spacing in mm (use it through SpacingMetricHandler)")
        voxel_ml = float(np.prod(spacing)) / 1000.0
        if self.of != "pred" and y is None:
            raise ValueError(f"the {self.of} volume needs the label")
        volumes = {
            key: mask.flatten(2).sum(-1).double() * voxel_ml
            for key, mask in (("pred", y_pred), ("label", y))
            if mask is not None
        }
        if self.of == "abs_difference":
            return (volumes["pred"] - volumes["label"]).abs().float()
        return volumes[self.of].float()


class ConfusionRatioMetric(ConfusionMatrixMetric):
    """One ratio of MONAI's ``ConfusionMatrixMetric`` (e.g. ``"precision"``, ``"recall"``) buffered per case, NaN
    where it is 0/0 (precision of an empty prediction, recall against an empty label)."""

    def __init__(self, metric_name, include_background=True, reduction="mean"):
        super().__init__(
            include_background=include_background, metric_name=metric_name, compute_sample=True, reduction=reduction
        )

    def _compute_tensor(self, y_pred, y=None, **kwargs):
        return compute_confusion_matrix_metric(self.metric_name[0], super()._compute_tensor(y_pred, y))

    def aggregate(self, compute_sample=False, reduction=None):
        return _mean_of_defined(self.get_buffer(), reduction or self.reduction)


class EmptyMaskRule(_PerCaseMetric):
    """A MONAI surface-distance metric (``HausdorffDistanceMetric``, ``SurfaceDistanceMetric``) with a defined value
    on empty masks: ``both_empty`` (default 0 mm: the masks agree) when prediction and label are both empty, NaN
    when exactly one is (there is no surface to measure to). Other cases keep the wrapped metric's value."""

    def __init__(self, metric, both_empty=0.0, reduction="mean"):
        super().__init__(reduction)
        self.metric, self.both_empty = metric, float(both_empty)

    def _compute_tensor(self, y_pred, y=None, **kwargs):
        with warnings.catch_warnings():  # MONAI warns that empty masks give NaN or inf; the rule below replaces those
            warnings.filterwarnings("ignore", message=".* is all 0, this may result in nan/inf distance")
            # MONAI 1.6.1's own get_edge_surface_distance passes get_mask_edges the argument it deprecates
            warnings.filterwarnings("ignore", message=DEPRECATED_BY_MONAI_ITSELF, category=FutureWarning)
            value = self.metric(y_pred, y, **kwargs)
        self.metric.reset()  # the wrapped metric is only used for its per-case values
        pred_any, label_any = y_pred.flatten(2).any(-1), y.flatten(2).any(-1)
        value = torch.where(pred_any & label_any, value, torch.nan)
        return torch.where(~pred_any & ~label_any, self.both_empty, value)


# panoptica's matchings of the last few (prediction, label) pairs: lesion_f1 and lesion_count_diff are two figures of
# one matching, which takes seconds on a whole-brain grid; keyed by the masks' bits, so a pair matches only itself
_MATCHINGS: OrderedDict = OrderedDict()
_MATCHINGS_KEPT = 8


def _mask_key(mask: np.ndarray) -> bytes:
    """A digest of a boolean mask's shape and voxels."""
    return hashlib.sha256(repr(mask.shape).encode() + np.packbits(mask).tobytes()).digest()


class ChallengeLesionMetric(_PerCaseMetric):
    """A lesion-wise figure of the ISLES 2024 scoring, computed by ``panoptica`` as the challenge's code calls it:
    lesions are connected components, matched one to one where their IoU is at least ``matching_iou``. A pair of
    masks is matched once for both figures (the matchings of the last 8 pairs are kept).

    Args:
        of: ``"f1"`` (panoptica's recognition quality ``rq``, tp / (tp + (fp + fn) / 2); 1 when both masks are
            empty, as the challenge sets it) or ``"count_difference"`` (|reference lesions - predicted lesions|).
        matching_iou: the matching threshold.
    """

    def __init__(self, of="f1", matching_iou=LESION_MATCHING_IOU, reduction="mean"):
        super().__init__(reduction)
        if of not in ("f1", "count_difference"):
            raise ValueError(f"of must be 'f1' or 'count_difference', got {of!r}")
        self.of = of
        self.matching_iou = matching_iou
        self.evaluator = Panoptica_Evaluator(
            expected_input=InputType.SEMANTIC,
            instance_approximator=ConnectedComponentsInstanceApproximator(),
            instance_matcher=NaiveThresholdMatching(matching_threshold=matching_iou),
        )

    def _compute_tensor(self, y_pred, y=None, **kwargs):
        values = [
            [self._one(pred_c, label_c) for pred_c, label_c in zip(pred, label)] for pred, label in zip(y_pred, y)
        ]
        return torch.tensor(values, dtype=torch.float32, device=y_pred.device)

    def _one(self, pred, label):
        pred, label = (t.detach().cpu().numpy() > 0 for t in (pred, label))
        n_ref, n_pred, rq = self._matching(pred, label)
        if self.of == "count_difference":
            return float(abs(n_ref - n_pred))
        return 1.0 if n_ref == 0 and n_pred == 0 else rq

    def _matching(self, pred, label):
        """(reference lesions, predicted lesions, rq) of panoptica's matching of the boolean masks."""
        key = (_mask_key(pred), _mask_key(label), self.matching_iou)
        if key in _MATCHINGS:
            _MATCHINGS.move_to_end(key)
            return _MATCHINGS[key]
        result = self.evaluator.evaluate(pred.astype(np.int32), label.astype(np.int32), verbose=False)["ungrouped"]
        _MATCHINGS[key] = int(result.n_ref_instances), int(result.n_pred_instances), float(result.rq)
        if len(_MATCHINGS) > _MATCHINGS_KEPT:
            _MATCHINGS.popitem(last=False)
        return _MATCHINGS[key]


# The per-case metrics of evaluation, defined once, in the order of metrics_per_case.csv: name -> (a new metric, whether
# it takes the voxel spacing). configs/evaluate.json scores the model's masks and the threshold-core baseline with them.
METRICS = {
    "dice": (lambda: DiceMetric(include_background=True, ignore_empty=False), False),
    "jaccard": (lambda: MeanIoU(include_background=True, ignore_empty=False), False),
    "precision": (lambda: ConfusionRatioMetric("precision"), False),
    "recall": (lambda: ConfusionRatioMetric("recall"), False),
    "hd95_mm": (lambda: EmptyMaskRule(HausdorffDistanceMetric(include_background=True, percentile=95)), True),
    "assd_mm": (lambda: EmptyMaskRule(SurfaceDistanceMetric(include_background=True, symmetric=True)), True),
    "volume_true_ml": (lambda: LesionVolumeMetric("label"), True),
    "volume_pred_ml": (lambda: LesionVolumeMetric("pred"), True),
    "volume_abs_diff_ml": (lambda: LesionVolumeMetric("abs_difference"), True),
    "lesion_f1": (lambda: ChallengeLesionMetric("f1"), False),
    "lesion_count_diff": (lambda: ChallengeLesionMetric("count_difference"), False),
}
METRIC_NAMES = tuple(METRICS)


def metric_handlers(names=METRIC_NAMES, pred_key="pred", label_key="label", prefix="") -> dict:
    """Ignite handlers of the ``METRICS`` named, each with a metric of its own, for an evaluator's
    ``key_val_metric`` / ``additional_metrics``.

    Args:
        names: which of ``METRICS``, in order.
        pred_key: the engine output key of the masks to score (``pred``, or ``baseline`` for the threshold core).
        label_key: the key of the labels.
        prefix: put before each name (``baseline_``), so that two sets can share an evaluator.

    Returns:
        ``{prefix + name: handler}``.
    """
    handlers = {}
    for name in names:
        make, in_mm = METRICS[name]
        handler = SpacingMetricHandler if in_mm else IgniteMetricHandler
        handlers[prefix + name] = handler(metric_fn=make(), output_transform=from_engine([pred_key, label_key]))
    return handlers

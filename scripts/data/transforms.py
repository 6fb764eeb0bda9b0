"""The deterministic pre-processing of every run, defined once for configs/train.json and configs/inference.json.

The two configs must each stand alone (MONAI Label reads each without the other, and a ``%file#id`` macro resolves
against the working folder, not the bundle), so the transform list they share lives here; each config builds it from
its own top-level ids. Every step is a MONAI transform but the two defined here: ``RequireFinited`` (MONAI has no
transform that refuses non-finite tensors: a NaN input would give an empty mask and 0 mL without a word) and
``RelativeToHealthyd``.
"""

from __future__ import annotations

import torch
from monai.config import KeysCollection
from monai.transforms import (
    ConcatItemsd,
    CopyItemsd,
    CropForegroundd,
    DeleteItemsd,
    EnsureTyped,
    Lambdad,
    MapTransform,
    MaskIntensityd,
    NormalizeIntensityd,
    Orientationd,
    Resized,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    SplitDimd,
)
from scripts.data.channels import CHANNELS, HEALTHY_TMAX_S, channel, tmax_not_in_seconds
from scripts.data.readers import LoadCased
from scripts.flags import as_bool

__all__ = [
    "MAP_NORMALISATIONS",
    "REPORT_MAPS",
    "RelativeToHealthyd",
    "RequireFinited",
    "case_preprocessing",
    "in_brain",
    "lesion_mask",
]

REPORT_MAPS = ("CT", "CBF", "Tmax")  # the maps the per-case report reads as they were loaded
MAP_NORMALISATIONS = ("zscore", "window")  # the values of ``map_normalisation``


def lesion_mask(label):
    """A label as a float mask: lesion wherever it is positive."""
    return (label > 0).float()


def in_brain(image):
    """The brain of an image (CT first, then the four perfusion maps, then optional inputs), one channel: where the
    perfusion maps give a value, as the perfusion software leaves them (0 outside)."""
    return (image[1 : len(CHANNELS)] != 0).any(0, keepdim=True)


class RequireFinited(MapTransform):
    """Raise ``ValueError`` naming the case and the channels when ``keys`` hold NaN or Inf.

    Args:
        keys: keys of the (channel-first) tensors to check.
        channel_names: a name per channel for the message, e.g. the input maps; default the channel index.
        what: what the tensor is, for the message (``"input"``, ``"prediction"``).
        allow_missing_keys: do not raise for absent keys.
    """

    def __init__(self, keys: KeysCollection, channel_names=None, what: str = "input", allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.channel_names = None if channel_names is None else list(channel_names)
        self.what = what

    def __call__(self, data):
        for key in self.key_iterator(data):
            values = data[key]
            finite = torch.isfinite(torch.as_tensor(values)).flatten(1).all(1)
            if not finite.all():
                bad = [int(c) for c in torch.nonzero(~finite).flatten()]
                names = [self.channel_names[c] if self.channel_names else str(c) for c in bad]
                source = getattr(values, "meta", {}).get("filename_or_obj", "?")
                raise ValueError(
                    f"{data.get('case', '?')}: the {self.what} '{key}' holds NaN or Inf in channel(s)"
                    f" {', '.join(names)} (from {source}); nothing was written for this case"
                )
        return data


class RelativeToHealthyd(MapTransform):
    """Each map of ``keys`` divided by its mean over healthy tissue: where it is above 0 and the Tmax map
    (``tmax_key``, in seconds) is at most ``healthy_tmax_s``, as the threshold core takes its reference; over all its
    non-zero voxels where none is healthy. A blank map stays as it is. A Tmax map that is not in seconds
    (``scripts.data.channels.tmax_not_in_seconds``: tenths of a second, milliseconds) is refused, naming the case:
    the healthy tissue and the fixed windows read it in seconds.

    Args:
        keys: the maps to make relative.
        tmax_key: the Tmax map, in seconds.
        healthy_tmax_s: the Tmax up to which tissue counts as healthy.
    """

    def __init__(self, keys, tmax_key, healthy_tmax_s=HEALTHY_TMAX_S):
        super().__init__(keys)
        self.tmax_key, self.healthy_tmax_s = tmax_key, healthy_tmax_s

    def __call__(self, data):
        d = dict(data)
        tmax = d[self.tmax_key]
        median = tmax_not_in_seconds(tmax)
        if median is not None:
            raise ValueError(
                f"{d.get('case', 'a case')}: the Tmax map is not in seconds (median {median:.3g} over"
                " its measured voxels; healthy tissue is 0-4 s), and map_normalisation 'window' reads it in seconds"
            )
        healthy = tmax <= self.healthy_tmax_s
        for key in self.key_iterator(d):
            values = d[key]
            reference = values[healthy & (values > 0)]
            if reference.numel() == 0:
                reference = values[values > 0]
            if reference.numel():
                d[key] = values / reference.float().mean()
        return d


def case_preprocessing(
    channels,
    ct_window,
    spatial_size,
    load_keys,
    spatial_keys,
    resize_modes,
    input_map_keys=None,
    map_normalisation="zscore",
    target_spacing=None,
    brain_mask=False,
    reader=None,
    check=False,
    refuse_blank=False,
) -> list:
    """Load a case's maps as the channels of ``image_key`` (``scripts.data.readers.LoadCased``), window the CT to
    [0, 1] and z-score each perfusion map within the brain (non-zero voxels) or window it (``map_normalisation``;
    ``scripts.data.channels`` says which input is which and gives the windows), refuse NaN/Inf, bring it to RAS and
    resize it to ``spatial_size`` (the paper's recipe), or resample it to ``target_spacing`` and pad it to at least
    ``spatial_size`` (patches).

    Args:
        channels: the channel names in order, CT first (``image_key`` becomes ``image_<name>`` while split).
        ct_window: the CT window in HU, mapped to [0, 1] and clipped.
        spatial_size: the network's input size.
        load_keys: the keys to load: the image's, then the label's where there is one (binarised).
        spatial_keys: the keys to reorient and resize (the label too for training, not for evaluation).
        resize_modes: the interpolation of each of ``spatial_keys``.
        input_map_keys: where to keep a copy of ``REPORT_MAPS`` as read, for the per-case report
            (``scripts.report.cases``); None keeps nothing (training).
        map_normalisation: ``"zscore"``: each input but the CT z-scored within its non-zero voxels; ``"window"``: each
            mapped from its fixed ``window`` to [0, 1] and clipped, CBF and CBV first made relative to healthy tissue
            (``RelativeToHealthyd``); an input without a window is z-scored.
        target_spacing: None resizes the whole volume to ``spatial_size``; a voxel size in mm resamples to it
            (``Spacingd``) instead, and ``spatial_size`` is then the patch (training) and window (inference) size.
        brain_mask: restrict the input to the brain (``in_brain``): the image set to 0 outside it (MONAI's
            ``MaskIntensityd``: the CT and optional inputs; the maps are 0 there already) and cropped to its bounding
            box (``CropForegroundd``) before the resize or the resampling, so the loss covers the brain's box only;
            ``Invertd`` pads the prediction back.
        reader: a reader besides the NIfTI one (``scripts.data.readers.CheckedNiftiReader``), or None; configs/dicom.json
            gives ``scripts.dicom.series.DicomSeriesReader``.
        check: check each file and case as it is loaded (the ``check_inputs`` id; ``LoadCased``).
        refuse_blank: with ``check``, refuse a blank perfusion map (training).

    Returns:
        The transforms, in order.
    """
    if map_normalisation not in MAP_NORMALISATIONS:
        raise ValueError(f"map_normalisation {map_normalisation!r}: expected one of {', '.join(MAP_NORMALISATIONS)}")
    image_key, label_keys = load_keys[0], list(load_keys[1:])
    keys = {c: f"{image_key}_{c}" for c in channels}
    windowed = [keys[c] for c in channels if channel(c).normalisation == "window"]
    fixed = [c for c in channels if map_normalisation == "window" and keys[c] not in windowed and channel(c).window]
    zscored = [keys[c] for c in channels if keys[c] not in windowed and c not in fixed]
    relative = [keys[c] for c in fixed if channel(c).relative]
    transforms = [
        LoadCased(load_keys, channels, as_bool(check, "check_inputs"), as_bool(refuse_blank, "refuse_blank"), reader),
        *([Lambdad(keys=label_keys, func=lesion_mask)] if label_keys else []),
        SplitDimd(keys=image_key, output_postfixes=channels, dim=0, keepdim=True),
    ]
    if input_map_keys:
        transforms.append(CopyItemsd(keys=[f"{image_key}_{c}" for c in REPORT_MAPS], names=input_map_keys))
    return transforms + [
        ScaleIntensityRanged(keys=windowed, a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0, clip=True),
        *([RelativeToHealthyd(relative, tmax_key=keys["Tmax"])] if relative else []),
        *(
            ScaleIntensityRanged(keys=keys[c], a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
            for c, (lo, hi) in ((c, channel(c).window) for c in fixed)
        ),
        *([NormalizeIntensityd(keys=zscored, nonzero=True)] if zscored else []),
        ConcatItemsd(keys=list(keys.values()), name=image_key, dim=0),
        DeleteItemsd(keys=list(keys.values())),
        RequireFinited(keys=image_key, channel_names=channels),
        *(
            [
                MaskIntensityd(keys=image_key, mask_key=image_key, select_fn=in_brain),
                CropForegroundd(
                    keys=spatial_keys,
                    source_key=image_key,
                    select_fn=in_brain,
                    margin=2,
                    start_coord_key=None,
                    end_coord_key=None,
                    allow_missing_keys=True,
                ),
            ]
            if as_bool(brain_mask, "brain_mask")
            else []
        ),
        Orientationd(keys=spatial_keys, axcodes="RAS", labels=None, allow_missing_keys=True),
        *(
            [Resized(keys=spatial_keys, spatial_size=spatial_size, mode=resize_modes, allow_missing_keys=True)]
            if target_spacing is None
            else [
                Spacingd(keys=spatial_keys, pixdim=target_spacing, mode=resize_modes, allow_missing_keys=True),
                SpatialPadd(keys=spatial_keys, spatial_size=spatial_size, allow_missing_keys=True),
            ]
        ),
        EnsureTyped(keys=load_keys, dtype=torch.float32, allow_missing_keys=True),
    ]

"""The deterministic pre-processing of every run, defined once for configs/train.json and configs/inference.json.

The two configs must each stand alone (MONAI Label reads each without the other, and a ``%file#id`` macro resolves
against the working folder, not the bundle), so the transform list they share lives here; each config builds it from
its own top-level ids. Every step is a MONAI transform but ``scripts.engine.finite.RequireFinited``.
"""

from __future__ import annotations

import torch
from monai.transforms import (
    ConcatItemsd,
    CopyItemsd,
    CropForegroundd,
    DeleteItemsd,
    EnsureTyped,
    Lambdad,
    MaskIntensityd,
    NormalizeIntensityd,
    Orientationd,
    Resized,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    SplitDimd,
)
from scripts.data.channels import CHANNELS, channel
from scripts.data.readers import LoadCased
from scripts.engine.finite import RequireFinited
from scripts.flags import as_bool

__all__ = ["REPORT_MAPS", "case_preprocessing", "in_brain", "lesion_mask"]

REPORT_MAPS = ("CT", "CBF", "Tmax")  # the maps the per-case report reads as they were loaded


def lesion_mask(label):
    """A label as a float mask: lesion wherever it is positive."""
    return (label > 0).float()


def in_brain(image):
    """The brain of an image (CT first, then the four perfusion maps, then optional inputs), one channel: where the
    perfusion maps give a value, as the perfusion software leaves them (0 outside)."""
    return (image[1 : len(CHANNELS)] != 0).any(0, keepdim=True)


def case_preprocessing(
    channels,
    ct_window,
    spatial_size,
    load_keys,
    spatial_keys,
    resize_modes,
    input_map_keys=None,
    target_spacing=None,
    brain_mask=False,
    reader=None,
    check=False,
    refuse_blank=False,
) -> list:
    """Load a case's maps as the channels of ``image_key`` (``scripts.data.readers.LoadCased``), window the CT to
    [0, 1] and z-score each perfusion map within the brain (non-zero voxels; ``scripts.data.channels`` says which
    input is which), refuse NaN/Inf, bring it to RAS and resize it to ``spatial_size`` (the
    paper's recipe), or resample it to ``target_spacing`` and pad it to at least ``spatial_size`` (patches).

    Args:
        channels: the channel names in order, CT first (``image_key`` becomes ``image_<name>`` while split).
        ct_window: the CT window in HU, mapped to [0, 1] and clipped.
        spatial_size: the network's input size.
        load_keys: the keys to load: the image's, then the label's where there is one (binarised).
        spatial_keys: the keys to reorient and resize (the label too for training, not for evaluation).
        resize_modes: the interpolation of each of ``spatial_keys``.
        input_map_keys: where to keep a copy of ``REPORT_MAPS`` as read, for the per-case report
            (``scripts.report.cases``); None keeps nothing (training).
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
    image_key, label_keys = load_keys[0], list(load_keys[1:])
    channel_keys = [f"{image_key}_{c}" for c in channels]
    windowed = [key for c, key in zip(channels, channel_keys) if channel(c).normalisation == "window"]
    transforms = [
        LoadCased(load_keys, channels, as_bool(check, "check_inputs"), as_bool(refuse_blank, "refuse_blank"), reader),
        *([Lambdad(keys=label_keys, func=lesion_mask)] if label_keys else []),
        SplitDimd(keys=image_key, output_postfixes=channels, dim=0, keepdim=True),
    ]
    if input_map_keys:
        transforms.append(CopyItemsd(keys=[f"{image_key}_{c}" for c in REPORT_MAPS], names=input_map_keys))
    return transforms + [
        ScaleIntensityRanged(keys=windowed, a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0, clip=True),
        NormalizeIntensityd(keys=[key for key in channel_keys if key not in windowed], nonzero=True),
        ConcatItemsd(keys=channel_keys, name=image_key, dim=0),
        DeleteItemsd(keys=channel_keys),
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

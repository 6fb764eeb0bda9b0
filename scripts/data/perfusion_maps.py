"""Perfusion maps computed from a raw 4D CT perfusion series: CBF, CBV, MTT and Tmax in the units the bundle reads
(ISLES 2018's: mL/100 g/min, mL/100 g, s, s) and the relative CBF against the healthy hemisphere.

Method (the indicator-dilution theory of Østergaard et al. 1996 as CT perfusion software applies it):
1. Frame times from the files, never a constant (``read_series``): a DICOM series' acquisition times; a NIfTI's BIDS
   JSON sidecar (``FrameTimesStart``, seconds) where there is one, else ``pixdim[4]`` with its time unit.
2. Head motion: each frame's in-plane rigid displacement against the first, fitted on the skull; frames that moved
   are realigned; a series whose head moved more than ``MAX_MOTION_MM``, or whose skull still differs after the
   realignment (through-plane motion), is refused.
3. Bolus arrival on the earliest-enhancing (vessel) voxels; the baseline is the mean of the frames before it. The
   concentration curves are the enhancement over that baseline (HU, linear in the iodine concentration).
4. Masks from the baseline image: the intracranial space (inside the closed skull), CSF (under ``CSF_HU``), vessels
   (a blood volume over ``VESSEL_CBV``): maps are 0 outside brain tissue, as ISLES's are.
5. Arterial input by the clustering of Mouridsen et al. 2006: the voxels of largest area under the curve, the least
   irregular of them, clustered twice (k-means on area-normalised curves) keeping the cluster of earliest first
   moment. A venous output (the largest late-peaking curves, the sinuses) scales the arterial input for its partial
   volume (their areas must agree).
6. Deconvolution by block-circulant SVD (Wu et al. 2003), insensitive to the tissue's delay against the arterial
   input: the zero-padded circulant matrix of the arterial input is diagonalised by the discrete Fourier transform, so
   its singular values are the magnitudes of the transform and truncating singular values below a fraction P of the
   largest is zeroing those frequencies (computed that way; ``tests/test_perfusion_maps.py`` checks it against the
   explicit SVD). oSVD: P chosen per voxel, the smallest of ``TRUNCATIONS`` whose residue function's oscillation
   index (Wu 2003) is at most ``OSCILLATION_INDEX``; a fixed P (``truncation=0.15``) is the plain bSVD.
7. Maps: CBF = max of the residue function (flow-scaled), Tmax = its time (parabolic peak), CBV = the ratio of the
   tissue's and the artery's areas, MTT = CBV / CBF (central volume theorem), corrected for the hematocrit of small
   vessels and the brain's density (``K_H``, ``RHO_BRAIN``).
A series that cannot be timed, has no bolus, was cut before the bolus passed or moved too much is refused with one
``CtpSeriesError`` naming the file and the reason.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import pydicom
from scipy import fft as sfft
from scipy import ndimage

__all__ = [
    "CtpSeries",
    "CtpSeriesError",
    "check_series",
    "compute_maps",
    "isles18_maps",
    "nifti_series",
    "read_dicom_series",
    "read_series",
    "relative_cbf",
    "sidecar_path",
]

RHO_BRAIN = 1.04  # g/mL, brain tissue density
K_H = (1 - 0.45) / (1 - 0.25)  # hematocrit of large vessels (0.45) against small ones (0.25)
ML_100G_MIN = 6000.0  # mL/g/s -> mL/100 g/min
DT_S = 1.0  # the uniform time grid the curves are interpolated onto for the deconvolution
TRUNCATIONS = np.geomspace(0.01, 0.6, 20)  # oSVD: the candidate thresholds, fractions of the largest singular value
OSCILLATION_INDEX = 0.03  # oSVD: the largest oscillation index a residue function may have (Wu 2003's definition)
FIXED_TRUNCATION = 0.15  # the plain block-circulant SVD that the benchmark compares against
SMOOTHING_MM = (0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)  # in-plane Gaussian sigmas (mm) to choose from
NOISE_TARGET_HU = 1.0  # the tissue curves' noise after the smoothing
BIN_MM = 2.0  # the tissue curves are averaged over in-plane blocks of about this size (whole voxels) first
TMAX_TOLERANCE = 0.1  # oSVD's Tmax: the first time the residue comes within this fraction of its maximum
BONE_HU = 700.0  # skull, for the intracranial mask and the overlap of realigned frames
SOFT_TISSUE_HU = 150.0  # the motion fit sees what lies above this: bone (and the largest vessels at their peak)
CSF_HU = 15.0  # baseline (smoothed) under this inside the skull: CSF
VESSEL_CBV = 8.0  # mL/100 g: a blood volume above this is a vessel, not tissue
MIN_FRAMES = 8
MAX_INTERVAL_S = 10.0  # frames further apart than this cannot sample a bolus
MAX_MOTION_MM = 10.0  # in-plane displacement of the head against the first frame, anywhere in it
MIN_BONE_DICE = 0.7  # the skull of a realigned frame against the first frame's
MOTION_TOLERANCE_VOXELS = 0.05  # frames displaced less than this are not resampled
VESSEL_SNR = 10.0  # a vessel enhances by more than this many times the noise
MIN_ENHANCEMENT_HU = 1.0  # the brain's mean enhancement at its peak: below this there is no bolus
TRUNCATED_FRACTION = 0.6  # the brain's curve still above this fraction of its peak at the last frame: truncated
AIF_CANDIDATES = 0.02  # the fraction of intracranial voxels (largest area under the curve) clustered for the AIF
AIF_CLUSTERS = 5
VOF_CANDIDATES = 0.005  # the fraction of intracranial voxels (largest area) the venous output is taken among
MAX_PV_SCALE = 5.0
CHUNK_VOXELS = 1 << 14
TIME_UNITS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}
EPOCH = datetime.datetime(1970, 1, 1)


class CtpSeriesError(ValueError):
    """A raw CT perfusion series the maps cannot be computed from; the message names the file and the reason
    (``scripts.data.readers.LoadCased`` adds the case)."""


@dataclass
class CtpSeries:
    """A 4D CT perfusion series: ``frames`` (x, y, z, t) in HU on the grid of the RAS ``affine``, ``times`` (t,) in
    seconds from the first frame, ``source`` the file or folder it was read from (errors name it)."""

    frames: np.ndarray
    times: np.ndarray
    affine: np.ndarray
    source: str
    notes: list = field(default_factory=list)


def _refuse(source, reason):
    raise CtpSeriesError(f"{source}: {reason}")


def sidecar_path(path) -> str:
    """The BIDS JSON sidecar of a NIfTI file: ``x.nii.gz`` -> ``x.json``."""
    path = str(path)
    for suffix in (".nii.gz", ".nii"):
        if path.lower().endswith(suffix):
            return path[: -len(suffix)] + ".json"
    return path + ".json"


def _nifti_times(path, header, count):
    """Frame times (s) of a 4D NIfTI: the sidecar's ``FrameTimesStart``, else ``pixdim[4]`` in its time unit."""
    sidecar = sidecar_path(path)
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            try:
                starts = json.load(f).get("FrameTimesStart")
            except json.JSONDecodeError as err:
                _refuse(path, f"cannot be timed: its sidecar {sidecar} is not JSON ({err})")
        if starts is not None:
            if len(starts) != count:
                _refuse(path, f"cannot be timed: {sidecar} gives {len(starts)} FrameTimesStart for {count} frames")
            return np.asarray(starts, dtype=np.float64) - float(starts[0])
    unit = header.get_xyzt_units()[1]
    interval = float(header["pixdim"][4])
    if unit not in TIME_UNITS or not interval > 0:
        _refuse(
            path,
            f"cannot be timed: pixdim[4] is {interval:g} with time unit {unit!r} (xyzt_units), and there is no"
            f" sidecar {sidecar} with FrameTimesStart",
        )
    return np.arange(count) * interval * TIME_UNITS[unit]


def _dicom_time(ds):
    """Acquisition time of one slice, in seconds from midnight of its acquisition date; None if it has none."""
    if ds.get("AcquisitionDateTime"):
        moment = pydicom.valuerep.DT(str(ds.AcquisitionDateTime))
        return (moment.replace(tzinfo=None) - EPOCH).total_seconds()
    if not ds.get("AcquisitionTime"):
        return None
    day = pydicom.valuerep.DA(str(ds.get("AcquisitionDate") or ds.get("StudyDate") or "19700101"))
    moment = datetime.datetime.combine(day, pydicom.valuerep.TM(str(ds.AcquisitionTime)))
    return (moment - EPOCH).total_seconds()


def _dicom_layout(name, datasets):
    """The slices of a CT perfusion series from their headers: each position's slices in order of acquisition time
    (``stacks``), the frames' times (each the median of its slices') and the RAS affine; refused (naming ``name``)
    where a slice has no time, the series mixes series, or its positions differ in frame count or spacing."""
    times = [_dicom_time(ds) for ds in datasets]
    untimed = [ds for ds, t in zip(datasets, times) if t is None]
    if untimed:
        where = getattr(untimed[0], "filename", None) or f"instance {untimed[0].get('InstanceNumber', '?')}"
        _refuse(name, f"cannot be timed: {where} has no AcquisitionDateTime or AcquisitionTime")
    if len({ds.SeriesInstanceUID for ds in datasets}) > 1:
        _refuse(name, "holds more than one series; pass the folder of the perfusion series alone")
    first = datasets[0]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = {}
    for ds, t in zip(datasets, times):
        level = float(normal @ np.asarray(ds.ImagePositionPatient, dtype=np.float64))
        positions.setdefault(round(level, 1), []).append((t, level, ds))
    counts = {len(v) for v in positions.values()}
    if len(counts) != 1:
        _refuse(name, f"cannot be timed: its slice positions have different numbers of frames ({sorted(counts)})")
    stacks = [sorted(positions[key], key=lambda entry: entry[0]) for key in sorted(positions)]
    levels = [np.mean([level for _, level, _ in stack]) for stack in stacks]
    frame_times = np.median(np.array([[t for t, _, _ in stack] for stack in stacks]), axis=0)
    gaps = np.diff(levels)
    if len(levels) > 1 and (gaps.min() <= 0 or np.ptp(gaps) > 0.01 * gaps.mean()):
        _refuse(name, f"its slices are not regularly spaced (gaps {gaps.min():.3g}-{gaps.max():.3g} mm)")
    rows, columns = (float(v) for v in first.PixelSpacing)
    slice_step = float(gaps.mean()) if len(levels) > 1 else float(first.get("SliceThickness", 1.0))
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * columns
    lps[:3, 1] = orientation[3:] * rows
    lps[:3, 2] = normal * slice_step
    lps[:3, 3] = np.asarray(stacks[0][0][2].ImagePositionPatient, dtype=np.float64)
    return stacks, frame_times - frame_times[0], np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def read_dicom_series(sources, name) -> CtpSeries:
    """A CT perfusion series from its single-frame slices, ``sources`` their files or datasets (a study held in
    memory), in any order: grouped by position, each position's slices in order of acquisition time; a frame's time
    is the median of its slices'. ``name`` names the series in errors.

    Raises:
        CtpSeriesError: as ``read_series``.
    """
    datasets = []
    for source in sources:
        try:
            datasets.append(source if isinstance(source, pydicom.Dataset) else pydicom.dcmread(source))
        except (pydicom.errors.InvalidDicomError, OSError) as err:
            _refuse(name, f"cannot read {source} as DICOM: {err}")
    # pydicom 3's module, imported where a DICOM series is read: the NIfTI path also runs beside MONAI Label 0.8.5,
    # whose environment keeps pydicom 2.4.5 (requirements-monailabel.txt)
    from pydicom.pixels import apply_modality_lut

    stacks, times, affine = _dicom_layout(name, datasets)
    first = datasets[0]
    frames = np.empty((int(first.Columns), int(first.Rows), len(stacks), len(times)), dtype=np.float32)
    for k, stack in enumerate(stacks):
        for i, (_, _, ds) in enumerate(stack):
            frames[:, :, k, i] = apply_modality_lut(ds.pixel_array, ds).T
    series = CtpSeries(frames, times, affine, str(name))
    _check_times(series.source, frames.shape[3], times)
    return series


def check_series(source, headers=None) -> None:
    """Refuse, from its headers alone (no frame read), a raw series that ``read_series`` would refuse: a NIfTI file
    (``source``) that is not 4D, has too few frames or cannot be timed; with ``headers`` (DICOM datasets without
    pixel data, ``source`` naming the series), slices that cannot be timed or placed.

    Raises:
        CtpSeriesError: naming ``source`` and the reason.
    """
    if headers is not None:
        _, times, _ = _dicom_layout(source, headers)
        _check_times(source, len(times), times)
        return
    image = nib.load(source)
    if len(image.shape) != 4:
        _refuse(source, f"has shape {image.shape}; a perfusion series is 4D (x, y, z, t)")
    _check_times(source, image.shape[3], _nifti_times(source, image.header, image.shape[3]))  # no frame read


def read_series(path) -> CtpSeries:
    """Read a raw CT perfusion series: a 4D NIfTI file (``.nii``/``.nii.gz``, with its BIDS sidecar if any) or a
    folder of the DICOM files of one series (single-frame slices).

    Raises:
        CtpSeriesError: naming the file, for a series that is not 4D, has under ``MIN_FRAMES`` frames, or cannot be
            timed (no sidecar times, no time unit, a frame without acquisition time, times that do not increase).
    """
    path = str(path)
    if os.path.isdir(path):
        paths = sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files)
        if not paths:
            _refuse(path, "holds no DICOM files")
        return read_dicom_series(paths, path)
    return nifti_series(nib.load(path), path)


def nifti_series(image, path) -> CtpSeries:
    """The series of a 4D NIfTI image read from ``path`` (its sidecar beside it): ``read_series`` of a file that the
    caller has read (``scripts.data.readers`` checks a ``.gz`` stream whole as it reads it).

    Raises:
        CtpSeriesError: as ``read_series``.
    """
    path = str(path)
    if len(image.shape) != 4:
        _refuse(path, f"has shape {image.shape}; a perfusion series is 4D (x, y, z, t)")
    times = _nifti_times(path, image.header, image.shape[3])
    _check_times(path, image.shape[3], times)
    return CtpSeries(np.asarray(image.dataobj, dtype=np.float32), times, image.affine, path)


def _check_times(source, count, times):
    times = np.asarray(times, dtype=np.float64)
    if count < MIN_FRAMES:
        _refuse(source, f"has {count} frames; at least {MIN_FRAMES} sample a bolus")
    steps = np.diff(times)
    if len(times) != count or not np.isfinite(times).all() or steps.min() <= 0:
        _refuse(source, f"cannot be timed: its {len(times)} frame times do not increase: {times.round(2)}")
    if steps.max() > MAX_INTERVAL_S:
        _refuse(source, f"cannot be timed: a gap of {steps.max():.3g} s between frames")


def _skull_image(frames, grid):
    """Each frame's bone, ``SOFT_TISSUE_HU`` and above (linear there, so that a rigid motion of the head moves it
    rigidly; the enhancing brain left out), averaged over its slices, on an in-plane grid of at most ``grid`` points
    a side."""
    step = max(1, int(np.ceil(max(frames.shape[:2]) / grid)))
    return np.clip(frames[::step, ::step] - SOFT_TISSUE_HU, 0, 2 * BONE_HU).mean(axis=2), step


def _rigid(params, centre):
    """The 2 x 2 rotation and offset of ``ndimage.affine_transform`` for an in-plane rotation by ``params[2]`` (rad)
    about ``centre`` and a shift ``params[:2]`` (voxels): output voxel p reads input R p + offset."""
    c, s = np.cos(params[2]), np.sin(params[2])
    rotation = np.array([[c, -s], [s, c]])
    return rotation, centre - rotation @ centre + params[:2]


def _fit_rigid(image, reference, centre, grid, start, iterations=30):
    """Gauss-Newton fit of the in-plane rigid motion (``_rigid``'s parameters) that maps ``image`` onto
    ``reference``, from ``start``."""
    params = start.copy()
    relative = grid - centre[:, None]
    for _ in range(iterations):
        rotation, offset = _rigid(params, centre)
        warped = ndimage.affine_transform(image, rotation, offset, order=1)
        gx, gy = (g.ravel() for g in np.gradient(warped))
        jacobian = np.stack([gx, gy, gy * relative[0] - gx * relative[1]], axis=1)
        step = np.linalg.lstsq(jacobian, (reference - warped).ravel(), rcond=None)[0]
        params = params + step
        if np.abs(step[:2]).max() < 1e-3 and abs(step[2]) < 1e-5:
            break
    return params


def _realign(series, spacing):
    """Fit each frame's in-plane rigid motion against the first on the skull; realign the frames that moved; refuse
    a series that moved too much. Returns the frames (realigned where needed) and the largest displacement in mm."""
    frames = series.frames
    bone, step = _skull_image(frames, 96)
    bone = ndimage.gaussian_filter(bone, sigma=(1, 1, 0))  # a wider basin for the fit
    reference = bone[..., 0]
    weight = reference.sum()
    if weight == 0:
        return frames, 0.0
    centre = np.array(ndimage.center_of_mass(reference))
    grid = np.indices(reference.shape).reshape(2, -1).astype(np.float64)
    radius = np.sqrt((((grid - centre[:, None]) ** 2).sum(axis=0) * reference.ravel()).sum() / weight)
    largest, moved = 0.0, []
    params = np.zeros(3)
    for i in range(1, frames.shape[3]):
        params = _fit_rigid(bone[..., i], reference, centre, grid, params)  # from the previous frame's motion
        displacement = (np.hypot(*params[:2]) + abs(params[2]) * radius) * step * spacing
        largest = max(largest, displacement)
        if displacement > MAX_MOTION_MM:
            _refuse(
                series.source,
                f"moves too much: frame {i} (at {series.times[i]:.1f} s) is displaced by {displacement:.1f} mm"
                f" against the first (limit {MAX_MOTION_MM:g} mm)",
            )
        if displacement > MOTION_TOLERANCE_VOXELS * spacing:
            moved.append((i, params))
    if moved:
        frames = frames.copy()
        full_centre = centre * step
        for i, params in moved:
            rotation, offset = _rigid(np.array([params[0] * step, params[1] * step, params[2]]), full_centre)
            matrix = np.eye(3)
            matrix[:2, :2] = rotation
            shift = np.append(offset, 0.0)
            frames[..., i] = ndimage.affine_transform(frames[..., i], matrix, shift, order=3, mode="nearest")
    first = frames[..., 0] > BONE_HU
    for i in range(1, frames.shape[3]):
        other = frames[..., i] > BONE_HU
        dice = 2 * np.count_nonzero(first & other) / max(1, np.count_nonzero(first) + np.count_nonzero(other))
        if dice < MIN_BONE_DICE:
            _refuse(
                series.source,
                f"moves too much: the skull of frame {i} (at {series.times[i]:.1f} s) overlaps the first frame's by"
                f" Dice {dice:.2f} after in-plane realignment (through-plane motion?); at least {MIN_BONE_DICE} needed",
            )
    return frames, largest


def _intracranial(baseline, margin=1):
    """The space inside the closed skull, ``margin`` voxels away from it, slice by slice (a slice whose skull is open
    has none)."""
    bone = baseline > BONE_HU / 2
    inside = np.zeros_like(bone)
    disk = ndimage.generate_binary_structure(2, 1)
    for k in range(bone.shape[2]):
        closed = ndimage.binary_closing(bone[..., k], disk, iterations=2)
        inside[..., k] = ndimage.binary_fill_holes(closed) & ~ndimage.binary_dilation(closed, disk, iterations=margin)
    return inside & (baseline > -100) & (baseline < 150)


def _noise_sd(frames, intracranial):
    """The CT noise (HU): a robust standard deviation of the difference of the first two frames (both before the
    bolus in any protocol), over the intracranial voxels."""
    difference = (frames[..., 1].astype(np.float32) - frames[..., 0])[intracranial]
    return float(1.4826 * np.median(np.abs(difference - np.median(difference))) / np.sqrt(2))


def _bolus_arrival(source, frames, intracranial):
    """Index of the first frame the bolus reached: among the vessels (the 0.5 % most enhancing intracranial voxels
    that enhance by over ``VESSEL_SNR`` times the noise), each one's first frame over a fifth of its peak
    enhancement, the earliest tenth of them (the arteries)."""
    noise = _noise_sd(frames, intracranial)
    peak = (frames.max(axis=3) - frames[..., 0].astype(np.float32))[intracranial]
    count = max(10, int(0.005 * len(peak)))
    top = np.argpartition(peak, -count)[-count:]
    top = top[peak[top] > VESSEL_SNR * noise]
    if len(top) < 3:
        _refuse(
            source,
            f"has no bolus: no vessel enhances (the largest enhancement is {peak.max():.0f} HU, the noise"
            f" {noise:.1f} HU)",
        )
    rise = frames[tuple(np.argwhere(intracranial)[top].T)].astype(np.float32)
    rise -= rise[:, :1]
    crossing = np.argmax(rise > 0.2 * rise.max(axis=1, keepdims=True), axis=1)
    arrival = int(np.quantile(crossing, 0.1))
    if arrival == 0:
        _refuse(source, "has no baseline: the vessels enhance from the first frame on")
    return arrival


def _trapezoid_weights(times):
    """Weights w with sum(w * y) = the trapezoid integral of y sampled at ``times``."""
    steps = np.diff(times)
    return np.concatenate([[steps[0] / 2], (steps[:-1] + steps[1:]) / 2, [steps[-1] / 2]])


def _kmeans(curves, k, iterations=50):
    """Labels of k-means clusters of ``curves`` (rows), seeded deterministically at quantiles of the first moment."""
    order = np.argsort(curves @ np.arange(curves.shape[1]))
    centres = curves[order[np.linspace(0, len(curves) - 1, k).astype(int)]]
    labels = np.zeros(len(curves), dtype=int)
    for _ in range(iterations):
        distances = ((curves[:, None, :] - centres[None]) ** 2).sum(axis=2)
        new = distances.argmin(axis=1)
        if (new == labels).all() and _ > 0:
            break
        labels = new
        centres = np.stack([curves[labels == j].mean(axis=0) if (labels == j).any() else centres[j] for j in range(k)])
    return labels


def _arterial_input(conc, times, weights, noise, first_pass):
    """Mouridsen 2006: among the vessels (voxels enhancing by over ``VESSEL_SNR`` times the ``noise``), those of
    largest area, the least irregular three quarters of them, clustered twice (k-means on area-normalised curves)
    keeping each time the cluster of earliest first moment, taken over the first pass (frames up to ``first_pass``,
    the brain's peak: recirculation would blur it). Returns the cluster's mean curve and its voxels (indices into
    ``conc``)."""
    area = conc @ weights
    peak = conc.max(axis=1)
    vessels = np.flatnonzero(peak > VESSEL_SNR * noise)
    if len(vessels) < AIF_CLUSTERS * 4:
        vessels = np.argsort(peak)[-AIF_CLUSTERS * 4 :]
    count = min(len(vessels), max(AIF_CLUSTERS * 4, int(AIF_CANDIDATES * len(area))))
    candidates = vessels[np.argsort(area[vessels])[-count:]]
    curves = conc[candidates]
    roughness = np.sqrt((np.diff(curves, 2, axis=1) ** 2).mean(axis=1)) / np.maximum(curves.max(axis=1), 1e-6)
    keep = roughness <= np.quantile(roughness, 0.75)
    candidates, curves = candidates[keep], curves[keep]
    window = weights[: first_pass + 1]
    for _ in range(2):
        if len(candidates) < 4 * AIF_CLUSTERS:
            break
        normalised = curves / np.maximum(curves @ weights, 1e-6)[:, None]
        labels = _kmeans(normalised, AIF_CLUSTERS)
        early = normalised[:, : first_pass + 1]
        moments = (early @ (window * times[: first_pass + 1])) / np.maximum(early @ window, 1e-9)
        means = [moments[labels == j].mean() if (labels == j).any() else np.inf for j in range(AIF_CLUSTERS)]
        chosen = labels == int(np.argmin(means))
        candidates, curves = candidates[chosen], curves[chosen]
    return curves.mean(axis=0), candidates


def _venous_output(conc, times, weights, aif):
    """The mean of the largest-area curves that peak at least 2 s after the arterial input (the sinuses), or None."""
    area = conc @ weights
    count = max(10, int(VOF_CANDIDATES * len(area)))
    candidates = np.argpartition(area, -count)[-count:]
    late = candidates[times[conc[candidates].argmax(axis=1)] >= times[aif.argmax()] + 2.0]
    if len(late) < 3:
        return None
    chosen = late[np.argsort(area[late])[-max(3, len(late) // 10) :]]
    return conc[chosen].mean(axis=0)


def _smooth(conc, weight, sigma):
    """In place: Gaussian in-plane smoothing (``sigma`` in voxels per axis) of the curves, weighted by ``weight``
    (the tissue fraction: a normalised convolution, so that no vessel, CSF or bone signal enters); curves where the
    weight is 0 are set to 0."""
    if max(sigma) > 0:
        total = ndimage.gaussian_filter(weight, sigma=(*sigma, 0), mode="constant")
        scale = np.where(weight > 0, 1 / np.maximum(total, 1e-6), 0).astype(np.float32)
        for i in range(conc.shape[3]):
            ndimage.gaussian_filter(conc[..., i] * weight, sigma=(*sigma, 0), output=conc[..., i], mode="constant")
            conc[..., i] *= scale
    else:
        conc *= (weight > 0)[..., None]
    return conc


def _smoothing(conc, weight, spacing, target):
    """The smallest in-plane Gaussian sigma (mm) of ``SMOOTHING_MM`` that brings the noise of the curves (measured
    on the difference of the first two frames, both before the bolus) down to ``target`` HU, the largest if none
    does."""
    difference = (conc[..., 1] - conc[..., 0]) / np.sqrt(2)
    tissue = weight > 0.5
    for sigma_mm in SMOOTHING_MM:
        smoothed = _smooth(difference[..., None].copy(), weight, tuple(sigma_mm / s for s in spacing))
        if np.std(smoothed[tissue]) <= target:
            break
    return sigma_mm


def _bin(conc, weight, factor):
    """The curves averaged over ``factor`` x ``factor`` in-plane blocks, weighted by ``weight`` (the tissue), and each
    block's mean weight."""
    if factor == 1:
        return conc, weight
    pad = [(0, (-n) % factor) for n in conc.shape[:2]]
    weight = np.pad(weight, pad + [(0, 0)])
    shape = (weight.shape[0] // factor, factor, weight.shape[1] // factor, factor, weight.shape[2])
    total = weight.reshape(shape).sum(axis=(1, 3))
    binned = np.empty(total.shape + conc.shape[3:], dtype=np.float32)
    for i in range(conc.shape[3]):
        block = np.pad(conc[..., i], pad + [(0, 0)]) * weight
        binned[..., i] = block.reshape(shape).sum(axis=(1, 3)) / np.maximum(total, 1e-6)
    return binned, total / factor**2


def _unbin(values, known, factor, shape):
    """``values`` of the binned grid, where ``known``, interpolated (linearly, from known blocks only) back onto the
    grid of ``shape``."""
    if factor == 1:
        return values
    axes = [(np.arange(n) + 0.5) / factor - 0.5 for n in shape[:2]] + [np.arange(shape[2], dtype=np.float64)]
    coordinates = np.meshgrid(*axes, indexing="ij")
    known = known.astype(np.float32)
    total = ndimage.map_coordinates(values * known, coordinates, order=1, mode="nearest")
    share = ndimage.map_coordinates(known, coordinates, order=1, mode="nearest")
    return np.where(share > 1e-3, total / np.maximum(share, 1e-3), 0).astype(np.float32)


def _interpolation_matrix(times, grid):
    """Matrix W (len(grid) x len(times)): W @ y is y (sampled at ``times``) linearly interpolated at ``grid``."""
    matrix = np.zeros((len(grid), len(times)))
    index = np.clip(np.searchsorted(times, grid, side="right") - 1, 0, len(times) - 2)
    fraction = np.clip((grid - times[index]) / (times[index + 1] - times[index]), 0, 1)
    matrix[np.arange(len(grid)), index] = 1 - fraction
    matrix[np.arange(len(grid)), index + 1] = fraction
    return matrix


def oscillation_index(residues):
    """Wu et al. 2003's oscillation index of residue functions (last axis): the mean absolute second difference over
    the largest value."""
    peak = np.maximum(residues.max(axis=-1), 1e-12)
    return np.abs(np.diff(residues, 2, axis=-1)).sum(axis=-1) / residues.shape[-1] / peak


def deconvolve(curves, aif, dt, truncation=None):
    """Block-circulant SVD deconvolution of tissue ``curves`` (n, N) by ``aif`` (N,), both on a uniform grid of step
    ``dt``: the flow-scaled residue functions (n, 2N), in 1/s.

    Args:
        curves: the tissue curves (concentration, same unit as the AIF).
        aif: the arterial input.
        dt: the grid step (s).
        truncation: a fixed threshold (fraction of the largest singular value), else oSVD: per curve the smallest of
            ``TRUNCATIONS`` whose residue's ``oscillation_index`` is at most ``OSCILLATION_INDEX``, found by bisection
            (the index falls as the threshold rises), the largest where none is.
    """
    length = 2 * curves.shape[-1]
    spectrum = sfft.rfft(np.asarray(aif, dtype=np.float64), length) * dt
    magnitude = np.abs(spectrum) / np.abs(spectrum).max()
    inverse = np.where(magnitude > 0, 1 / np.where(magnitude > 0, spectrum, 1), 0).astype(np.complex64)
    data = sfft.rfft(np.asarray(curves, dtype=np.float32), length, axis=-1, workers=-1) * inverse

    def residues(thresholds):
        kept = magnitude[None] >= np.asarray(thresholds, dtype=np.float64).reshape(-1, 1)
        return sfft.irfft(data * kept, length, axis=-1, workers=-1)

    if truncation is not None:
        return residues([truncation])
    low = np.zeros(len(curves), dtype=int)
    high = np.full(len(curves), len(TRUNCATIONS) - 1)
    while (low < high).any():
        middle = (low + high) // 2
        smooth = oscillation_index(residues(TRUNCATIONS[middle])) <= OSCILLATION_INDEX
        high = np.where((low < high) & smooth, middle, high)
        low = np.where((low < high) & ~smooth, middle + 1, low)
    return residues(TRUNCATIONS[low])


def _peak(residues, dt, tolerance=0.0):
    """Height and time (s) of each residue function's maximum: the first sample within ``tolerance`` (a fraction) of
    the maximum, refined by a parabola through it and its neighbours (0: the maximum itself); a peak in the wrapped
    half counts as negative, clipped to 0."""
    length = residues.shape[-1]
    height = residues.max(axis=-1)
    index = np.argmax(residues >= ((1 - tolerance) * height)[:, None], axis=-1)
    rows = np.arange(len(residues))
    left, centre = residues[rows, index - 1], residues[rows, index]
    right = residues[rows, (index + 1) % length]
    curvature = left - 2 * centre + right
    offset = np.where(curvature < 0, 0.5 * (left - right) / np.where(curvature < 0, curvature, -1), 0.0)
    when = np.where(index > length // 2, index - length, index) + np.clip(offset, -0.5, 0.5)
    return height, np.clip(when * dt, 0, None)


def relative_cbf(cbf, tmax, tissue):
    """CBF relative to the mean CBF of the healthy hemisphere's tissue: the half (split at the tissue's centre along
    the first, left-right, axis) with the lower median Tmax. 0 outside ``tissue``."""
    tissue = tissue & (cbf > 0)
    if not tissue.any():
        return np.zeros_like(cbf, dtype=np.float32)
    middle = ndimage.center_of_mass(tissue)[0]
    left = (np.arange(cbf.shape[0]) < middle)[:, None, None] & tissue
    right = tissue & ~left
    if not left.any() or not right.any():
        healthy = tissue
    else:
        healthy = left if np.median(tmax[left]) <= np.median(tmax[right]) else right
    return np.where(tissue, cbf / cbf[healthy].mean(), 0).astype(np.float32)


def _series_checks(series, frames, times, intracranial):
    """The bolus arrival, the baseline and the concentration curves (enhancement, float32) of a realigned series;
    refused without a bolus or with a truncated one."""
    arrival = _bolus_arrival(series.source, frames, intracranial)
    baseline = frames[..., : max(1, arrival - 1)].mean(axis=3, dtype=np.float32)  # one frame's margin
    conc = frames.astype(np.float32)
    conc -= baseline[..., None]
    brain_curve = conc[intracranial].mean(axis=0)
    rise = float(brain_curve.max())
    if rise < MIN_ENHANCEMENT_HU:
        _refuse(
            series.source, f"has no bolus: the brain enhances by {rise:.2f} HU at most ({MIN_ENHANCEMENT_HU} needed)"
        )
    if brain_curve[-1] > TRUNCATED_FRACTION * rise:
        _refuse(
            series.source,
            f"the bolus is truncated: at the last frame ({times[-1]:.1f} s) the brain's enhancement is still"
            f" {100 * brain_curve[-1] / rise:.0f} % of its peak (over {100 * TRUNCATED_FRACTION:.0f} %)",
        )
    return arrival, baseline, conc, int(brain_curve.argmax())


def _scaled_input(conc, intracranial, times, weights, first_pass, notes):
    """The arterial input (``_arterial_input``) scaled for its partial volume by the venous output, its voxels, the
    venous output and the scale."""
    curves = conc[intracranial]
    aif, voxels = _arterial_input(curves, times, weights, _noise_sd(conc, intracranial), first_pass)
    vof = _venous_output(curves, times, weights, aif)
    scale = 1.0
    if vof is None:
        notes.append("no venous output found: the arterial input is not scaled for partial volume")
    elif vof[-1] > 0.5 * vof.max():
        notes.append("the venous output is cut by the end of the series: the arterial input is not scaled")
    else:
        scale = float(np.clip((vof @ weights) / (aif @ weights), 1.0, MAX_PV_SCALE))
    return aif * scale, voxels, vof, scale


def compute_maps(
    series: CtpSeries,
    truncation: float | None = None,
    smoothing_mm: float | None = None,
    noise_target: float = NOISE_TARGET_HU,
) -> dict:
    """CBF (mL/100 g/min), CBV (mL/100 g), MTT (s), Tmax (s) and rCBF (fraction of the healthy hemisphere's mean
    CBF) of a raw series, float32 arrays on its grid, 0 outside brain tissue; and ``"tissue"`` (bool) and ``"info"``
    (the arterial input and venous output curves, their voxels, the partial-volume scale, the bolus arrival, the
    largest head motion in mm, notes, the seconds the deconvolution took).

    The tissue curves are averaged over in-plane blocks of about ``BIN_MM`` (whole voxels) and smoothed there; the
    maps computed on that grid are interpolated back onto the series' (masks stay at full resolution).

    Args:
        series: the series (``read_series``, or a phantom's).
        truncation: a fixed bSVD threshold (e.g. ``FIXED_TRUNCATION``: the plain block-circulant SVD, its Tmax the
            residue's largest sample) instead of oSVD.
        smoothing_mm: the in-plane Gaussian sigma applied to the tissue curves (0: none), else the smallest of
            ``SMOOTHING_MM`` that brings their noise down to ``noise_target`` HU.
        noise_target: see ``smoothing_mm``.

    Raises:
        CtpSeriesError: naming the series' file: it cannot be timed, has no bolus, the bolus is truncated, the head
            moved too much, or no skull encloses a brain.
    """
    _check_times(series.source, series.frames.shape[3], series.times)
    times = np.asarray(series.times, dtype=np.float64)
    spacing = np.sqrt((np.asarray(series.affine)[:3, :3] ** 2).sum(axis=0))
    frames, motion = _realign(series, float(spacing[:2].mean()))
    intracranial = _intracranial(frames[..., 0])
    if intracranial.sum() < 100:
        _refuse(series.source, "has no brain enclosed by a skull (fewer than 100 intracranial voxels)")
    # a moved skull leaves its edge in the frames' differences: tissue within the largest motion of it is left out
    # (the arterial input and the venous output, the sinuses along the skull among them, are sought in all of it)
    margin = 1 + int(np.ceil(motion / spacing[:2].min() - MOTION_TOLERANCE_VOXELS))
    inner = _intracranial(frames[..., 0], margin) if margin > 1 else intracranial
    arrival, baseline, conc, first_pass = _series_checks(series, frames, times, intracranial)
    del frames
    weights = _trapezoid_weights(times)
    notes = list(series.notes)
    aif, aif_voxels, vof, scale = _scaled_input(conc, intracranial, times, weights, first_pass, notes)
    aif_area = float(aif @ weights)
    volume_per_area = 100 * K_H / RHO_BRAIN / aif_area  # mL/100 g per HU s of tissue enhancement
    blood_volume = volume_per_area * np.einsum("xyzt,t->xyz", conc, weights.astype(np.float32))
    vessels = ndimage.gaussian_filter(blood_volume, sigma=(*(1.0 / spacing[:2]), 0)) > VESSEL_CBV
    tissue = inner & (ndimage.gaussian_filter(baseline, sigma=(1, 1, 0)) >= CSF_HU) & ~vessels
    factor = max(1, int(BIN_MM / spacing[:2].mean()))
    conc, weight = _bin(conc, tissue.astype(np.float32), factor)
    binned_spacing = factor * spacing[:2]
    if smoothing_mm is None:
        smoothing_mm = _smoothing(conc, weight, binned_spacing, noise_target)
    conc = _smooth(conc, weight, tuple(smoothing_mm / s for s in binned_spacing))
    known = weight > 0
    curves = conc[known]
    del conc
    grid = np.arange(0.0, times[-1] + 1e-9, DT_S)
    interpolate = _interpolation_matrix(times, grid).astype(np.float32)
    aif_grid = interpolate @ aif.astype(np.float32)
    flow, delay = np.empty(len(curves), dtype=np.float32), np.empty(len(curves), dtype=np.float32)
    started = time.perf_counter()
    for start in range(0, len(curves), CHUNK_VOXELS):
        block = curves[start : start + CHUNK_VOXELS] @ interpolate.T
        residues = deconvolve(block, aif_grid, DT_S, truncation)
        height, when = _peak(residues, DT_S, TMAX_TOLERANCE if truncation is None else 0.0)
        flow[start : start + CHUNK_VOXELS], delay[start : start + CHUNK_VOXELS] = height, when
    deconvolution_s = time.perf_counter() - started
    binned = {
        "CBF": flow * (K_H / RHO_BRAIN * ML_100G_MIN),
        "CBV": volume_per_area * (curves @ weights.astype(np.float32)),
        "Tmax": delay,
    }
    maps = {}
    for name, values in binned.items():
        grid_values = np.zeros(known.shape, dtype=np.float32)
        grid_values[known] = np.clip(values, 0, None)
        maps[name] = np.where(tissue, _unbin(grid_values, known, factor, tissue.shape), 0).astype(np.float32)
    maps["Tmax"] = np.clip(maps["Tmax"], 0, times[-1])
    maps["MTT"] = np.where(maps["CBF"] > 0, 60 * maps["CBV"] / np.maximum(maps["CBF"], 1e-6), 0).clip(0, times[-1])
    maps["MTT"] = maps["MTT"].astype(np.float32)
    maps["rCBF"] = relative_cbf(maps["CBF"], maps["Tmax"], tissue)
    maps["tissue"] = tissue
    maps["info"] = {
        "aif": aif,
        "vof": vof,
        "aif_voxels": np.argwhere(intracranial)[aif_voxels],
        "partial_volume_scale": scale,
        "arrival_s": float(times[arrival]),
        "motion_mm": motion,
        "notes": notes,
        "deconvolution_s": deconvolution_s,
        "smoothing_mm": smoothing_mm,
    }
    return maps


def isles18_maps(maps) -> dict:
    """The four maps as ISLES 2018 stores them: CBF uint16 (mL/100 g/min), CBV uint16 (0.01 mL/100 g), MTT and Tmax
    float64 (s)."""
    return {
        "CBF": np.rint(np.clip(maps["CBF"], 0, 65535)).astype(np.uint16),
        "CBV": np.rint(np.clip(100 * maps["CBV"], 0, 65535)).astype(np.uint16),
        "MTT": maps["MTT"].astype(np.float64),
        "Tmax": maps["Tmax"].astype(np.float64),
    }

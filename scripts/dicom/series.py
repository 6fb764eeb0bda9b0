"""DICOM CT perfusion studies as the bundle's cases: the studies of a folder, each map's series picked by rules and
checked from the headers before any work, and MONAI's ``LoadImaged`` reading the five series as one case.

A hospital's perfusion software (RAPID, syngo.via, Olea, Vitrea) sends the NCCT and its CBF, CBV, MTT and Tmax maps to
the PACS as DICOM series of one study. ``find_studies`` reads the headers of every file under a folder (pixel data
only of one Tmax slice, for its unit), groups them by study, and picks for each channel the one series that its rule
(configs/dicom.json's ``series_rules``, defined there only) matches by modality, image type and series description. A study
with a map missing, two candidates for one map, series of another frame of reference, a non-axial or irregular
series, or Tmax in milliseconds is refused with one error naming the series (description and UID) before anything is
segmented. A case's name is ``study-`` and a hash of its StudyInstanceUID: no patient name or ID reaches a file
name or a log.

``Study.item`` is a case's datalist item: its ``image`` is the picked ``Series`` objects themselves, its ``label`` the
``GroundTruth`` SEG, and ``DicomSeriesReader``, the MONAI ``ImageReader`` that ``scripts.data.readers.LoadCased`` picks
for them, turns them into one (5, x, y, z) float32 array with the NCCT's affine (RAS, as ``NibabelReader`` gives a
NIfTI's) on highdicom's grid (``volume_arrays``), the rescale slope and intercept applied, and a map on another grid of
the same frame of reference resampled (trilinear) onto the NCCT's, as the ISLES 2024 maps are.

A study with a CT perfusion series (the raw 4D series, picked by the ``CTP`` rule, ``scripts.data.channels.RAW_CTP``)
and none of the maps gets its maps computed from that series (``Study.maps_source``): the series is checked from its
headers with the study (every slice timed and placed: ``scripts.data.perfusion_maps.check_series``) and read once
when the case is loaded (``scripts.data.readers.LoadCased``). A study with the maps uses them.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
import pydicom
from highdicom.spatial import convert_affine_to_convention, get_series_volume_positions
from monai.data import ImageReader
from monai.utils import ensure_tuple
from pydicom.pixels import apply_modality_lut, get_decoder
from scripts.data import perfusion_maps
from scripts.data.channels import (
    CHANNELS,
    COMPUTED_MAPS,
    MAPS_SOURCE,
    NCCT,
    RAW_CTP,
    VENDOR_MAPS,
    computed_channels,
    matches_description,
)
from scripts.data.files import InvalidCaseError
from scripts.data.readers import onto_grid
from scripts.dicom.uids import case_of, uid_name

__all__ = [
    "MANUFACTURER",
    "DicomSeriesReader",
    "GroundTruth",
    "Series",
    "Study",
    "case_of",
    "find_studies",
    "matches_description",
    "studies_in_memory",
    "volume_arrays",
    "volume_as_nifti",
]

logger = logging.getLogger(__name__)

# the Manufacturer of the bundle's own objects (scripts.dicom.results writes them): never a study's ground truth
MANUFACTURER = "MONAI bundle ischemic_stroke_ctp_segmentation"
AXIAL_LIMIT_DEG = 45.0  # the slice normal within this angle of the head-foot axis (oblique, gantry-tilted: fine)
SPACING_TOLERANCE = 0.01  # relative: slice gaps that differ by more are an irregular series
TMAX_MS_MEDIAN = 100.0  # a median Tmax in the brain above this (seconds) can only be milliseconds
_MS_UNIT = re.compile(r"(?i)\b(ms|msec|millisec\w*)\b")
PIXEL_DATA = 0x7FE00010
DEFER_BYTES = 4096
UNDEFINED_LENGTH = 0xFFFFFFFF
SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD) of length 0, little endian
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR: an index of files, not an instance
NON_IMAGE_MODALITIES = ("SR", "PR", "KO")


@dataclass
class Series:
    """One DICOM series: its UID, description, headers (no pixel data where read from files) and sources: the file
    of each header, or the dataset itself for a study held in memory (retrieved from a PACS)."""

    uid: str
    description: str
    headers: list = field(repr=False)
    sources: list = field(repr=False)

    @property
    def name(self) -> str:
        """How messages name it, without its UID (an identifier): ``"RAPID CBF" (series 3, uid-1a2b3c4d5e6f)``."""
        number = self.headers[0].get("SeriesNumber", "") if self.headers else ""
        return f'"{self.description}" (series {number}, {uid_name(self.uid)})'

    def __str__(self) -> str:
        return self.name  # as the loaded image's meta (``filename_or_obj``) names it


@dataclass
class GroundTruth:
    """A study's ground-truth SEG (``seg``), read on the grid of its NCCT series (``ct``): a case's ``label``."""

    seg: Series
    ct: Series = field(repr=False)

    def __str__(self) -> str:
        return self.seg.name


@dataclass
class Study:
    """One study as a case: its name, StudyInstanceUID, the series picked for each channel, its ground-truth SEG
    (evaluation only) and, where the perfusion maps cover part of the NCCT, which NCCT slices were kept
    (``coverage``: ``{"first": k, "last": m, "of": n}``, 1-based in slice order; the NCCT series holds those only)."""

    case: str
    uid: str
    series: dict
    label: Series | None = None
    coverage: dict | None = None
    maps_source: str = VENDOR_MAPS

    def item(self) -> dict:
        """The datalist item: the channels' series as ``image`` (the raw perfusion series for each map computed from
        it), the ground truth as ``label`` (``GroundTruth``), and where the maps come from (``maps_source``)."""
        label = {"label": GroundTruth(self.label, self.series[NCCT])} if self.label is not None else {}
        return {"image": list(self.series.values()), "case": self.case, MAPS_SOURCE: self.maps_source, **label}


def _read_headers(dataset_dir):
    """Every DICOM file's header under ``dataset_dir`` (walked in sorted order), as (path, dataset) pairs, each
    checked whole (``_check_instance``); files without the DICM prefix (not DICOM), a DICOMDIR and hidden files and
    folders are skipped; a DICOM file that cannot be read, or is cut short, is refused, naming it."""
    found = []
    for folder, dirs, files in os.walk(dataset_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):  # hidden: partial writes, system files
            path = os.path.join(folder, name)
            try:
                header = pydicom.dcmread(path, defer_size=DEFER_BYTES)  # large values not read, their length known
            except pydicom.errors.InvalidDicomError as err:
                if _has_dicom_prefix(path):
                    raise InvalidCaseError(
                        f"{path}: a DICOM file (DICM prefix) that cannot be read: cut short or damaged"
                    ) from err
                continue
            except Exception as err:  # a damaged file: refused, naming it
                raise InvalidCaseError(f"{path}: not a readable DICOM file, cut short or damaged ({err})") from err
            meta = getattr(header, "file_meta", None)
            if meta is not None and meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY:
                continue
            _check_file_end(path, header)
            _check_instance(path, header)
            header.pop(PIXEL_DATA, None)  # read again with the case, when it is segmented
            found.append((path, header))
    return found


def _has_dicom_prefix(path):
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def _check_file_end(path, header):
    """Refuse a file whose last element ends after its last byte (a copy or transfer cut short inside a value: pydicom
    reads what is there without a word), or whose encapsulated pixel data lack their closing delimiter."""
    if not len(header):
        raise InvalidCaseError(f"{path}: a DICOM file that holds no data set after its file meta: cut short")
    last = header.get_item(max(header.keys()))
    size, where = os.path.getsize(path), _where(path, header)
    length, tell = getattr(last, "length", None), getattr(last, "value_tell", None)
    if length is None or tell is None:  # read and converted already: not the file's last bytes
        return
    if length == UNDEFINED_LENGTH:
        with open(path, "rb") as f:
            f.seek(max(0, size - len(SEQUENCE_END)))
            if f.read() != SEQUENCE_END:
                raise InvalidCaseError(f"{where} is cut short: its last element (of undefined length) has no end")
    elif tell + length > size:
        raise InvalidCaseError(f"{where} is cut short: its data need {tell + length} bytes, the file has {size}")


def _where(source, header, with_case=True):
    """How a message names one instance: its study's case name where known (``with_case``), then its file, or (held
    in memory) its instance number and series."""
    case = f"{case_of(header.StudyInstanceUID)}: " if with_case and header.get("StudyInstanceUID") else ""
    if not isinstance(source, pydicom.Dataset):
        return f"{case}{source}"
    series = uid_name(header.get("SeriesInstanceUID", ""))
    return f'{case}instance {header.get("InstanceNumber", "?")} of series "{header.get("SeriesDescription", "")}" ({series})'


def _check_instance(source, header):
    """Refuse an instance without the UIDs that place it (study, series, instance), or an image whose pixel data
    are missing or shorter than its rows, columns, samples, frames and bits need (native transfer syntaxes)."""
    where = _where(source, header)
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not header.get(k)]
    if missing:
        raise InvalidCaseError(f"{where}: a DICOM instance without {', '.join(missing)}: cut short or damaged")
    if "Rows" not in header or header.get("Modality") in NON_IMAGE_MODALITIES:
        return
    if PIXEL_DATA not in header:
        raise InvalidCaseError(f"{where}: an image without pixel data: cut short or damaged")
    meta = getattr(header, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_transfer_syntax and syntax.is_compressed:
        return
    element = header.get_item(PIXEL_DATA)
    value = element.value
    held = getattr(element, "length", None) if value is None else len(value)  # deferred: its declared length
    pixels = int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel", 1))
    pixels *= int(header.get("NumberOfFrames", 1) or 1)
    needed = (pixels * int(header.get("BitsAllocated", 16)) + 7) // 8
    if held is not None and held < needed:
        raise InvalidCaseError(f"{where} is cut short: its pixel data hold {held} bytes, its header needs {needed}")


def _group(found):
    """``{study UID: {series UID: Series}}`` of the image series and of the SEG series (SR and other non-image
    objects left out), from (source, header) pairs."""
    images, segmentations = {}, {}
    for source, header in found:
        modality = header.get("Modality")
        if modality == "SEG":
            grouped = segmentations
        elif "Rows" in header and modality not in NON_IMAGE_MODALITIES:
            grouped = images
        else:
            continue
        uid = header.SeriesInstanceUID
        series = grouped.setdefault(header.StudyInstanceUID, {}).setdefault(
            uid, Series(uid, str(header.get("SeriesDescription", "")), [], [])
        )
        series.headers.append(header)
        series.sources.append(source)
    return images, segmentations


def _matches(rule, series) -> bool:
    header = series.headers[0]
    image_type = [str(v).upper() for v in header.get("ImageType", [])]
    if any(value.upper() not in image_type for value in rule.get("image_type", [])):
        return False
    if header.get("SamplesPerPixel", 1) != 1:  # a colour rendering of a map, not the map
        return False
    return matches_description(rule, header.get("Modality"), series.description)


def _raw_series(case, series_of_study, rules, channels):
    """The study's raw perfusion series (the ``CTP`` rule's one match) where it has none of the maps that can be
    computed from it, else None; an error for two matches."""
    computed = computed_channels(channels)
    if RAW_CTP.name not in rules or any(
        _matches(rules[channel], s) for channel in computed for s in series_of_study.values()
    ):
        return None
    candidates = [s for s in series_of_study.values() if _matches(rules[RAW_CTP.name], s)]
    if len(candidates) > 1:
        raise InvalidCaseError(
            f"{case}: no perfusion maps, and two or more series match the raw CT perfusion series (rule"
            f" {RAW_CTP.name}): {'; '.join(s.name for s in candidates)}; set site_series_rules to tell them apart"
            " (docs/dicom.md)"
        )
    return candidates[0] if candidates else None


def _pick(case, series_of_study, rules, channels):
    """The one series of each channel (the raw perfusion series for each map computed from it, ``_raw_series``) and
    the raw series or None, or an error naming the candidates (or the series there are)."""
    picked = {}
    for channel in channels:
        if channel not in rules:
            raise ValueError(f"series_rules has no rule for channel {channel}; it has {', '.join(rules)}")
    raw = _raw_series(case, series_of_study, rules, channels)
    for channel in channels:
        if raw is not None and channel in computed_channels(channels):
            picked[channel] = raw
            continue
        candidates = [s for s in series_of_study.values() if _matches(rules[channel], s)]
        if not candidates:
            present = "; ".join(s.name for s in series_of_study.values()) or "none"
            raise InvalidCaseError(
                f"{case}: no series for {channel} (rule {rules[channel]}); the study's image series: {present}. If"
                " one of them is it, set site_series_rules for your site's names (docs/dicom.md)"
            )
        if len(candidates) > 1:
            raise InvalidCaseError(
                f"{case}: two or more series match {channel}: {'; '.join(s.name for s in candidates)}; set"
                " site_series_rules to tell them apart (docs/dicom.md)"
            )
        picked[channel] = candidates[0]
    repeated = {s.uid for s in picked.values() if s is not raw and list(picked.values()).count(s) > 1}
    if repeated:
        names = [f"{c} {s.name}" for c, s in picked.items() if s.uid in repeated]
        raise InvalidCaseError(f"{case}: one series matches two maps ({'; '.join(names)}); set site_series_rules")
    return picked, raw


def _frame_positions(header):
    """The (orientation, [positions]) of a series' instance: one per frame of a multi-frame one."""
    if int(header.get("NumberOfFrames", 1)) > 1:
        shared = header.get("SharedFunctionalGroupsSequence", [{}])[0]
        frames = header.PerFrameFunctionalGroupsSequence
        first = frames[0]
        orientation_seq = first.get("PlaneOrientationSequence") or shared.get("PlaneOrientationSequence")
        orientation = orientation_seq[0].ImageOrientationPatient
        positions = [frame.PlanePositionSequence[0].ImagePositionPatient for frame in frames]
        return np.asarray(orientation, dtype=float), [np.asarray(p, dtype=float) for p in positions]
    if "ImageOrientationPatient" not in header or "ImagePositionPatient" not in header:
        return None, []
    return np.asarray(header.ImageOrientationPatient, dtype=float), [np.asarray(header.ImagePositionPatient, float)]


def _check_geometry(case, channel, series):
    """Refuse a series that is not one regular stack of axial (or gantry-tilted) slices."""
    orientations, positions = [], []
    for header in series.headers:
        orientation, frame_positions = _frame_positions(header)
        if orientation is None:
            raise InvalidCaseError(f"{case}: {channel} series {series.name} has no image plane (orientation)")
        orientations.append(orientation)
        positions.extend(frame_positions)
    if any(not np.allclose(o, orientations[0], atol=1e-3) for o in orientations):
        raise InvalidCaseError(f"{case}: {channel} series {series.name} mixes slice orientations")
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    angle = np.degrees(np.arccos(min(1.0, abs(normal[2]) / np.linalg.norm(normal))))
    if angle > AXIAL_LIMIT_DEG:
        raise InvalidCaseError(
            f"{case}: {channel} series {series.name} is not axial: its slices are {angle:.0f} degrees from axial"
            f" (at most {AXIAL_LIMIT_DEG:.0f}: sagittal and coronal reformats are not read)"
        )
    along = np.sort([float(np.dot(p, normal)) for p in positions])
    gaps = np.diff(along)
    if len(gaps) and (gaps.min() <= 1e-3 or gaps.max() - gaps.min() > SPACING_TOLERANCE * gaps.mean()):
        detail = "two slices at one position" if gaps.min() <= 1e-3 else f"gaps {gaps.min():.3g}-{gaps.max():.3g} mm"
        raise InvalidCaseError(
            f"{case}: {channel} series {series.name} has irregular slice spacing ({detail}): a missing or repeated"
            f" slice, or a time series. {INCOMPLETE_HINT}"
        )
    if len(gaps):
        _check_no_slice_missing(case, channel, series, normal, float(gaps.mean()))


INCOMPLETE_HINT = (
    "If the series is still arriving, the study is done once it is whole (the listener does so by itself); if it was"
    " sent in part, send it again whole"
)


def _check_no_slice_missing(case, channel, series, normal, gap):
    """Refuse a regular stack that still lacks slices: instance numbers that skip values along the stack (slices
    1, 3, 5, ... of a series that arrives odd-first), or slices twice (or more) the series' SpacingBetweenSlices
    apart."""
    numbers = [header.get("InstanceNumber") for header in series.headers]
    if len(series.headers) > 1 and None not in numbers and len(set(numbers)) == len(numbers):
        order = np.argsort([float(np.dot(_frame_positions(h)[1][0], normal)) for h in series.headers])
        ordered = [int(numbers[i]) for i in order]
        steps = np.diff(ordered)
        span = abs(ordered[-1] - ordered[0]) + 1
        if (np.all(steps > 0) or np.all(steps < 0)) and span > len(ordered):
            missing = sorted(set(range(min(ordered), max(ordered) + 1)) - set(ordered))
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            raise InvalidCaseError(
                f"{case}: {channel} series {series.name} lacks {len(missing)} slice(s): its instance numbers run"
                f" {min(ordered)}-{max(ordered)} along the stack, {shown} missing. {INCOMPLETE_HINT}"
            )
    said = float(series.headers[0].get("SpacingBetweenSlices", 0) or 0)
    if said > 0 and gap / said >= 1.5 and abs(gap / said - round(gap / said)) < 0.1:
        raise InvalidCaseError(
            f"{case}: {channel} series {series.name} lacks slices: they are {gap:.3g} mm apart, its"
            f" SpacingBetweenSlices is {said:.3g} mm. {INCOMPLETE_HINT}"
        )


def _pixel_spacing(header):
    """(between rows, between columns) in mm of a single-frame slice or a multi-frame instance, else ``None``."""
    if "PixelSpacing" in header:
        return [float(v) for v in header.PixelSpacing]
    for groups in (header.get("PerFrameFunctionalGroupsSequence"), header.get("SharedFunctionalGroupsSequence")):
        measures = groups[0].get("PixelMeasuresSequence") if groups else None
        if measures and "PixelSpacing" in measures[0]:
            return [float(v) for v in measures[0].PixelSpacing]
    return None


@dataclass
class _Stack:
    """A series' slices in patient space: orientation (row then column cosines), positions (one per frame, in the
    order of the headers and their frames), pixel spacing and size."""

    orientation: np.ndarray
    positions: np.ndarray
    spacing: list | None
    rows: int
    columns: int

    @property
    def normal(self):
        return np.cross(self.orientation[:3], self.orientation[3:])

    def corners(self):
        """The corners of its voxels' outer edges at its first and last slice (patient coordinates, mm)."""
        row_cosine, column_cosine = self.orientation[:3], self.orientation[3:]
        between_rows, between_columns = self.spacing
        found = []
        for position in (self.positions[0], self.positions[-1]):
            for i in (-0.5, self.columns - 0.5):
                for j in (-0.5, self.rows - 0.5):
                    found.append(position + i * between_columns * row_cosine + j * between_rows * column_cosine)
        return np.asarray(found)


def _stack(series):
    """A series' ``_Stack``: each position once (a perfusion series has one slice per frame at each), in the order
    they first appear."""
    positions = []
    for header in series.headers:
        orientation, frame_positions = _frame_positions(header)
        positions.extend(frame_positions)
    positions = np.asarray(positions)
    first = np.sort(np.unique(positions.round(3), axis=0, return_index=True)[1])
    header = series.headers[0]
    return _Stack(orientation, positions[first], _pixel_spacing(header), int(header.Rows), int(header.Columns))


def _slice_step(header, along):
    """The distance between a stack's slices: their mean gap, else its SpacingBetweenSlices or SliceThickness."""
    if len(along) > 1:
        return float(np.diff(np.sort(along)).mean())
    return float(header.get("SpacingBetweenSlices") or header.get("SliceThickness") or 1.0)


def _z_range(stack):
    return f"z {stack.positions[:, 2].min():.1f} to {stack.positions[:, 2].max():.1f} mm"


def _coverage(case, picked):
    """Check where the perfusion maps lie against the NCCT, and keep the NCCT slices they cover.

    The maps must cover one range of slices together (one incomplete or from another scan: refused), lie within the
    NCCT's slices (the NCCT still arriving, or of another scan: refused), and cover its field of view in-plane (to
    within one NCCT voxel). Where they cover part of the NCCT's slices (a CT perfusion slab on a whole-brain NCCT),
    only the NCCT slices inside the slab are kept, so that nothing is predicted where a map has no value.

    Returns:
        (``picked`` with the NCCT series cut to the covered slices, the ``Study.coverage``), or (``picked``, ``None``)
        where the maps cover every NCCT slice.
    """
    ct_series = picked[NCCT]
    maps = {channel: _stack(series) for channel, series in picked.items() if channel != NCCT}
    if not maps:
        return picked, None
    ct = _stack(ct_series)
    normal = ct.normal / np.linalg.norm(ct.normal)
    along = ct.positions @ normal
    ct_step = _slice_step(ct_series.headers[0], along)
    eps = 1e-3 * ct_step
    ranges = {}
    for channel, stack in maps.items():
        map_along = stack.positions @ normal
        step = _slice_step(picked[channel].headers[0], map_along)
        ranges[channel] = (float(map_along.min()), float(map_along.max()), step)
    listed = "; ".join(f"{channel} {picked[channel].name}: {_z_range(stack)}" for channel, stack in maps.items())
    tolerance = 0.5 * max(step for _, _, step in ranges.values()) + eps
    lows, highs = [low for low, _, _ in ranges.values()], [high for _, high, _ in ranges.values()]
    if max(lows) - min(lows) > tolerance or max(highs) - min(highs) > tolerance:
        raise InvalidCaseError(
            f"{case}: the perfusion maps cover different slices ({listed}): one is incomplete or of another scan."
            f" {INCOMPLETE_HINT}"
        )
    if min(lows) < along.min() - ct_step / 2 - eps or max(highs) > along.max() + ct_step / 2 + eps:
        raise InvalidCaseError(
            f"{case}: the perfusion maps reach beyond the NCCT {ct_series.name} ({_z_range(ct)}; {listed}): the NCCT"
            f" is incomplete, or the series are of different scans. {INCOMPLETE_HINT}"
        )
    if ct.spacing is not None:
        row_cosine, column_cosine = ct.orientation[:3], ct.orientation[3:]
        ct_box = ct.corners() @ np.stack([row_cosine, column_cosine], axis=1)
        margin = np.array([ct.spacing[1], ct.spacing[0]]) + eps
        for channel, stack in maps.items():
            if stack.spacing is None:
                continue
            box = stack.corners() @ np.stack([row_cosine, column_cosine], axis=1)
            if np.any(box.min(axis=0) > ct_box.min(axis=0) + margin) or np.any(
                box.max(axis=0) < ct_box.max(axis=0) - margin
            ):
                raise InvalidCaseError(
                    f"{case}: the {channel} map {picked[channel].name} covers a smaller field of view than the NCCT"
                    f" {ct_series.name} (by more than one voxel): the NCCT's edge would be segmented without it"
                )
    low = max(low - step / 2 for low, _, step in ranges.values()) - eps
    high = min(high + step / 2 for _, high, step in ranges.values()) + eps
    order = np.argsort(along)
    covered = [k for k, index in enumerate(order) if low <= along[index] <= high]
    if len(covered) == len(order):
        return picked, None
    if not covered:
        raise InvalidCaseError(
            f"{case}: no slice of the NCCT {ct_series.name} ({_z_range(ct)}) lies within the maps ({listed})"
        )
    if len(ct_series.headers) != len(order):
        raise InvalidCaseError(
            f"{case}: the perfusion maps cover part of the multi-frame NCCT {ct_series.name} ({_z_range(ct)};"
            f" {listed}): not read"
        )
    kept = sorted(order[k] for k in covered)
    coverage = {"first": covered[0] + 1, "last": covered[-1] + 1, "of": len(order)}
    logger.warning(
        "%s: the perfusion maps cover NCCT slices %d-%d of %d (%s): only those are segmented, and the SEG and SR say so",
        case,
        coverage["first"],
        coverage["last"],
        coverage["of"],
        ", ".join(f"{channel} {_z_range(stack)}" for channel, stack in maps.items()),
    )
    cut = Series(
        ct_series.uid, ct_series.description, [ct_series.headers[i] for i in kept], [ct_series.sources[i] for i in kept]
    )
    return {**picked, NCCT: cut}, coverage


def _check_unique_instances(case, picked):
    """Refuse two instances of the picked series that share one SOPInstanceUID (a frame a viewer cannot place)."""
    seen = {}
    for series in {s.uid: s for s in picked.values()}.values():
        for source, header in zip(series.sources, series.headers):
            uid = header.SOPInstanceUID
            if uid in seen:
                raise InvalidCaseError(
                    f"{case}: {seen[uid]} and {_where(source, header, False)} share one SOPInstanceUID ({uid_name(uid)}):"
                    " each instance needs its own; the study must be sent again as it was made"
                )
            seen[uid] = _where(source, header, False)


def _check_decodable(case, channel, series):
    """Refuse a series whose transfer syntax no installed pydicom decoder reads (JPEG Lossless needs pylibjpeg and
    pylibjpeg-libjpeg, which requirements.txt installs)."""
    meta = getattr(series.headers[0], "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or (syntax.is_transfer_syntax and not syntax.is_compressed):
        return
    try:
        available = syntax.is_transfer_syntax and get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise InvalidCaseError(
            f"{case}: {channel} series {series.name} is stored as {syntax.name} ({syntax}), which no installed"
            " pixel data decoder reads"
        )


def _check_tmax_unit(case, series):
    """Refuse Tmax stored in milliseconds: said by its unit, or seen in its values (the middle slice's median)."""
    header = series.headers[0]
    said = " ".join(str(header.get(k, "")) for k in ("RescaleType", "Units", "SeriesDescription", "ImageComments"))
    if _MS_UNIT.search(said):
        raise InvalidCaseError(f"{case}: Tmax series {series.name} is in milliseconds ({said.strip()}); need seconds")
    if int(header.get("NumberOfFrames", 1)) > 1:
        values = volume_arrays([_load(series.sources[0])])[0]
    else:
        middle = sorted(range(len(series.sources)), key=lambda i: float(series.headers[i].get("InstanceNumber", i)))
        values = volume_arrays([_load(series.sources[middle[len(middle) // 2]])])[0]
    measured = values[values > 0]
    if measured.size and float(np.median(measured)) > TMAX_MS_MEDIAN:
        raise InvalidCaseError(
            f"{case}: Tmax series {series.name} holds values of median {float(np.median(measured)):.0f} in the"
            " brain: milliseconds, not seconds (healthy tissue is 0-4 s); convert it or store it in seconds"
        )


def _ground_truth(case, segmentations, ct):
    """The study's one ground-truth SEG on its NCCT series: a SEG this bundle did not make (``MANUFACTURER``) that
    references ``ct``; an error for none, several, or one on a multi-frame NCCT."""
    candidates = [
        s
        for s in segmentations.values()
        if s.headers[0].get("Manufacturer") != MANUFACTURER
        and any(ref.SeriesInstanceUID == ct.uid for ref in s.headers[0].get("ReferencedSeriesSequence", []))
    ]
    if len(candidates) != 1 or len(candidates[0].sources) != 1:
        found = "; ".join(s.name for s in candidates) or "none"
        raise InvalidCaseError(
            f"{case}: evaluation needs one ground-truth SEG instance on the NCCT series {ct.name}, found: {found}"
        )
    if int(ct.headers[0].get("NumberOfFrames", 1)) > 1:
        raise InvalidCaseError(f"{case}: a ground-truth SEG on a multi-frame NCCT ({ct.name}) is not read")
    return candidates[0]


def find_studies(dataset_dir, rules, channels=CHANNELS, labels=False) -> list:
    """The DICOM studies under ``dataset_dir`` as cases, checked: one per StudyInstanceUID that holds image series.

    Args:
        dataset_dir: a folder of DICOM files (any layout, any file names; other files are skipped).
        rules: which series is which channel: configs/dicom.json's ``series_rules`` (docs/dicom.md), a rule per
            channel of ``modality``, optional ``image_type`` values, ``description`` and ``exclude`` patterns.
        channels: the channels to pick, in order, the NCCT first.
        labels: each study must hold one ground-truth SEG on its NCCT (evaluation), which becomes its ``label``.

    Returns:
        The ``Study`` of each case, in StudyInstanceUID order.

    Raises:
        InvalidCaseError: for a study with a map missing, two candidates for a map, series of other frames of
            reference, a non-axial or irregular series, a transfer syntax no decoder reads, Tmax in milliseconds or
            a truncated file, naming the series or the file; or no study.
    """
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"{dataset_dir}: no such folder of DICOM studies")
    return _studies(_read_headers(dataset_dir), dataset_dir, rules, channels, labels)


def studies_in_memory(datasets, rules, channels=CHANNELS, labels=False) -> list:
    """``find_studies`` of datasets held in memory (a study retrieved from a PACS), with the same checks; each
    ``Series`` keeps its datasets as its sources, so that nothing is written to disk or read twice."""
    for dataset in datasets:
        _check_instance(dataset, dataset)
    return _studies([(dataset, dataset) for dataset in datasets], "the retrieved instances", rules, channels, labels)


def _studies(found, where, rules, channels, labels):
    channels = list(channels)
    studies = []
    images, segmentations = _group(found)
    for study_uid, series_of_study in sorted(images.items()):
        case = case_of(study_uid)
        picked, raw = _pick(case, series_of_study, rules, channels)
        frames = {s.headers[0].get("FrameOfReferenceUID") for s in picked.values()}
        if len(frames) > 1 or None in frames:
            listed = "; ".join(
                f"{c} {s.name}: {uid_name(s.headers[0].get('FrameOfReferenceUID') or 'none')}"
                for c, s in picked.items()
            )
            raise InvalidCaseError(f"{case}: the series are not in one frame of reference ({listed})")
        for channel, series in picked.items():
            if series is not raw:
                _check_geometry(case, channel, series)
                _check_decodable(case, channel, series)
        if raw is not None:
            _check_decodable(case, RAW_CTP.name, raw)
            try:
                perfusion_maps.check_series(f"CT perfusion series {raw.name}", raw.headers)
            except perfusion_maps.CtpSeriesError as err:
                raise InvalidCaseError(f"{case}: {err}") from err
        _check_unique_instances(case, picked)
        if "Tmax" in picked and picked["Tmax"] is not raw:
            _check_tmax_unit(case, picked["Tmax"])
        picked, coverage = _coverage(case, picked)
        label = _ground_truth(case, segmentations.get(study_uid, {}), picked[NCCT]) if labels else None
        source = VENDOR_MAPS if raw is None else COMPUTED_MAPS
        studies.append(Study(case, study_uid, picked, label, coverage, source))
        logger.info("%s: %s", case, ", ".join(f"{c} {len(s.sources)} instance(s)" for c, s in picked.items()))
    if not studies:
        raise InvalidCaseError(f"{where}: no DICOM study with image series found")
    return studies


def _load(source):
    """A series' source as a dataset: read from its file, or the dataset itself."""
    return source if isinstance(source, pydicom.Dataset) else pydicom.dcmread(source)


def volume_as_nifti(volume) -> tuple:
    """The NIfTI (x, y, z) array and RAS affine of a ``highdicom.Volume`` (of a series, a multi-frame image or a SEG).

    highdicom stacks the slices on axis 0 of ``volume.array`` (rows on axis 1, columns on axis 2). The NIfTI axes are
    (column, row, slice): highdicom's ``permute_spatial_axes`` reverses them, ``ensure_handedness`` flips the slice
    axis where that makes the axes left-handed (so the RAS affine is right-handed, whatever the slice order in the
    files), and ``highdicom.spatial.convert_affine_to_convention`` gives the affine in NIfTI's RAS convention. For a
    series that ``scripts.synthetic.dicom_studies.write_study`` wrote from a right-handed affine this gives back that affine
    (up to the DS rounding, ~1e-10 mm) and the array exactly.

    Args:
        volume: a ``highdicom.Volume`` with a 3-D array.

    Returns:
        (array (x, y, z) float32, a view, 4 x 4 RAS affine float64).
    """
    nifti = volume.permute_spatial_axes([2, 1, 0]).ensure_handedness(hd.AxisHandedness.RIGHT_HANDED, flip_axis=2)
    affine = convert_affine_to_convention(nifti.affine, "LPS", "RAS")
    return np.asarray(nifti.array, dtype=np.float32), affine  # a view: the reader stacks the channels into one copy


def volume_arrays(datasets, dtype=np.float32):
    """The pixel values (rescaled) of one series' datasets, single-frame slices in any order or one multi-frame
    instance, as ``volume_as_nifti`` gives them.

    A series of two or more single-frame slices with a rescale or a modality LUT (every CT image) is stacked here in
    the order and on the grid highdicom's ``get_volume_from_series`` gives (``_geometry``), the values from pydicom's
    ``apply_modality_lut``: the same volume without highdicom's check of every frame's attributes against the IOD,
    which took most of its time. Other series (one slice, multi-frame, a real-world value map) are highdicom's."""
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1)) > 1:
        return volume_as_nifti(hd.Image.from_dataset(datasets[0], copy=False).get_volume(dtype=dtype))
    if len(datasets) == 1 or any("RealWorldValueMappingSequence" in ds for ds in datasets):
        return volume_as_nifti(hd.get_volume_from_series(datasets, dtype=dtype))
    geometry, order = _geometry(datasets)
    frames = [apply_modality_lut(datasets[i].pixel_array, datasets[i]) for i in order]
    return volume_as_nifti(geometry.with_array(np.stack(frames).astype(dtype, copy=False)))


def _geometry(headers):
    """The grid of a series of single-frame slices as highdicom's ``get_volume_from_series`` makes it, from the
    headers alone, and the order of ``headers`` along its slice axis."""
    if len(headers) == 1:  # as highdicom takes a one-slice series
        spacing, positions = float(headers[0].get("SpacingBetweenSlices", 1.0)), [0]
    else:
        spacing, positions = get_series_volume_positions(headers)
    if spacing is None:
        raise ValueError(f"series {uid_name(headers[0].SeriesInstanceUID)} is not a regularly spaced volume")
    order = [positions.index(k) for k in range(len(headers))]
    first = headers[order[0]]
    geometry = hd.VolumeGeometry.from_attributes(
        image_position=first.ImagePositionPatient,
        image_orientation=first.ImageOrientationPatient,
        rows=first.Rows,
        columns=first.Columns,
        pixel_spacing=first.PixelSpacing,
        spacing_between_slices=spacing,
        number_of_frames=len(headers),
        coordinate_system="PATIENT",
        frame_of_reference_uid=first.FrameOfReferenceUID,
    )
    return geometry, order


class DicomSeriesReader(ImageReader):
    """MONAI ``ImageReader`` of the ``Series`` (a case's ``image``) and ``GroundTruth`` (its ``label``) that
    ``find_studies`` picked: ``Study.item``'s objects, not paths.

    ``read`` of a case's series gives them as (array, affine) pairs; ``get_data`` stacks them as channels, each map on
    another grid than the first (the NCCT) resampled onto it. A ground-truth SEG is read on its NCCT's grid
    (highdicom's ``match_geometry``: padded with 0 where it has no frames). Stateless, so threads and DataLoader
    workers can share it.
    """

    def verify_suffix(self, filename) -> bool:
        return all(isinstance(item, (Series, GroundTruth)) for item in ensure_tuple(filename))

    @staticmethod
    def perfusion_series(series, read=True):
        """The raw CT perfusion ``series`` read (``scripts.data.perfusion_maps.read_dicom_series``), or with ``read``
        False checked from its headers: ``CtpSeriesError`` naming it."""
        name = f"CT perfusion series {series.name}"
        if not read:
            return perfusion_maps.check_series(name, series.headers)
        return perfusion_maps.read_dicom_series(series.sources, name)

    def read(self, data, **kwargs):
        return [
            self._read_label(item) if isinstance(item, GroundTruth) else volume_arrays(list(map(_load, item.sources)))
            for item in ensure_tuple(data)
        ]

    @staticmethod
    def _read_label(truth):
        seg = hd.seg.Segmentation.from_dataset(_load(truth.seg.sources[0]), copy=False)
        volume = seg.get_volume(combine_segments=True, dtype=np.float32)
        return volume_as_nifti(volume.match_geometry(_geometry(truth.ct.headers)[0]))

    def get_data(self, img):
        (reference, affine), others = img[0], img[1:]
        arrays = [reference] + [
            (
                array
                if array.shape == reference.shape and np.allclose(a, affine, atol=1e-3)
                else onto_grid(array, a, reference.shape, affine)
            )
            for array, a in others
        ]
        meta = {
            "affine": affine,
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(reference.shape),
            "original_channel_dim": 0,
            "space": "RAS",
        }
        return np.stack(arrays).astype(np.float32, copy=False), meta

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
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
import pydicom
import torch
from highdicom.spatial import get_series_volume_positions
from monai.data import ImageReader, MetaTensor
from monai.transforms import SpatialResample
from monai.utils import ensure_tuple
from pydicom.pixels import apply_modality_lut, get_decoder
from scripts.data.channels import CHANNELS, NCCT
from scripts.data.readers import InvalidCaseError
from scripts.dicom.results import LPS_TO_RAS
from scripts.dicom.results import MANUFACTURER as RESULTS_MANUFACTURER

__all__ = [
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

AXIAL_LIMIT_DEG = 45.0  # the slice normal within this angle of the head-foot axis (oblique, gantry-tilted: fine)
SPACING_TOLERANCE = 0.01  # relative: slice gaps that differ by more are an irregular series
TMAX_MS_MEDIAN = 100.0  # a median Tmax in the brain above this (seconds) can only be milliseconds
_MS_UNIT = re.compile(r"(?i)\b(ms|msec|millisec\w*)\b")
PIXEL_DATA = 0x7FE00010
DEFER_BYTES = 4096


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
        """How messages name it: ``"RAPID CBF" (1.2.826...)``."""
        return f'"{self.description}" ({self.uid})'

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
    """One study as a case: its name, StudyInstanceUID, the series picked for each channel and its ground-truth SEG
    (evaluation only)."""

    case: str
    uid: str
    series: dict
    label: Series | None = None

    def item(self) -> dict:
        """The datalist item: the channels' series as ``image``, the ground truth as ``label`` (``GroundTruth``)."""
        label = {"label": GroundTruth(self.label, self.series[NCCT])} if self.label is not None else {}
        return {"image": list(self.series.values()), "case": self.case, **label}


def case_of(study_uid) -> str:
    """A study's case name: ``study-`` and 12 hex digits of its StudyInstanceUID's SHA-256."""
    return "study-" + hashlib.sha256(study_uid.encode()).hexdigest()[:12]


def _read_headers(dataset_dir):
    """Every DICOM file's header under ``dataset_dir`` (walked in sorted order), as (path, dataset) pairs; files that
    are not DICOM and hidden files and folders are skipped, a DICOM file that cannot be read is refused."""
    found = []
    for folder, dirs, files in os.walk(dataset_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):  # hidden: partial writes, system files
            path = os.path.join(folder, name)
            try:
                header = pydicom.dcmread(path, defer_size=DEFER_BYTES)  # large values not read, their length known
            except pydicom.errors.InvalidDicomError:
                continue
            except Exception as err:  # a damaged file: refused, naming it
                raise InvalidCaseError(f"{path}: not a readable DICOM file ({err})") from err
            _refuse_truncated(path, header)
            if "SeriesInstanceUID" in header and "StudyInstanceUID" in header:
                found.append((path, header))
    return found


def _refuse_truncated(path, header):
    """Refuse a file whose pixel data end after its last byte (a copy or transfer cut short), then drop them from
    the header: they are read when the case is."""
    if PIXEL_DATA not in header:
        return
    element = header.get_item(PIXEL_DATA)
    length = getattr(element, "length", None)  # a deferred (raw) element; a small one is read whole already
    size = os.path.getsize(path)
    end = getattr(element, "value_tell", 0) + (length or 0)
    if length not in (None, 0xFFFFFFFF) and end > size:  # encapsulated (undefined length) data are not measured
        case = case_of(header.StudyInstanceUID) if "StudyInstanceUID" in header else "a study"
        raise InvalidCaseError(f"{case}: {path} is truncated: its pixel data need {end} bytes, the file has {size}")
    del header[PIXEL_DATA]


def _group(found):
    """``{study UID: {series UID: Series}}`` of the image series and of the SEG series (SR and other non-image
    objects left out), from (source, header) pairs."""
    images, segmentations = {}, {}
    for source, header in found:
        modality = header.get("Modality")
        if modality == "SEG":
            grouped = segmentations
        elif "Rows" in header and modality not in ("SR", "PR", "KO"):
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


def matches_description(rule, modality, description) -> bool:
    """Whether a series of ``modality`` and ``description`` passes a rule's modality and description tests (what a
    PACS query tells of a series before it is downloaded)."""
    if rule.get("modality") and modality not in rule["modality"]:
        return False
    if not re.search(rule["description"], description, re.IGNORECASE):
        return False
    return not (rule.get("exclude") and re.search(rule["exclude"], description, re.IGNORECASE))


def _matches(rule, series) -> bool:
    header = series.headers[0]
    image_type = [str(v).upper() for v in header.get("ImageType", [])]
    if any(value.upper() not in image_type for value in rule.get("image_type", [])):
        return False
    if header.get("SamplesPerPixel", 1) != 1:  # a colour rendering of a map, not the map
        return False
    return matches_description(rule, header.get("Modality"), series.description)


def _pick(case, series_of_study, rules, channels):
    """The one series of each channel, or an error naming the candidates (or the series there are)."""
    picked = {}
    for channel in channels:
        if channel not in rules:
            raise ValueError(f"series_rules has no rule for channel {channel}; it has {', '.join(rules)}")
        candidates = [s for s in series_of_study.values() if _matches(rules[channel], s)]
        if not candidates:
            present = "; ".join(s.name for s in series_of_study.values()) or "none"
            raise InvalidCaseError(
                f"{case}: no series for {channel} (rule {rules[channel]}); the study's image series: {present}"
            )
        if len(candidates) > 1:
            raise InvalidCaseError(
                f"{case}: two or more series match {channel}: {'; '.join(s.name for s in candidates)}; set"
                " series_rules to tell them apart (docs/dicom.md)"
            )
        picked[channel] = candidates[0]
    repeated = {s.uid for s in picked.values() if list(picked.values()).count(s) > 1}
    if repeated:
        names = [f"{c} {s.name}" for c, s in picked.items() if s.uid in repeated]
        raise InvalidCaseError(f"{case}: one series matches two maps ({'; '.join(names)}); set series_rules")
    return picked


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
            " slice, or a time series"
        )


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
    """The study's one ground-truth SEG on its NCCT series: a SEG this bundle did not make (``MANUFACTURER`` of
    ``scripts.dicom.results``) that references ``ct``; an error for none, several, or one on a multi-frame NCCT."""
    candidates = [
        s
        for s in segmentations.values()
        if s.headers[0].get("Manufacturer") != RESULTS_MANUFACTURER
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
    return _studies([(dataset, dataset) for dataset in datasets], "the retrieved instances", rules, channels, labels)


def _studies(found, where, rules, channels, labels):
    channels = list(channels)
    studies = []
    images, segmentations = _group(found)
    for study_uid, series_of_study in sorted(images.items()):
        case = case_of(study_uid)
        picked = _pick(case, series_of_study, rules, channels)
        frames = {s.headers[0].get("FrameOfReferenceUID") for s in picked.values()}
        if len(frames) > 1 or None in frames:
            listed = "; ".join(f"{c} {s.name}: {s.headers[0].get('FrameOfReferenceUID')}" for c, s in picked.items())
            raise InvalidCaseError(f"{case}: the series are not in one frame of reference ({listed})")
        for channel, series in picked.items():
            _check_geometry(case, channel, series)
            _check_decodable(case, channel, series)
        if "Tmax" in picked:
            _check_tmax_unit(case, picked["Tmax"])
        label = _ground_truth(case, segmentations.get(study_uid, {}), picked[NCCT]) if labels else None
        studies.append(Study(case, study_uid, picked, label))
        logger.info("%s: %s", case, ", ".join(f"{c} {len(s.sources)} instance(s)" for c, s in picked.items()))
    if not studies:
        raise InvalidCaseError(f"{where}: no DICOM study with image series found")
    return studies


def _load(source):
    """A series' source as a dataset: read from its file, or the dataset itself."""
    return source if isinstance(source, pydicom.Dataset) else pydicom.dcmread(source)


def volume_as_nifti(volume) -> tuple:
    """The NIfTI (x, y, z) array and RAS affine of a ``highdicom.Volume`` (of a series, a multi-frame image or a SEG).

    ``highdicom.get_volume_from_series`` stacks the slices on axis 0 of ``volume.array`` (rows on axis 1, columns on
    axis 2), ordered so that (slice, row, column) is right-handed in LPS, and ``volume.affine`` maps (slice, row,
    column, 1) to LPS: its columns are the slice step, the step down the rows (the column cosine times the row
    spacing), the step along a row (the row cosine times the column spacing) and the first slice's position. So
    (column, row, slice) in that order is left-handed, and for a series written by
    ``scripts.dicom.synthetic.write_study`` from a right-handed affine (as all of the generator's are) axis 0 runs
    from slice z-1 to slice 0: ``volume.array[s, j, i]`` is ``array[i, j, z - 1 - s]``.

    This returns the axes (column index, row index, slice index) with the slices in the order that makes the RAS
    affine right-handed (highdicom's order reversed), read from the volume's affine alone, so it holds for any slice
    order in the files and any row, column or slice direction; for such a series of a right-handed affine
    it gives back that affine (up to the DS rounding, ~1e-10 mm) and the array exactly.

    Args:
        volume: a ``highdicom.Volume`` with a 3-D array.

    Returns:
        (array (x, y, z) float32, a view, 4 x 4 RAS affine float64).
    """
    array = np.asarray(volume.array, dtype=np.float32).transpose(2, 1, 0)
    affine_lps = np.asarray(volume.affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    if np.linalg.det(affine_lps[:3, :3]) < 0:
        affine_lps[:3, 3] += (array.shape[2] - 1) * affine_lps[:3, 2]
        affine_lps[:3, 2] *= -1
        array = array[:, :, ::-1]
    affine = LPS_TO_RAS @ affine_lps
    return array, affine  # a view of the volume's array: the reader stacks the channels into one copy


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
        raise ValueError(f"series {headers[0].SeriesInstanceUID} is not a regularly spaced volume")
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


def _onto_grid(array, affine, shape, target_affine):
    """``array`` resampled (MONAI's ``SpatialResample``: trilinear, 0 outside) onto the grid of ``shape`` and
    ``target_affine``."""
    image = MetaTensor(torch.as_tensor(np.ascontiguousarray(array))[None], affine=torch.as_tensor(affine))
    resampled = SpatialResample(mode="bilinear", padding_mode="zeros")(
        image, dst_affine=torch.as_tensor(target_affine), spatial_size=tuple(shape)
    )
    return resampled[0].numpy()


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
                else _onto_grid(array, a, reference.shape, affine)
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

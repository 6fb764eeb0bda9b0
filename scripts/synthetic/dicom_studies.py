"""Synthetic cases as a hospital's PACS holds CT perfusion results: one DICOM study per case, with a series for the
NCCT, one for each perfusion map and one for each optional input the case has (``scripts.data.channels``), each
classic CT Image Storage with one file per slice.

The NIfTI and the DICOM forms of a case hold the same values (``dicom_representable``) on the same grid, so the
bundle's pipeline gives identical inputs, and identical masks, from either.

Geometry: voxel (i, j, k) of a NIfTI (x, y, z) array is slice k's pixel at column i, row j. With the RAS affine A and
``LPS = diag(-1, -1, 1)``: ImageOrientationPatient is LPS @ A[:3, 0] (along the columns of a row, increasing column
index) and LPS @ A[:3, 1] (down the rows), both normalised; ImagePositionPatient of slice k is LPS @ (A @ [0, 0, k, 1]);
PixelSpacing is (|A[:3, 1]|, |A[:3, 0]|), the slice spacing |A[:3, 2]|; InstanceNumber is k + 1.
"""

import hashlib
from pathlib import Path

import numpy as np
import pydicom
from highdicom.spatial import convert_affine_to_convention
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds
from scripts.data import channels as spec
from scripts.data.channels import CHANNELS, matches_description
from scripts.dicom.results import derived_uid, segmentation

__all__ = ["SERIES_DESCRIPTIONS", "dicom_representable", "series_description", "write_label", "write_study"]

# Series description of each required input, as a vendor names them; an optional input's series is named after it.
SERIES_DESCRIPTIONS = {
    "CT": "NCCT Head 5mm",
    "CBF": "RAPID CBF",
    "CBV": "RAPID CBV",
    "MTT": "RAPID MTT",
    "Tmax": "RAPID Tmax",
}
IMAGE_TYPES = {"CT": ["ORIGINAL", "PRIMARY", "AXIAL"], "map": ["DERIVED", "SECONDARY", "AXIAL", "PERFUSION"]}
CT_INTERCEPT = -1024  # HU of stored value 0 in the NCCT series
# Finest rescale slope 2**-k of a float map: 2**-15 = 3.0517578125e-05 still fits the 16 characters of a DS exactly.
MAX_SCALE_EXPONENT = 15
# Fixed dates and times, so that the same arguments give byte-identical files.
STUDY_DATE, STUDY_TIME = "20240101", "120000"
MANUFACTURER, MODEL_NAME = "SYNTHETIC", "synthetic_isles"
LABEL_SERIES_NUMBER = len(CHANNELS) + 1  # after the required inputs' series
FIRST_OPTIONAL_SERIES_NUMBER = LABEL_SERIES_NUMBER + 2  # after the label and the phantom's raw perfusion series
UID_NAMESPACE = "scripts.dicom.synthetic"  # the module's first name, kept: the same arguments give the same UIDs


def _storage_range(signed):
    """The smallest and largest stored value of 16-bit pixels."""
    return (-(2**15), 2**15 - 1) if signed else (0, 2**16 - 1)


def _scale_exponent(values):
    """Largest k in [0, MAX_SCALE_EXPONENT] whose grid 2**-k holds ``values`` (float) in 16-bit integers: int16, or
    uint16 where all values are >= 0.

    Raises:
        ValueError: for values that are not finite or too large for 16 bits even at k = 0.
    """
    if not np.isfinite(values).all():
        raise ValueError("a map with NaN or infinite values has no DICOM form")
    low, high = float(values.min()), float(values.max())
    lower, upper = _storage_range(signed=low < 0)
    for exponent in range(MAX_SCALE_EXPONENT, -1, -1):
        if lower <= np.rint(low * 2.0**exponent) and np.rint(high * 2.0**exponent) <= upper:
            return exponent
    raise ValueError(f"values from {low} to {high} do not fit 16 bits with a rescale slope of 1")


def dicom_representable(arrays: dict) -> dict:
    """The values a 16-bit DICOM series with a power-of-two RescaleSlope holds of each array, in the array's dtype.

    Integer arrays are returned unchanged (slope 1). A float array is rounded to the grid 2**-k with the largest k
    (the finest grid, k from 0 to ``MAX_SCALE_EXPONENT``) whose stored integers fit int16, or uint16 where all values
    are >= 0. Why: a stored integer n < 2**16 times 2**-k is exact in float64 and in float32, so the DICOM read back
    (stored * slope + intercept, cast to float32) gives exactly the float32 values MONAI loads from the NIfTI of the
    returned array, and the model gives identical masks from the NIfTI and the DICOM forms of a case. The result is
    its own ``dicom_representable``.

    Args:
        arrays: channel -> numpy array (any shape).

    Returns:
        channel -> array of the same dtype and shape.

    Raises:
        ValueError: for a float array with NaN or infinite values, or too large for 16 bits.
    """
    representable = {}
    for channel, array in arrays.items():
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.integer):
            representable[channel] = array
            continue
        step = 2.0 ** -_scale_exponent(array)
        representable[channel] = (np.rint(array.astype(np.float64) / step) * step + 0.0).astype(array.dtype)
    return representable


def _stored_pixels(channel, array):
    """The stored 16-bit values of ``array`` and its (slope, intercept, signed).

    Raises:
        ValueError: where ``array`` is not ``dicom_representable`` (off the grid, or out of 16-bit range).
    """
    values = np.asarray(array)
    if np.issubdtype(values.dtype, np.integer):
        slope, intercept = 1.0, CT_INTERCEPT if channel == "CT" else 0
    else:
        slope, intercept = 2.0 ** -_scale_exponent(values), 0
    scaled = (values.astype(np.float64) - intercept) / slope
    stored = np.rint(scaled)
    signed = bool(stored.min() < 0)
    lower, upper = _storage_range(signed)
    if not np.array_equal(stored, scaled) or stored.min() < lower or stored.max() > upper:
        raise ValueError(f"{channel} is not dicom_representable: pass it through dicom_representable first")
    return stored.astype("<i2" if signed else "<u2"), slope, intercept, signed


def _ds(values):
    """DS strings (16 characters at most) of ``values``, with no negative zeros."""
    return [format_number_as_ds(float(v) + 0.0) for v in values]


def _geometry(affine, depth):
    """ImageOrientationPatient, PixelSpacing, slice spacing, each slice's ImagePositionPatient and SliceLocation (LPS)
    of a NIfTI RAS ``affine``, for an (x, y, z) array of ``depth`` slices."""
    lps = convert_affine_to_convention(np.asarray(affine, dtype=np.float64), "RAS", "LPS")
    row_step, column_step = lps[:3, 0], lps[:3, 1]
    row_cosine, column_cosine = row_step / np.linalg.norm(row_step), column_step / np.linalg.norm(column_step)
    positions = [(lps @ [0.0, 0.0, k, 1.0])[:3] for k in range(depth)]
    normal = np.cross(row_cosine, column_cosine)
    return {
        "orientation": np.concatenate([row_cosine, column_cosine]),
        "pixel_spacing": (np.linalg.norm(column_step), np.linalg.norm(row_step)),
        "slice_spacing": float(np.linalg.norm(affine[:3, 2])),
        "positions": positions,
        "locations": [float(normal @ p) for p in positions],
    }


def series_description(name) -> str:
    """The SeriesDescription of an input's series: a vendor's name for a required input, the input's name for an
    optional one, which its default DICOM rule must match (else its series could not be found)."""
    description, rule = SERIES_DESCRIPTIONS.get(name, name), spec.channel(name).series_rule
    if not matches_description(rule, "CT", description):
        raise ValueError(f"{name}: its DICOM rule {rule} does not match its synthetic series' name {description!r}")
    return description


def _series_numbers(names) -> dict:
    """Each input's SeriesNumber: the required ones 1 to 5, optional ones after the label and the raw series."""
    optional = [name for name in names if name not in CHANNELS]
    return {
        name: CHANNELS.index(name) + 1 if name in CHANNELS else FIRST_OPTIONAL_SERIES_NUMBER + optional.index(name)
        for name in names
    }


def _series_dataset(channel, number, study, series_uid, geometry, shape, storage):
    """The attributes shared by every slice of one series."""
    slope, intercept, signed = storage
    ds = pydicom.Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = IMAGE_TYPES["CT" if channel == "CT" else "map"]
    for prefix in ("Study", "Series", "Acquisition", "Content"):
        setattr(ds, f"{prefix}Date", STUDY_DATE)
        setattr(ds, f"{prefix}Time", STUDY_TIME)
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT PERFUSION HEAD"
    ds.SeriesDescription = series_description(channel)
    if spec.channel(channel).computed:
        ds.DerivationDescription = f"{channel} map computed from the CT perfusion series (synthetic)"
    ds.PatientName = study["patient_name"]
    ds.PatientID = study["patient_id"]
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = _ds([geometry["slice_spacing"]])[0]
    ds.SpacingBetweenSlices = _ds([geometry["slice_spacing"]])[0]
    ds.KVP = "120" if channel == "CT" else "80"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study["study_instance_uid"]
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = _ds(geometry["orientation"])
    ds.FrameOfReferenceUID = study["frame_of_reference_uid"]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = shape[1], shape[0]
    ds.PixelSpacing = _ds(geometry["pixel_spacing"])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(signed)
    ds.RescaleIntercept = _ds([intercept])[0]
    ds.RescaleSlope = _ds([slope])[0]
    ds.RescaleType = "HU" if channel == "CT" else "US"
    return ds


def _write_slice(template, sop_instance_uid, instance_number, geometry, k, pixels, path) -> None:
    """One CT Image Storage file: ``template`` with slice ``k``'s position (``geometry``), ``pixels`` (x, y) as
    stored values, its UID and number, written to ``path``."""
    ds = template.copy()
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = _ds(geometry["positions"][k])
    ds.SliceLocation = _ds([geometry["locations"][k]])[0]
    ds.PixelData = np.ascontiguousarray(pixels.T).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def write_study(folder, arrays: dict, affine, case: str, seed: int, patient: str | None = None) -> dict:
    """Write one case as a DICOM study under ``folder``: one series per channel, ``<number>_<channel>/``, holding
    ``<number:02d>_<instance:04d>.dcm`` per slice (classic CT Image Storage, explicit VR little endian).

    Deterministic: the UIDs derive from ``case``, ``seed``, a digest of the arrays and affine, the channel and the
    slice, and dates and times are fixed, so the same arguments give byte-identical files. All series share one
    StudyInstanceUID and one FrameOfReferenceUID. See the module docstring for the geometry.

    Args:
        folder: the study folder (created).
        arrays: input -> (x, y, z) numpy array, already ``dicom_representable``, for every required input and any
            optional ones (``scripts.data.channels``), all of one shape.
        affine: 4 x 4 RAS affine (NIfTI) of all the arrays.
        case: a name of the case unique in its tree (e.g. ``training-case_1``); it names the patient unless
            ``patient`` does.
        seed: the generator's seed.
        patient: a name of the patient (cases of one patient share it), e.g. ``training-patient_1``.

    Returns:
        ``{"study_instance_uid", "series": {channel: series_instance_uid}, "files": [paths, series by series, in
        slice order], "folder"}``.

    Raises:
        ValueError: for a required input missing or an undeclared one, arrays of different or non-3D shapes, or
            values that are not ``dicom_representable``.
    """
    names = [c.name for c in spec.SPEC if c.name in arrays]
    if not set(CHANNELS) <= set(arrays) or len(names) != len(arrays):
        raise ValueError(
            f"a study holds the channels {', '.join(CHANNELS)} and optional inputs, got {', '.join(arrays)}"
        )
    shapes = {np.shape(array) for array in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"the arrays must share one (x, y, z) shape, got {sorted(shapes)}")
    shape = shapes.pop()
    affine = np.asarray(affine, dtype=np.float64)
    digest = hashlib.sha256(affine.tobytes())
    for name in names:
        digest.update(f"{name}:{arrays[name].dtype.str}".encode())
        digest.update(np.ascontiguousarray(arrays[name]))
    identity = (case, seed, digest.hexdigest())
    patient = case if patient is None else patient
    study = {
        "study_instance_uid": derived_uid(UID_NAMESPACE, *identity, "study"),
        "frame_of_reference_uid": derived_uid(UID_NAMESPACE, *identity, "frame of reference"),
        "patient_name": f"SYNTHETIC^{patient.upper()}",
        "patient_id": f"SYN-{patient}",
    }
    geometry = _geometry(affine, shape[2])
    folder = Path(folder)
    series, files = {}, []
    for channel, number in _series_numbers(names).items():
        stored, *storage = _stored_pixels(channel, arrays[channel])
        series[channel] = derived_uid(UID_NAMESPACE, *identity, "series", channel)
        template = _series_dataset(channel, number, study, series[channel], geometry, shape, storage)
        series_dir = folder / f"{number}_{channel}"
        series_dir.mkdir(parents=True, exist_ok=True)
        for k in range(shape[2]):
            uid = derived_uid(UID_NAMESPACE, *identity, "instance", channel, k)
            path = series_dir / f"{number:02d}_{k + 1:04d}.dcm"
            _write_slice(template, uid, k + 1, geometry, k, stored[:, :, k], path)
            files.append(str(path))
    return {"study_instance_uid": study["study_instance_uid"], "series": series, "files": files, "folder": str(folder)}


LABEL_DESCRIPTION = "Lesion (ground truth, synthetic)"


def write_label(study, label, affine, case: str, seed: int) -> str:
    """Write a case's label as a ground-truth DICOM SEG (binary, a manual segment, on the study's NCCT series) in
    ``<study folder>/<number>_label/``, as a site's reference segmentation is stored beside the study.

    Args:
        study: ``write_study``'s result for the case.
        label: the (x, y, z) label array (lesion where positive), on the grid of ``affine``.
        affine: the 4 x 4 RAS affine the study was written with.
        case: the case's name, as given to ``write_study``.
        seed: the generator's seed.

    Returns:
        The SEG file's path.
    """
    depth = np.shape(label)[2]
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in study["files"][:depth]]  # the NCCT
    uids = {"seg_series": derived_uid(UID_NAMESPACE, case, seed, study["study_instance_uid"], "label series")}
    uids["seg_instance"] = derived_uid(UID_NAMESPACE, case, seed, study["study_instance_uid"], "label instance")
    seg = segmentation(
        headers,
        np.asarray(label) > 0,
        affine,
        uids,
        MODEL_NAME,
        MANUFACTURER,
        manufacturer=MANUFACTURER,
        series_number=LABEL_SERIES_NUMBER,
        series_description=LABEL_DESCRIPTION,
        predicted=False,
    )
    for prefix in ("Series", "Content", "InstanceCreation"):  # fixed, as the study's: the same arguments, the same file
        setattr(seg, f"{prefix}Date", STUDY_DATE)
        setattr(seg, f"{prefix}Time", STUDY_TIME)
    for item in seg.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = STUDY_DATE + STUDY_TIME
    path = Path(study["folder"]) / f"{LABEL_SERIES_NUMBER}_label" / f"{LABEL_SERIES_NUMBER:02d}_0001.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path, enforce_file_format=True)
    return str(path)

"""Each DICOM case's results as DICOM objects for the PACS: the mask as a DICOM SEG on the NCCT and its volumes and
perfusion figures as a TID 1500 measurement report (Comprehensive 3D SR) that references the SEG, both with highdicom.

``DicomResultsWriter`` is one of ``scripts.report.cases.CaseOutputsWriter``'s ``case_writers`` (configs/dicom.json):
it gets each case's mask, on the NCCT's grid as ``scripts.dicom.series.DicomSeriesReader`` read it, and the case's
row of ``volumes.csv``, and writes ``<prediction_dir>/dicom/<case>/seg.dcm``, ``sr.dcm`` and (``overlay``)
``overlay.dcm``, each whole under a temporary name, before the row is written. Their UIDs are derived from the
study's UID and the model's checkpoint bytes, so a rerun of the same model on the same study makes the same objects:
the PACS replaces them instead of holding two copies. The segment is coded as an infarct (SNOMED CT 55641003, a
morphologically abnormal structure of the brain) labelled "ischemic core"; the series descriptions say "predicted,
research use".
"""

from __future__ import annotations

import functools
import hashlib
import os

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from scripts.data.channels import NCCT
from scripts.flags import as_bool
from scripts.report.cases import file_stamps
from scripts.safe_files import write_atomically

__all__ = ["DicomResultsWriter", "derived_uid", "measurement_report", "overlay_capture", "result_uids", "segmentation"]

MANUFACTURER = "MONAI bundle ischemic_stroke_ctp_segmentation"
INFARCT = Code("55641003", "SCT", "Infarct")
SEGMENT_LABEL = "ischemic core"
SEG_DESCRIPTION = "Ischemic core (predicted, research use)"
SR_DESCRIPTION = "Stroke CTP volumes (predicted, research use)"
OVERLAY_DESCRIPTION = "Ischemic core overlay (predicted, research use)"
SEG_SERIES_NUMBER, SR_SERIES_NUMBER, OVERLAY_SERIES_NUMBER = 9901, 9902, 9903
LOCAL_SCHEME = "99STROKECTP"  # the bundle's own codes (a private coding scheme: "99" + name) for its figures
UNITS = {"ml": Code("ml", "UCUM", "milliliter"), "ratio": Code("1", "UCUM", "no units")}
# volumes.csv's figures in the report: name, meaning, unit
FIGURES = {
    "hypoperfusion_ml": ("Hypoperfused volume (Tmax > 6 s)", "ml"),
    "core_rcbf_ml": ("Core volume (rCBF < 30%)", "ml"),
    "mismatch_ml": ("Mismatch volume", "ml"),
    "mismatch_ratio": ("Mismatch ratio", "ratio"),
    "hypoperfusion_intensity_ratio": ("Hypoperfusion intensity ratio", "ratio"),
}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM's patient coordinates (LPS) to NIfTI's (RAS), and back


@functools.lru_cache(maxsize=8)
def _digest_of(stamps) -> str:
    """SHA-256 of the checkpoints' bytes, in order, for their (path, size, mtime) ``stamps``: computed once per
    model in a process that segments study after study (the listener)."""
    digest = hashlib.sha256()
    for path, _, _ in stamps:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _digest(paths) -> str:
    """SHA-256 of the checkpoints' bytes, in order: the model the results come from."""
    return _digest_of(tuple(tuple(stamp) for stamp in file_stamps(paths)))


def derived_uid(*parts) -> str:
    """pydicom's UID (under its root) derived from ``parts`` alone: the same parts, the same UID."""
    return generate_uid(entropy_srcs=[str(part) for part in parts])


def result_uids(study_uid, model_digest) -> dict:
    """The SEG's and SR's series and instance UIDs, the same for the same study and model."""
    names = ("seg_series", "seg_instance", "sr_series", "sr_instance", "tracking", "overlay_series", "overlay_instance")
    return {name: derived_uid(study_uid, model_digest, name) for name in names}


def _slice_of(header, frame, inverse):
    """The slice index, in the mask's (x, y, z) grid, of one NCCT frame (its ImagePositionPatient)."""
    if int(header.get("NumberOfFrames", 1)) > 1:
        position = header.PerFrameFunctionalGroupsSequence[frame].PlanePositionSequence[0].ImagePositionPatient
    else:
        position = header.ImagePositionPatient
    index = inverse @ np.append(np.asarray(position, dtype=float), 1.0)
    k = int(round(index[2]))
    if abs(index[2] - k) > 1e-2 or abs(index[0]) > 1e-2 or abs(index[1]) > 1e-2:
        raise ValueError(f"NCCT instance {header.SOPInstanceUID}: its position is off the mask's grid ({index[:3]})")
    return k


def segmentation(
    ct_headers,
    mask,
    affine,
    uids,
    software_version,
    manufacturer=MANUFACTURER,
    series_number=SEG_SERIES_NUMBER,
    series_description=SEG_DESCRIPTION,
    predicted=True,
) -> hd.seg.Segmentation:
    """The mask as a binary DICOM SEG referencing the NCCT instances.

    Args:
        ct_headers: the NCCT series' datasets (headers suffice), any order.
        mask: the (x, y, z) bool mask on the NCCT's grid (x the column, y the row of a slice).
        affine: the mask's RAS affine (``scripts.dicom.series.volume_arrays``'s).
        uids: ``result_uids``'s (``seg_series``, ``seg_instance``).
        software_version: the bundle's version.
        manufacturer: who made it: the bundle (a prediction); a ground truth's maker otherwise.
        series_number: the SEG's series number.
        series_description: the SEG's series description.
        predicted: the bundle's automatic segment (the model named); else a manual one (a ground truth).
    """
    inverse = np.linalg.inv(LPS_TO_RAS @ np.asarray(affine, dtype=np.float64))
    frames = []
    for header in ct_headers:
        for frame in range(int(header.get("NumberOfFrames", 1))):
            frames.append(mask[:, :, _slice_of(header, frame, inverse)].T)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=INFARCT,
        algorithm_type=(
            hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if predicted else hd.seg.SegmentAlgorithmTypeValues.MANUAL
        ),
        algorithm_identification=(
            hd.AlgorithmIdentificationSequence(
                name="ModifiedUNet", version=software_version, family=codes.cid7162.ArtificialIntelligence
            )
            if predicted
            else None
        ),
        anatomic_regions=[codes.SCT.Brain],
    )
    seg = hd.seg.Segmentation(
        source_images=list(ct_headers),
        pixel_array=np.stack(frames).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=uids["seg_series"],
        series_number=series_number,
        sop_instance_uid=uids["seg_instance"],
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name="ModifiedUNet" if predicted else manufacturer,
        software_versions=software_version,
        device_serial_number="0",
        series_description=series_description,
        omit_empty_frames=False,
    )
    dimensions = derived_uid(uids["seg_instance"], "dimension organization")  # highdicom draws a random one
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimensions
    return seg


def _measurement(name, meaning, value, unit):
    return hd.sr.Measurement(
        name=Code(name, LOCAL_SCHEME, meaning) if name != "volume" else codes.SCT.Volume,
        value=float(value),
        unit=UNITS[unit],
    )


def measurement_report(seg, ct_headers, row, uids, software_version) -> hd.sr.Comprehensive3DSR:
    """The case's figures as a TID 1500 measurement report: the segment's volume (SNOMED CT Volume, mL) in a
    volumetric group that references the SEG's segment, and the perfusion figures present in ``row`` (blank ones
    left out) in a second group.

    Args:
        seg: ``segmentation``'s SEG.
        ct_headers: the NCCT series' datasets.
        row: the case's row of volumes.csv (``volume_pred_ml`` and the perfusion figures).
        uids: ``result_uids``'s.
        software_version: the bundle's version.
    """
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(MANUFACTURER), name=MANUFACTURER, model_name="ModifiedUNet"
        ),
    )
    algorithm = hd.sr.AlgorithmIdentification(name="ModifiedUNet", version=software_version)
    core = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids["tracking"], identifier=SEGMENT_LABEL),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=1,
            source_series=hd.sr.SourceSeriesForSegmentation(ct_headers[0].SeriesInstanceUID),
        ),
        finding_type=INFARCT,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Brain)],
        algorithm_id=algorithm,
        measurements=[_measurement("volume", "", row["volume_pred_ml"], "ml")],
    )
    figures = [
        _measurement(name, meaning, row[name], unit)
        for name, (meaning, unit) in FIGURES.items()
        if row.get(name) not in (None, "")
    ]
    groups = [core]
    if figures:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(identifier="perfusion figures"),
                algorithm_id=hd.sr.AlgorithmIdentification(name="threshold perfusion report", version=software_version),
                measurements=figures,
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.CTPerfusionHeadWithContrastIV,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*ct_headers, seg],
        content=report,
        series_instance_uid=uids["sr_series"],
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids["sr_instance"],
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=SR_DESCRIPTION,
        coding_schemes=[
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=LOCAL_SCHEME, name="Stroke CTP bundle figures", responsible_organization=MANUFACTURER
            )
        ],
    )


def overlay_capture(ct_headers, image, uids) -> hd.sc.SCImage:
    """The case's overlay PNG (``scripts.report.overlay.overlay_image``) as an RGB secondary capture in the study."""
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ct_headers[0],
        pixel_array=np.asarray(image.convert("RGB")),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids["overlay_series"],
        series_number=OVERLAY_SERIES_NUMBER,
        sop_instance_uid=uids["overlay_instance"],
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "P"),
        series_description=OVERLAY_DESCRIPTION,
    )


class DicomResultsWriter:
    """Writes each DICOM case's SEG and SR under ``<prediction_dir>/dicom/<case>/`` (a ``case_writers`` entry of
    ``scripts.report.cases.CaseOutputsWriter``).

    Args:
        studies: ``scripts.dicom.series.find_studies``'s studies of the run.
        prediction_dir: the run's output folder.
        checkpoints: the checkpoint files of the model (their bytes go into the UIDs).
        software_version: the bundle's version (configs/dicom.json: ``@_meta_#version``).
        overlay: also the overlay PNG as a secondary capture (``overlay.dcm``).
    """

    def __init__(self, studies, prediction_dir, checkpoints, software_version, overlay=False):
        self.studies = {study.case: study for study in studies}
        self.folder = os.path.join(prediction_dir, "dicom")
        self.checkpoints, self.software_version = list(checkpoints), software_version
        self.overlay = as_bool(overlay, "dicom_overlay")

    def files(self, case) -> tuple:
        """The paths of ``case``'s SEG, SR and (with ``overlay``) secondary capture, in that order."""
        names = ("seg.dcm", "sr.dcm", "overlay.dcm") if self.overlay else ("seg.dcm", "sr.dcm")
        return tuple(os.path.join(self.folder, case, name) for name in names)

    def write(self, case, mask, affine, row, overlay) -> None:
        """Write ``case``'s DICOM objects from its mask ((x, y, z) bool), the mask's affine, its volumes.csv row and
        its overlay (a PIL image)."""
        study = self.studies[case]
        uids = result_uids(study.uid, _digest(self.checkpoints))
        ct_headers = study.series[NCCT].headers
        seg = segmentation(ct_headers, mask, affine, uids, self.software_version)
        sr = measurement_report(seg, ct_headers, row, uids, self.software_version)
        datasets = [seg, sr] + ([overlay_capture(ct_headers, overlay, uids)] if self.overlay else [])
        for dataset, path in zip(datasets, self.files(case)):
            write_atomically(path, lambda f, dataset=dataset: dataset.save_as(f, enforce_file_format=True))

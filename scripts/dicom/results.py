"""Each DICOM case's results as DICOM objects for the PACS: the mask as a DICOM SEG on the NCCT and its volumes and
perfusion figures as a TID 1500 measurement report (Comprehensive 3D SR) that references the SEG, both with highdicom.

``DicomResultsWriter`` is one of ``scripts.report.cases.CaseOutputsWriter``'s ``case_writers`` (configs/dicom.json):
it gets each case's mask, on the NCCT's grid as ``scripts.dicom.series.DicomSeriesReader`` read it, and the case's
row of ``volumes.csv``, and writes ``<prediction_dir>/dicom/<case>/seg.dcm``, ``sr.dcm`` and (``overlay``)
``overlay.dcm``, each whole under a temporary name, before the row is written.

Their UIDs are derived from what their content depends on: the study's UID, the instances read (``inputs_digest``),
the model's checkpoint bytes and every setting that changes a mask or a figure (configs/dicom.json's
``dicom_result_settings``: network, thresholds, test-time flips, precision, pre-processing, series rules, version).
So a rerun with the same model, settings and study makes the same objects, which the PACS holds once, and a rerun
with anything changed makes new objects, never new content under the old UIDs. The segment is coded as an infarct
(SNOMED CT 55641003, a morphologically abnormal structure of the brain) labelled "ischemic core" and names the network
that the config built (``network_name``); the SR's figures are named after the thresholds used; the series
descriptions say "predicted, research use", and where the perfusion maps cover part of the NCCT (a CT perfusion
slab), "CTP slab": the SEG then covers those NCCT slices only (``scripts.dicom.series.Study.coverage``). Where the
perfusion maps came from (the vendor's series, or computed by the bundle from the raw CT perfusion series, with the
method) is a text item (an algorithm parameter) of both measurement groups of the SR.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from scripts.data.channels import MAPS_SOURCE, NCCT, VENDOR_MAPS
from scripts.dicom.series import MANUFACTURER
from scripts.flags import as_bool
from scripts.report.cases import PER_CASE, file_stamps
from scripts.report.perfusion import DEFAULT_THRESHOLDS
from scripts.report.tables import read_csv
from scripts.safe_files import rank, write_atomically

__all__ = [
    "DicomResultsWriter",
    "derived_uid",
    "figure_concepts",
    "inputs_digest",
    "measurement_report",
    "overlay_capture",
    "remove_stale_objects",
    "result_uids",
    "segmentation",
]

INFARCT = Code("55641003", "SCT", "Infarct")
SEGMENT_LABEL = "ischemic core"
SEG_DESCRIPTION = "Ischemic core (predicted, research use{})"
SR_DESCRIPTION = "Stroke CTP volumes (predicted, research use{})"
SLAB = ", CTP slab"  # in both descriptions where the maps cover part of the NCCT
OVERLAY_DESCRIPTION = "Ischemic core overlay (predicted, research use)"
SEG_SERIES_NUMBER, SR_SERIES_NUMBER, OVERLAY_SERIES_NUMBER = 9901, 9902, 9903
LOCAL_SCHEME = "99STROKECTP"  # the bundle's own codes (a private coding scheme: "99" + name) for its figures
UNITS = {"ml": Code("ml", "UCUM", "milliliter"), "ratio": Code("1", "UCUM", "no units")}
# the Type 2 patient and study attributes that highdicom copies from the NCCT: written empty where a study lacks them
TYPE_2_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def figure_concepts(thresholds=None) -> dict:
    """The SR's concept of each perfusion figure of volumes.csv, named after the thresholds used: ``{column: (Code,
    unit)}``. The code value holds the thresholds too, so that one code never means two things.

    Args:
        thresholds: the run's ``perfusion_thresholds`` (``scripts.report.perfusion.DEFAULT_THRESHOLDS``'s keys).
    """
    t = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    tmax, severe, rcbf = f"{float(t['tmax_s']):g}", f"{float(t['tmax_severe_s']):g}", f"{100 * float(t['rcbf']):g}"
    hypo, core = f"Tmax > {tmax} s", f"rCBF < {rcbf}%"
    concepts = {
        "hypoperfusion_ml": (f"HYPO_T{tmax}", f"Hypoperfused volume ({hypo})", "ml"),
        "core_rcbf_ml": (f"CORE_R{rcbf}", f"Core volume ({core})", "ml"),
        "mismatch_ml": (f"MISMATCH_T{tmax}_R{rcbf}", f"Mismatch volume ({hypo} minus {core})", "ml"),
        "mismatch_ratio": (f"MMRATIO_T{tmax}_R{rcbf}", f"Mismatch ratio ({hypo} / {core})", "ratio"),
        "hypoperfusion_intensity_ratio": (
            f"HIR_T{severe}_T{tmax}",
            f"Hypoperfusion intensity ratio (Tmax > {severe} s / {hypo})",
            "ratio",
        ),
    }
    return {column: (Code(value, LOCAL_SCHEME, meaning), unit) for column, (value, meaning, unit) in concepts.items()}


COVERAGE = Code("NCCT_SLAB", LOCAL_SCHEME, "Fraction of NCCT slices with perfusion maps (segmented)")


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


def _settings_digest(settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=repr).encode()).hexdigest()


def inputs_digest(study) -> str:
    """SHA-256 of what a study's results are made from: each channel's series and the SOPInstanceUIDs read of it
    (the NCCT slices kept where the maps cover part of it)."""
    inputs = {
        channel: [series.uid, sorted(str(header.SOPInstanceUID) for header in series.headers)]
        for channel, series in study.series.items()
    }
    return _settings_digest(inputs)


def derived_uid(*parts) -> str:
    """pydicom's UID (under its root) derived from ``parts`` alone: the same parts, the same UID."""
    return generate_uid(entropy_srcs=[str(part) for part in parts])


def result_uids(study_uid, *sources) -> dict:
    """The SEG's, SR's and overlay's series and instance UIDs and the SR's tracking UIDs, derived from the study's UID
    and ``sources`` (what the content depends on): the same sources, the same UIDs."""
    names = (
        "seg_series",
        "seg_instance",
        "sr_series",
        "sr_instance",
        "tracking",
        "perfusion_tracking",
        "overlay_series",
        "overlay_instance",
    )
    return {name: derived_uid(study_uid, *sources, name) for name in names}


def _with_type_2_attributes(headers) -> list:
    """``headers``, each given the Type 2 patient and study attributes it lacks, empty, as the standard allows (the
    headers are the study's, held in memory: nothing is written back to its files)."""
    for header in headers:
        for keyword in TYPE_2_ATTRIBUTES:
            if keyword not in header:
                setattr(header, keyword, "")
    return list(headers)


def segmentation(
    ct_headers,
    mask,
    affine,
    uids,
    software_version,
    algorithm_name,
    manufacturer=MANUFACTURER,
    series_number=SEG_SERIES_NUMBER,
    series_description=None,
    predicted=True,
    content_description=None,
) -> hd.seg.Segmentation:
    """The mask as a binary DICOM SEG referencing the NCCT instances: highdicom places each slice of the mask (a
    ``highdicom.Volume``) on the NCCT frame at its position.

    Args:
        ct_headers: the NCCT series' datasets (headers suffice), any order.
        mask: the (x, y, z) bool mask on the NCCT's grid (x the column, y the row of a slice).
        affine: the mask's RAS affine (``scripts.dicom.series.volume_arrays``'s).
        uids: ``result_uids``'s (``seg_series``, ``seg_instance``).
        software_version: the bundle's version.
        algorithm_name: the network that made the mask (the config's ``network_name``), or the maker of a manual one.
        manufacturer: who made it: the bundle (a prediction); a ground truth's maker otherwise.
        series_number: the SEG's series number.
        series_description: the SEG's series description (``SEG_DESCRIPTION`` by default).
        predicted: the bundle's automatic segment (the model named); else a manual one (a ground truth).
        content_description: what the SEG covers, where it is not the whole NCCT.
    """
    volume = hd.Volume(
        np.asarray(mask, dtype=np.uint8),
        np.asarray(affine, dtype=np.float64),
        coordinate_system="PATIENT",
        frame_of_reference_uid=ct_headers[0].FrameOfReferenceUID,
        from_reference_convention="RAS",
    ).permute_spatial_axes(
        [2, 1, 0]
    )  # the slices on axis 0, as SEG frames
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
                name=algorithm_name, version=software_version, family=codes.cid7162.ArtificialIntelligence
            )
            if predicted
            else None
        ),
        anatomic_regions=[codes.SCT.Brain],
    )
    seg = hd.seg.Segmentation(
        source_images=list(ct_headers),
        pixel_array=volume,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=uids["seg_series"],
        series_number=series_number,
        sop_instance_uid=uids["seg_instance"],
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name,
        software_versions=software_version,
        device_serial_number="0",
        series_description=series_description or SEG_DESCRIPTION.format(""),
        content_description=content_description,
        omit_empty_frames=False,
    )
    dimensions = derived_uid(uids["seg_instance"], "dimension organization")  # highdicom draws a random one
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimensions
    return seg


def _measurement(concept, value, unit):
    return hd.sr.Measurement(name=concept, value=float(value), unit=UNITS[unit])


def measurement_report(
    seg, ct_headers, row, uids, software_version, algorithm_name, thresholds=None, coverage=None
) -> hd.sr.Comprehensive3DSR:
    """The case's figures as a TID 1500 measurement report: the segment's volume (SNOMED CT Volume, mL) in a
    volumetric group that references the SEG's segment, and the perfusion figures present in ``row`` (blank ones
    left out) in a second group, named after ``thresholds``; each group's algorithm says where the perfusion maps came
    from (``maps_source``, a TEXT parameter: ``perfusion maps: vendor``, or computed by the bundle with the method).

    Args:
        seg: ``segmentation``'s SEG.
        ct_headers: the NCCT series' datasets.
        row: the case's row of volumes.csv (``volume_pred_ml``, ``maps_source`` and the perfusion figures).
        uids: ``result_uids``'s.
        software_version: the bundle's version.
        algorithm_name: the network that made the mask (the config's ``network_name``).
        thresholds: the run's ``perfusion_thresholds``.
        coverage: the study's ``coverage`` where the maps cover part of the NCCT: its fraction of slices is reported.
    """
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(MANUFACTURER), name=MANUFACTURER, model_name=algorithm_name
        ),
    )
    maps = [f"perfusion maps: {row.get(MAPS_SOURCE) or VENDOR_MAPS}"]
    measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=float(row["volume_pred_ml"]), unit=UNITS["ml"])]
    if coverage:
        fraction = (coverage["last"] - coverage["first"] + 1) / coverage["of"]
        measurements.append(_measurement(COVERAGE, fraction, "ratio"))
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
        algorithm_id=hd.sr.AlgorithmIdentification(name=algorithm_name, version=software_version, parameters=maps),
        measurements=measurements,
    )
    figures = [
        _measurement(concept, row[column], unit)
        for column, (concept, unit) in figure_concepts(thresholds).items()
        if row.get(column) not in (None, "")
    ]
    groups = [core]
    if figures:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uids["perfusion_tracking"], identifier="perfusion figures"
                ),
                algorithm_id=hd.sr.AlgorithmIdentification(
                    name="threshold perfusion report", version=software_version, parameters=maps
                ),
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
        series_description=SR_DESCRIPTION.format(SLAB if coverage else ""),
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


DICOM_FOLDER = "dicom"  # <prediction_dir>/dicom/<case>/


def remove_stale_objects(prediction_dir) -> None:
    """Remove ``<prediction_dir>/dicom/<case>/`` of every case without a row in ``per_case.csv``: what an earlier run
    wrote for a case that this run does again, or that is no longer in it (``--overwrite true``), is never sent to a
    PACS with this run's objects. Run after ``scripts.report.cases.prepare_outputs`` (configs/dicom.json's
    ``+initialize``), which keeps the rows of the cases that stay; on rank 0 only."""
    if rank() != 0:
        return
    folder = os.path.join(prediction_dir, DICOM_FOLDER)
    if not os.path.isdir(folder):
        return
    table = os.path.join(prediction_dir, PER_CASE)
    finished = {row["case"] for row in read_csv(table)} if os.path.isfile(table) else set()
    for case in sorted(set(os.listdir(folder)) - finished):
        shutil.rmtree(os.path.join(folder, case))


class DicomResultsWriter:
    """Writes each DICOM case's SEG and SR under ``<prediction_dir>/dicom/<case>/`` (a ``case_writers`` entry of
    ``scripts.report.cases.CaseOutputsWriter``).

    Args:
        studies: ``scripts.dicom.series.find_studies``'s studies of the run.
        prediction_dir: the run's output folder.
        checkpoints: the checkpoint files of the model (their bytes go into the UIDs).
        software_version: the bundle's version (configs/dicom.json: ``@_meta_#version``).
        network_name: the network that the config built (``@network_name``), named in the SEG and SR.
        settings: every setting that changes a mask or a figure (``@dicom_result_settings``), for the UIDs.
        thresholds: the run's ``perfusion_thresholds``, which name the SR's figures.
        overlay: also the overlay PNG as a secondary capture (``overlay.dcm``).
    """

    def __init__(
        self,
        studies,
        prediction_dir,
        checkpoints,
        software_version,
        network_name,
        settings=None,
        thresholds=None,
        overlay=False,
    ):
        self.studies = {study.case: study for study in studies}
        self.folder = os.path.join(prediction_dir, DICOM_FOLDER)
        self.checkpoints, self.software_version = list(checkpoints), software_version
        self.network_name, self.thresholds = network_name, thresholds
        self.settings = _settings_digest(settings or {})
        self.overlay = as_bool(overlay, "dicom_overlay")

    def files(self, case) -> tuple:
        """The paths of ``case``'s SEG, SR and (with ``overlay``) secondary capture, in that order."""
        names = ("seg.dcm", "sr.dcm", "overlay.dcm") if self.overlay else ("seg.dcm", "sr.dcm")
        return tuple(os.path.join(self.folder, case, name) for name in names)

    def write(self, case, mask, affine, row, overlay) -> None:
        """Write ``case``'s DICOM objects from its mask ((x, y, z) bool), the mask's affine, its volumes.csv row and
        its overlay (a PIL image)."""
        study = self.studies[case]
        uids = result_uids(study.uid, _digest(self.checkpoints), self.settings, inputs_digest(study))
        ct_headers = _with_type_2_attributes(study.series[NCCT].headers)
        coverage = study.coverage
        seg = segmentation(
            ct_headers,
            mask,
            affine,
            uids,
            self.software_version,
            self.network_name,
            series_description=SEG_DESCRIPTION.format(SLAB if coverage else ""),
            content_description=(
                f"NCCT slices {coverage['first']}-{coverage['last']} of {coverage['of']}: where the maps are"
                if coverage
                else None
            ),
        )
        sr = measurement_report(
            seg, ct_headers, row, uids, self.software_version, self.network_name, self.thresholds, coverage
        )
        datasets = [seg, sr] + ([overlay_capture(ct_headers, overlay, uids)] if self.overlay else [])
        for dataset, path in zip(datasets, self.files(case)):
            write_atomically(path, lambda f, dataset=dataset: dataset.save_as(f, enforce_file_format=True))

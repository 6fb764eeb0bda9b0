"""Turn ISLES 2018 cases (co-registered inputs, a file each) into single 4D NIfTI studies, e.g. for MONAI Label.

MONAI Label hands a bundle ONE image file per study, while an ISLES case is five files (CT, CBF, CBV, MTT, Tmax; more
with a profile's optional inputs, ``--channels``). This writes each case as one 4D NIfTI of shape (x, y, z, channels),
float32, channels in metadata.json's channel_def order (or ``--channels``'), with the CT's affine (sform and qform
copied from the CT header as MONAI reads it, below): the case as the bundle loads it (``scripts.data.readers.
LoadCased``), written as one file. The bundle's pre-processing loads that file and the separate maps to the same
(channels, x, y, z) float32 array and affine, so both give the same mask.

    # one case folder -> OUT/case_7.nii.gz
    python -m scripts.tools.make_studies --source DIR/TESTING/case_7 --output_dir OUT
    # a whole ISLES root -> a MONAI Label studies folder: OUT/training_case_N.nii.gz, OUT/testing_case_N.nii.gz,
    # with --labels also the training labels as OUT/labels/final/training_case_N.nii.gz (what MONAI Label trains on)
    python -m scripts.tools.make_studies --source DIR --output_dir OUT [--sections TRAINING,TESTING] [--labels] \\
        [--channels CT,CBF,CBV,MTT,Tmax,<optional input>]

Existing files are never replaced without ``--overwrite`` (checked for every planned file before anything is
written); every case is read and checked with the datalist builder's checks before the first study is written, so
a bad case stops the run with a message naming the case and the file and nothing written, unless ``--skip_invalid``
is given (then the other cases are written). With ``--check false`` the checks run only as each case is loaded to be
written, so a bad case stops the run part-way.

The geometry copied is the CT's as MONAI's ``NibabelReader`` reads it: ``correct_nifti_header_if_necessary`` puts the
qform in place of a sform whose column norms disagree with pixdim (a sheared sform; a pixdim that is the slice
thickness, not the spacing). MONAI does that to the 3D maps but never to a 4D file, so a raw copy would load with
another affine than the maps (for a sform sheared by a 12 degree gantry tilt, 1.9 mm per 9.1 mm slice).

Not MONAI's ``LoadImage`` + ``SaveImage`` (tried with MONAI 1.6.1 and nibabel 5.4): ``LoadImage`` of the five files
gives (5, x, y, z) and ``SaveImage(resample=False, output_dtype=float32)`` writes them (x, y, z, 5) with the data and
the affine unchanged, and for the synthetic cases (qform_code = sform_code = 1, qform = sform) the uncompressed
file is byte for byte this module's, given a header with descrip and xyzt_units (without one, both are lost). But
``NibabelWriter.write`` always sets both codes to 1 and recomputes the qform from the affine: a CT with sform_code 2
or 0, or qform_code 0, gets 1 and 1, and a qform that differs from the sform is lost. It writes a one-slice label as
2D (x, y), and ``nib.save`` needs the temporary file to end in ``.nii.gz``, which MONAI Label's datastore would list.
"""

import gzip
import logging
import os
from functools import partial

import nibabel as nib
import numpy as np
from scripts.data.channels import CHANNELS, check_channels
from scripts.data.files import InvalidCaseError
from scripts.data.isles18 import TESTING_DIR, TRAINING_DIR, find_cases, find_dir, read_case
from scripts.flags import as_names
from scripts.safe_files import refuse_existing, write_atomically
from scripts.tools.cli import run

logger = logging.getLogger(__name__)

STUDY_SUFFIX = ".nii.gz"
LABELS_SUBDIR = os.path.join("labels", "final")  # MONAI Label's LocalDatastore: labels of tag "final"
DESCRIPTION = "ISLES CTP channels: "  # and the study's channels
DEFAULT_CHANNELS = ",".join(CHANNELS)
# Header fields that define the CT's voxel-to-world mapping, copied verbatim so that the study's affine is the CT's.
_GEOMETRY_FIELDS = ("qform_code", "sform_code", "xyzt_units", "srow_x", "srow_y", "srow_z")
_GEOMETRY_FIELDS += tuple(f"quatern_{a}" for a in "bcd") + tuple(f"qoffset_{a}" for a in "xyz")


def _image(data, meta, dtype):
    """``data`` as a NIfTI image of ``dtype`` with the geometry of the header ``meta`` (a loaded CT's, as MONAI reads it:
    module docstring)."""
    header = nib.Nifti1Header()
    for name in _GEOMETRY_FIELDS:
        header[name] = meta[name]
    header["pixdim"][:4] = meta["pixdim"][:4]  # qfac and the voxel spacing
    header.set_data_dtype(dtype)
    return nib.Nifti1Image(data.astype(dtype), None, header=header)


def stack_case(loaded, channels=CHANNELS):
    """A case loaded by ``LoadCased`` as one ``(x, y, z, channels)`` float32 study with the CT's geometry, and its label
    (uint8, same geometry) where it has one."""
    image = loaded["image"]
    study = _image(np.moveaxis(image.numpy(), 0, -1), image.meta, np.float32)
    study.header["descrip"] = (DESCRIPTION + ",".join(channels)).encode()
    label = _image(loaded["label"].numpy()[0], image.meta, np.uint8) if "label" in loaded else None
    return study, label


def _save(img, path):
    """Write ``img`` gzipped to ``path`` atomically, so a watching MONAI Label server never sees a half-written study."""
    write_atomically(path, lambda f: f.write(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)))


def _plan(source, sections):
    """``[(section, case, case_dir, study_id)]`` for a case folder or an ISLES root."""
    source = os.path.abspath(source)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"source {source} is not a folder")
    sections = [s.upper() for s in as_names(sections)]
    unknown = [s for s in sections if s not in (TRAINING_DIR, TESTING_DIR)]
    if unknown or not sections:
        raise ValueError(f"sections must be {TRAINING_DIR} and/or {TESTING_DIR}, got {sections}")
    roots = [s for s in (TRAINING_DIR, TESTING_DIR) if find_dir(source, s)]
    if not roots:  # a single case folder
        case = os.path.basename(source)
        return [(None, case, source, case)]
    plan = []
    for section in sections:
        plan += [
            (section, case, case_dir, f"{section.lower()}_{case}") for case, case_dir in find_cases(source, section)
        ]
    if not plan:
        raise InvalidCaseError(f"{source}: no case folders under {' or '.join(s + '/' for s in sections)}")
    return plan


def convert(
    source,
    output_dir,
    sections=(TRAINING_DIR, TESTING_DIR),
    labels=False,
    overwrite=False,
    check=True,
    skip_invalid=False,
    channels=CHANNELS,
):
    """Write one study of ``channels`` per case of ``source`` into ``output_dir``; return ``{study_id: path}``.

    ``source`` is one case folder (``.../case_N`` with its ``SMIR.Brain.XX.O.<MOD>.<id>`` map folders, written as
    ``<case>.nii.gz``) or an ISLES root holding ``TRAINING/`` and/or ``TESTING/`` (each case written as
    ``<section>_<case>.nii.gz``, e.g. ``training_case_1.nii.gz``, so the two sections' case numbers do not clash).
    ``labels=True`` also writes each training case's OT as ``labels/final/<study_id>.nii.gz``.
    """
    # imported here, not at the top: the flags are checked before the seconds MONAI and torch take to import
    from scripts.data.datalist import log_skipped, read_valid_cases
    from scripts.data.readers import LoadCased

    check_channels(channels)
    plan = _plan(source, sections)
    jobs = []
    for section, case, case_dir, study in plan:
        case = f"{section}/{case}" if section else case  # how errors name the case
        with_label = bool(labels) and section != TESTING_DIR
        study_path = os.path.join(output_dir, study + STUDY_SUFFIX)
        label_path = os.path.join(output_dir, LABELS_SUBDIR, study + STUDY_SUFFIX) if with_label else None
        jobs.append((case, case_dir, with_label, study, study_path, label_path))
    refuse_existing([p for job in jobs for p in job[4:] if p], overwrite)
    # every case read and checked before the first study is written
    reads = [partial(read_case, *job[:3], channels) for job in jobs]
    items, skipped = read_valid_cases(reads, check, skip_invalid, channels)
    by_case = {item["case"]: item for item in items}
    written, load = {}, LoadCased(("image", "label"), channels, simple_keys=False)  # stack_case copies the CT header
    for case, case_dir, _, study, study_path, label_path in jobs:
        if case not in by_case:
            continue
        try:  # loaded again, checked again: with --check false this is the only check
            image, label = stack_case(load(by_case[case]), channels)
        except InvalidCaseError as err:
            if not skip_invalid:
                raise
            skipped.append(str(err))
            continue
        _save(image, study_path)
        if label is not None:
            _save(label, label_path)
        written[study] = study_path
        logger.info("%s -> %s%s", case_dir, study_path, f" (+ label {label_path})" if label_path else "")
    log_skipped(skipped)
    return written


def main(
    source: str,
    output_dir: str,
    sections: str | tuple | list = f"{TRAINING_DIR},{TESTING_DIR}",
    labels: bool = False,
    overwrite: bool = False,
    check: bool = True,
    skip_invalid: bool = False,
    channels: str | tuple | list = DEFAULT_CHANNELS,
):
    """CLI: see the module docstring; ``--channels`` lists each study's inputs, the required ones (``scripts.data.
    channels``) then optional ones, as the profile the studies are for (e.g. ``CT,CBF,CBV,MTT,Tmax,CTA``)."""
    channels = as_names(channels)
    written = convert(source, output_dir, sections, labels, overwrite, check, skip_invalid, channels)
    print(
        f"{output_dir}: wrote {len(written)} {len(channels)}-channel stud{'y' if len(written) == 1 else 'ies'}"
        f" ({', '.join(channels)})" + (", with training labels in " + LABELS_SUBDIR if labels else "")
    )


if __name__ == "__main__":
    run(main)

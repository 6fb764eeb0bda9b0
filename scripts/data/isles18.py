"""The ISLES 2018 CT-perfusion release on disk: its layout, finding and reading its cases, checking their files, and
the names their outputs carry. Shared by the generator, the datalist builder, the configs' loaders and make_studies.

MONAI reads datalists and NIfTI files but knows nothing of the ISLES folder layout or of the ways a scan folder can be
broken; this module fills that gap.
"""

import gzip
import logging
import os
import re
import zlib

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)

# Model input channels, in the fixed order of metadata.json's channel_def.
CHANNELS = ("CT", "CBF", "CBV", "MTT", "Tmax")
NCCT = CHANNELS[0]  # the non-contrast CT: the grid the other inputs lie on, which the results are drawn on
# Inputs a profile may add after them (configs/isles24_cta.json): ISLES 2024's CT angiography, on the NCCT grid.
OPTIONAL_CHANNELS = ("CTA",)
LABEL = "OT"

# Modality token(s) found in the folder names for each channel; the first is what the generator writes.
# One early release named some training maps MR_MTT / MR_Tmax instead of CT_MTT / CT_Tmax.
MODALITY_TOKENS = {
    "CT": ("CT",),
    "CBF": ("CT_CBF",),
    "CBV": ("CT_CBV",),
    "MTT": ("CT_MTT", "MR_MTT"),
    "Tmax": ("CT_Tmax", "MR_Tmax"),
    LABEL: ("OT",),
}
# Raw 4D perfusion series: present in the release, not used by the model.
IGNORED_TOKENS = ("CT_4DPWI", "MR_4DPWI")

TRAINING_DIR = "TRAINING"
TESTING_DIR = "TESTING"

# SMIR.Brain.XX.O.<MOD>.<id>, the name of both the map folder and the NIfTI file inside it.
SMIR_NAME = re.compile(r"^SMIR\.Brain\.XX\.O\.(?P<mod>[A-Za-z0-9_]+)\.(?P<id>\d+)$", re.IGNORECASE)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SERIES_SUFFIX = ".dcm-series"  # a DICOM series' key, <dataset_dir>/<case>/<channel>.dcm-series (dicom_series)
# an ISLES 2024 NCCT file, sub-<label>_ses-<label>_ncct.nii[.gz]: its subject names the case
BIDS_NCCT = re.compile(r"^(?P<subject>sub-[A-Za-z0-9]+)_ses-[A-Za-z0-9]+_ncct\.nii(\.gz)?$", re.IGNORECASE)


def smir_name(token: str, smir_id: int) -> str:
    """Folder (and file stem) name of one map, e.g. ``SMIR.Brain.XX.O.CT_CBF.345563``."""
    return f"SMIR.Brain.XX.O.{token}.{smir_id}"


def check_channels(channels):
    """Refuse a ``channels`` setting other than the five inputs followed by some of ``OPTIONAL_CHANNELS``."""
    extra = tuple(channels[len(CHANNELS) :])
    if (
        tuple(channels[: len(CHANNELS)]) != CHANNELS
        or len(set(extra)) < len(extra)
        or set(extra) - set(OPTIONAL_CHANNELS)
    ):
        raise ValueError(
            f"channels {list(channels)}: the model's inputs are {', '.join(CHANNELS)}, in that order, then optionally"
            f" {', '.join(OPTIONAL_CHANNELS)}"
        )


def key_of_token(token: str):
    """Channel name (or ``OT``) of a folder's modality token, ``None`` for ignored or unknown tokens."""
    for key, tokens in MODALITY_TOKENS.items():
        if token.lower() in (t.lower() for t in tokens):
            return key
    return None


class InvalidCaseError(ValueError):
    """A case that cannot be used; the message names the case and the file."""


def find_dir(parent, name):
    """``parent/name`` matched case-insensitively (releases differ in the case of folder names)."""
    if not os.path.isdir(parent):
        return None
    matches = [
        d for d in sorted(os.listdir(parent)) if d.lower() == name.lower() and os.path.isdir(os.path.join(parent, d))
    ]
    return os.path.join(parent, matches[0]) if matches else None


def _case_sort_key(name):
    number = name.rsplit("_", 1)[-1]
    return (0, int(number), name) if number.isdigit() else (1, 0, name)


def find_cases(data_root, section):
    """Case folders (``case_N``) of ``TRAINING`` or ``TESTING``, in numeric order; [] if the section is absent."""
    section_dir = find_dir(data_root, section)
    return [] if section_dir is None else case_folders(section_dir)


def case_folders(folder):
    """``(name, path)`` of the sub-folders of ``folder``, in numeric order of their ``_N`` suffix.

    A symbolic link whose target is missing is listed too (``read_case`` then names it), not dropped unseen."""
    names = [
        d
        for d in os.listdir(folder)
        if os.path.isdir(os.path.join(folder, d))
        or os.path.islink(os.path.join(folder, d))
        and not os.path.exists(os.path.join(folder, d))
    ]
    return [(name, os.path.join(folder, name)) for name in sorted(names, key=_case_sort_key)]


def _map_file(case, map_dir):
    """The one NIfTI file in a ``SMIR.Brain.XX.O.<MOD>.<id>`` folder."""
    files = [f for f in sorted(os.listdir(map_dir)) if f.lower().endswith(NIFTI_SUFFIXES)]
    if len(files) != 1:
        found = ", ".join(sorted(os.listdir(map_dir))) or "nothing"
        raise InvalidCaseError(f"{case}: expected one .nii or .nii.gz file in {map_dir}, found {found}")
    return os.path.join(map_dir, files[0])


def read_case(case, case_dir, with_label):
    """Map the case's folders to ``{"image": [CT, CBF, CBV, MTT, Tmax], "label": OT}`` (absolute paths)."""
    if not os.path.isdir(case_dir):
        raise InvalidCaseError(
            f"{case}: {case_dir} is a symbolic link to {os.readlink(case_dir)}, which does not exist"
        )
    found = {}
    for entry in sorted(os.listdir(case_dir)):
        path = os.path.join(case_dir, entry)
        match = SMIR_NAME.match(entry)
        if not os.path.isdir(path) or match is None:
            continue
        token = match.group("mod")
        key = key_of_token(token)
        if key is None:
            if token.upper() not in (t.upper() for t in IGNORED_TOKENS):
                logger.warning("%s: ignoring folder %s (unknown modality %s)", case, path, token)
            continue
        if key in found:
            raise InvalidCaseError(f"{case}: two folders for {key}: {os.path.dirname(found[key])} and {path}")
        found[key] = _map_file(case, path)
    if not found:
        raise InvalidCaseError(f"{case}: no SMIR.Brain.XX.O.<MOD>.<id> map folders in {case_dir}")
    wanted = CHANNELS + ((LABEL,) if with_label else ())
    missing = [key for key in wanted if key not in found]
    if missing:
        raise InvalidCaseError(f"{case}: missing {', '.join(missing)} in {case_dir} (found {', '.join(found)})")
    item = {"image": [found[c] for c in CHANNELS], "case": case}
    if with_label:
        item["label"] = found[LABEL]
    return item


# Largest magnitude accepted in a map or label, after the header's scaling. No CT (HU), perfusion map or label value
# comes near it; beyond it lie "no value" markers such as FLT_MAX (3.4e38), and a float32 z-score over a slab with such
# a value loses the rest of the map (beyond about 1e19 its sum of squares overflows to Inf, and the input to NaN).
MAX_ABS_VALUE = 1e6


def same_grid(affine, ref_affine):
    """Whether two affines describe one grid, by the rule MONAI's ``NibabelReader`` applies when it stacks the maps
    of a case (``np.allclose`` with its default tolerances), so that the check refuses exactly what loading would."""
    return np.allclose(affine, ref_affine)


def _values_problem(data):
    """What is wrong with a map's values as the pipeline reads them (float32 after the header's scaling), or None."""
    with np.errstate(over="ignore", invalid="ignore"):
        values = data.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        count = int((~finite).sum())
        where = "" if np.isfinite(data).all() else " (NaN/Inf in the file)"
        return f"{count} values that are NaN/Inf as float32{where}, e.g. {data[~finite].flat[0]:.4g}"
    large = np.abs(values) > MAX_ABS_VALUE
    if large.any():
        return (
            f"{int(large.sum())} values beyond +-{MAX_ABS_VALUE:g} (largest {np.abs(values).max():.4g}), e.g. a"
            f" 'no value' marker; set them to 0 (or to a value the map can hold) before use"
        )
    return None


class _BrokenStream(Exception):
    """A ``.gz`` file whose stream is not whole (its CRC or length differs from its trailer, or it ends early)."""


def _read_nifti(path):
    """The NIfTI image of ``path``, its file read once. A ``.gz`` file is decompressed whole in memory first, which
    checks its stream against the trailer's CRC and length (``_BrokenStream`` when that fails): nibabel reads only
    the bytes the header asks for, so a corrupt stream could give wrong values without an error."""
    if not path.lower().endswith(".gz"):
        return nib.load(path)
    try:
        with gzip.open(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise _BrokenStream(err) from err
    image_class = nib.Nifti2Image if nib.Nifti2Header.may_contain_header(raw) else nib.Nifti1Image
    return image_class.from_bytes(raw)


def check_case(item, refuse_blank=False, channels=CHANNELS):
    """Load every file of a datalist item (absolute paths) and check grids, values and the label.

    ``item["image"]`` is the 5 maps in channel order, or one 4D file with the 5 channels last (x, y, z, 5).
    Values are checked as the pipeline reads them: after the header's scaling (``scl_slope``/``scl_inter``), as
    float32. With ``refuse_blank`` (training), a perfusion map with one value everywhere is refused too.
    ``channels`` names the files of ``item["image"]`` (``CHANNELS``, and optional ones a profile adds).

    Returns:
        The number of lesion voxels of the label, None for an item without label.

    Raises:
        InvalidCaseError: naming the case and the file, for unreadable/truncated/non-NIfTI files, a map that is not 3-D
            ((x, y, z), or (x, y, z, 1)), a 4D file that is not (x, y, z, 5), a shape or affine that differs from the
            CT's (``same_grid``), values that are NaN/Inf as float32 or beyond ``MAX_ABS_VALUE``, a ``.gz`` file
            whose stream fails its CRC or length check, and a label with values other than 0 and 1.
    """
    case = item.get("case", "?")
    image = item["image"]
    one_file = isinstance(image, str)
    files = [("image", image)] if one_file else list(zip(channels, image))
    files += [(LABEL, item["label"])] if "label" in item else []
    ref_shape = ref_affine = lesion_voxels = None
    for name, path in files:
        try:
            img = _read_nifti(path)
            data = np.asanyarray(img.dataobj)
        except _BrokenStream as err:
            raise InvalidCaseError(
                f"{case}: {name} file {path} has a compressed stream that is not whole ({err}): the file is corrupt;"
                " copy it again"
            ) from err
        except Exception as err:  # nibabel raises several types for missing, truncated and foreign files
            raise InvalidCaseError(f"{case}: cannot read {name} file {path}: {err}") from err
        shape = data.shape
        if name != "image" and (data.ndim < 3 or data.ndim > 3 and shape[3:] != (1,) * (data.ndim - 3)):
            raise InvalidCaseError(
                f"{case}: {name} file {path} has shape {shape}; a map must be a 3-D grid (x, y, z), a 2-D slice as"
                " (x, y, 1)"
            )
        shape = shape[:3]
        if name == "image":
            if data.ndim != 4 or data.shape[3] != len(channels):
                raise InvalidCaseError(
                    f"{case}: image file {path} has shape {data.shape}; a single-file input must be"
                    f" (x, y, z, {len(channels)}) with the channels {', '.join(channels)} last"
                )
        if ref_shape is None:
            ref_shape, ref_affine = shape, img.affine
        elif shape != ref_shape:
            raise InvalidCaseError(f"{case}: {name} file {path} has shape {shape}, CT has {ref_shape}")
        elif not same_grid(img.affine, ref_affine):
            raise InvalidCaseError(
                f"{case}: {name} file {path} has an affine that differs from the CT's (by up to"
                f" {np.abs(img.affine - ref_affine).max():.2g}; MONAI stacks maps only when np.allclose holds)"
                f"\n{np.array2string(img.affine, precision=6)}\nvs CT\n{np.array2string(ref_affine, precision=6)}"
            )
        problem = _values_problem(data)
        if not problem and refuse_blank and name in CHANNELS[1:] and data.size and np.ptp(data) == 0:
            problem = (
                f"the same value ({np.asarray(data).flat[0]:.4g}) in every voxel: a blank map (the perfusion software"
                " produced none) teaches the network nothing true; leave the case out"
            )
        if problem:
            raise InvalidCaseError(f"{case}: {name} file {path} has {problem}")
        if name == LABEL:
            values = np.unique(data)
            if values.size > 2 or values.min() < 0 or values.size == 2 and values[0] != 0:
                raise InvalidCaseError(
                    f"{case}: label file {path} is not a binary mask: values {values[:10].tolist()} (after the"
                    f" header's scaling); a mask is 0 and one positive value, read as lesion where > 0"
                )
            lesion_voxels = int(np.count_nonzero(data))
    return lesion_voxels


def case_name(image):
    """Name of a case, which its outputs carry, from its ``image`` (one file or a list of files): the ISLES 2018 case
    folder (``case_N`` above ``SMIR.Brain.XX.O.<MOD>.<id>/``), the ISLES 2024 subject (``sub-...`` of
    ``sub-..._ses-..._ncct.nii.gz``), the DICOM study's case (``<case>/CT.dcm-series``), else the (first) file's name
    without ``.nii``/``.nii.gz``."""
    path = os.path.abspath(image if isinstance(image, str) else image[0])
    folder = os.path.dirname(path)
    if SMIR_NAME.match(os.path.basename(folder)):
        return os.path.basename(os.path.dirname(folder))
    if path.endswith(DICOM_SERIES_SUFFIX):
        return os.path.basename(folder)
    name = os.path.basename(path)
    subject = BIDS_NCCT.match(name)
    if subject:
        return subject.group("subject")
    return next(name[: -len(s)] for s in sorted(NIFTI_SUFFIXES, key=len, reverse=True) if name.lower().endswith(s))


def check_unique_names(items):
    """Every case must get its own ``case_name``: outputs are named after it."""
    seen = {}
    for item in items:
        name, first = case_name(item["image"]), item["image"] if isinstance(item["image"], str) else item["image"][0]
        if name in seen:
            raise InvalidCaseError(
                f"two cases are named {name} ({seen[name]} and {first}); their outputs would"
                f" overwrite each other: outputs are named after the ISLES case folder, else after"
                f" the (first) file"
            )
        seen[name] = first


def read_valid_cases(cases, check=False, skip_invalid=False, read=None, channels=CHANNELS):
    """Read (``read_case``) and, with ``check``, check (``check_case``) each case; the one loop of every tool that
    reads an ISLES tree.

    Args:
        cases: the arguments of ``read`` for each case; for ``read_case``, ``(name, folder, with_label)``, e.g.
            ``("TRAINING/case_3", ".../TRAINING/case_3", True)``.
        check: load and check every file of every case.
        skip_invalid: leave a case that is not valid out instead of stopping (``log_skipped`` lists them).
        read: what reads one case into a datalist item, default ``read_case`` (ISLES 2018); ISLES 2024:
            ``scripts.data.isles24.read_subject``.
        channels: the inputs each item's ``image`` lists, for ``check_case``.

    Returns:
        The items (``{"image": [...], "case": name}``, with ``"label"`` where asked) of the valid cases, in order, and
        the error messages of the cases left out.

    Raises:
        InvalidCaseError: naming the case and the file, for the first invalid case unless ``skip_invalid``.
    """
    items, skipped = [], []
    for case in cases:
        try:
            item = (read or read_case)(*case)
            if check:
                check_case(item, refuse_blank="label" in item, channels=channels)  # refuse_blank: a training case
        except InvalidCaseError as err:
            if not skip_invalid:
                raise
            skipped.append(str(err))
            continue
        items.append(item)
    return items, skipped


def log_skipped(skipped):
    """One warning listing the cases ``read_valid_cases`` left out (their error messages), if any."""
    if skipped:
        logger.warning("skipped %d invalid case(s):\n  %s", len(skipped), "\n  ".join(skipped))

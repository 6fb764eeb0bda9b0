"""Synthetic ISLES 2018 CT-perfusion tree, the default data for the demo and the tests.

The real release must be requested and registered for, so this writes a small look-alike with the same layout,
file names, dtypes and slab geometry: anisotropic slabs of 2 to 22 axial slices, and some patients who give two
slabs (cases A and B) that share one head and one set of lesions.

Content, inside the brain (healthy grey / white matter, ischemic core):
    CT    int32, Hounsfield units: air -1000, scalp 40, skull 800-1500, grey 40, white 30, CSF 5,
          core 2-6 HU darker than its surroundings, noise SD 4 HU.
    CBF   uint16, mL/100 g/min: grey ~55, white ~22, core ~3-8 (under 30 % of normal), penumbra ~65 % of normal.
    CBV   uint16, 0.01 mL/100 g (400 = 4 mL/100 g): grey ~4, white ~2 mL/100 g; ~45 % of normal in the inner part
          of the core only, ~15 % above normal in the penumbra.
    MTT   float64, seconds: grey ~4, white ~5; penumbra ~8-10, core ~11-14.
    Tmax  float64, seconds: normal 0-2; penumbra ~7-8, core ~10-11.
    OT    uint8, 0/1: the ischemic core.
The perfusion maps are 0 outside the brain and in CSF. Each map's abnormal region is shaped differently from the
core (CBF: a slightly larger region, CBV: part of it, MTT and Tmax: a much larger penumbra) and carries voxel noise,
so no single map thresholded reproduces the label while the maps together are informative.
Geometry: in-plane spacing = field of view 215-250 mm / in_plane (0.84-0.98 mm at 256), slice thickness 2-12 mm
(at most 120 mm per slab), 1 to 3 irregular lesions per patient drawn with a total volume of 15 mL (median; 3-100 mL),
of which a slab shows a part (every training slab shows some).
"""

import csv
import gzip
import itertools
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from scripts.data import channels as spec
from scripts.data.channels import CHANNELS
from scripts.data.isles18 import LABEL, TESTING_DIR, TRAINING_DIR, modality_tokens, smir_name
from scripts.safe_files import refuse_existing
from scripts.synthetic.dicom_studies import dicom_representable, write_label, write_study

FIRST_SMIR_ID = 345560
DTYPES = {"CT": np.int32, "CBF": np.uint16, "CBV": np.uint16, "MTT": np.float64, "Tmax": np.float64, LABEL: np.uint8}
PATIENTS_CSV = "patients.csv"
DICOM_DIR = "dicom"  # ISLES 2018 DICOM studies: dicom/TRAINING/case_1/, dicom/TESTING/case_1/, ...
SOURCEDATA_DIR = "sourcedata"  # ISLES 2024 DICOM studies, BIDS's place for them: sourcedata/<subject>/<session>/

BOX_MM = (140.0, 140.0, 110.0)  # half extent, around the head centre, of the region the random fields cover
SLAB_LIMIT_MM = 70.0  # slabs stay within this distance of the head centre along z
MAX_SLAB_MM = 120.0  # depth x thickness of one slab
SCALP_MM = 4.0
# Correlation length (mm) of each smooth random field of a patient, in the order they are drawn.
FIELD_SIGMAS = {
    "shape": 25,
    "skull": 10,
    "folds": 3,
    "tissue": 8,
    "perfusion": 20,
    "core": 5,
    "cbf": 6,
    "cbv": 5,
    "tmax": 8,
}
EDGE = 0.1  # width of the soft edge of the ischemic regions, in units of the lesion radius
WHOLE_BRAIN_MM = 200.0  # axial extent of an ISLES 2024 NCCT-space volume (about 100 slices of 2 mm)
# ISLES 2024: stored dtypes (NCCT in HU; maps in float32, CBV in mL/100 g; the mask as uint16 0/65535 scaled to 0/1)
DTYPES_2024 = {"CT": np.int16, "CBF": np.float32, "CBV": np.float32, "MTT": np.float32, "Tmax": np.float32}
MASK_RAW = 65535
LAYOUTS_2024 = {  # layout: (root folder, raw folder, subject prefix, session of the inputs, of the mask, mask infix)
    "isles24": ("", "rawdata", "sub-strokecase", "ses-0001", "ses-0002", ""),
    "isles24_archive": ("train", "raw_data", "sub-stroke", "ses-01", "ses-02", "space-ncct_"),
}


def _sigmoid(t):
    """Logistic function, overflow-free."""
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def _irregular(field):
    """Factor in [0.4, 1.6] that turns an ellipsoid distance into an irregular blob's."""
    return 1.0 - 0.3 * np.clip(field, -2.0, 2.0)


def healthy_tissue_hu(grey, csf):
    """The NCCT's noise-free HU of healthy tissue: grey matter 40, white matter 30, CSF 5, mixed by fraction."""
    return (30 + 10 * grey) * (1 - csf) + 5 * csf


def _region(distance, field, scale):
    """Soft mask (0-1) of an irregular region `scale` times the lesions' size, its edge shaped by `field`."""
    return _sigmoid((1 - distance * _irregular(field) / scale) / EDGE)


class _Field:
    """Smooth Gaussian random field of unit variance over the patient box, evaluated on any axis-aligned grid."""

    def __init__(self, rng, sigma):
        step = 0.75 * sigma
        self.sigma = float(sigma)
        self.nodes = [np.arange(-half, half + step, step, dtype=np.float32) for half in BOX_MM]
        self.values = rng.standard_normal([len(n) for n in self.nodes], dtype=np.float32)

    def __call__(self, x, y, z):
        """Field on the grid spanned by the 1-D coordinates x, y, z (mm), shape (len(x), len(y), len(z))."""
        out = self.values
        for axis, coords in ((2, z), (1, y), (0, x)):  # z first: a slab needs few z nodes
            nodes = self.nodes[axis]
            lo, hi = np.searchsorted(nodes, [coords.min() - 4 * self.sigma, coords.max() + 4 * self.sigma])
            out = np.moveaxis(
                np.tensordot(out.take(np.arange(lo, hi), axis), self._weights(coords, nodes[lo:hi]), axes=(axis, 1)),
                -1,
                axis,
            )
        return out

    def _weights(self, coords, nodes):
        """Gaussian kernel weights (cut at 4 sigma) of each coordinate on the nodes, for a unit-variance field."""
        d = (coords[:, None] - nodes[None, :]) / self.sigma
        w = np.exp(-0.5 * d**2) * (np.abs(d) <= 4)
        return w / np.sqrt((w**2).sum(axis=1, keepdims=True))


class _Slab:
    """Axial extent of one case: `depth` slices `thickness` mm apart, centred at `center` mm."""

    def __init__(self, depth, thickness, center):
        self.depth, self.thickness = int(depth), float(thickness)
        self.z = (center + (np.arange(depth) - (depth - 1) / 2) * thickness).astype(np.float32)


class _Patient:
    """One synthetic head with its lesions, and the one or two slabs acquired of it."""

    def __init__(self, rng, in_plane, slices, n_slabs, whole_brain=False):
        self.semi_axes = (float(rng.uniform(68, 78)), float(rng.uniform(86, 96)))  # half width (x), length (y), mm
        self.half_height = float(rng.uniform(100, 120))
        self.skull_mm = float(rng.uniform(5, 8))
        self.spacing = float(rng.uniform(215, 250)) / in_plane
        origin = -(in_plane - 1) / 2 * self.spacing + rng.uniform(-8, 8, size=2)
        self.x, self.y = (o + self.spacing * np.arange(in_plane, dtype=np.float32) for o in origin.astype(np.float32))
        self.fields = {name: _Field(rng, sigma) for name, sigma in FIELD_SIGMAS.items()}
        # ISLES 2024: one whole-brain volume of `slices` slices over WHOLE_BRAIN_MM instead of slabs
        self.slabs = (
            [_Slab(slices[0], WHOLE_BRAIN_MM / slices[0], 0.0)]
            if whole_brain
            else self._draw_slabs(rng, slices, n_slabs)
        )
        self.lesions = self._draw_lesions(rng, int(rng.integers(n_slabs, 4)))
        self.cbf_scale = float(rng.uniform(0.85, 1.15))
        self.core_hypodensity = float(rng.uniform(2, 6))
        self.penumbra_factor = {
            "cbf": float(rng.uniform(1.05, 1.3)),
            "cbv": float(rng.uniform(0.5, 0.8)),
            "tmax": float(rng.uniform(1.4, 2.0)),
        }
        if whole_brain:  # ISLES 2024's final infarcts: often several, some small (lacunes under 1 mL)
            self.lesions += self._draw_small_lesions(rng, int(rng.integers(2, 6)))

    @staticmethod
    def _draw_slabs(rng, slices, n_slabs):
        """Slab A somewhere around the head centre, slab B (if any) next to it, overlapping a little or not."""
        depths = rng.choice(slices, size=n_slabs)
        thicknesses = [rng.uniform(2, min(12, MAX_SLAB_MM / d)) for d in depths]
        extents = [d * t for d, t in zip(depths, thicknesses)]
        centers = [rng.uniform(-1, 1) * min(30.0, SLAB_LIMIT_MM - extents[0] / 2)]
        if n_slabs == 2:
            direction = -1.0 if centers[0] > 0 else 1.0
            shift = (extents[0] + extents[1]) / 2 * rng.uniform(0.6, 1.0)
            limit = SLAB_LIMIT_MM - extents[1] / 2
            centers.append(np.clip(centers[0] + direction * shift, -limit, limit))
        return [_Slab(d, t, c) for d, t, c in zip(depths, thicknesses, centers)]

    def _draw_lesions(self, rng, n_lesions):
        """Ellipsoids (centre, radii, angle about z) in one hemisphere; lesion i < number of slabs is centred on a
        voxel of slab i, so every slab shows some core."""
        total_mm3 = np.clip(rng.lognormal(np.log(15.0), 0.8), 3.0, 100.0) * 1000.0
        side = rng.choice((-1.0, 1.0))
        lesions = []
        for i, volume in enumerate(total_mm3 * rng.dirichlet(np.full(n_lesions, 2.0))):
            slab = self.slabs[i] if i < len(self.slabs) else self.slabs[rng.integers(len(self.slabs))]
            center = self._lesion_center(rng, slab, side)
            shape = rng.lognormal(0.0, 0.25, size=3)
            radii = (3 * volume / (4 * np.pi)) ** (1 / 3) * shape / np.prod(shape) ** (1 / 3)
            lesions.append((center, radii.astype(np.float32), float(rng.uniform(0, np.pi))))
        return lesions

    def _draw_small_lesions(self, rng, n_lesions):
        """Near-spherical lesions of 0.1-1.5 mL anywhere in the brain of the (one) slab: most under 1 mL."""
        lesions = []
        for _ in range(n_lesions):
            volume = float(np.exp(rng.uniform(np.log(100.0), np.log(1500.0))))  # mm^3
            center = self._lesion_center(rng, self.slabs[0], rng.choice((-1.0, 1.0)))
            shape = rng.lognormal(0.0, 0.15, size=3)
            radii = (3 * volume / (4 * np.pi)) ** (1 / 3) * shape / np.prod(shape) ** (1 / 3)
            lesions.append((center, radii.astype(np.float32), float(rng.uniform(0, np.pi))))
        return lesions

    def _lesion_center(self, rng, slab, side):
        """A voxel of `slab` in the `side` hemisphere, in brain tissue (not CSF), away from the skull."""
        z = slab.z[rng.integers(slab.depth)][None]
        anatomy = self.anatomy(self.x, self.y, z)
        allowed = (anatomy["csf"][..., 0] < 0.3) & (side * self.x[:, None] > 0)
        depth = np.where(allowed, anatomy["brain_depth"][..., 0], -np.inf)
        candidates = np.argwhere(depth >= min(8.0, 0.5 * depth.max()))
        i, j = candidates[rng.integers(len(candidates))]
        return np.array([self.x[i], self.y[j], z[0]], dtype=np.float32)

    def anatomy(self, x, y, z):
        """Depth under the scalp and inside the skull (mm), grey-matter and CSF fractions on the grid x, y, z."""
        f = {name: self.fields[name](x, y, z) for name in ("shape", "skull", "folds", "tissue")}
        gx, gy, gz = np.ix_(x, y, z)
        taper = np.sqrt(np.clip(1 - (gz / self.half_height) ** 2, 0.05, None))
        a, b = self.semi_axes[0] * taper, self.semi_axes[1] * taper
        radius = np.sqrt((gx / a) ** 2 + (gy / b) ** 2) + 0.02 * f["shape"]
        depth = (1 - radius) * (a + b) / 2
        skull_end = SCALP_MM + self.skull_mm + f["skull"]
        brain_depth = depth - skull_end
        cortex = _sigmoid((10.0 + 5.0 * f["tissue"] + 2.0 * f["folds"] - brain_depth) / 0.7)
        deep_grey = _sigmoid((f["tissue"] - 1.0) / 0.25) * _sigmoid((brain_depth - 25.0) / 3.0)
        ventricle = np.sqrt(((np.abs(gx) - 8) / 6) ** 2 + ((gy - 5) / 20) ** 2 + ((gz - 15) / 12) ** 2)
        ventricle = ventricle + 0.15 * f["tissue"]
        surface_csf = _sigmoid((1.0 - brain_depth) / 0.5)
        sulci = _sigmoid((f["folds"] - 1.3) / 0.2) * _sigmoid((10.0 - brain_depth) / 2.0)
        csf = np.maximum(np.maximum(surface_csf, sulci), _sigmoid((1 - ventricle) / 0.08))
        return {
            "depth": depth,
            "skull_end": skull_end,
            "skull_field": f["skull"],
            "brain_depth": brain_depth,
            "grey": np.maximum(cortex, deep_grey),
            "csf": csf,
        }

    def lesion_distance(self, x, y, z):
        """Smallest normalised ellipsoid distance to a lesion centre (< 1 inside a regular lesion)."""
        gx, gy, gz = np.ix_(x, y, z)
        distances = []
        for (cx, cy, cz), (rx, ry, rz), angle in self.lesions:
            c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
            u, v = c * (gx - cx) + s * (gy - cy), c * (gy - cy) - s * (gx - cx)
            distances.append(np.sqrt((u / rx) ** 2 + (v / ry) ** 2 + ((gz - cz) / rz) ** 2))
        return np.minimum.reduce(distances)

    def severity(self, fields, distance):
        """The deficit regions (0 to 1) of CBF, CBV and Tmax from the noise-free ``fields`` (``core``, ``cbf``,
        ``cbv``, ``tmax``) and the ``lesion_distance``."""
        scale = self.penumbra_factor
        return {  # the CBF deficit follows the core's edge loosely, the others not at all
            "cbf": _region(distance, 0.6 * fields["core"] + 0.8 * fields["cbf"], scale["cbf"]),
            "cbv": _region(distance, fields["cbv"], scale["cbv"]),
            "tmax": _region(distance, fields["tmax"], scale["tmax"]),
        }

    def case(self, slab, rng):
        """The six arrays (stored dtypes) and the affine of the case acquired as `slab`; `rng` draws its noise."""
        x, y, z = self.x, self.y, slab.z
        shape = (len(x), len(y), len(z))
        anatomy = self.anatomy(x, y, z)
        f = {name: self.fields[name](x, y, z) for name in ("perfusion", "core", "cbf", "cbv", "tmax")}
        distance = self.lesion_distance(x, y, z)
        core_q = distance * _irregular(f["core"])  # < 1 in the core
        severity = self.severity(f, distance)
        brain = anatomy["brain_depth"] >= 0
        grey, csf = anatomy["grey"], anatomy["csf"]
        white = 1 - grey
        perfused = brain * (1 - csf)

        def noise(sd):
            return sd * rng.standard_normal(shape, dtype=np.float32)

        skull_fraction = np.clip((anatomy["depth"] - SCALP_MM) / (anatomy["skull_end"] - SCALP_MM), 0, 1)
        bone = 800 + 650 * np.abs(np.cos(np.pi * skull_fraction)) + 40 * anatomy["skull_field"]
        tissue = healthy_tissue_hu(grey, csf) - self.core_hypodensity * _sigmoid((1 - core_q) / EDGE)
        ct = np.select([brain, anatomy["depth"] >= SCALP_MM, anatomy["depth"] >= 0], [tissue, bone, 40.0], -1000.0)
        ct = ct + noise(4.0)

        cbf = (
            self.cbf_scale
            * (55 * grey + 22 * white)
            * (1 + 0.08 * f["perfusion"])
            * (1 - 0.35 * severity["tmax"] - 0.5 * severity["cbf"])
            * np.exp(noise(0.12))
            * perfused
        )
        cbv = (
            (4 * grey + 2 * white)
            * (1 + 0.05 * f["perfusion"])
            * (1 + 0.15 * severity["tmax"])
            * (1 - 0.6 * severity["cbv"])
            * np.exp(noise(0.12))
            * perfused
        )
        mtt = (4 * grey + 5 * white) * (1 + severity["tmax"] + 0.8 * severity["cbf"]) * np.exp(noise(0.1)) * perfused
        tmax = (
            np.clip(0.8 + 0.5 * f["perfusion"] + 7 * severity["tmax"] + 3 * severity["cbf"] + noise(0.5), 0, None)
            * perfused
        )
        arrays = {
            "CT": np.rint(np.clip(ct, -1024, 3071)),
            "CBF": np.rint(np.clip(cbf, 0, 65535)),
            "CBV": np.rint(np.clip(100 * cbv, 0, 65535)),
            "MTT": mtt,
            "Tmax": tmax,
            LABEL: (core_q < 1) & brain & (csf < 0.5),
        }
        affine = np.diag([self.spacing, self.spacing, slab.thickness, 1.0])
        affine[:3, 3] = (x[0], y[0], z[0])
        return {key: np.asarray(a, dtype=DTYPES[key]) for key, a in arrays.items()}, affine


def _isles18_inputs():
    """The inputs an ISLES 2018 tree holds (``scripts.data.channels``)."""
    return tuple(key for key in modality_tokens() if key != LABEL)


def _with_optional(arrays, names):
    """``arrays`` and each optional input of ``names``, drawn from them by its ``synthetic`` recipe
    (``scripts.data.channels``)."""
    return arrays | {c.name: c.synthetic(arrays) for c in spec.SPEC if c.name in names and c.name not in arrays}


def _with_dicom_values(arrays, names=CHANNELS):
    """``arrays`` with the values of the inputs ``names`` as their DICOM series hold them (``dicom_representable``)."""
    return {**arrays, **dicom_representable({key: arrays[key] for key in names})}


def _write_case(case_dir, arrays, affine, smir_ids):
    """Write each array as SMIR.Brain.XX.O.<TOKEN>.<id>/SMIR.Brain.XX.O.<TOKEN>.<id>.nii under `case_dir`."""
    for key, data in arrays.items():
        name = smir_name(modality_tokens()[key][0], next(smir_ids))
        _save_nifti(case_dir / name / f"{name}.nii", data, affine)


def split_slabs(seed, split_index, num_cases, in_plane, slices, two_slab_fraction):
    """``(patient_index, patient, slab, rng)`` of each case of one split, in order: ``num_cases`` slabs of patients
    drawn one after another (``two_slab_fraction`` of them with two), each with the ``rng`` its case is drawn with."""
    done = 0
    for patient_index in itertools.count(1):
        if done == num_cases:
            return
        rng = np.random.default_rng([seed, split_index, patient_index])
        n_slabs = 2 if rng.random() < two_slab_fraction else 1
        patient = _Patient(rng, in_plane, slices, n_slabs)
        for slab_index, slab in enumerate(patient.slabs[: num_cases - done]):
            done += 1
            yield patient_index, patient, slab, np.random.default_rng([seed, split_index, patient_index, slab_index])


def _drawn_case(patient, slab, rng):
    """A case's arrays and affine as ``_Patient.case`` draws them, and no raw series."""
    return (*patient.case(slab, rng), None)


def _write_split(
    split_dir,
    keys,
    num_cases,
    seed,
    split_index,
    in_plane,
    slices,
    two_slab_fraction,
    smir_ids,
    dicom_dir=None,
    case_source=_drawn_case,
):
    """Write case_1 .. case_<num_cases> of one split, and (with a ``dicom_dir``) each case's maps as a DICOM study in
    ``dicom_dir/<case>/``; return the (case, patient) rows. A raw series that ``case_source`` gives is written beside
    the case (and into its study)."""
    rows = []
    for patient_index, patient, slab, rng in split_slabs(
        seed, split_index, num_cases, in_plane, slices, two_slab_fraction
    ):
        case = f"case_{len(rows) + 1}"
        arrays, affine, raw = case_source(patient, slab, rng)
        arrays = _with_optional(arrays, keys)
        if dicom_dir is not None:
            inputs = [key for key in keys if key != LABEL]  # the study holds every input of the case's folder
            arrays = _with_dicom_values(arrays, inputs)  # and the NIfTI files the values its series hold
            split = split_dir.name.lower()
            name = f"{split}-{case}"
            maps = {key: arrays[key] for key in inputs}
            study = write_study(dicom_dir / case, maps, affine, name, seed, f"{split}-patient_{patient_index}")
            if LABEL in keys:
                write_label(study, arrays[LABEL], affine, name, seed)
            if raw is not None:
                raw.write_dicom(study, affine, name, seed)
        _write_case(split_dir / case, {key: arrays[key] for key in keys}, affine, smir_ids)
        if raw is not None:
            raw.write_isles18(split_dir / case, next(smir_ids), affine)
        rows.append((case, f"patient_{patient_index}"))
    return rows


def generate(
    output_dir: str,
    num_train: int = 20,
    num_test: int = 4,
    seed: int = 0,
    in_plane: int = 256,
    slices: int | tuple | list = (2, 4, 8, 16, 22),
    two_slab_fraction: float = 0.3,
    overwrite: bool = False,
    dicom: bool = False,
    case_source=None,
) -> dict:
    """Write a synthetic ISLES 2018 tree (TRAINING with labels, TESTING without, patients.csv) to `output_dir`.

    `slices` is a slab depth or the choices each case draws its depth from; a training patient gives two consecutive
    cases with probability `two_slab_fraction`. With `dicom`, each case's inputs are also written as a DICOM study
    (`scripts.synthetic.dicom_studies.write_study`) in dicom/TRAINING/case_N/ or dicom/TESTING/case_N/ (a training case's
    label too, as a ground-truth DICOM SEG: `write_label`), and the NIfTI files
    hold the same values (`dicom_representable`: MTT and Tmax on a power-of-two grid) instead of the full float64
    ones. The same arguments give byte-identical files. Existing TRAINING, TESTING or dicom folders (or patients.csv)
    are replaced only with `overwrite=True`; the dicom folder is removed then even without `dicom`, so that no studies
    of an earlier tree stay beside the new one. `case_source(patient, slab, rng)` gives each case's arrays, affine
    and raw series (or None) instead of the patient's drawn maps: `scripts.synthetic.phantom.PhantomSource` computes the maps from a
    phantom's raw series and writes that series beside the case (`write_isles18`, `write_dicom`).
    """
    slices = (int(slices),) if np.isscalar(slices) else tuple(int(s) for s in slices)
    if int(in_plane) < 16 or not slices or min(slices) < 1 or num_train < 0 or num_test < 0:
        raise ValueError("need in_plane >= 16, slab depths >= 1 and non-negative case counts")
    if not 0 <= two_slab_fraction <= 1:
        raise ValueError(f"two_slab_fraction must lie in [0, 1], got {two_slab_fraction}")
    output_dir = Path(output_dir)
    train_dir, test_dir, csv_path = output_dir / TRAINING_DIR, output_dir / TESTING_DIR, output_dir / PATIENTS_CSV
    dicom_dir = output_dir / DICOM_DIR
    refuse_existing([train_dir, test_dir, dicom_dir, csv_path], overwrite)
    for folder in (train_dir, test_dir, dicom_dir):
        if folder.exists():
            shutil.rmtree(folder)
    csv_path.unlink(missing_ok=True)

    smir_ids = itertools.count(FIRST_SMIR_ID)
    common = {"seed": int(seed), "in_plane": int(in_plane), "slices": slices, "smir_ids": smir_ids}
    common["case_source"] = case_source or _drawn_case
    rows = _write_split(
        train_dir,
        _isles18_inputs() + (LABEL,),
        num_train,
        split_index=0,
        two_slab_fraction=two_slab_fraction,
        dicom_dir=dicom_dir / TRAINING_DIR if dicom else None,
        **common,
    )
    test_rows = _write_split(
        test_dir,
        _isles18_inputs(),
        num_test,
        split_index=1,
        two_slab_fraction=0.0,
        dicom_dir=dicom_dir / TESTING_DIR if dicom else None,
        **common,
    )
    train_dir.mkdir(parents=True, exist_ok=True)
    test_dir.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("case", "patient"), *rows])
    return {
        "output_dir": str(output_dir),
        "training": [case for case, _ in rows],
        "testing": [case for case, _ in test_rows],
        "patients_csv": str(csv_path),
    }


def _oblique(affine, rng):
    """``affine`` tilted about the x axis by 5 to 15 degrees (a tilted gantry), about the volume's first voxel."""
    angle = np.deg2rad(rng.uniform(5, 15)) * rng.choice((-1, 1))
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return rotation @ affine


def _header(shape, dtype, affine):
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    return header


def _save_nifti(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine, header=_header(data.shape, data.dtype, affine)), path)


def _save_scaled_mask(path, mask, affine):
    """``mask`` (bool) as uint16 0/65535 with ``scl_slope`` 1/65535, as the ISLES 2024 masks are stored: written by
    hand, because nibabel chooses its own scaling when it saves an array."""
    header = _header(mask.shape, np.uint16, affine)
    header.set_slope_inter(1.0 / MASK_RAW, 0.0)
    header["vox_offset"] = 352  # the 348-byte header and 4 bytes of "no extensions"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(header.binaryblock + bytes(4))
        f.write((mask.astype("<u2") * MASK_RAW).tobytes(order="F"))


def _write_isles24_subject(root, layout, index, arrays, affine, with_mask):
    """One subject in an ISLES 2024 layout: each input where ``scripts.data.channels`` says ISLES 2024 keeps it (the
    NCCT in the raw tree, the 4 maps and the CTA in derivatives), and (training) the mask in derivatives."""
    top, raw_dir, prefix, ses_in, ses_mask, mask_infix = LAYOUTS_2024[layout]
    subject = f"{prefix}{index:04d}"
    base = root / top if top else root
    trees = {"raw": raw_dir, "derivatives": "derivatives"}
    for channel in spec.SPEC:
        if channel.isles24:
            tree, *folder, ending = channel.isles24.split("/")
            path = base.joinpath(trees[tree], subject, ses_in, *folder, f"{subject}_{ses_in}_{ending}.nii.gz")
            _save_nifti(path, arrays[channel.name], affine)
    if with_mask:
        mask = base / "derivatives" / subject / ses_mask / f"{subject}_{ses_mask}_{mask_infix}lesion-msk.nii.gz"
        _save_scaled_mask(mask, arrays[LABEL], affine)
    return subject


def generate_isles24(
    output_dir,
    num_train=20,
    num_test=0,
    seed=0,
    in_plane=512,
    slices=100,
    layout="isles24",
    overwrite=False,
    dicom: bool = False,
    case_source=None,
) -> dict:
    """Write a synthetic ISLES 2024 tree in ``layout`` (``isles24``: the challenge README's; ``isles24_archive``: the
    public archive's): one whole-brain NCCT-space volume per subject, ``in_plane`` squared voxels over a 215-250 mm
    field of view, ``slices`` slices over 200 mm, tilted about x by 5-15 degrees (an oblique affine); NCCT int16 HU,
    maps float32 (CBV in mL/100 g), a CTA registered to the NCCT (int16 HU, enhanced with the CBV), the mask uint16
    0/65535 with a scale factor of 1/65535. Subjects after the first
    ``num_train`` have no mask (testing cases). With ``dicom``, each subject's NCCT and maps are also written as a
    DICOM study (``scripts.synthetic.dicom_studies.write_study``, oblique as the affine; a mask as a ground-truth SEG) in
    sourcedata/<subject>/<session>/,
    and the NIfTI files (and the CTA made from them) hold the same values (``dicom_representable``). Existing trees
    (sourcedata included, with or without ``dicom``) are replaced only with ``overwrite``. ``case_source`` as
    ``generate``'s; a raw series goes into the raw tree (``write_isles24``) and the study.
    """
    if layout not in LAYOUTS_2024:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS_2024)}, got {layout!r}")
    if int(in_plane) < 16 or int(slices) < 1 or num_train < 0 or num_test < 0:
        raise ValueError("need in_plane >= 16, slices >= 1 and non-negative case counts")
    output_dir = Path(output_dir)
    top, raw_dir = LAYOUTS_2024[layout][:2]
    base = output_dir / top if top else output_dir
    refuse_existing([base / raw_dir, base / "derivatives", base / SOURCEDATA_DIR], overwrite)
    for folder in (base / raw_dir, base / "derivatives", base / SOURCEDATA_DIR):
        if folder.exists():
            shutil.rmtree(folder)
    subjects = []
    for index in range(1, num_train + num_test + 1):
        rng = np.random.default_rng([seed, 2024, index])
        patient = _Patient(rng, int(in_plane), (int(slices),), 1, whole_brain=True)
        case_rng = np.random.default_rng([seed, 2024, index, 0])
        arrays, affine, raw = (case_source or _drawn_case)(patient, patient.slabs[0], case_rng)
        arrays = {key: np.asarray(arrays[key], dtype=DTYPES_2024.get(key, arrays[key].dtype)) for key in arrays}
        arrays["CBV"] = (arrays["CBV"] / 100).astype(np.float32)  # 0.01 mL/100 g -> mL/100 g
        affine = _oblique(affine, rng)
        if dicom:
            arrays = _with_dicom_values(arrays)
        arrays = _with_optional(arrays, [c.name for c in spec.SPEC if c.isles24])
        subjects.append(_write_isles24_subject(output_dir, layout, index, arrays, affine, index <= num_train))
        if raw is not None:
            raw.write_isles24(base, layout, subjects[-1], affine)
        if dicom:
            study_dir = base / SOURCEDATA_DIR / subjects[-1] / LAYOUTS_2024[layout][3]
            study = write_study(study_dir, {key: arrays[key] for key in CHANNELS}, affine, subjects[-1], seed)
            if index <= num_train:
                write_label(study, arrays[LABEL], affine, subjects[-1], seed)
            if raw is not None:
                raw.write_dicom(study, affine, subjects[-1], seed)
    return {"output_dir": str(output_dir), "training": subjects[:num_train], "testing": subjects[num_train:]}

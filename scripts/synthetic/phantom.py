"""A CT perfusion digital phantom: a raw 4D CT perfusion series of a synthetic head with a stroke, and the truth it
was drawn from (CBF, CBV, MTT, Tmax, arterial delay and dispersion, tissue classes, the core label), deterministic
per seed; and its writers: ISLES 2018 ``CT_4DPWI``, ISLES 2024 raw CTP, a DICOM CT perfusion series.

The head is a patient of ``scripts.synthetic.isles`` (skull, scalp, grey and white matter, CSF, lesions, smooth random
fields), so that a phantom case and a drawn one share their anatomy; this module adds vessels, physiology and time.

Physiology (per patient, shared by its slabs; per voxel through the patient's smooth random fields):
- An ischemic territory around the lesions: severity s = 1 at their centres falling to 0 at ``territory`` times
  their size, shaped irregularly. Flow relative to normal r = 1 - (1 - r_min) s^gamma (collaterals: r_min 0.08-0.18),
  arterial delay td0 + delta s^0.6 (delta 3-9 s), dispersion beta0 + beta_max s (an exponential vascular transport
  function, Calamante 2004), blood volume up in the penumbra (vasodilation), down in the core.
- Tissue fate: a voxel is core (dead) where r fell under its viability threshold: r_crit (0.22-0.38, the time since
  onset) shifted by a vulnerability field and by grey matter (``_fate``). So the core is not a threshold of any one
  map: r_crit differs between patients and the vulnerability field is independent of the perfusion maps.
- Classes (``TISSUE_CLASSES``): core; penumbra (not core, r < ``PENUMBRA_FLOW``); benign oligaemia (not core or
  penumbra, inside the territory); healthy. Truth maps and classes are 0 outside brain tissue (CSF, vessels).
- Residue functions of a gamma distribution of capillary transit times (shape k 1.5-3; k = 1 is the exponential).
Signal (Østergaard 1996's indicator dilution): arterial input = a gamma variate (arrival 4-10 s, peak 250-450 HU in
blood) with systemic recirculation (a fraction 0.35-0.5 returning after a gamma-distributed 14-20 s transit, over
and over); tissue concentration = rho / k_H * CBF * (AIF delayed by td, dispersed by beta) * R; venous output = the
AIF after a gamma-distributed 4.5-7.5 s transit. Vessels: middle, anterior and posterior cerebral arteries (partial
volume 0.55-0.95; those in the territory delayed and dispersed) and the superior sagittal sinus (full volume),
running through the slab. A voxel holds vessel and tissue by its partial volume. HU: the case's NCCT as the
pre-contrast image (its core hypodense), plus enhancement, in-plane correlated noise of SD ``noise_sd`` HU in a
1 x 1 x 5 mm voxel (scaled to the voxel size), rounded to integers as a scanner stores them.
Acquisition: ``frames`` frames 1-1.6 s apart for the first pass, then 2-3 s apart, each interval jittered by 5 %
(``frame_times``); optionally in-plane head motion (a random walk reaching ``motion_mm``) and a scan cut at
``truncate_s``.
Truth: CBF, CBV, MTT = CBV / CBF and the classes as drawn; Tmax = the delay plus the time to peak of the dispersed
residue function (what an exact deconvolution by the undelayed AIF gives); rCBF by
``scripts.data.perfusion_maps.relative_cbf``, the maps' own definition.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from scipy import ndimage, special, stats
from scripts.data.isles18 import LABEL, smir_name
from scripts.data.perfusion_maps import (
    K_H,
    ML_100G_MIN,
    RHO_BRAIN,
    CtpSeries,
    compute_maps,
    isles18_maps,
    relative_cbf,
    sidecar_path,
)
from scripts.dicom.results import derived_uid
from scripts.synthetic.dicom_studies import (
    LABEL_SERIES_NUMBER,
    STUDY_DATE,
    UID_NAMESPACE,
    _geometry,
    _series_dataset,
    _stored_pixels,
    _write_slice,
)
from scripts.synthetic.isles import EDGE, LAYOUTS_2024, _irregular, _Patient, _sigmoid

__all__ = [
    "TISSUE_CLASSES",
    "Phantom",
    "PhantomSource",
    "draw_phantom",
    "frame_times",
    "load_truth",
    "phantom_case",
    "write_dicom_series",
    "write_isles18_series",
    "write_nifti_series",
    "write_truth",
]

TISSUE_CLASSES = {"healthy": 1, "oligaemia": 2, "penumbra": 3, "core": 4}  # 0: no brain tissue (CSF, vessel, out)
PENUMBRA_FLOW = 0.6  # flow relative to normal under which tissue that is not core is at risk
NOISE_SD = 8.0  # HU in a 1 x 1 x 5 mm voxel
NOISE_VOXEL_MM3 = 5.0
NOISE_CORRELATION_VOXELS = 0.6  # in-plane Gaussian sigma of the noise's texture
FINE_DT = 0.05  # s, the grid the curves are drawn on
MTT_RANGE = (0.5, 40.0)  # s, the lookup table's span (log-spaced)
DISPERSION_MAX = 6.0  # s
MTT_MAX = 20.0  # s: blood volume is lowered where it would give more
BLOOD_HU = 40.0
VESSEL_MIN_PV = 0.1  # a voxel with more blood than this is a vessel (no tissue truth)
CTP_SERIES_NUMBER = LABEL_SERIES_NUMBER + 1  # after the study's required inputs and its label
CTP_DESCRIPTION = "CT Perfusion 4D (synthetic phantom)"
CTP_TOKEN = "CT_4DPWI"
TRUTH_DIR = "phantom_truth"  # beside the raw series: the truth maps, NIfTI, one per name
TRUTH_MAPS = ("CBF", "CBV", "MTT", "Tmax", "delay", "dispersion", "rCBF", "tissue")
# vessels: (kind, x and y position as fractions of the slice's brain half-extent from its centre, radius mm)
ARTERIES = (
    ("MCA", (-0.45, 0.05), 1.3),
    ("MCA", (0.45, 0.05), 1.3),
    ("ACA", (-0.06, 0.55), 1.0),
    ("ACA", (0.06, 0.55), 1.0),
    ("PCA", (-0.3, -0.45), 1.0),
    ("PCA", (0.3, -0.45), 1.0),
)
SINUS_RADIUS_MM = 3.5
SINUS_DEPTH_MM = 4.0  # the sinus centre inside the brain's posterior edge


@dataclass
class Phantom:
    """One phantom case: its raw ``series`` (frames int16 HU), the ``ncct`` (int32 HU), the ``truth`` maps
    (``TRUTH_MAPS``, float32; ``tissue`` uint8 ``TISSUE_CLASSES``) and the core ``label`` (uint8), all on the grid of
    ``series.affine``."""

    series: CtpSeries
    ncct: np.ndarray
    truth: dict
    label: np.ndarray


def frame_times(rng, count=40, regular=False) -> np.ndarray:
    """Frame times (s from the first) as a CT perfusion protocol takes them: ``count`` frames 1-1.6 s apart over the
    first pass, then 2-3 s apart, each interval jittered by up to 5 %; with ``regular``, one interval of 1-2 s."""
    if regular:
        return np.arange(count) * float(np.round(rng.uniform(1.0, 2.0), 2))
    fast, slow = rng.uniform(1.0, 1.6), rng.uniform(2.0, 3.0)
    steps = np.where(np.arange(count - 1) < rng.integers(22, 30), fast, slow) * rng.uniform(0.95, 1.05, count - 1)
    return np.round(np.concatenate([[0.0], np.cumsum(steps)]), 3)


def _gamma_density(t, mean, shape):
    return stats.gamma.pdf(t, shape, scale=mean / shape)


def _physiology(patient, rng):
    """The patient's perfusion parameters, drawn once (with the first slab's ``rng``) and kept on the patient so that
    its slabs share them."""
    if not hasattr(patient, "phantom_physiology"):
        patient.phantom_physiology = {
            "territory": rng.uniform(1.8, 3.0),
            "r_min": rng.uniform(0.08, 0.18),
            "gamma": rng.uniform(0.7, 1.5),
            "r_crit": rng.uniform(0.22, 0.38),
            "delay0": rng.uniform(0.3, 1.5),
            "delta": rng.uniform(3.0, 9.0),
            "beta0": rng.uniform(0.1, 0.4),
            "beta_max": rng.uniform(1.0, 3.0),
            "cbv_up": rng.uniform(0.1, 0.4),
            "cbv_core": rng.uniform(0.35, 0.6),
            "shape": rng.uniform(1.5, 3.0),
            "arrival": rng.uniform(4.0, 10.0),
            "alpha": rng.uniform(2.5, 4.5),
            "width": rng.uniform(0.9, 1.8),
            "peak_hu": rng.uniform(250.0, 450.0),
            "recirculation": rng.uniform(0.35, 0.5),
            "systemic_s": rng.uniform(14.0, 20.0),
            "venous_s": rng.uniform(4.5, 7.5),
            "artery_pv": rng.uniform(0.55, 0.95, len(ARTERIES)),
        }
    return patient.phantom_physiology


def _smoothstep(u):
    u = np.clip(u, 0, 1)
    return u * u * (3 - 2 * u)


def _fate(p, r, grey, vulnerability):
    """Probability (0-1, a steep logistic) that tissue of relative flow ``r`` has died: under its viability threshold
    r_crit, higher in grey matter and where the vulnerability field is high."""
    return _sigmoid((p["r_crit"] + 0.03 * grey + 0.06 * np.clip(vulnerability, -2, 2) - r) / 0.02)


def _tissue_truth(patient, p, x, y, z, anatomy):
    """Per-voxel truth of the tissue (flow, volume, transit time, delay, dispersion, fate) on the grid x, y, z."""
    f = {name: patient.fields[name](x, y, z) for name in ("perfusion", "core", "cbf", "cbv", "tmax")}
    distance = patient.lesion_distance(x, y, z)
    severity = _smoothstep((p["territory"] - distance * _irregular(f["tmax"])) / (p["territory"] - 0.7))
    r = np.clip((1 - (1 - p["r_min"]) * severity ** p["gamma"]) * (1 + 0.08 * f["cbf"] * severity), 0.05, 1.1)
    grey, csf = anatomy["grey"], anatomy["csf"]
    brain = anatomy["brain_depth"] >= 0
    perfused = brain * (1 - csf)
    normal_cbf = patient.cbf_scale * (55 * grey + 22 * (1 - grey)) * (1 + 0.08 * f["perfusion"])
    fate = _fate(p, r, grey, f["core"])
    normal_cbv = (4 * grey + 2 * (1 - grey)) * (1 + 0.05 * f["perfusion"])
    cbv = normal_cbv * ((1 - fate) * (1 + p["cbv_up"] * severity) + fate * p["cbv_core"] * (1 + 0.1 * f["cbv"]))
    cbf = normal_cbf * r
    mtt = np.clip(60 * cbv / cbf, 1.5, MTT_MAX)
    return {
        "flow": cbf.astype(np.float32),  # mL/100 g/min of the tissue itself (not scaled by its fraction)
        "perfused": perfused.astype(np.float32),
        "mtt": mtt.astype(np.float32),
        "delay": (np.clip(p["delay0"] * (1 + 0.3 * f["perfusion"]), 0.1, None) + p["delta"] * severity**0.6).astype(
            np.float32
        ),
        "dispersion": (p["beta0"] + p["beta_max"] * severity).astype(np.float32),
        "severity": severity,
        "r": r,
        "core": (fate > 0.5) & brain & (csf < 0.5),
        "tissue": brain & (csf < 0.5),
    }


class _Bolus:
    """The arterial input, venous output and the tissue curves' lookup table over (MTT, dispersion), on the grid
    ``FINE_DT`` from 0 to ``end`` seconds."""

    def __init__(self, p, end):
        count = int(np.ceil((end + 1.0) / FINE_DT)) + 1
        self.t = np.arange(count) * FINE_DT
        long = int(2 ** np.ceil(np.log2(max(count * 2, int(300 / FINE_DT)))))
        t_long = np.arange(long) * FINE_DT
        after = np.clip(t_long - p["arrival"], 0, None) / (p["alpha"] * p["width"])
        first = p["peak_hu"] * after ** p["alpha"] * np.exp(p["alpha"] * (1 - after))
        returning = np.fft.rfft(_gamma_density(t_long, p["systemic_s"], 6.0) * FINE_DT)
        aif = np.fft.irfft(np.fft.rfft(first) / (1 - p["recirculation"] * returning), long)
        venous = np.fft.irfft(
            np.fft.rfft(aif) * np.fft.rfft(_gamma_density(t_long, p["venous_s"], 5.0) * FINE_DT), long
        )
        self.aif, self.vof = aif[:count], venous[:count]
        self.log_mtt = np.linspace(np.log(MTT_RANGE[0]), np.log(MTT_RANGE[1]), 64)
        self.betas = np.linspace(0.0, DISPERSION_MAX, 31)
        size = 2 * count + int(8 * DISPERSION_MAX / FINE_DT)  # no wrap-around of what the first `count` steps hold
        dispersion = np.stack([self._transport(beta, size) for beta in self.betas])  # (B, size) probabilities
        residues = special.gammaincc(
            p["shape"], np.arange(size)[None] * FINE_DT / (np.exp(self.log_mtt)[:, None] / p["shape"])
        )
        residues[:, count:] = 0  # not needed past the end; no wrap-around in the products below
        spectra = np.fft.rfft(residues, size)[:, None] * np.fft.rfft(dispersion, size)[None]  # (M, B, F)
        effective = np.fft.irfft(spectra, size)[..., :count]
        self.peak, self.peak_time = effective.max(axis=-1), effective.argmax(axis=-1) * FINE_DT
        curves = np.fft.irfft(spectra * np.fft.rfft(aif[:count] * FINE_DT, size), size)[..., :count]
        self.table = curves.astype(np.float32)  # (M, B, T): tissue concentration (HU) per unit flow (1/s)

    @staticmethod
    def _transport(beta, size):
        """The exponential vascular transport function of mean ``beta`` as probabilities per step (a delta at 0)."""
        edges = np.arange(size + 1) * FINE_DT
        if beta < FINE_DT / 10:
            return np.eye(1, size)[0]
        return np.diff(-np.exp(-edges / beta))

    def _coordinates(self, mtt, beta):
        m = np.clip((np.log(mtt) - self.log_mtt[0]) / (self.log_mtt[1] - self.log_mtt[0]), 0, len(self.log_mtt) - 1.001)
        b = np.clip(beta / (self.betas[1] - self.betas[0]), 0, len(self.betas) - 1.001)
        m0, b0 = m.astype(int), b.astype(int)
        return m0, b0, (m - m0)[..., None], (b - b0)[..., None]

    def _bilinear(self, values, mtt, beta):
        m0, b0, fm, fb = self._coordinates(mtt, beta)
        fm, fb = fm[..., 0], fb[..., 0]
        return (
            values[m0, b0] * (1 - fm) * (1 - fb)
            + values[m0 + 1, b0] * fm * (1 - fb)
            + values[m0, b0 + 1] * (1 - fm) * fb
            + values[m0 + 1, b0 + 1] * fm * fb
        )

    def time_to_peak(self, mtt, beta):
        """Time to peak (s) of the dispersed residue function."""
        return self._bilinear(self.peak_time, mtt, beta)

    def tissue(self, mtt, beta, delay, times):
        """Concentration (HU per unit flow in 1/s) of tissue voxels (1-D parameters) at ``times``: (n, len(times))."""
        m0, b0, fm, fb = self._coordinates(mtt, beta)
        position = np.clip((times[None] - delay[:, None]) / FINE_DT, 0, len(self.t) - 1.001)
        t0 = position.astype(int)
        ft = position - t0
        out = np.zeros(position.shape, dtype=np.float32)
        for dm, wm in ((0, 1 - fm), (1, fm)):
            for db, wb in ((0, 1 - fb), (1, fb)):
                m, b = (m0 + dm)[:, None], (b0 + db)[:, None]
                values = self.table[m, b, t0] * (1 - ft) + self.table[m, b, t0 + 1] * ft
                out += (wm * wb * values).astype(np.float32)
        return out

    def artery(self, delay, beta, times):
        """The arterial input delayed by ``delay`` and dispersed by ``beta`` (s), at ``times``."""
        dispersed = np.convolve(self.aif, self._transport(beta, len(self.t)))[: len(self.t)]
        return np.interp(times - delay, self.t, dispersed, left=0.0)


def _vessels(patient, p, anatomy, severity, bolus, times):
    """Per voxel: the blood fraction (0-1) and the blood's enhancement (HU) at each frame, (x, y, z, T)."""
    x, y = patient.x, patient.y
    spacing = float(x[1] - x[0])
    shape = anatomy["brain_depth"].shape
    fraction = np.zeros(shape, dtype=np.float32)
    blood = np.zeros(shape + (len(times),), dtype=np.float32)
    gx, gy = np.meshgrid(x, y, indexing="ij")
    for k in range(shape[2]):
        brain = anatomy["brain_depth"][..., k] >= 0
        if brain.sum() < 200:
            continue
        xs, ys = gx[brain], gy[brain]
        centre = np.array([(xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2])
        half = np.array([(xs.max() - xs.min()) / 2, (ys.max() - ys.min()) / 2])
        vessels = [
            (centre + np.array(position) * half, radius, p["artery_pv"][i], "artery")
            for i, (_, position, radius) in enumerate(ARTERIES)
        ]
        vessels.append((np.array([centre[0], ys.min() + SINUS_DEPTH_MM]), SINUS_RADIUS_MM, 1.0, "vein"))
        for where, radius, scale, kind in vessels:
            pv = np.clip((radius - np.hypot(gx - where[0], gy - where[1])) / spacing + 0.5, 0, 1) * scale
            inside = pv > 0
            if not inside.any():
                continue
            if kind == "vein":
                curve = np.interp(times, bolus.t, bolus.vof)
            else:
                i, j = np.unravel_index(np.argmin(np.hypot(gx - where[0], gy - where[1])), gx.shape)
                s = float(severity[i, j, k])
                curve = bolus.artery(0.5 * p["delta"] * s, 0.5 * p["beta_max"] * s, times)
            add = np.minimum(pv[inside], 1 - fraction[..., k][inside])
            fraction[..., k][inside] += add
            blood[inside, k] += add[:, None] * curve[None].astype(np.float32)
    return fraction, blood


def _noise(rng, shape, sd):
    """In-plane correlated Gaussian noise of standard deviation ``sd``."""
    white = rng.standard_normal(shape, dtype=np.float32)
    sigma = (NOISE_CORRELATION_VOXELS, NOISE_CORRELATION_VOXELS, 0)
    impulse = np.zeros((9, 9, 1), dtype=np.float32)
    impulse[4, 4, 0] = 1
    gain = np.sqrt((ndimage.gaussian_filter(impulse, sigma) ** 2).sum())
    return ndimage.gaussian_filter(white, sigma) * (sd / gain)


def _motion(rng, count, amplitude_mm, spacing, shape):
    """Per frame, the ``ndimage.affine_transform`` (matrix, offset) of an in-plane rigid motion about the slice
    centre: a random walk from rest whose largest displacement (within 80 mm of the centre) is ``amplitude_mm``."""
    walk = np.cumsum(rng.standard_normal((count, 3)), axis=0)
    walk[0] = 0
    walk -= walk[0]
    walk[:, 2] /= 80.0  # radians: a unit step moves a point 80 mm from the centre by about one unit
    displacement = np.hypot(walk[:, 0], walk[:, 1]) + np.abs(walk[:, 2]) * 80.0
    walk *= amplitude_mm / max(displacement.max(), 1e-9)
    centre = (np.array(shape[:2]) - 1) / 2
    transforms = []
    for dx, dy, angle in walk:
        c, s = np.cos(angle), np.sin(angle)
        matrix = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
        offset = np.append(centre - matrix[:2, :2] @ centre + np.array([dx, dy]) / spacing, 0.0)
        transforms.append((matrix, offset))
    return transforms


def phantom_case(
    patient,
    slab,
    rng,
    frames: int = 40,
    noise_sd: float = NOISE_SD,
    motion_mm: float = 0.0,
    truncate_s: float | None = None,
    regular: bool = False,
) -> Phantom:
    """The phantom of one slab of a ``scripts.synthetic.isles`` patient, its noise and timing drawn from ``rng``.

    Args:
        patient: the head (``scripts.synthetic.isles._Patient``).
        slab: which of its slabs.
        rng: a numpy Generator for this case.
        frames: the number of frames (before ``truncate_s``).
        noise_sd: CT noise (HU) in a 1 x 1 x 5 mm voxel; scaled by the voxel's volume.
        motion_mm: the largest in-plane head displacement against the first frame (0: none).
        truncate_s: the scan stops after this time (s from the first frame).
        regular: frames at one regular interval (as ``pixdim[4]`` alone can tell) instead of a protocol's two.
    """
    p = _physiology(patient, rng)
    arrays, affine = patient.case(slab, rng)
    x, y, z = patient.x, patient.y, slab.z
    anatomy = patient.anatomy(x, y, z)
    tissue = _tissue_truth(patient, p, x, y, z, anatomy)
    # the NCCT's hypodensity follows the phantom's core instead of the drawn case's
    drawn_core = _sigmoid((1 - patient.lesion_distance(x, y, z) * _irregular(patient.fields["core"](x, y, z))) / EDGE)
    ncct = arrays["CT"] + np.rint(patient.core_hypodensity * (drawn_core - tissue["core"])).astype(np.int32)
    ncct = np.clip(ncct, -1024, 3071).astype(np.int32)
    times = frame_times(rng, frames, regular)
    if truncate_s is not None:
        times = times[times <= truncate_s]
    bolus = _Bolus(p, float(times[-1]))
    fraction, blood = _vessels(patient, p, anatomy, tissue["severity"], bolus, times)
    vessel = fraction > VESSEL_MIN_PV
    spacing = np.array([patient.spacing, patient.spacing, slab.thickness])
    sd = noise_sd * np.sqrt(NOISE_VOXEL_MM3 / np.prod(spacing))
    enhancement = blood
    flow = tissue["flow"] * tissue["perfused"] * (1 - fraction) / ML_100G_MIN * RHO_BRAIN / K_H  # 1/s
    for k in range(len(z)):
        voxels = np.flatnonzero(flow[..., k] > 0)
        i, j = np.unravel_index(voxels, flow.shape[:2])
        curves = bolus.tissue(tissue["mtt"][i, j, k], tissue["dispersion"][i, j, k], tissue["delay"][i, j, k], times)
        enhancement[i, j, k] += flow[i, j, k][:, None] * curves
    base = ncct.astype(np.float32) * (1 - fraction) + BLOOD_HU * fraction
    series = enhancement
    series += base[..., None]
    if motion_mm > 0:
        for t, (matrix, offset) in enumerate(_motion(rng, len(times), motion_mm, patient.spacing, base.shape)):
            series[..., t] = ndimage.affine_transform(series[..., t], matrix, offset, order=3, mode="nearest")
    for t in range(len(times)):
        series[..., t] += _noise(rng, base.shape, sd)
    stored = np.clip(np.rint(series), -1024, 3071).astype(np.int16)

    tissue_mask = tissue["tissue"] & ~vessel
    truth = {
        "CBF": tissue["flow"] * tissue["perfused"],
        "CBV": tissue["flow"] * tissue["perfused"] * tissue["mtt"] / 60,
        "MTT": tissue["mtt"],
        "Tmax": tissue["delay"] + bolus.time_to_peak(tissue["mtt"], tissue["dispersion"]),
        "delay": tissue["delay"],
        "dispersion": tissue["dispersion"],
    }
    truth = {key: np.where(tissue_mask, value, 0).astype(np.float32) for key, value in truth.items()}
    truth["rCBF"] = relative_cbf(truth["CBF"], truth["Tmax"], tissue_mask)
    core = tissue["core"] & ~vessel
    classes = np.select(
        [core, tissue["r"] < PENUMBRA_FLOW, tissue["severity"] > 0.02],
        [TISSUE_CLASSES["core"], TISSUE_CLASSES["penumbra"], TISSUE_CLASSES["oligaemia"]],
        TISSUE_CLASSES["healthy"],
    )
    truth["tissue"] = np.where(tissue_mask, classes, 0).astype(np.uint8)
    return Phantom(CtpSeries(stored, times, affine, "phantom"), ncct, truth, core.astype(np.uint8))


def draw_phantom(seed: int, in_plane: int = 128, slices: int = 8, **options) -> Phantom:
    """A phantom of one slab of ``slices`` slices (2-12 mm thick, as the synthetic slabs), ``in_plane`` squared
    voxels, deterministic per ``seed``; ``options`` as ``phantom_case``'s."""
    patient = _Patient(np.random.default_rng([seed, 32]), int(in_plane), (int(slices),), 1)
    return phantom_case(patient, patient.slabs[0], np.random.default_rng([seed, 32, 1]), **options)


def _save(path, data, affine, interval=None):
    """Write ``data`` as NIfTI-1 with qform and sform, units mm and s (``interval``: pixdim[4] of a 4D series)."""
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    if interval is not None:
        zooms = image.header.get_zooms()
        image.header.set_zooms((*zooms[:3], float(interval)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


def write_nifti_series(path, series: CtpSeries, affine=None) -> str:
    """Write a series as a 4D NIfTI (int16 HU) at ``path``: ``pixdim[4]`` the mean frame interval in seconds and,
    where the frames are not evenly spaced, a BIDS sidecar (``sidecar_path``) with their ``FrameTimesStart``."""
    times = np.asarray(series.times, dtype=np.float64)
    steps = np.diff(times)
    _save(path, series.frames, series.affine if affine is None else affine, interval=steps.mean())
    if np.ptp(steps) > 1e-6:
        with open(sidecar_path(path), "w") as f:
            json.dump({"Modality": "CT", "FrameTimesStart": [round(float(t), 6) for t in times]}, f, indent=4)
            f.write("\n")
    return str(path)


def write_isles18_series(case_dir, series: CtpSeries, smir_id: int, affine=None) -> str:
    """Write the series as ISLES 2018's ``SMIR.Brain.XX.O.CT_4DPWI.<id>/SMIR.Brain.XX.O.CT_4DPWI.<id>.nii``."""
    name = smir_name(CTP_TOKEN, smir_id)
    return write_nifti_series(Path(case_dir) / name / f"{name}.nii", series, affine)


def isles24_series_path(base, layout, subject) -> Path:
    """Where ISLES 2024 keeps a subject's raw CTP: ``<raw>/<subject>/<session>/<subject>_<session>_ctp.nii.gz``."""
    _, raw_dir, _, session, _, _ = LAYOUTS_2024[layout]
    return Path(base) / raw_dir / subject / session / f"{subject}_{session}_ctp.nii.gz"


def write_dicom_series(folder, series: CtpSeries, case: str, seed: int, study=None, affine=None) -> list:
    """Write the series as a DICOM CT perfusion series in ``folder/<number>_CTP/``: one CT Image Storage file per
    slice and frame, each frame's slices with its acquisition time (``AcquisitionTime``, ``AcquisitionDateTime``) and
    ``AcquisitionNumber`` (the frame's number).

    Args:
        folder: the study folder.
        series: the phantom's series.
        case: the case's name (its UIDs derive from it and ``seed``).
        seed: the generator's seed.
        study: a dataset of the study the series joins (its study, patient and frame of reference), else a study of
            its own.
        affine: the series' affine, if not its own.

    Returns:
        The paths written, frame by frame, each frame in slice order.
    """
    affine = np.asarray(series.affine if affine is None else affine, dtype=np.float64)
    frames = np.asarray(series.frames)
    if study is None:
        identity = {
            "study_instance_uid": derived_uid(UID_NAMESPACE, case, seed, "ctp study"),
            "frame_of_reference_uid": derived_uid(UID_NAMESPACE, case, seed, "ctp frame of reference"),
            "patient_name": f"SYNTHETIC^{case.upper()}",
            "patient_id": f"SYN-{case}",
        }
    else:
        identity = {
            "study_instance_uid": study.StudyInstanceUID,
            "frame_of_reference_uid": study.FrameOfReferenceUID,
            "patient_name": str(study.PatientName),
            "patient_id": study.PatientID,
        }
    series_uid = derived_uid(UID_NAMESPACE, case, seed, identity["study_instance_uid"], "ctp series")
    geometry = _geometry(affine, frames.shape[2])
    out = Path(folder) / f"{CTP_SERIES_NUMBER}_CTP"
    out.mkdir(parents=True, exist_ok=True)
    start = 12 * 3600.0  # the study's time of day, 12:00:00
    paths = []
    for t, moment in enumerate(np.asarray(series.times, dtype=np.float64)):
        stored, *storage = _stored_pixels("CT", frames[..., t].astype(np.int32))
        template = _series_dataset("CT", CTP_SERIES_NUMBER, identity, series_uid, geometry, frames.shape, storage)
        template.SeriesDescription = CTP_DESCRIPTION
        template.KVP = "80"
        seconds = start + moment
        clock = f"{int(seconds // 3600):02d}{int(seconds % 3600 // 60):02d}{seconds % 60:09.6f}"
        template.AcquisitionTime = template.ContentTime = clock
        template.AcquisitionDateTime = STUDY_DATE + clock
        template.AcquisitionNumber = t + 1
        for k in range(frames.shape[2]):
            uid = derived_uid(UID_NAMESPACE, series_uid, t, k)
            path = out / f"{CTP_SERIES_NUMBER:02d}_{t + 1:03d}_{k + 1:04d}.dcm"
            _write_slice(template, uid, t * frames.shape[2] + k + 1, geometry, k, stored[:, :, k], path)
            paths.append(str(path))
    return paths


def write_truth(folder, phantom: Phantom, affine=None) -> list:
    """Write the phantom's truth maps (``TRUTH_MAPS``) and core label (``core``) as ``folder/<name>.nii.gz``."""
    affine = phantom.series.affine if affine is None else affine
    paths = []
    for name, data in {**phantom.truth, "core": phantom.label}.items():
        path = Path(folder) / f"{name}.nii.gz"
        _save(path, data, affine)
        paths.append(str(path))
    return paths


def load_truth(folder) -> dict:
    """The truth maps ``write_truth`` wrote in ``folder``."""
    return {
        name[: -len(".nii.gz")]: np.asanyarray(nib.load(os.path.join(folder, name)).dataobj)
        for name in sorted(os.listdir(folder))
        if name.endswith(".nii.gz")
    }


@dataclass
class RawSeries:
    """A phantom case's raw series and truth, written beside the case by ``scripts.synthetic.isles``'s generators."""

    phantom: Phantom

    def write_isles18(self, case_dir, smir_id, affine):
        """``CT_4DPWI`` in the case folder (``write_isles18_series``), the truth in its ``TRUTH_DIR``."""
        write_isles18_series(case_dir, self.phantom.series, smir_id, affine)
        write_truth(Path(case_dir) / TRUTH_DIR, self.phantom, affine)

    def write_isles24(self, base, layout, subject, affine):
        """The raw CTP of an ISLES 2024 subject (``isles24_series_path``), the truth in a ``TRUTH_DIR`` beside it."""
        path = isles24_series_path(base, layout, subject)
        write_nifti_series(path, self.phantom.series, affine)
        write_truth(path.parent / TRUTH_DIR, self.phantom, affine)

    def write_dicom(self, study, affine, case, seed):
        """The series in the case's DICOM study (``write_dicom_series``), ``study`` as ``write_study`` returns it."""
        header = pydicom.dcmread(study["files"][0], stop_before_pixels=True)
        write_dicom_series(study["folder"], self.phantom.series, case, seed, header, affine)


class PhantomSource:
    """A ``case_source`` of ``scripts.synthetic.isles.generate``/``generate_isles24``: each case a phantom
    (``phantom_case`` with ``options``), its CBF, CBV, MTT and Tmax computed from its raw series by
    ``scripts.data.perfusion_maps.compute_maps``, its NCCT and label the phantom's; the raw series and the truth are
    written beside the case (``RawSeries``)."""

    def __init__(self, **options):
        self.options = options

    def __call__(self, patient, slab, rng):
        phantom = phantom_case(patient, slab, rng, **self.options)
        series = phantom.series
        maps = compute_maps(CtpSeries(series.frames, series.times, series.affine, "phantom case"))
        arrays = {"CT": phantom.ncct, **isles18_maps(maps), LABEL: phantom.label}
        return arrays, series.affine, RawSeries(phantom)

"""The perfusion figures a stroke team reads beside the predicted core, from the input maps alone, and the threshold
core as a non-learned baseline (scored in evaluation with the model's own metrics). Research figures, not a treatment
decision. Computed from the maps the engine holds (``scripts.case_report.PerfusionReportd``), never read back from
disk.

Per case, on the scan's own grid (voxel volume from its affine; the maps are 0 outside the brain):
- hypoperfusion: Tmax > ``tmax_s`` (6 s);
- threshold core: relative CBF < ``rcbf`` (30 %) of the healthy-tissue mean (the mean CBF where Tmax <= 6 s), within
  the hypoperfused region;
- mismatch volume (hypoperfusion minus core) and ratio (hypoperfusion / core), and the hypoperfusion intensity ratio
  (Tmax > ``tmax_severe_s`` (10 s) volume / Tmax > 6 s volume); a ratio with an empty denominator is left blank.
Tmax must be in seconds: a map whose 99th percentile in the brain exceeds ``TMAX_SECONDS_LIMIT`` looks like
milliseconds, and its figures are left blank with a note (and a warning) instead of being wrong by 1000x.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["COLUMNS", "DEFAULT_THRESHOLDS", "perfusion_regions", "perfusion_figures"]

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = {"tmax_s": 6.0, "tmax_severe_s": 10.0, "rcbf": 0.3}
TMAX_SECONDS_LIMIT = 100.0
# the columns perfusion_figures adds to a case's row of volumes.csv
COLUMNS = (
    "hypoperfusion_ml",
    "core_rcbf_ml",
    "mismatch_ml",
    "mismatch_ratio",
    "hypoperfusion_intensity_ratio",
    "perfusion_note",
)


def perfusion_regions(cbf, tmax, thresholds=None):
    """The hypoperfusion, severe-hypoperfusion and threshold-core masks of one case's CBF and Tmax maps (arrays on
    one grid, Tmax in seconds), or ``None`` and a note saying why the maps do not allow them.

    Args:
        cbf: the CBF map (any units: the core is relative to the healthy-tissue mean).
        tmax: the Tmax map in seconds.
        thresholds: overrides of ``DEFAULT_THRESHOLDS``.

    Returns:
        ``({"hypo": ..., "severe": ..., "core": ...}, "")`` or ``(None, note)``.
    """
    t = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    cbf, tmax = np.asarray(cbf, dtype=np.float64), np.asarray(tmax, dtype=np.float64)
    brain = (cbf > 0) | (tmax > 0)
    if not brain.any():
        return None, "the CBF and Tmax maps are empty"
    p99 = float(np.percentile(tmax[brain], 99))
    if p99 > TMAX_SECONDS_LIMIT:
        return None, f"Tmax looks like milliseconds (99th percentile {p99:.0f}), not seconds"
    hypo = brain & (tmax > t["tmax_s"])
    healthy = brain & ~hypo & (cbf > 0)
    if not healthy.any():
        return None, "no healthy tissue (Tmax <= threshold) to take the reference CBF from"
    core = hypo & (cbf < t["rcbf"] * cbf[healthy].mean())
    return {"hypo": hypo, "severe": brain & (tmax > t["tmax_severe_s"]), "core": core}, ""


def perfusion_figures(regions, note, voxel_ml) -> dict:
    """The report's figures (``COLUMNS``) of one case from its ``perfusion_regions``; blank ones with the note when
    there are no regions.

    Args:
        regions: the masks of ``perfusion_regions``, or ``None``.
        note: ``perfusion_regions``'s note.
        voxel_ml: the volume of one voxel in mL.
    """
    if regions is None:
        return {**dict.fromkeys(COLUMNS[:-1], ""), "perfusion_note": note}
    hypo, severe, core = (float(regions[k].sum()) * voxel_ml for k in ("hypo", "severe", "core"))
    return {
        "hypoperfusion_ml": round(hypo, 3),
        "core_rcbf_ml": round(core, 3),
        "mismatch_ml": round(hypo - core, 3),
        "mismatch_ratio": round(hypo / core, 3) if core else "",
        "hypoperfusion_intensity_ratio": round(severe / hypo, 3) if hypo else "",
        "perfusion_note": "",
    }

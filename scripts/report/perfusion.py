"""The perfusion figures a stroke team reads beside the predicted core, from the input maps alone, and the threshold
core as a non-learned baseline (scored in evaluation with the model's own metrics). Research figures, not a treatment
decision. Computed from the maps the engine holds (``scripts.report.cases.PerfusionReportd``), never read back from
disk.

Per case, on the scan's own grid (voxel volume from its affine; the maps are 0 outside the brain):
- hypoperfusion: Tmax > ``tmax_s`` (6 s);
- threshold core: relative CBF < ``rcbf`` (30 %) of the healthy-tissue mean (the mean CBF where Tmax <= 6 s), within
  the hypoperfused region;
- mismatch volume (hypoperfusion minus core) and ratio (hypoperfusion / core), and the hypoperfusion intensity ratio
  (Tmax > ``tmax_severe_s`` (10 s) volume / Tmax > 6 s volume); a ratio with an empty denominator is left blank.
No figure is printed as real when the maps cannot give it; the figures are left blank and the note says why:
- a blank CBF or Tmax map (no value above 0: the perfusion software failed), named;
- Tmax not in seconds: most brain tissue is healthy, with a Tmax of 0 to 4 s, so the median Tmax of the brain's
  measured voxels (Tmax > 0) is at most 5 s (``scripts.data.channels.tmax_not_in_seconds``); a map stored in tenths
  of a second (x10) or milliseconds (x1000) is far above it, and which of the two it is cannot be told from the values alone;
- no healthy tissue to take the reference CBF from.
Voxels inside the brain outline where both maps give no value (0), next to the hypoperfused region, are what a
no-flow core looks like when the software leaves it blank: they cannot be counted, and the note gives their volume.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage
from scripts.data.channels import HEALTHY_TMAX_S, tmax_not_in_seconds
from scripts.flags import as_fraction

__all__ = ["COLUMNS", "DEFAULT_THRESHOLDS", "check_thresholds", "perfusion_regions", "perfusion_figures"]

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = {"tmax_s": HEALTHY_TMAX_S, "tmax_severe_s": 10.0, "rcbf": 0.3}
# the columns perfusion_figures adds to a case's row of per_case.csv
COLUMNS = (
    "hypoperfusion_ml",
    "core_rcbf_ml",
    "mismatch_ml",
    "mismatch_ratio",
    "hypoperfusion_intensity_ratio",
    "perfusion_note",
)


def check_thresholds(thresholds) -> dict:
    """``DEFAULT_THRESHOLDS`` with ``thresholds`` applied, refused before any work when a key is unknown or a value
    would make every region empty or full: ``rcbf`` strictly between 0 and 1, ``tmax_s`` above 0, ``tmax_severe_s``
    above ``tmax_s``.

    Raises:
        ValueError: naming the setting and the value.
    """
    unknown = sorted(set(thresholds or {}) - set(DEFAULT_THRESHOLDS))
    if unknown:
        raise ValueError(f"perfusion_thresholds: unknown {', '.join(unknown)} (known: {', '.join(DEFAULT_THRESHOLDS)})")
    t = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    as_fraction(t["rcbf"], "perfusion_thresholds#rcbf")
    if not 0 < float(t["tmax_s"]) < float(t["tmax_severe_s"]):
        raise ValueError(
            f"perfusion_thresholds: need 0 < tmax_s < tmax_severe_s (seconds), got tmax_s {t['tmax_s']!r} and"
            f" tmax_severe_s {t['tmax_severe_s']!r}"
        )
    return t


def perfusion_regions(cbf, tmax, thresholds=None):
    """The hypoperfusion, severe-hypoperfusion and threshold-core masks of one case's CBF and Tmax maps (arrays on
    one grid, Tmax in seconds), and the brain voxels next to the hypoperfused region where neither map has a value;
    or ``None`` and a note saying why the maps do not allow the figures.

    Args:
        cbf: the CBF map (any units: the core is relative to the healthy-tissue mean).
        tmax: the Tmax map in seconds.
        thresholds: overrides of ``DEFAULT_THRESHOLDS``.

    Returns:
        ``({"hypo": ..., "severe": ..., "core": ..., "no_value": ...}, "")`` or ``(None, note)``.
    """
    t = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    cbf, tmax = np.asarray(cbf, dtype=np.float64), np.asarray(tmax, dtype=np.float64)
    blank = [name for name, values in (("CBF", cbf), ("Tmax", tmax)) if not (values > 0).any()]
    if blank:
        maps = " and ".join(blank)
        return None, (
            f"the {maps} map{'s are' if len(blank) > 1 else ' is'} blank (no value above 0): the perfusion software"
            " gave none, and the network's mask was computed without it"
        )
    median = tmax_not_in_seconds(tmax)
    if median is not None:
        return None, (
            f"Tmax is not in seconds: its median in the brain is {median:.3g}, healthy tissue is 0-4 s (tenths of a"
            " second or milliseconds cannot be told apart from the values)"
        )
    brain = (cbf > 0) | (tmax > 0)
    hypo = brain & (tmax > t["tmax_s"])
    healthy = brain & ~hypo & (cbf > 0)
    if not healthy.any():
        return None, "no healthy tissue (Tmax <= threshold) to take the reference CBF from"
    core = hypo & (cbf < t["rcbf"] * cbf[healthy].mean())
    outline = np.stack([ndimage.binary_fill_holes(brain[:, :, k]) for k in range(brain.shape[2])], axis=2)
    no_value = outline & ~brain & ndimage.binary_dilation(hypo, iterations=2)
    return {"hypo": hypo, "severe": brain & (tmax > t["tmax_severe_s"]), "core": core, "no_value": no_value}, ""


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
    hypo, severe, core, no_value = (float(regions[k].sum()) * voxel_ml for k in ("hypo", "severe", "core", "no_value"))
    if no_value:
        note = (
            f"{no_value:.3g} mL inside the brain next to the hypoperfused region have no CBF or Tmax value (a no-flow"
            " core left blank by the perfusion software?): not counted in the core"
        )
    return {
        "hypoperfusion_ml": round(hypo, 3),
        "core_rcbf_ml": round(core, 3),
        "mismatch_ml": round(hypo - core, 3),
        "mismatch_ratio": round(hypo / core, 3) if core else "",
        "hypoperfusion_intensity_ratio": round(severe / hypo, 3) if hypo else "",
        "perfusion_note": note,
    }

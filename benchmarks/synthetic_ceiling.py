"""What the synthetic ISLES 2018 cases let any model reach: the generator's own noise-free fields against its labels.

    python benchmarks/synthetic_ceiling.py [--seed 0] [--num_cases 20] [--in_plane 256]

Regenerates the training cases that ``scripts.data.synthetic.generate`` writes for ``seed`` (by its ``split_slabs``,
with its default slabs; the demo's tree: seed 0, 20 cases) and scores, per case, against the written label (Dice,
mean over the cases):

- **perfusion ceiling**: the hypoperfused CBF region that the generator draws the CBF map from, noise-free, inside
  the valid brain: what a perfect reader of the maps could give, since the label is the core, whose boundary the
  maps carry only through this region and its noise;
- **NCCT oracle**: the CT's difference to the known healthy-tissue HU (grey/white/CSF mix), smoothed in-plane by a
  Gaussian of ``sigma`` mm, below half the case's core hypodensity (2-6 HU), inside the hypoperfused Tmax region:
  the exact boundary is in the CT's few-HU hypodensity, under the CT's noise.

A white-box diagnosis of the generator (it reads its private fields): it bounds what the maps can give on these
data, for the model card's learning section; it says nothing about patients.
"""

from __future__ import annotations

import inspect
import os
import sys

import numpy as np
from scipy import ndimage

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from scripts.data import synthetic  # noqa: E402
from scripts.tools.cli import run  # noqa: E402

GENERATE_DEFAULTS = {k: p.default for k, p in inspect.signature(synthetic.generate).parameters.items()}
SIGMAS_MM = (0.0, 1.0, 2.0, 3.0)


def _dice(a, b) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / float(total)


def case_ceilings(patient, slab, rng) -> dict:
    """The perfusion ceiling and the NCCT oracle at each of ``SIGMAS_MM`` for one case (Dice against its label)."""
    arrays, _ = patient.case(slab, rng)
    x, y, z = patient.x, patient.y, slab.z
    anatomy = patient.anatomy(x, y, z)
    fields = {name: patient.fields[name](x, y, z) for name in ("core", "cbf", "cbv", "tmax")}
    severity = patient.severity(fields, patient.lesion_distance(x, y, z))
    label = arrays["OT"] > 0
    valid = (anatomy["brain_depth"] >= 0) & (anatomy["csf"] < 0.5)
    difference = arrays["CT"].astype(np.float32) - synthetic.healthy_tissue_hu(anatomy["grey"], anatomy["csf"])
    row = {"perfusion ceiling": _dice((severity["cbf"] > 0.5) & valid, label)}
    for sigma in SIGMAS_MM:
        smoothed = ndimage.gaussian_filter(difference, (sigma / patient.spacing,) * 2 + (0,)) if sigma else difference
        oracle = (smoothed < -patient.core_hypodensity / 2) & valid & (severity["tmax"] > 0.5)
        row[f"NCCT oracle, {sigma:g} mm"] = _dice(oracle, label)
    return row


def main(seed: int = 0, num_cases: int = 20, in_plane: int = 256):
    """CLI: see the module docstring."""
    slabs = synthetic.split_slabs(
        seed, 0, num_cases, in_plane, GENERATE_DEFAULTS["slices"], GENERATE_DEFAULTS["two_slab_fraction"]
    )
    rows = [case_ceilings(patient, slab, rng) for _, patient, slab, rng in slabs]
    print(f"synthetic ISLES 2018 training cases, seed {seed}, {len(rows)} cases: mean Dice against the label")
    for name in rows[0]:
        print(f"  {name}: {np.mean([row[name] for row in rows]):.3f}")


if __name__ == "__main__":
    run(main)

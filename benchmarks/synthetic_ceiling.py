"""What the synthetic ISLES 2018 cases let any model reach: the generator's own noise-free fields against its labels.

    python benchmarks/synthetic_ceiling.py [--seed 0] [--num_cases 20] [--in_plane 256]

Regenerates the training cases that ``scripts.data.synthetic.generate`` writes for ``seed`` (the demo's tree: seed 0,
20 cases) and scores, per case, against the written label (Dice, mean over the cases):

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

import os
import sys

import numpy as np
from scipy import ndimage

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from scripts.data import synthetic  # noqa: E402
from scripts.tools.cli import run  # noqa: E402

SLICES = (2, 4, 8, 16, 22)  # generate()'s default slab thicknesses
TWO_SLAB_FRACTION = 0.3  # generate()'s default
SIGMAS_MM = (0.0, 1.0, 2.0, 3.0)


def _dice(a, b) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / float(total)


def training_cases(seed, num_cases, in_plane):
    """(patient, slab, arrays) of the training split as ``generate`` draws it (split index 0)."""
    done = 0
    patient_index = 0
    while done < num_cases:
        patient_index += 1
        rng = np.random.default_rng([seed, 0, patient_index])
        n_slabs = 2 if rng.random() < TWO_SLAB_FRACTION else 1
        patient = synthetic._Patient(rng, in_plane, SLICES, n_slabs)
        for slab_index, slab in enumerate(patient.slabs[: num_cases - done]):
            arrays, _ = patient.case(slab, np.random.default_rng([seed, 0, patient_index, slab_index]))
            done += 1
            yield patient, slab, arrays


def case_ceilings(patient, slab, arrays) -> dict:
    """The perfusion ceiling and the NCCT oracle at each of ``SIGMAS_MM`` for one case (Dice against its label)."""
    x, y, z = patient.x, patient.y, slab.z
    anatomy = patient.anatomy(x, y, z)
    fields = {name: patient.fields[name](x, y, z) for name in ("core", "cbf", "tmax")}
    distance = patient.lesion_distance(x, y, z)
    label = arrays["OT"] > 0
    valid = (anatomy["brain_depth"] >= 0) & (anatomy["csf"] < 0.5)
    scale = patient.penumbra_factor
    cbf_region = synthetic._region(distance, 0.6 * fields["core"] + 0.8 * fields["cbf"], scale["cbf"]) > 0.5
    tmax_region = synthetic._region(distance, fields["tmax"], scale["tmax"]) > 0.5
    healthy = (30 + 10 * anatomy["grey"]) * (1 - anatomy["csf"]) + 5 * anatomy["csf"]
    difference = arrays["CT"].astype(np.float32) - healthy
    row = {"perfusion ceiling": _dice(cbf_region & valid, label)}
    for sigma in SIGMAS_MM:
        smoothed = ndimage.gaussian_filter(difference, (sigma / patient.spacing,) * 2 + (0,)) if sigma else difference
        oracle = (smoothed < -patient.core_hypodensity / 2) & valid & tmax_region
        row[f"NCCT oracle, {sigma:g} mm"] = _dice(oracle, label)
    return row


def main(seed: int = 0, num_cases: int = 20, in_plane: int = 256):
    """CLI: see the module docstring."""
    rows = [case_ceilings(*case) for case in training_cases(seed, num_cases, in_plane)]
    print(f"synthetic ISLES 2018 training cases, seed {seed}, {len(rows)} cases: mean Dice against the label")
    for name in rows[0]:
        print(f"  {name}: {np.mean([row[name] for row in rows]):.3f}")


if __name__ == "__main__":
    run(main)

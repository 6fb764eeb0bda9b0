"""What the synthetic ISLES 2018 cases let any model reach: the generator's own noise-free fields against its labels.

    python benchmarks/synthetic_ceiling.py [--seed 0] [--num_cases 20] [--in_plane 256] [--oracle_tree SRC DST]

Regenerates the training cases that ``scripts.synthetic.isles.generate`` writes for ``seed`` (by its ``split_slabs``,
with its default slabs; the demo's tree: seed 0, 20 cases) and scores, per case, against the written label (Dice,
mean over the cases):

- **perfusion ceiling**: the hypoperfused CBF region that the generator draws the CBF map from, noise-free, inside
  the valid brain, its soft edge cut at each of ``LEVELS``: the best of them is what a perfect reader of the maps
  could give (an optimistic bound: the level is chosen on these cases), since the label is the core, whose boundary
  the maps carry only through this region and its noise;
- **NCCT oracle**: the CT's difference to the known healthy-tissue HU (grey/white/CSF mix), smoothed in-plane by a
  Gaussian of ``sigma`` mm, below half the case's core hypodensity (2-6 HU), inside the hypoperfused Tmax region:
  the exact boundary is in the CT's few-HU hypodensity, under the CT's noise.

With ``--oracle_tree SRC DST`` it also copies the tree written at ``SRC`` (e.g. the demo's ``demo_data``: its
``isles`` folder and ``datalist.json``) to ``DST`` with each training case's NCCT replaced, inside the brain, by its
difference to the healthy-tissue HU plus 35 HU: the core's hypodensity without the grey/white contrast around it.
Trained on (``--demo_dir DST``), it tells whether a network reads a few-HU hypodensity at a given budget and window.

A white-box diagnosis of the generator (it reads its private fields): it bounds what the maps can give on these
data, for the model card's learning section; it says nothing about patients.
"""

from __future__ import annotations

import glob
import inspect
import os
import shutil
import sys

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from scripts.data import synthetic  # noqa: E402
from scripts.tools.cli import run  # noqa: E402

GENERATE_DEFAULTS = {k: p.default for k, p in inspect.signature(synthetic.generate).parameters.items()}
SIGMAS_MM = (0.0, 1.0, 2.0, 3.0)
LEVELS = (0.5, 0.7, 0.8, 0.9)  # cuts of the CBF deficit's soft edge (0.5: its nominal boundary)
ORACLE_HEALTHY_HU = 35.0


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
    row = {f"perfusion ceiling, level {level:g}": _dice((severity["cbf"] > level) & valid, label) for level in LEVELS}
    for sigma in SIGMAS_MM:
        smoothed = ndimage.gaussian_filter(difference, (sigma / patient.spacing,) * 2 + (0,)) if sigma else difference
        oracle = (smoothed < -patient.core_hypodensity / 2) & valid & (severity["tmax"] > 0.5)
        row[f"NCCT oracle, {sigma:g} mm"] = _dice(oracle, label)
    return row


def write_oracle_ct(path, patient, slab) -> None:
    """Replace the NCCT at ``path`` (a training case of ``patient`` acquired as ``slab``) by its difference to the
    healthy-tissue HU plus ``ORACLE_HEALTHY_HU`` inside the brain, in its stored dtype and header."""
    image = nib.load(path)
    ct = np.asarray(image.dataobj, dtype=np.float32)
    anatomy = patient.anatomy(patient.x, patient.y, slab.z)
    healthy = synthetic.healthy_tissue_hu(anatomy["grey"], anatomy["csf"])
    oracle = np.where(anatomy["brain_depth"] >= 0, ct - healthy + ORACLE_HEALTHY_HU, ct)
    nib.save(nib.Nifti1Image(np.rint(oracle).astype(image.get_data_dtype()), image.affine, image.header), path)


def main(seed: int = 0, num_cases: int = 20, in_plane: int = 256, oracle_tree: list | None = None):
    """CLI: see the module docstring."""
    if oracle_tree is not None:
        source, target = oracle_tree
        shutil.copytree(os.path.join(source, "isles"), os.path.join(target, "isles"))
        shutil.copy(os.path.join(source, "datalist.json"), os.path.join(target, "datalist.json"))
    slabs = synthetic.split_slabs(
        seed, 0, num_cases, in_plane, GENERATE_DEFAULTS["slices"], GENERATE_DEFAULTS["two_slab_fraction"]
    )
    rows = []
    for index, (_, patient, slab, rng) in enumerate(slabs, start=1):
        rows.append(case_ceilings(patient, slab, rng))
        if oracle_tree is not None:
            (ct_path,) = glob.glob(
                os.path.join(oracle_tree[1], "isles", "TRAINING", f"case_{index}", "*.CT.*", "*.nii*")
            )
            write_oracle_ct(ct_path, patient, slab)
    print(f"synthetic ISLES 2018 training cases, seed {seed}, {len(rows)} cases: mean Dice against the label")
    for name in rows[0]:
        print(f"  {name}: {np.mean([row[name] for row in rows]):.3f}")


if __name__ == "__main__":
    run(main)

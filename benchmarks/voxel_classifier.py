"""A per-voxel classifier of the perfusion maps: the second baseline a learned network must beat.

    python benchmarks/voxel_classifier.py --data_list_file_path D/datalist.json --dataset_dir D/isles [--fold 0]
        [--output_dir OUT]

A logistic regression, quadratic in its features, of each voxel's lesion label: the five maps in fixed clinical
windows (NCCT 0-100 HU; CBF and CBV as a fraction of the brain's median, 0-400 %; MTT and Tmax 0-20 s) and their
in-plane local means (5 x 5 voxels), fitted (L-BFGS, L2 1e-4) on a random sample of brain voxels of the fold's
training cases, thresholded at 0.5 on the held-out cases, on each case's own grid. It sees no shape, no 3D context
and no other case: what a network learns beyond it is what the network adds. The held-out cases are scored by
``scripts.report.metrics.score_case`` (the bundle's evaluation); ``benchmarks/peers.py`` reports it as a row of its
table. With ``--output_dir`` the masks are written there as ``<case>.nii.gz``.
"""

from __future__ import annotations

import gzip
import os
import sys
import time

import nibabel as nib
import numpy as np
import torch
from monai.data.utils import affine_to_spacing
from scipy import ndimage, optimize

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from scripts.data.channels import CHANNELS  # noqa: E402
from scripts.data.datalist import load_fold  # noqa: E402
from scripts.data.readers import LoadCased  # noqa: E402
from scripts.report.metrics import METRIC_NAMES, score_case  # noqa: E402
from scripts.safe_files import write_atomically  # noqa: E402
from scripts.tools.cli import run  # noqa: E402

NAME = "per-voxel classifier (quadratic logistic regression of the windowed maps)"
LOCAL_MEAN = 5  # in-plane voxels of each map's local mean
SAMPLES = 200_000  # brain voxels drawn from the training cases, in equal shares
L2 = 1e-4


def _read(item, channels) -> tuple:
    """(maps as a {channel: (X, Y, Z) float32 array}, label or None, affine) of a datalist item, read and checked by
    the bundle's own loader (``LoadCased``: a bad file is named with its case)."""
    keys = ["image", "label"] if item.get("label") else ["image"]
    case = LoadCased(keys, channels=channels)(item)
    maps = {name: case["image"][i].numpy() for i, name in enumerate(channels)}
    label = case["label"][0].numpy() > 0 if "label" in case else None
    return maps, label, np.asarray(case["image"].affine, dtype=np.float64)


def features(maps) -> tuple:
    """(voxels x 10 features, brain mask as a flat boolean array): the five windowed maps of ``maps`` ({channel:
    array}; any other channel, e.g. the CTA, is left out) and their local means."""
    ct, cbf, cbv, mtt, tmax = (maps[name] for name in CHANNELS)
    brain = (np.stack([cbf, cbv, mtt, tmax]) != 0).any(0)
    windowed = [np.clip(ct / 100.0, 0, 1)]
    for m in (cbf, cbv):
        ref = float(np.median(m[brain])) if brain.any() else 1.0
        windowed.append(np.clip(m / (ref + 1e-8) / 4.0, 0, 1))
    windowed += [np.clip(mtt / 20.0, 0, 1), np.clip(tmax / 20.0, 0, 1)]
    x = np.stack(windowed)
    means = np.stack([ndimage.uniform_filter(m, size=(LOCAL_MEAN, LOCAL_MEAN, 1)) for m in x])
    return np.concatenate([x, means]).reshape(2 * len(x), -1).T, brain.reshape(-1)


def _quadratic(f):
    i, j = np.triu_indices(f.shape[1])
    return np.concatenate([np.ones((len(f), 1)), f, f[:, i] * f[:, j]], 1)


def fit(cases, seed=0) -> tuple:
    """The classifier's (weights, feature means, feature deviations), fitted on ``cases`` ((maps, label) pairs)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for maps, label in cases:
        f, brain = features(maps)
        idx = np.flatnonzero(brain)
        idx = rng.choice(idx, size=min(len(idx), SAMPLES // len(cases)), replace=False)
        xs.append(_quadratic(f[idx]))
        ys.append(label.reshape(-1)[idx])
    x, y = np.concatenate(xs), np.concatenate(ys).astype(np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-8
    mean[0], std[0] = 0.0, 1.0
    xn = (x - mean) / std

    def loss_and_gradient(w):
        z = xn @ w
        loss = np.logaddexp(0, z) - y * z
        gradient = xn.T @ (1 / (1 + np.exp(-z)) - y) / len(y) + L2 * w
        return loss.mean() + 0.5 * L2 * w @ w, gradient

    w = optimize.minimize(loss_and_gradient, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B").x
    return w, mean, std


def predict(model, maps) -> np.ndarray:
    """The boolean lesion mask of one case (probability >= 0.5 inside the brain)."""
    w, mean, std = model
    f, brain = features(maps)
    probability = 1 / (1 + np.exp(-((_quadratic(f) - mean) / std) @ w))
    return ((probability >= 0.5) & brain).reshape(maps[CHANNELS[0]].shape)


def evaluate(data_list_file_path, dataset_dir, fold=0, channels=None, output_dir=None) -> dict:
    """Fit on the fold's training cases, score its held-out ones; ``{"rows": [{case, metrics...}], "fit_s",
    "predict_s_per_case"}``."""
    channels = list(channels or CHANNELS)
    split = load_fold(data_list_file_path, dataset_dir, fold, channels)
    start = time.perf_counter()
    model = fit([_read(item, channels)[:2] for item in split["train"]])
    fit_s = time.perf_counter() - start
    rows, start = [], time.perf_counter()
    for item in split["validation"]:
        maps, label, affine = _read(item, channels)
        mask = predict(model, maps)
        spacing = [float(s) for s in affine_to_spacing(torch.as_tensor(affine), r=3)]
        rows.append({"case": item["case"], **score_case(mask, label, spacing)})
        if output_dir:
            path = os.path.join(output_dir, f"{item['case']}.nii.gz")
            image = nib.Nifti1Image(mask.astype(np.uint8), affine)
            write_atomically(path, lambda f, image=image: f.write(gzip.compress(image.to_bytes(), 1)))
    return {"rows": rows, "fit_s": fit_s, "predict_s_per_case": (time.perf_counter() - start) / max(1, len(rows))}


def main(data_list_file_path: str, dataset_dir: str, fold: int = 0, output_dir: str | None = None):
    """CLI: see the module docstring."""
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    result = evaluate(data_list_file_path, dataset_dir, fold, output_dir=output_dir)
    print(f"{NAME}, fold {fold}: fit {result['fit_s']:.1f} s, {result['predict_s_per_case']:.2f} s per case")
    for row in result["rows"]:
        print(row["case"], " ".join(f"{m} {row[m]:.3f}" for m in ("dice", "lesion_f1")))
    for m in METRIC_NAMES:
        print(f"mean {m}: {np.nanmean([row[m] for row in result['rows']]):.3f}")


if __name__ == "__main__":
    run(main)

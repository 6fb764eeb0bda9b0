"""Perfusion maps from raw 4D CT perfusion series (scripts.data.perfusion_maps) against the truth of phantom series
(scripts.synthetic.phantom), and against a plain block-circulant SVD with a fixed 15 % truncation on the same series.
Synthetic: every figure is on phantoms, none on patients.

    python benchmarks/perfusion_maps.py                      # 6 phantoms, 64 x 64 x 8, 40 frames
    python benchmarks/perfusion_maps.py --seeds 12 --in_plane 128
    python benchmarks/perfusion_maps.py --seeds 0 --speed true   # one 512 x 512 x 20 x 40-frame series only
    python benchmarks/perfusion_maps.py --seeds 0 --tree DIR     # the threshold core's Dice on an ISLES 2018 tree
    python benchmarks/perfusion_maps.py --seeds 0 --load DIR     # loading its TESTING cases raw-only vs with maps

Tables (markdown, printed):
- per tissue class (healthy, benign oligaemia, penumbra, core) and map: the bias of the mean (CBF, CBV, MTT relative
  to the true mean, Tmax in seconds) and the voxel-wise Pearson correlation, pooled over the phantoms' voxels that
  both the phantom and the method call tissue, for oSVD (ours) and the fixed-15 % bSVD;
- the mean absolute error of each map, both methods, and by how much ours is lower;
- the Tmax > 6 s and rCBF < 30 % volumes (mL) against the true ones (the truth's own Tmax and rCBF);
- with ``--speed``: seconds and peak memory of ``compute_maps`` on one 512 x 512 x 20 x 40 series, and the part the
  deconvolution itself took;
- with ``--load``: the seconds ``scripts.data.readers.LoadCased`` takes to load each TESTING case of an ISLES 2018
  tree of phantoms as it is (its maps read) and raw-only (a copy without its maps: the maps computed from its
  ``CT_4DPWI``), alternating, three rounds, the median.
"""

import argparse
import os
import resource
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.data import perfusion_maps as pm  # noqa: E402
from scripts.synthetic.phantom import TISSUE_CLASSES, draw_phantom  # noqa: E402

MAPS = ("CBF", "CBV", "MTT", "Tmax")
RELATIVE = ("CBF", "CBV", "MTT")


def _voxel_ml(series):
    return float(abs(np.linalg.det(np.asarray(series.affine)[:3, :3]))) / 1000.0


def evaluate(seeds, in_plane, slices):
    """Per method (``osvd``, ``bsvd15``): pooled (computed, true) values per class and map, absolute errors per map,
    and the lesion volumes (mL) per phantom."""
    pooled = {m: {(c, n): ([], []) for c in TISSUE_CLASSES for n in MAPS} for m in ("osvd", "bsvd15")}
    errors = {m: {n: [] for n in MAPS} for m in ("osvd", "bsvd15")}
    volumes = []
    for seed in seeds:
        phantom = draw_phantom(seed, in_plane=in_plane, slices=slices)
        truth, ml = phantom.truth, _voxel_ml(phantom.series)
        row = {
            "seed": seed,
            "true Tmax>6": float(((truth["Tmax"] > 6) & (truth["tissue"] > 0)).sum() * ml),
            "true rCBF<30%": float(((truth["rCBF"] < 0.3) & (truth["tissue"] > 0)).sum() * ml),
        }
        for method, truncation in (("osvd", None), ("bsvd15", pm.FIXED_TRUNCATION)):
            maps = pm.compute_maps(phantom.series, truncation=truncation)
            both = (truth["tissue"] > 0) & maps["tissue"]
            for name in MAPS:
                errors[method][name].append(np.abs(maps[name][both] - truth[name][both]))
                for label, value in TISSUE_CLASSES.items():
                    voxels = both & (truth["tissue"] == value)
                    pooled[method][(label, name)][0].append(maps[name][voxels])
                    pooled[method][(label, name)][1].append(truth[name][voxels])
            row[f"{method} Tmax>6"] = float(((maps["Tmax"] > 6) & maps["tissue"]).sum() * ml)
            row[f"{method} rCBF<30%"] = float(((maps["rCBF"] < 0.3) & maps["tissue"]).sum() * ml)
        volumes.append(row)
    return pooled, errors, volumes


def class_table(pooled):
    lines = [
        "| class | map | true mean | oSVD bias | bSVD-15 % bias | oSVD r | bSVD-15 % r | voxels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in TISSUE_CLASSES:
        for name in MAPS:
            cells = []
            for method in ("osvd", "bsvd15"):
                ours, true = (np.concatenate(v) for v in pooled[method][(label, name)])
                if len(true) < 20:
                    cells.append(None)
                    continue
                bias = ours.mean() / true.mean() - 1 if name in RELATIVE else ours.mean() - true.mean()
                r = np.corrcoef(ours, true)[0, 1] if ours.std() > 0 and true.std() > 0 else float("nan")
                cells.append((true.mean(), bias, r, len(true)))
            if cells[0] is None:
                continue
            fmt = (lambda b: f"{100 * b:+.0f} %") if name in RELATIVE else (lambda b: f"{b:+.2f} s")
            lines.append(
                f"| {label} | {name} | {cells[0][0]:.2f} | {fmt(cells[0][1])} | {fmt(cells[1][1])} |"
                f" {cells[0][2]:.2f} | {cells[1][2]:.2f} | {cells[0][3]} |"
            )
    return "\n".join(lines)


def error_table(errors):
    lines = ["| map | oSVD MAE | bSVD-15 % MAE | oSVD lower by |", "|---|---|---|---|"]
    for name in MAPS:
        ours, plain = (float(np.concatenate(errors[m][name]).mean()) for m in ("osvd", "bsvd15"))
        lines.append(f"| {name} | {ours:.3f} | {plain:.3f} | {100 * (1 - ours / plain):.0f} % |")
    return "\n".join(lines)


def volume_table(volumes):
    keys = ["true Tmax>6", "osvd Tmax>6", "bsvd15 Tmax>6", "true rCBF<30%", "osvd rCBF<30%", "bsvd15 rCBF<30%"]
    lines = ["| seed | " + " | ".join(f"{k} (mL)" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in volumes:
        lines.append(f"| {row['seed']} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")
    mean_abs = {
        k: np.mean([abs(r[k] - r["true " + k.split(" ")[1]]) for r in volumes]) for k in keys if "true" not in k
    }
    lines.append(
        "| mean abs. difference | " + " | ".join("" if "true" in k else f"{mean_abs[k]:.1f}" for k in keys) + " |"
    )
    return "\n".join(lines)


def speed(in_plane=512, slices=20, frames=40):
    """Seconds and memory of ``compute_maps`` on one phantom series; its own peak of allocations (numpy's reported to
    ``tracemalloc``) on top of the series, and the process' peak RSS (which drawing the phantom may have set)."""
    started = time.perf_counter()
    phantom = draw_phantom(0, in_plane=in_plane, slices=slices, frames=frames)
    drawn = time.perf_counter() - started
    tracemalloc.start()
    started = time.perf_counter()
    maps = pm.compute_maps(phantom.series)
    total = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shape = "x".join(str(s) for s in phantom.series.frames.shape)
    series_mib = phantom.series.frames.nbytes / 2**20
    return (
        "| series | its size (MiB, int16) | phantom drawn (s) | compute_maps (s) | of which deconvolution (s) |"
        " compute_maps peak allocations (MiB) | process peak RSS (MiB) |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {shape} | {series_mib:.0f} | {drawn:.1f} | {total:.1f} | {maps['info']['deconvolution_s']:.1f} |"
        f" {peak:.0f} | {rss:.0f} |"
    )


def threshold_dice(root):
    """Per training case of an ISLES 2018 tree: Dice of the threshold core (``perfusion_regions``' ``core``, the
    evaluation's baseline) against the label, and their mean."""
    import nibabel as nib
    from scripts.data.isles18 import TRAINING_DIR, find_cases, read_case
    from scripts.report.perfusion import perfusion_regions

    lines, dices = ["| case | label voxels | core voxels | Dice |", "|---|---|---|---|"], []
    for name, path in find_cases(root, TRAINING_DIR):
        item = read_case(name, path, True)
        cbf, tmax = (np.asarray(nib.load(item["image"][i]).dataobj, dtype=np.float32) for i in (1, 4))
        label = np.asarray(nib.load(item["label"]).dataobj) > 0
        regions, _ = perfusion_regions(cbf, tmax)
        core = regions["core"] if regions else np.zeros_like(label)
        dices.append(2 * (core & label).sum() / max(1, core.sum() + label.sum()))
        lines.append(f"| {name} | {label.sum()} | {core.sum()} | {dices[-1]:.3f} |")
    lines.append(f"| mean of {len(dices)} | | | {np.mean(dices):.3f} |")
    return "\n".join(lines)


def load_time(root, rounds=3):
    """Median seconds of ``LoadCased`` per TESTING case of an ISLES 2018 tree, with its maps and raw-only."""
    import shutil
    import tempfile

    import nibabel as nib
    from scripts.data.datalist import find_inputs
    from scripts.data.isles18 import SMIR_NAME, TESTING_DIR, key_of_token
    from scripts.data.readers import LoadCased

    lines = ["| case | grid x frames | with maps (s) | raw-only, maps computed (s) |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as copy:
        raw_root = os.path.join(copy, TESTING_DIR)
        shutil.copytree(os.path.join(root, TESTING_DIR), raw_root)
        for case in os.listdir(raw_root):
            for name in os.listdir(os.path.join(raw_root, case)):
                match = SMIR_NAME.match(name)
                if match and key_of_token(match.group("mod")) in MAPS:
                    shutil.rmtree(os.path.join(raw_root, case, name))
        load = LoadCased(("image",))
        vendor, raw = find_inputs(os.path.join(root, TESTING_DIR)), find_inputs(raw_root)
        for with_maps, raw_only in zip(vendor, raw):
            seconds = {"vendor": [], "raw": []}
            for _ in range(rounds):
                for key, item in (("vendor", with_maps), ("raw", raw_only)):
                    started = time.perf_counter()
                    image = load(item)["image"]
                    seconds[key].append(time.perf_counter() - started)
            frames = nib.load(raw_only["image"][1]).shape[3]
            lines.append(
                f"| {with_maps['case']} | {' x '.join(map(str, image.shape[1:]))} x {frames} |"
                f" {np.median(seconds['vendor']):.2f} | {np.median(seconds['raw']):.2f} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=6, help="phantoms 1..N (0: none, e.g. with --speed)")
    parser.add_argument("--in_plane", type=int, default=64)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--speed", default="false", choices=("true", "false"))
    parser.add_argument("--tree", default=None, help="an ISLES 2018 tree: the threshold core's Dice per case")
    parser.add_argument("--load", default=None, help="an ISLES 2018 tree of phantoms: loading raw-only vs with maps")
    args = parser.parse_args()
    if args.load:
        print(load_time(args.load), end="\n\n")
    if args.tree:
        print(threshold_dice(args.tree), end="\n\n")
    if args.seeds > 0:
        pooled, errors, volumes = evaluate(range(1, args.seeds + 1), args.in_plane, args.slices)
        print(f"Synthetic: {args.seeds} phantoms, {args.in_plane} x {args.in_plane} x {args.slices}, 40 frames\n")
        print(class_table(pooled), end="\n\n")
        print(error_table(errors), end="\n\n")
        print(volume_table(volumes), end="\n\n")
    if args.speed == "true":
        print(speed())


if __name__ == "__main__":
    main()

"""What a cross-validation (scripts/tools/cross_validate.py) leaves: the per-case table, the paper's Tab. 1 beside ours, a
paired comparison of the two networks, a figure of per-case Dice, and the fold-ensemble override for inference."""

from __future__ import annotations

import json
import math
import os

import numpy as np
from monai.bundle import ConfigParser
from monai.data import load_decathlon_datalist
from PIL import Image, ImageDraw
from scipy.stats import bootstrap, wilcoxon
from scripts import BUNDLE_ROOT
from scripts.data.channels import CHANNELS
from scripts.report.cases import PER_CASE
from scripts.report.metrics import METRIC_NAMES
from scripts.report.tables import print_table, read_csv, write_csv
from scripts.safe_files import write_atomically

__all__ = ["PAPER_TABLE", "paired_comparison", "summary_table", "write_outputs"]


TABLE_COLUMNS = (
    "dice",
    "precision",
    "recall",
    "jaccard",
    "hd95_mm",
    "volume_abs_diff_ml",
    "lesion_f1",
    "lesion_count_diff",
)
# Omarov et al. 2022, Tab. 1 (their "test" is a held-out part of the ISLES 2018 training set)
PAPER_TABLE = [
    {"network": "classic", "split": "train", "dice": 0.48, "precision": 0.39, "recall": 0.99, "jaccard": 0.35},
    {"network": "modified", "split": "train", "dice": 0.90, "precision": 0.83, "recall": 0.93, "jaccard": 0.89},
    {"network": "classic", "split": "test", "dice": 0.36, "precision": 0.38, "recall": 0.37, "jaccard": 0.32},
    {"network": "modified", "split": "test", "dice": 0.58, "precision": 0.68, "recall": 0.60, "jaccard": 0.66},
]
SPLITS = ("test", "train")
TESTING_FILE = "testing.json"  # the datalist's testing cases, which the fold-ensemble overrides segment


def _baselines(header):
    """The baselines an evaluation's per_case.csv scored: those with a ``<baseline>_<metric>`` column of each
    metric."""
    first, rest = METRIC_NAMES[0], METRIC_NAMES[1:]
    keys = [column[: -len(first) - 1] for column in header if column.endswith(f"_{first}")]
    return [key for key in keys if all(f"{key}_{name}" in header for name in rest)]


def collect_per_case(output_dir, networks, folds, datalist_path):
    """Every scored case, from the per_case.csv each evaluation wrote: network, fold, split ("test" = out-of-fold,
    "train" = the fold's own training cases), case, patient and every metric; and each baseline's held-out scores
    (the baselines learn nothing: those of the first network's folds), under the baseline's name."""
    with open(datalist_path) as f:
        patient = {item["case"]: item.get("patient", item["case"]) for item in json.load(f)["training"]}
    rows = []
    for network in networks:
        for fold in folds:
            for split in SPLITS:
                table = read_csv(os.path.join(output_dir, network, f"fold{fold}", f"eval_{split}", PER_CASE))
                scored = [(network, "")]
                if network == networks[0] and split == "test":
                    scored += [(key, f"{key}_") for key in _baselines(list(table[0]) if table else [])]
                for name, prefix in scored:
                    rows += [
                        {
                            "network": name,
                            "fold": fold,
                            "split": split,
                            "case": r["case"],
                            "patient": patient[r["case"]],
                            **{m: float(r[prefix + m]) for m in METRIC_NAMES},
                        }
                        for r in table
                    ]
    return rows


def _mean(values):
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def summary_table(per_case, networks):
    """One row per network and split, and each baseline's held-out row: the mean of the per-case values of each
    metric (NaNs left out: precision of an empty prediction), with the number of cases; the paper's rows beside
    them."""
    baselines = sorted({r["network"] for r in per_case} - set(networks))
    rows = []
    for network, split in [(n, s) for n in networks for s in SPLITS] + [(b, "test") for b in baselines]:
        cases = [r for r in per_case if r["network"] == network and r["split"] == split]
        rows.append(
            {
                "source": "this run",
                "network": network,
                "split": split,
                "cases": len(cases),
                **{m: _mean([r[m] for r in cases]) for m in TABLE_COLUMNS},
            }
        )
    rows += [
        {"source": "paper (Omarov 2022, Tab. 1)", "cases": "", **{m: math.nan for m in TABLE_COLUMNS}, **row}
        for row in PAPER_TABLE
        if row["network"] in networks
    ]
    return rows


def paired_comparison(per_case, metric="dice", a="modified", b="classic", resamples=10000, seed=0):
    """``a`` against ``b`` on the same out-of-fold cases: the mean per-case difference of ``metric``, its 95 %
    percentile bootstrap interval (cases resampled with replacement, ``scipy.stats.bootstrap``) and the Wilcoxon
    signed-rank p-value (``scipy.stats.wilcoxon``)."""
    values = {
        net: {r["case"]: r[metric] for r in per_case if r["network"] == net and r["split"] == "test"} for net in (a, b)
    }
    cases = sorted(set(values[a]) & set(values[b]))
    diff = np.array([values[a][c] - values[b][c] for c in cases])
    interval = bootstrap(
        (diff,), np.mean, n_resamples=resamples, method="percentile", rng=np.random.default_rng(seed)
    ).confidence_interval
    p_value = 1.0 if not np.any(diff) else float(wilcoxon(diff).pvalue)
    return {
        "metric": metric,
        "a": a,
        "b": b,
        "cases": len(cases),
        "mean_a": float(np.mean([values[a][c] for c in cases])),
        "mean_b": float(np.mean([values[b][c] for c in cases])),
        "mean_difference": float(diff.mean()),
        "ci95_low": float(interval.low),
        "ci95_high": float(interval.high),
        "wilcoxon_p": p_value,
    }


def _markdown(rows, columns):
    def cell(value):
        return (
            f"{value:.3f}"
            if isinstance(value, float) and not math.isnan(value)
            else "" if isinstance(value, float) else str(value)
        )

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]) + "\n"


def dice_figure(per_case, networks, path, title):
    """Per-case out-of-fold Dice of each network as a strip plot over a box (quartiles, median, range), PNG."""
    width, height, left, top, bottom = 180 + 160 * len(networks), 420, 60, 40, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    plot_h = height - top - bottom

    def y(v):
        return top + (1 - v) * plot_h

    draw.text((left, 10), title, fill="black")
    for tick in np.linspace(0, 1, 6):
        draw.line([(left - 5, y(tick)), (width - 20, y(tick))], fill=(225, 225, 225))
        draw.text((10, y(tick) - 6), f"{tick:.1f}", fill="black")
    draw.line([(left, top), (left, top + plot_h)], fill="black")
    rng = np.random.default_rng(0)
    for index, network in enumerate(networks):
        values = np.array([r["dice"] for r in per_case if r["network"] == network and r["split"] == "test"])
        x = left + 100 + index * 160
        if values.size:
            q1, median, q3 = np.percentile(values, [25, 50, 75])
            draw.line([(x, y(values.min())), (x, y(values.max()))], fill=(90, 90, 90))
            draw.rectangle([(x - 30, y(q3)), (x + 30, y(q1))], outline=(40, 70, 160), fill=(205, 215, 240))
            draw.line([(x - 30, y(median)), (x + 30, y(median))], fill=(40, 70, 160), width=3)
            for v in values:
                jitter = rng.uniform(-22, 22)
                draw.ellipse([(x + jitter - 3, y(v) - 3), (x + jitter + 3, y(v) + 3)], fill=(200, 60, 40))
        label = f"{network} (n={values.size}, mean {values.mean():.3f})" if values.size else network
        draw.text((x - 60, top + plot_h + 15), label, fill="black")
    draw.text((10, top - 20), "Dice", fill="black")
    write_atomically(path, lambda f: image.save(f, format="PNG"))


def _ensemble_override(output_dir, network, folds, testing_path, profile_files, overrides):
    """An override of configs/inference.json that segments the datalist's testing cases (``testing_path``) with the
    fold models: the run's overrides and profile settings that inference.json has (those that refer to no other ID).
    Only the testing section: on an ISLES 2024 root every other subject trained one of the fold models."""
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE_ROOT, "configs", "inference.json"))
    settings = {}
    for profile in profile_files:
        with open(os.path.join(BUNDLE_ROOT, profile)) as f:
            settings.update({k: v for k, v in json.load(f).items() if k in parser and "@" not in json.dumps(v)})
    settings.update({k: v for k, v in overrides.items() if k in parser})
    return {
        **settings,
        "dataset_dir": testing_path,
        "data_list_key": "testing",
        "ensemble_checkpoints": [os.path.join(output_dir, network, f"fold{f}", "models", "model.pt") for f in folds],
        "output_dir": os.path.join(output_dir, network, "ensemble"),
    }


def _testing_items(datalist_path, dataset_dir):
    """The datalist's channels and its ``testing`` items with absolute paths (MONAI's ``load_decathlon_datalist``)
    and without labels (none of the fold models trained on them)."""
    with open(datalist_path) as f:
        datalist = json.load(f)
    channels = datalist.get("channels", list(CHANNELS))
    if not datalist.get("testing"):
        return channels, []
    items = load_decathlon_datalist(datalist_path, is_segmentation=False, data_list_key="testing", base_dir=dataset_dir)
    return channels, [{k: v for k, v in item.items() if k != "label"} for item in items]


def write_outputs(output_dir, networks, folds, datalist_path, dataset_dir, profile_files, overrides):
    """Write every output of a finished cross-validation into ``output_dir``; returns ``{name: path}``.

    Args:
        output_dir: the cross-validation's folder.
        networks: the networks it trained.
        folds: the fold numbers.
        datalist_path: its datalist.
        dataset_dir: the data root.
        profile_files: the profile configs it ran with (bundle-relative, e.g. ``["configs/demo.json"]``).
        overrides: its config overrides.
    """
    per_case = collect_per_case(output_dir, networks, folds, datalist_path)
    out = {name: os.path.join(output_dir, name) for name in ("per_case.csv", "table.csv", "dice.png", "table.md")}
    write_csv(out["per_case.csv"], ["network", "fold", "split", "case", "patient", *METRIC_NAMES], per_case)
    table = summary_table(per_case, networks)
    columns = ["source", "network", "split", "cases", *TABLE_COLUMNS]
    write_csv(out["table.csv"], columns, table)
    demo = "configs/demo.json" in profile_files
    synthetic = "synthetic data" if demo or "synthetic" in dataset_dir.lower() else dataset_dir
    dice_figure(per_case, networks, out["dice.png"], f"Per-case Dice, out-of-fold ({synthetic})")
    text = [
        f"# Cross-validation: {', '.join(networks)}, {len(folds)} folds by patient\n",
        f'Data: `{dataset_dir}`. Means of per-case values; "test" = every case scored by the model of the fold'
        f" that held it out, \"train\" = each fold's training cases scored by that fold's model. The paper's rows"
        f" are its own figures (ISLES 2018), not comparable with other data.\n",
        _markdown(table, columns),
    ]
    if {"modified", "classic"} <= set(networks):
        rows = [paired_comparison(per_case, metric) for metric in ("dice", "jaccard")]
        out["comparison.md"] = os.path.join(output_dir, "comparison.md")
        comparison = "## Modified against classic, paired on the same out-of-fold cases\n\n" + _markdown(
            rows, list(rows[0])
        )
        write_atomically(out["comparison.md"], lambda f: f.write(comparison.encode()))
        text.append("\n" + comparison)
    channels, testing = _testing_items(datalist_path, dataset_dir)
    if testing:
        out[TESTING_FILE] = os.path.join(output_dir, TESTING_FILE)
        listing = json.dumps({"channels": channels, "testing": testing}, indent=2) + "\n"
        write_atomically(out[TESTING_FILE], lambda f: f.write(listing.encode()))
    else:
        text.append("\nThe datalist has no testing cases: no fold ensemble (every case trained one of its models).\n")
    for network in networks if testing else []:
        name = "ensemble.json" if network == networks[0] else f"ensemble_{network}.json"
        out[name] = os.path.join(output_dir, name)
        override = _ensemble_override(output_dir, network, folds, out[TESTING_FILE], profile_files, overrides)
        write_atomically(out[name], lambda f, o=override: f.write((json.dumps(o, indent=4) + "\n").encode()))
        configs = ["configs/inference.json"] + (["configs/classic_unet.json"] if network == "classic" else [])
        text.append(
            f"\nFold ensemble of {network} on the {len(testing)} testing cases of the datalist ({TESTING_FILE}):\n\n"
            f'    python -m monai.bundle run --config_file "{configs + [out[name]]}"\n'
        )
    write_atomically(out["table.md"], lambda f: f.write("\n".join(text).encode()))  # last: it marks OUT as finished
    print_table(f"{out['table.md']}:", columns, table)
    return out

"""What a run prints and the tables it leaves: CSV files written whole, their summary statistics, aligned columns on
the terminal; and a training run ends with where its best model and logs are."""

from __future__ import annotations

import csv
import io
import math
import os

import numpy as np
from scripts.safe_files import write_atomically

__all__ = ["print_table", "print_training_summary", "read_csv", "summarize", "write_csv"]


def print_training_summary(evaluator, ckpt_dir, log_dir) -> None:
    """Print the last validation's metrics, the best key metric and its epoch, and where the best model and the
    TensorBoard logs are; nothing when no validation ran.

    Args:
        evaluator: the validation engine (MONAI ``Evaluator``).
        ckpt_dir: the folder of ``model.pt``.
        log_dir: the TensorBoard log folder.
    """
    state = evaluator.state
    if state.best_metric_epoch > 0:
        print(
            "validation",
            state.metrics,
            "| best",
            state.key_metric_name,
            round(state.best_metric, 4),
            "at epoch",
            state.best_metric_epoch,
            "| best model:",
            os.path.abspath(os.path.join(ckpt_dir, "model.pt")),
            "| TensorBoard logs:",
            os.path.abspath(log_dir),
        )


# the statistics of the summary table, as MONAI's MetricsSaver names them, over the cases where a metric is defined
SUMMARY_STATISTICS = {
    "mean": np.mean,
    "median": np.median,
    "max": np.max,
    "min": np.min,
    "90percentile": lambda values: np.percentile(values, 90),
    "std": np.std,
}


def summarize(rows, columns) -> list:
    """One row per column of ``rows`` (dicts of numbers, or of their text as read from a CSV): its ``mean``,
    ``median``, ``max``, ``min``, ``90percentile`` and ``std`` over the defined values (NaN left out; all NaN when
    none is) and ``notnans``, how many they are.

    Args:
        rows: the per-case rows.
        columns: which of their columns to summarize, in order.
    """
    summary = []
    for column in columns:
        values = np.array([float(row[column]) for row in rows], dtype=np.float64)
        defined = values[~np.isnan(values)]
        stats = {name: float(f(defined)) if defined.size else math.nan for name, f in SUMMARY_STATISTICS.items()}
        summary.append({"metric": column, **stats, "notnans": int(defined.size)})
    return summary


def read_csv(path):
    """The rows of a CSV file as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path, header, rows):
    """Write ``rows`` (dicts) under ``header`` to ``path``, atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, lambda f: f.write(text.getvalue().encode()))


def print_table(title, header, rows):
    """Print ``rows`` (dicts) as aligned columns under ``title``."""
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print(title)
    for line in [dict(zip(header, header)), *rows]:
        print("  ".join(str(line[h]).ljust(w) for h, w in zip(header, widths)))

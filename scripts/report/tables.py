"""What a run prints and the tables it leaves: MONAI's ``MetricsSaver`` writes one file per metric, a reader wants one
row per case; and a training run ends with where its best model and logs are."""

from __future__ import annotations

import csv
import io
import os

from scripts.safe_files import write_atomically

__all__ = ["print_table", "print_training_summary", "read_csv", "write_csv", "write_report"]


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


def write_report(details_dir, metrics, per_case_csv, summary_csv=None, prefix="", title=None):
    """Join the per-metric files ``MetricsSaver`` wrote to ``details_dir`` (``<prefix><metric>_raw.csv``, and with
    summary_ops ``<prefix><metric>_summary.csv``) into ``per_case_csv`` (``case`` plus one column per metric, values as
    MetricsSaver wrote them) and ``summary_csv`` (one row per metric: the summary columns); print the summary (under
    ``title``), or without one the per-case table. Returns the per-case rows."""
    columns = {m: read_csv(os.path.join(details_dir, f"{prefix}{m}_raw.csv")) for m in metrics}
    cases = [row["filename"] for row in columns[metrics[0]]]
    for metric, rows in columns.items():
        if [row["filename"] for row in rows] != cases:
            raise ValueError(f"{details_dir}: {prefix}{metric}_raw.csv lists other cases than {metrics[0]}_raw.csv")
    table = [{"case": case, **{m: columns[m][i]["class0"] for m in metrics}} for i, case in enumerate(cases)]
    write_csv(per_case_csv, ["case", *metrics], table)
    if summary_csv is None:
        print_table(f"{per_case_csv}:", ["case", *metrics], table)
        return table
    summary = []
    for metric in metrics:
        path = os.path.join(details_dir, f"{prefix}{metric}_summary.csv")
        (row,) = [r for r in read_csv(path) if r["class"] == "class0"]
        summary.append({"metric": metric, **{k: v for k, v in row.items() if k != "class"}})
    header = ["metric", *(k for k in summary[0] if k != "metric")]
    write_csv(summary_csv, header, summary)
    where = f"{len(cases)} cases, per-case values in {per_case_csv}, summary in {summary_csv}:"
    print_table(f"{title}, {where}" if title else where, header, summary)
    return table


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

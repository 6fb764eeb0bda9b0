"""A training run's learning curves beside its checkpoints: ``curves.csv`` and ``curves.png``.

MONAI logs the training loss and the validation metrics to the console and to TensorBoard, but leaves no file a reader
can open without TensorBoard, and nothing that survives a resume as one series. ``LearningCurves`` keeps the mean
training loss of every epoch and the validation metrics of every validation, writes both files whole after every
epoch, and is part of the training checkpoint (``state_dict``), so a resumed run continues the same curves.
"""

from __future__ import annotations

import math

from ignite.engine import Engine, Events
from monai.handlers import from_engine
from PIL import Image, ImageDraw
from scripts.report.tables import write_csv
from scripts.safe_files import rank, write_atomically

__all__ = ["LearningCurves", "plot_curves"]

CSV_NAME, PNG_NAME = "curves.csv", "curves.png"
LOSS = "train_loss"
COLOURS = ((200, 60, 40), (40, 90, 180), (40, 150, 70), (150, 80, 170), (120, 120, 120))


class LearningCurves:
    """Ignite handler: the training loss (mean over each epoch's iterations) and the validator's metrics at each
    validation, as one row per epoch of ``curves.csv`` and two panels of ``curves.png`` in ``output_dir``.

    Attach it to the trainer after the validation handler, so that an epoch's validation is in its row.

    Args:
        validator: the validation engine, whose ``state.metrics`` are read when it completes.
        output_dir: where the two files go (the checkpoint folder).
        metric_names: the validator's metrics to record; None records all of them.
        loss_transform: gives the loss from the trainer's ``state.output``.
    """

    def __init__(self, validator: Engine, output_dir: str, metric_names=None, loss_transform=None):
        self.validator, self.output_dir = validator, output_dir
        self.metric_names = None if metric_names is None else list(metric_names)
        self.loss_transform = from_engine(["loss"], first=True) if loss_transform is None else loss_transform
        self.rows: list[dict] = []
        self._loss_sum, self._loss_count, self._validation = 0.0, 0, {}

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        self.validator.add_event_handler(Events.COMPLETED, self._validation_completed)

    def _epoch_started(self, trainer: Engine) -> None:
        self._loss_sum, self._loss_count, self._validation = 0.0, 0, {}

    def _iteration_completed(self, trainer: Engine) -> None:
        loss = self.loss_transform(trainer.state.output)
        self._loss_sum += float(loss[0] if isinstance(loss, (list, tuple)) else loss)
        self._loss_count += 1

    def _validation_completed(self, validator: Engine) -> None:
        names = self.metric_names or list(validator.state.metrics)
        self._validation = {name: float(validator.state.metrics[name]) for name in names}

    def _epoch_completed(self, trainer: Engine) -> None:
        row = {"epoch": trainer.state.epoch, LOSS: self._loss_sum / max(self._loss_count, 1), **self._validation}
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        self.write()

    def write(self) -> None:
        """Write ``curves.csv`` and ``curves.png``, each whole (rank 0 of a distributed run)."""
        if rank() != 0:
            return
        columns = ["epoch", LOSS, *dict.fromkeys(k for r in self.rows for k in r if k not in ("epoch", LOSS))]
        rows = [{c: _cell(r.get(c)) for c in columns} for r in self.rows]
        write_csv(f"{self.output_dir}/{CSV_NAME}", columns, rows)
        image = plot_curves(self.rows, columns[2:])
        write_atomically(f"{self.output_dir}/{PNG_NAME}", lambda f: image.save(f, format="PNG"))

    def state_dict(self) -> dict:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [dict(r) for r in state["rows"]]


def _cell(value):
    return "" if value is None else round(value, 6) if isinstance(value, float) else value


def plot_curves(rows, metric_names, width=720, height=300) -> Image.Image:
    """Two panels side by side: the training loss per epoch, and each validation metric per validation.

    Args:
        rows: ``{"epoch", "train_loss", <metric>: value, ...}`` per epoch; a metric is missing where there was no
            validation.
        metric_names: the metrics of the right panel, in legend order.
        width: the image width in pixels.
        height: the image height in pixels.
    """
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    panel = width // 2
    epochs = [r["epoch"] for r in rows] or [1]
    losses = [r[LOSS] for r in rows if r.get(LOSS) is not None and math.isfinite(r[LOSS])]
    top = max(losses, default=1.0) * 1.05 or 1.0
    series = [("training loss", [(r["epoch"], r[LOSS]) for r in rows], COLOURS[0])]
    _panel(draw, (0, 0, panel, height), series, max(epochs), (0.0, top))
    metrics = [
        (name, [(r["epoch"], r[name]) for r in rows if r.get(name) is not None], COLOURS[(i + 1) % len(COLOURS)])
        for i, name in enumerate(metric_names)
    ]
    _panel(draw, (panel, 0, width, height), metrics, max(epochs), (0.0, 1.0))
    return image


def _panel(draw, box, series, last_epoch, y_range):
    """One panel: axes with ticks, a line and dots per series, and a legend."""
    left, top, right, bottom = box[0] + 48, box[1] + 12 + 14 * len(series), box[2] - 12, box[3] - 30
    lo, hi = y_range

    def xy(epoch, value):
        x = left + (right - left) * (epoch - 1) / max(last_epoch - 1, 1)
        return x, bottom - (bottom - top) * (min(max(value, lo), hi) - lo) / (hi - lo)

    for k in range(5):
        value = lo + (hi - lo) * k / 4
        y = xy(1, value)[1]
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        draw.text((box[0] + 4, y - 6), f"{value:.2f}", fill="black")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    draw.text(((left + right) // 2 - 16, bottom + 10), f"epoch (1-{last_epoch})", fill="black")
    for index, (name, points, colour) in enumerate(series):
        draw.text((left + 8, box[1] + 4 + 14 * index), name, fill=colour)
        pixels = [xy(e, v) for e, v in points if v is not None and math.isfinite(v)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for x, y in pixels:
            draw.ellipse([(x - 2, y - 2), (x + 2, y + 2)], fill=colour)

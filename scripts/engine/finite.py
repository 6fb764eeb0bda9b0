"""Stop a training whose loss or weights turn NaN or Inf before they reach a saved model.

Ignite's ``TerminateOnNan`` ends training quietly (the run exits 0 and its last checkpoint stands). The inputs and
the predictions are checked by ``scripts.data.transforms.RequireFinited``.
"""

from __future__ import annotations

import math

import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine

__all__ = ["StopOnNonFinite"]


class StopOnNonFinite:
    """Ignite handler: end training with ``FloatingPointError`` at the first non-finite loss, naming the epoch and
    the iteration, and check the weights at each epoch's end, before any checkpoint or validation handler that was
    attached after it saves them.

    Args:
        network: the trained network, whose parameters are checked at each epoch's end; None skips that check.
        output_transform: gives the loss from ``engine.state.output``; default the first item's ``"loss"``.
    """

    def __init__(self, network: torch.nn.Module | None = None, output_transform=None):
        self.network = network
        self.output_transform = from_engine(["loss"], first=True) if output_transform is None else output_transform

    def attach(self, engine: Engine) -> None:
        """Check the loss after every iteration and the weights after every epoch of ``engine``."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.check_loss)
        if self.network is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.check_weights)

    def check_loss(self, engine: Engine) -> None:
        loss = self.output_transform(engine.state.output)
        loss = float(loss[0] if isinstance(loss, (list, tuple)) else loss)
        if not math.isfinite(loss):
            state = engine.state
            in_epoch = (state.iteration - 1) % state.epoch_length + 1
            raise FloatingPointError(
                f"training loss is {loss} at epoch {state.epoch}, iteration {state.iteration} ({in_epoch} of"
                f" {state.epoch_length} in the epoch): training stopped, no checkpoint of these weights was written."
                " Check the inputs (python -m scripts.tools.prepare_datalist ... --check) or lower the learning rate"
            )

    def check_weights(self, engine: Engine) -> None:
        bad = [name for name, p in self.network.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise FloatingPointError(
                f"non-finite weights after epoch {engine.state.epoch} (in {', '.join(bad[:5])}):"
                " training stopped before they were saved"
            )

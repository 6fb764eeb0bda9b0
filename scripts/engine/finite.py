"""Stop NaN and Inf before they reach a saved model, a mask or a reported volume.

Ignite's ``TerminateOnNan`` ends training quietly (the run exits 0 and its last checkpoint stands), and MONAI has no
transform that refuses non-finite tensors; a NaN input gives an empty mask and 0 mL without a word.
"""

from __future__ import annotations

import math

import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.handlers import from_engine
from monai.transforms import MapTransform

__all__ = ["RequireFinited", "StopOnNonFinite"]


class RequireFinited(MapTransform):
    """Raise ``ValueError`` naming the case and the channels when ``keys`` hold NaN or Inf.

    Args:
        keys: keys of the (channel-first) tensors to check.
        channel_names: a name per channel for the message, e.g. the input maps; default the channel index.
        what: what the tensor is, for the message (``"input"``, ``"prediction"``).
        allow_missing_keys: do not raise for absent keys.
    """

    def __init__(self, keys: KeysCollection, channel_names=None, what: str = "input", allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.channel_names = None if channel_names is None else list(channel_names)
        self.what = what

    def __call__(self, data):
        for key in self.key_iterator(data):
            values = data[key]
            finite = torch.isfinite(torch.as_tensor(values)).flatten(1).all(1)
            if not finite.all():
                bad = [int(c) for c in torch.nonzero(~finite).flatten()]
                names = [self.channel_names[c] if self.channel_names else str(c) for c in bad]
                source = getattr(values, "meta", {}).get("filename_or_obj", "?")
                raise ValueError(
                    f"{data.get('case', '?')}: the {self.what} '{key}' holds NaN or Inf in channel(s)"
                    f" {', '.join(names)} (from {source}); nothing was written for this case"
                )
        return data


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

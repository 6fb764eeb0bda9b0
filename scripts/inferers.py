"""Test-time mirroring (nnU-Net's flip test-time augmentation) as a MONAI inferer.

MONAI's ``TestTimeAugmentation`` draws random transforms on dictionaries to estimate uncertainty; there is no
inferer that averages the fixed set of mirror images, which is what nnU-Net does at test time.
"""

from __future__ import annotations

import itertools
import math

import torch
from monai.inferers import Inferer, SimpleInferer

__all__ = ["FlipInferer", "test_time_inferer"]


def test_time_inferer(tta_flips=False) -> Inferer:
    """The inferer of evaluation and inference: ``FlipInferer()`` with ``tta_flips`` (a bool, or true/false as typed
    on the command line), else MONAI's ``SimpleInferer()``."""
    from scripts.cli import as_bool

    return FlipInferer() if as_bool(tta_flips, "tta_flips") else SimpleInferer()


class FlipInferer(Inferer):
    """Mean of the softmax probabilities over the input and its mirror images along every combination of
    ``spatial_axes`` (0, 1, 2: x, y, z; 8 passes for all three), each prediction flipped back before averaging.

    Returns the log of that mean, so that the usual postprocessing (``Activationsd(softmax=True)``) turns it into
    exactly the mean probability, and ensembles (mean of probabilities) compose with it.

    Args:
        spatial_axes: spatial axes to mirror along (the training augmentation flips all three).
        inferer: the inferer that runs each pass, default ``SimpleInferer()``.
    """

    def __init__(self, spatial_axes=(0, 1, 2), inferer: Inferer | None = None):
        super().__init__()
        axes = [int(a) for a in spatial_axes]
        self.flips = [list(c) for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
        self.inferer = SimpleInferer() if inferer is None else inferer

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        log_probs = []
        for axes in self.flips:
            dims = [a + 2 for a in axes]  # inputs are (batch, channel, x, y, z)
            logits = self.inferer(torch.flip(inputs, dims), network, *args, **kwargs)
            log_probs.append(torch.log_softmax(torch.flip(logits, dims), dim=1))
        return torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(self.flips))

"""The modified 3D UNet of Omarov et al. 2022, built from MONAI's ``Convolution`` block.

The paper keeps the classic UNet topology (two 3x3x3 convolutions per level, 2x2x2 max-pooling, a 2x2x2
up-convolution halving the channels, concatenation with the skip, a 1x1x1 head; 23 convolutional layers at
five levels) and modifies it with dilated convolutions, LeakyReLU, instance normalisation and spatial dropout.
It does not say which convolutions are dilated nor where the dropout sits; the choices are documented on
:class:`ModifiedUNet` and are constructor arguments so a config can change them.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from scripts.flags import as_bool

__all__ = ["ConvBlock", "UpBlock", "ModifiedUNet", "check_spatial_size", "instance_norm_as_group_norm", "to_device"]


def _as_int(value, what: str) -> int:
    """``value`` as a plain int (numpy ints accepted), or ValueError; bools and floats are refused."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an int, got {value!r}") from None


def _divisibility_problems(spatial_size: list[int], divisor: int) -> list[str]:
    """Descriptions of the dimensions that are not positive multiples of ``divisor`` (empty when all are).

    Written as a loop so that TorchScript can compile it with the network's ``forward``.
    """
    problems: list[str] = []
    for dim, size in enumerate(spatial_size):
        if size <= 0 or size % divisor != 0:
            problems.append(f"{size} in dimension {dim}")
    return problems


def check_spatial_size(spatial_size: Sequence[int], levels: int = 5) -> tuple[int, ...]:
    """Check at start-up that a UNet of ``levels`` levels can take patches of ``spatial_size``.

    Every dimension is halved ``levels - 1`` times by the encoder and must come back to the same size in the
    decoder, so it must be a positive multiple of ``2 ** (levels - 1)``. Failing here, with the numbers, beats a
    concatenation shape mismatch deep inside the first forward pass.

    Returns:
        ``spatial_size`` as a tuple of ints.

    Raises:
        ValueError: naming the spatial size, the required divisor and the offending dimensions.
    """
    levels = _as_int(levels, "levels")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    divisor = 2 ** (levels - 1)
    if isinstance(spatial_size, (str, bytes)) or not isinstance(spatial_size, Sequence) or len(spatial_size) == 0:
        raise ValueError(f"spatial_size must be a non-empty sequence of ints, got {spatial_size!r}")
    sizes = tuple(_as_int(s, f"spatial_size {list(spatial_size)} entry") for s in spatial_size)
    problems = _divisibility_problems(list(sizes), divisor)
    if problems:
        raise ValueError(
            f"spatial_size {list(sizes)} must be positive and divisible by {divisor} in every dimension "
            f"for a {levels}-level UNet; got {', '.join(problems)}"
        )
    return sizes


def instance_norm_as_group_norm(norm: str | tuple, channels: int) -> str | tuple:
    """``norm`` for ``channels`` channels, with instance norm expressed as GroupNorm of one group per channel.

    Both normalise each channel of each sample over its spatial voxels and hold the same ``weight``/``bias``
    parameters, so the maths and the checkpoints are the same. The difference is speed: PyTorch's
    ``InstanceNorm3d`` returns a contiguous tensor for a ``channels_last_3d`` input, so every convolution after
    it converts the memory format back; ``GroupNorm`` keeps it. On a 2-core CPU this took the demo-size training
    step (``benchmarks/run.py``'s step, 5 timed calls) from 175 ms to 137 ms. Instance norm with running
    statistics, and any other norm, is returned unchanged.
    """
    name, args = (norm, {}) if isinstance(norm, str) else (norm[0], dict(norm[1]) if len(norm) > 1 else {})
    if not isinstance(name, str) or name.lower() != "instance" or not set(args) <= {"affine", "eps"}:
        return norm
    return ("group", {"num_groups": channels, "affine": args.get("affine", False), "eps": args.get("eps", 1e-5)})


def to_device(network: nn.Module, device, channels_last=True) -> nn.Module:
    """``network`` moved to ``device``, its weights in ``channels_last_3d`` memory format when ``channels_last``.

    Args:
        network: the network (a 3D one for ``channels_last``).
        device: a ``torch.device`` or its name (``"cpu"``, ``"cuda:0"``, as typed on the command line).
        channels_last: a bool, or true/false as typed on the command line.

    Returns:
        The network, moved in place.
    """
    layout = torch.channels_last_3d if as_bool(channels_last, "channels_last") else torch.contiguous_format
    return network.to(torch.device(device), memory_format=layout)


class ConvBlock(nn.Sequential):
    """Two 3x3x3 convolutions, each conv + norm + (dropout) + act; the unit of every encoder and decoder level.

    Only the second convolution is dilated (padding = dilation keeps the size), so the first one still sees
    the dense neighbourhood and the pair has no gridding holes. ``dropout`` is channel-wise (``Dropout3d`` in
    3D: whole feature maps are dropped, the paper's "spatial dropout"); 0 adds no dropout layer at all.
    Instance norm is built as GroupNorm, see :func:`instance_norm_as_group_norm`.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        act: str | tuple,
        norm: str | tuple,
        bias: bool = True,
        dilation: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        drop = dropout if dropout else None  # None: Convolution builds no dropout layer
        norm = instance_norm_as_group_norm(norm, out_channels)
        common = dict(act=act, norm=norm, bias=bias, dropout=drop, dropout_dim=spatial_dims, kernel_size=3)
        self.add_module("conv_0", Convolution(spatial_dims, in_channels, out_channels, padding=1, **common))
        self.add_module(
            "conv_1",
            Convolution(spatial_dims, out_channels, out_channels, dilation=dilation, padding=dilation, **common),
        )


class UpBlock(nn.Module):
    """Decoder level: 2x2x2 stride-2 transposed conv halving the channels, concat with the skip, a ConvBlock.

    The up-convolution is a plain (linear) transposed convolution, as in the original UNet and MONAI's
    BasicUNet "deconv": the ConvBlock right after it normalises and activates the concatenated features.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        act: str | tuple,
        norm: str | tuple,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.up = Convolution(
            spatial_dims,
            in_channels,
            out_channels,
            strides=2,
            kernel_size=2,
            padding=0,
            output_padding=0,
            bias=bias,
            conv_only=True,
            is_transposed=True,
        )
        self.convs = ConvBlock(spatial_dims, 2 * out_channels, out_channels, act, norm, bias=bias, dropout=dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([skip, self.up(x)], dim=1))


class ModifiedUNet(nn.Module):
    """Modified 3D UNet of Omarov et al. 2022 for ischemic-stroke core segmentation from CT perfusion.

    Topology: ``len(features)`` levels. Encoder level ``i`` is a :class:`ConvBlock` with ``features[i]``
    channels, followed by 2x2x2 max-pooling except at the deepest level (the bottleneck). Each decoder level is
    an :class:`UpBlock` (plain 2x2x2 stride-2 transposed conv to ``features[i]`` channels, no norm/activation,
    concatenation with the encoder skip, a ConvBlock). A 1x1x1 conv maps ``features[0]`` to ``out_channels``
    logits (no softmax; the loss or post-processing applies it). At the paper's defaults that is
    5 x 2 + 4 x (1 + 2) + 1 = 23 convolutional layers.

    Choices the paper leaves open (all configurable):

    - Dilation: ``dilations[i]`` is the dilation of the *second* conv of encoder level ``i``; default
      ``(1, 1, 2, 2, 2)`` dilates the three deepest levels (1/4, 1/8, 1/16 resolution) to widen their context
      without more pooling. Decoder convs are not dilated.
    - Spatial dropout: ``Dropout3d(p=dropout)`` (whole feature maps) after the norm of both convs of every
      ConvBlock of the levels in ``dropout_levels`` (encoder and decoder block of that level; negative indices
      count from the bottleneck). Default ``(4,)`` is the bottleneck only, where the original UNet put its
      dropout. ``dropout=0`` or an empty ``dropout_levels`` disables it.
    - ``act`` and ``norm`` go straight to MONAI's ``Convolution`` (defaults LeakyReLU 0.01 and affine
      InstanceNorm, the paper's choices, built as one-group-per-channel GroupNorm for speed, see
      :func:`instance_norm_as_group_norm`; e.g. ``"relu"`` and ``"batch"`` give the classic UNet).
      ``bias`` applies to all convs except the head, which always has a bias.

    Input ``[B, in_channels, *spatial]`` with every spatial size divisible by ``2 ** (len(features) - 1)``
    (16 at five levels); see :func:`check_spatial_size`. In training mode instance norm also needs more than one
    voxel per bottleneck feature map, i.e. a spatial size larger than the divisor in at least one dimension
    (the paper's 128x128x32 gives 8x8x2).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 5,
        out_channels: int = 2,
        features: Sequence[int] = (64, 128, 256, 512, 1024),
        dilations: Sequence[int] = (1, 1, 2, 2, 2),
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        dropout: float = 0.5,
        dropout_levels: Sequence[int] = (4,),
        bias: bool = True,
    ):
        super().__init__()
        spatial_dims = _as_int(spatial_dims, "spatial_dims")
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        in_channels = _as_int(in_channels, "in_channels")
        out_channels = _as_int(out_channels, "out_channels")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        features = tuple(_as_int(f, "features entry") for f in features)
        if len(features) < 2 or any(f < 1 for f in features):
            raise ValueError(f"features must hold at least 2 positive ints (one per level), got {list(features)}")
        levels = len(features)
        dilations = tuple(_as_int(d, "dilations entry") for d in dilations)
        if len(dilations) != levels:
            raise ValueError(
                f"dilations must have one entry per level: len(dilations)={len(dilations)} != "
                f"len(features)={levels} (dilations={list(dilations)}, features={list(features)})"
            )
        if any(d < 1 for d in dilations):
            raise ValueError(f"dilations must be positive ints, got {list(dilations)}")
        dropout = float(dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        drop_levels = set()
        for lvl in dropout_levels:
            lvl = _as_int(lvl, "dropout_levels entry")
            if not -levels <= lvl < levels:
                raise ValueError(f"dropout_levels entry {lvl} is out of range for a {levels}-level UNet")
            drop_levels.add(lvl % levels)

        self.spatial_dims = spatial_dims
        self.levels = levels
        self.divisor = 2 ** (levels - 1)
        self.features = features
        self.dilations = dilations
        self.dropout_levels = tuple(sorted(drop_levels))

        def level_dropout(i: int) -> float:
            return dropout if i in drop_levels else 0.0

        self.pool = Pool["MAX", spatial_dims](kernel_size=2)
        self.encoder = nn.ModuleList(
            ConvBlock(
                spatial_dims,
                in_channels if i == 0 else features[i - 1],
                features[i],
                act,
                norm,
                bias=bias,
                dilation=dilations[i],
                dropout=level_dropout(i),
            )
            for i in range(levels)
        )
        # decoder[j] brings level levels-1-j up to level levels-2-j (deepest first, as forward uses it)
        self.decoder = nn.ModuleList(
            UpBlock(spatial_dims, features[i + 1], features[i], act, norm, bias=bias, dropout=level_dropout(i))
            for i in reversed(range(levels - 1))
        )
        self.head = Convolution(spatial_dims, features[0], out_channels, kernel_size=1, conv_only=True, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"input must be [B, C, *spatial] with {self.spatial_dims} spatial dims, got shape {list(x.shape)}"
            )
        # eager and TorchScript (scripted) calls check the size; under torch.jit.trace / ONNX export the sizes are
        # traced values, and the exported graph keeps no Python check
        if not torch.jit.is_tracing():
            spatial = list(x.shape[2:])
            problems = _divisibility_problems(spatial, self.divisor)
            if len(problems) > 0:
                raise ValueError(
                    f"input shape {list(x.shape)}: spatial size {spatial} must be divisible by {self.divisor} in "
                    f"every dimension for a {self.levels}-level UNet; got {', '.join(problems)}"
                )

        skips = []
        for i, block in enumerate(self.encoder):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself, not a skip
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.head(x)

"""Unit tests of scripts/engine/networks.py: topology, configurable choices, shape checks. Tiny nets, CPU, fast."""

import warnings

import pytest
import torch
import torch.nn as nn
from monai.bundle import ConfigParser
from scripts.engine.networks import ConvBlock, ModifiedUNet, UpBlock, check_spatial_size, instance_norm_as_group_norm

TINY = (2, 4, 8, 16, 32)


def convs(module):
    """All convolutional layers (regular and transposed) in module order."""
    return [m for m in module.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]


def count(module, kind):
    return sum(isinstance(m, kind) for m in module.modules())


def instance_norms(module):
    """The instance norms of ``module``: GroupNorms with one group per channel (see instance_norm_as_group_norm)."""
    return [m for m in module.modules() if isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_paper_defaults_have_23_conv_layers():
    net = ModifiedUNet()
    layers = convs(net)
    assert len(layers) == 23
    assert sum(isinstance(m, nn.ConvTranspose3d) for m in layers) == 4
    assert layers[0].in_channels == 5 and layers[0].out_channels == 64
    assert max(m.out_channels for m in layers) == 1024
    head = net.head.conv
    assert isinstance(head, nn.Conv3d) and head.kernel_size == (1, 1, 1)
    assert (head.in_channels, head.out_channels) == (64, 2)
    for up in net.decoder:
        assert up.up.conv.kernel_size == (2, 2, 2) and up.up.conv.stride == (2, 2, 2)
        assert up.up.conv.out_channels * 2 == up.up.conv.in_channels


def test_paper_defaults_layers():
    net = ModifiedUNet()
    assert count(net, nn.LeakyReLU) == 18  # every 3x3x3 conv, none after up-convs or head
    assert all(m.negative_slope == 0.01 for m in net.modules() if isinstance(m, nn.LeakyReLU))
    assert len(instance_norms(net)) == count(net, nn.GroupNorm) == 18
    assert all(m.affine for m in instance_norms(net))
    assert count(net, nn.ReLU) == count(net, nn.BatchNorm3d) == 0
    assert count(net, nn.MaxPool3d) == 1  # one stateless pool, applied between levels
    # default dropout: bottleneck only, two Dropout3d(0.5)
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout3d)]
    assert len(drops) == 2 and all(d.p == 0.5 for d in drops)
    assert count(net.encoder[4], nn.Dropout3d) == 2


@pytest.mark.parametrize(
    "features, shape",
    [
        (TINY, (1, 5, 128, 128, 32)),  # the paper's input size
        (TINY, (2, 5, 16, 32, 48)),
        ((3, 6, 12), (2, 5, 8, 4, 12)),
        ((4, 8), (1, 5, 6, 2, 4)),
    ],
)
def test_output_shape(features, shape):
    net = ModifiedUNet(features=features, dilations=[1] * (len(features) - 1) + [2], dropout_levels=[-1])
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(*shape))
    assert out.shape == (shape[0], 2, *shape[2:])


def test_other_channel_counts_and_2d():
    net = ModifiedUNet(in_channels=1, out_channels=3, features=(4, 8, 16), dilations=(1, 2, 2), dropout_levels=())
    assert net(torch.randn(1, 1, 8, 8, 8)).shape == (1, 3, 8, 8, 8)
    net2d = ModifiedUNet(spatial_dims=2, features=(4, 8, 16), dilations=(1, 2, 2), dropout_levels=[2])
    assert count(net2d, nn.Dropout2d) == 2
    assert net2d(torch.randn(2, 5, 16, 12)).shape == (2, 2, 16, 12)


def test_dilation_placement():
    net = ModifiedUNet(features=TINY)  # default dilations (1, 1, 2, 2, 2)
    for block, d in zip(net.encoder, (1, 1, 2, 2, 2)):
        assert block.conv_0.conv.dilation == (1, 1, 1)
        assert block.conv_1.conv.dilation == (d, d, d)
        assert block.conv_1.conv.padding == (d, d, d)
    for up in net.decoder:
        assert all(m.dilation == (1, 1, 1) for m in convs(up))
    assert net.head.conv.dilation == (1, 1, 1)
    dilated = [m for m in convs(net) if m.dilation != (1, 1, 1)]
    assert len(dilated) == 3

    custom = ModifiedUNet(features=TINY, dilations=(3, 1, 1, 1, 4))
    assert [b.conv_1.conv.dilation[0] for b in custom.encoder] == [3, 1, 1, 1, 4]
    assert len([m for m in convs(custom) if m.dilation != (1, 1, 1)]) == 2
    assert custom(torch.randn(1, 5, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


def test_act_and_norm_are_configurable():
    net = ModifiedUNet(features=TINY, act="relu", norm="batch")
    assert count(net, nn.ReLU) == count(net, nn.BatchNorm3d) == 18
    assert count(net, nn.LeakyReLU) == count(net, nn.GroupNorm) == count(net, nn.InstanceNorm3d) == 0
    assert not any(m.bias is not None for m in convs(ModifiedUNet(features=TINY, bias=False))[:-1])


def test_dropout_placement():
    net = ModifiedUNet(features=TINY, dropout=0.3, dropout_levels=(1, 4))
    for i, block in enumerate(net.encoder):
        assert count(block, nn.Dropout3d) == (2 if i in (1, 4) else 0)
    # decoder[j] is level 3 - j; level 1 gets dropout in its decoder block too
    for j, up in enumerate(net.decoder):
        assert count(up, nn.Dropout3d) == (2 if 3 - j == 1 else 0)
    assert all(m.p == 0.3 for m in net.modules() if isinstance(m, nn.Dropout3d))
    assert count(net, nn.Dropout) == count(net, nn.Dropout2d) == 0
    assert count(ModifiedUNet(features=TINY, dropout=0), nn.Dropout3d) == 0
    assert count(ModifiedUNet(features=TINY, dropout_levels=[]), nn.Dropout3d) == 0


def test_dropout_train_vs_eval():
    net = ModifiedUNet(features=TINY, dropout_levels=(0, 4))
    x = torch.randn(1, 5, 32, 16, 16)
    net.train()
    with torch.no_grad():
        a, b = net(x), net(x)
    assert not torch.allclose(a, b)
    net.eval()
    with torch.no_grad():
        c, d = net(x), net(x)
    assert torch.equal(c, d)
    no_drop = ModifiedUNet(features=TINY, dropout=0).train()
    with torch.no_grad():
        assert torch.equal(no_drop(x), no_drop(x))


def test_forward_rejects_indivisible_size():
    net = ModifiedUNet(features=TINY)
    with pytest.raises(ValueError, match=r"\[1, 5, 128, 128, 30\].*divisible by 16.*30 in dimension 2"):
        net(torch.randn(1, 5, 128, 128, 30))
    with pytest.raises(ValueError, match="spatial dims"):
        net(torch.randn(5, 16, 16, 16))
    # fewer levels -> smaller divisor
    assert ModifiedUNet(features=(2, 4, 8), dilations=(1, 1, 2), dropout_levels=[2])(
        torch.randn(1, 5, 4, 8, 12)
    ).shape == (1, 2, 4, 8, 12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dilations=(1, 1, 2)), r"len\(dilations\)=3 != len\(features\)=5"),
        (dict(features=(4, 8, 16), dilations=(1, 1, 2, 2, 2), dropout_levels=()), "len\\(dilations\\)=5"),
        (dict(features=(4, 0, 16), dilations=(1, 1, 2), dropout_levels=()), "positive"),
        (dict(features=(4, 8.5, 16), dilations=(1, 1, 2), dropout_levels=()), "int"),
        (dict(features=(4,), dilations=(1,), dropout_levels=()), "at least 2"),
        (dict(features=(4, 8, 16), dilations=(1, 1, 2)), "dropout_levels entry 4 is out of range"),
        (dict(features=TINY, dilations=(1, 1, 0, 2, 2)), "positive"),
        (dict(features=TINY, dropout=1.0), "dropout"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModifiedUNet(**kwargs)


def test_check_spatial_size():
    assert check_spatial_size([128, 128, 32]) == (128, 128, 32)
    assert check_spatial_size((8, 4), levels=3) == (8, 4)
    with pytest.raises(ValueError, match=r"spatial_size \[128, 128, 30\] .*divisible by 16 .*5-level UNet; got 30"):
        check_spatial_size([128, 128, 30])
    for bad in ([128, 0, 32], [128, -16, 32], [128.0, 128, 32], "128", [True, 16, 16], []):
        with pytest.raises(ValueError, match="spatial_size"):
            check_spatial_size(bad)
    with pytest.raises(ValueError, match="divisible by 4"):
        check_spatial_size([8, 6], levels=3)


def test_gradients_flow():
    net = ModifiedUNet(features=TINY)
    x = torch.randn(2, 5, 32, 16, 16)
    loss = net(x).logsumexp(dim=1).mean()
    loss.backward()
    first = net.encoder[0].conv_0.conv
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())


def test_trace():
    net = ModifiedUNet(features=TINY).eval()
    x = torch.randn(1, 5, 16, 16, 32)
    # torch 2.13 deprecates torch.jit.trace, which the model zoo's export (MONAI's ckpt_export --use_trace,
    # tests/test_export.py) still uses, and torch's instance norm checks its input size as a Python bool while traced
    # (torch/nn/functional.py, a TracerWarning): torch's notices on the export path the zoo requires, not ours to change
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.trace(_method)?` is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean", torch.jit.TracerWarning)
        traced = torch.jit.trace(net, x)
    with torch.no_grad():
        assert torch.allclose(traced(x), net(x), atol=1e-5)


def test_blocks_are_reusable_units():
    block = ConvBlock(3, 5, 4, "relu", "instance", dilation=2, dropout=0.2)
    assert block(torch.randn(1, 5, 8, 8, 8)).shape == (1, 4, 8, 8, 8)
    up = UpBlock(3, 8, 4, "relu", "instance")
    assert up(torch.randn(1, 8, 4, 4, 4), torch.randn(1, 4, 8, 8, 8)).shape == (1, 4, 8, 8, 8)


def test_instance_norm_as_group_norm_is_instance_norm_and_keeps_channels_last():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 8, 12, 6)
    fast = ConvBlock(3, 5, 4, "relu", ("instance", {"affine": True}))
    reference = nn.Sequential(*(nn.Sequential(c.conv, nn.InstanceNorm3d(4, affine=True), nn.ReLU()) for c in fast))
    for conv, ref in zip(fast, reference):  # random affine parameters, shared by both
        nn.init.normal_(conv.adn.N.weight)
        nn.init.normal_(conv.adn.N.bias)
        ref[1].load_state_dict(conv.adn.N.state_dict())
    with torch.no_grad():
        assert torch.allclose(fast(x), reference(x), atol=1e-5)
        fast = fast.to(memory_format=torch.channels_last_3d)
        out = fast(x.to(memory_format=torch.channels_last_3d))
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    # anything but plain (affine) instance norm passes through unchanged
    for norm in ("batch", ("instance", {"track_running_stats": True}), ("group", {"num_groups": 2})):
        assert instance_norm_as_group_norm(norm, 4) == norm
    assert instance_norm_as_group_norm("INSTANCE", 4) == ("group", {"num_groups": 4, "affine": False, "eps": 1e-5})


def test_checkpoints_of_instance_norm3d_models_load_strictly():
    """Weights saved before instance norm was built as GroupNorm (bundle 0.3.0) load into today's network."""
    old = ModifiedUNet(features=TINY, norm=("instance", {"affine": True, "momentum": 0.1}))  # kept as InstanceNorm3d
    assert count(old, nn.InstanceNorm3d) == 18 and count(old, nn.GroupNorm) == 0
    new = ModifiedUNet(features=TINY)
    new.load_state_dict(old.state_dict())  # strict
    x = torch.randn(1, 5, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(new.eval()(x), old.eval()(x), atol=1e-5)


def test_bundle_config_construction():
    parser = ConfigParser(
        {
            "network_def": {
                "_target_": "scripts.engine.networks.ModifiedUNet",
                "features": [4, 8, 16, 32, 64],
                "dilations": [1, 1, 2, 2, 2],
                "act": ["leakyrelu", {"negative_slope": 0.01, "inplace": True}],
                "norm": ["instance", {"affine": True}],
                "dropout": 0.5,
                "dropout_levels": [4],
            },
            "patch": "$scripts.engine.networks.check_spatial_size([128, 128, 32])",
            # "$import scripts.engine.networks" alone binds no name "scripts"; both lines are needed
            "imports": ["$import scripts", "$import scripts.engine.networks"],
        }
    )
    parser.get_parsed_content("imports")  # what a bundle workflow does first
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, ModifiedUNet)
    assert net.features == (4, 8, 16, 32, 64)
    assert len(convs(net)) == 23
    assert parser.get_parsed_content("patch") == (128, 128, 32)
    default = ConfigParser({"net": {"_target_": "scripts.engine.networks.ModifiedUNet"}}).get_parsed_content("net")
    assert len(convs(default)) == 23

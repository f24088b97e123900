"""Narrow tensors placed back at full width: the scatter, and BatchNorm layers that scatter."""

import copy

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from manidp_cli.runtime.channels import ScattersOutput, scatter_channels, scatter_outputs


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("padded", [False, True])
def test_scatter_channels_places_each_channel_and_keeps_the_layout(layout, padded):
    wide = torch.randn(2, 40, 7, 5).contiguous(memory_format=layout)
    narrow = wide[:, :32] if padded else wide  # a tuned entry's output without its zero rows
    channels = torch.randperm(64, generator=torch.Generator().manual_seed(0))[: narrow.shape[1]].sort().values
    out = scatter_channels(narrow, channels, 64)
    expected = torch.zeros(2, 64, 7, 5)
    expected[:, channels] = narrow
    assert torch.equal(out, expected)
    assert out.is_contiguous(memory_format=layout)


def _narrowed(norm: nn.Module, channels: torch.Tensor) -> nn.Module:
    narrow = copy.deepcopy(norm)
    with torch.no_grad():
        for name in ("weight", "bias"):
            setattr(narrow, name, nn.Parameter(getattr(narrow, name)[channels].clone()))
        for name in ("running_mean", "running_var"):
            setattr(narrow, name, getattr(narrow, name)[channels].clone())
    narrow.num_features = len(channels)
    return narrow


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(16), BatchNormAct2d(16)])  # plain, and with a fused ReLU
def test_a_scattering_batchnorm_equals_the_full_one_with_zeroed_channels(norm):
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    norm.eval()
    channels = torch.tensor([1, 4, 5, 11, 15])
    full = copy.deepcopy(norm)
    removed = torch.ones(16, dtype=torch.bool)
    removed[channels] = False
    with torch.no_grad():  # what slimming leaves in a removed channel: a zero mean mask folded in
        full.weight[removed] = 0
        full.bias[removed] = 0
    narrow = _narrowed(norm, channels)
    keys = set(narrow.state_dict())
    scatter_outputs(narrow, channels, 16)
    assert isinstance(narrow, ScattersOutput) and isinstance(narrow, type(norm))
    assert set(narrow.state_dict()) == keys  # the channel places are not a weight: keys as timm's
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        assert torch.allclose(narrow(x[:, channels]), full(x), atol=1e-6)
    assert torch.allclose(copy.deepcopy(narrow)(x[:, channels]), full(x), atol=1e-6)


def test_scatter_outputs_refuses_places_that_do_not_match_the_layer():
    with pytest.raises(ValueError, match="3 channel places for a BatchNorm of 4 features"):
        scatter_outputs(nn.BatchNorm2d(4), torch.tensor([0, 1, 2]), 8)

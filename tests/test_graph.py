import timm
import torch
from torch import nn

from manidp_cli.core.graph import fused_activation, trace_dataflow, zero_preserving


def test_resnet_pairs_stem_and_shortcuts():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    flow = trace_dataflow(model, (3, 32, 32))
    pairs = flow.conv_norm_pairs()
    assert pairs["layer1.0.conv1"] == "layer1.0.bn1"
    assert pairs["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert len(pairs) == 20
    assert flow.stem_convs() == {"conv1"}
    assert flow.shortcut_convs() == {f"layer{i}.0.downsample.0" for i in (2, 3, 4)}


def test_conv_without_norm_and_reused_conv_are_not_paired():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.shared = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            x = self.shared(self.shared(self.a(x)))
            return self.head(self.bn(x))

    flow = trace_dataflow(Reuse(), (3, 8, 8))
    assert flow.conv_names() == ["a", "shared", "shared", "head"]
    assert flow.conv_norm_pairs() == {}


def test_shortcut_detection_ignores_identity_shortcuts():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))

    flow = trace_dataflow(Block(), (4, 8, 8))
    assert flow.shortcut_convs() == set()
    assert flow.conv_norm_pairs() == {"conv1": "bn1", "conv2": "bn2"}


def test_zero_preserving_activations():
    assert zero_preserving(None) and zero_preserving(nn.ReLU()) and zero_preserving(nn.SiLU())
    assert not zero_preserving(nn.Sigmoid()) and not zero_preserving(nn.Hardsigmoid())


def test_fused_activation_is_the_norms_own_act_module():
    from timm.layers import BatchNormAct2d

    assert isinstance(fused_activation(BatchNormAct2d(4)), nn.ReLU)
    assert fused_activation(nn.BatchNorm2d(4)) is None

import os

# Tests never touch the network: timm and huggingface_hub must fail fast instead of downloading.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_activations_positive(model: torch.nn.Module) -> None:
    """Give every BatchNorm a small scale and a positive shift so that no channel is ever entirely
    zero: then every input channel of every convolution is active, whatever the weights."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.constant_(module.weight, 0.01)
            torch.nn.init.constant_(module.bias, 1.0)


def randomize_norms(model: torch.nn.Module) -> None:
    """timm zero-initialises the last BatchNorm of residual branches, which makes a fresh network
    ignore those branches (and hence their gates); random affine parameters bring them back."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)

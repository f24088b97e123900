"""Taylor importance: per-image |dL/dm| of a mask on each channel, measured without a mask."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import randomize_norms

from manidp_cli.core.taylor import taylor_importance
from manidp_cli.errors import ModelError

SHAPE = (1, 32, 32)
NORMS = ["bn1", "layer1.0.bn1", "layer2.1.bn2", "layer4.1.bn2"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1).double().eval()
    randomize_norms(net)
    return net


def _masked_gradients(model, name, x, y) -> torch.Tensor:
    """|dL/dm| per image for a mask m = 1 that really multiplies the module's output (N x C)."""
    rows = []
    for image, label in zip(x, y):
        module = model.get_submodule(name)
        mask = torch.ones(module.num_features, dtype=torch.float64, requires_grad=True)
        handle = module.register_forward_hook(lambda m, a, out: out * mask[None, :, None, None])
        try:
            loss = F.cross_entropy(model(image[None]), label[None])
            (grad,) = torch.autograd.grad(loss, [mask])
        finally:
            handle.remove()
        rows.append(grad.abs())
    return torch.stack(rows)


def test_importance_is_the_mean_over_images_of_a_masks_gradient(model):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, *SHAPE, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=generator)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # two batches of different sizes: the mean is over images, not batches
    importance = taylor_importance(model, NORMS, [(x[:4], y[:4]), (x[4:], y[4:])])
    for name in NORMS:
        expected = _masked_gradients(model, name, x, y).mean(0)
        torch.testing.assert_close(importance[name].double(), expected, rtol=1e-4, atol=1e-9)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())  # gradients are taken, not accumulated
    assert not model.layer1[0].bn1._forward_hooks  # hooks removed


def test_a_channel_the_loss_never_sees_has_no_importance(model):
    x, y = torch.randn(3, *SHAPE, dtype=torch.float64), torch.tensor([0, 1, 2])
    with torch.no_grad():
        saved = model.layer1[0].conv2.weight[:, 5].clone()
        model.layer1[0].conv2.weight[:, 5] = 0.0  # channel 5 of layer1.0.bn1 reaches nothing
    try:
        importance = taylor_importance(model, ["layer1.0.bn1"], [(x, y)])["layer1.0.bn1"]
    finally:
        with torch.no_grad():
            model.layer1[0].conv2.weight[:, 5] = saved
    assert importance[5] == 0 and (importance > 0).sum() > 32


def test_no_images_and_unknown_modules_are_errors(model):
    with pytest.raises(ModelError, match="at least one image"):
        taylor_importance(model, ["bn1"], [])
    with pytest.raises(AttributeError):
        taylor_importance(model, ["no_such_module"], [(torch.randn(1, *SHAPE), torch.tensor([0]))])

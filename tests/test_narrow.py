"""Narrow training: gated convolutions compute only the batch's kept channels, with the masked
model's loss and gradients."""

import copy

import pytest
import timm
import torch
from helpers import randomize_norms
from torch import nn

from manidp_cli.config import GatePolicy
from manidp_cli.core.gating import gates_of, insert_gates
from manidp_cli.core.losses import ManiDPLoss
from manidp_cli.core.narrow import ComputesKeptChannels, NarrowTraining, NormalisesKeptChannels
from manidp_cli.core.recorder import GateRecorder

SHAPE = (3, 32, 32)


def _gated(name: str) -> nn.Module:
    """A float64 gated network whose saliencies vary per image, with thresholds that keep about half
    of each layer's channels: the union over a batch is wider than one image's keep-set, and
    narrower than the layer."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    randomize_norms(model)
    gates = insert_gates(model, GatePolicy(init="l1_norm"), SHAPE)
    with torch.no_grad():
        for gate in gates.values():
            gate.fc2.weight.normal_(0, 0.01)
    model.double().train()
    with torch.no_grad(), GateRecorder(model, detach=True) as recorder:
        model(torch.randn(8, *SHAPE, dtype=torch.float64))
        gates.set_thresholds({n: float(s.mean(0).quantile(0.5)) for n, s in recorder.saliency.items()})
    return model


def _step(model: nn.Module, images, targets, narrowing=None, lambda_sim=0.0):
    loss = ManiDPLoss(lambda_sparse=0.1, lambda_sim=lambda_sim)
    model.zero_grad(set_to_none=True)
    with GateRecorder(model, features=True) as recorder:
        if narrowing is not None:
            with narrowing:
                terms = loss(model(images), targets, recorder.saliency, recorder.features, mean_loss=5.0)
        else:
            terms = loss(model(images), targets, recorder.saliency, recorder.features, mean_loss=5.0)
        terms["loss"].backward()
    return terms, dict(recorder.features)


def _norms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_100", "regnetx_002", "densenet121"])
def test_narrow_training_gives_the_masked_models_loss_and_gradients(name):
    masked = _gated(name)
    narrow = copy.deepcopy(masked)
    images = torch.randn(6, *SHAPE, dtype=torch.float64)
    targets = torch.randint(0, 5, (6,))
    classes = {n: type(m) for n, m in narrow.named_modules()}
    keys = set(narrow.state_dict())
    narrowing = NarrowTraining(narrow, SHAPE)
    assert narrowing.plan.consumers, f"{name}: nothing to narrow"
    widths = {}
    with narrowing:
        narrowing.model(images)  # one pass to see what the batch computes
        for conv_name in narrowing.plan.consumers:
            kept = narrow.get_submodule(conv_name).kept_outputs
            widths[conv_name] = kept.width if kept.channels is None else len(kept.channels)
    narrow.load_state_dict(masked.state_dict())  # undo that pass's running statistics
    assert any(w < narrow.get_submodule(c).out_channels for c, w in widths.items()), "no layer computed fewer"

    start = copy.deepcopy(masked.state_dict())
    with torch.no_grad(), GateRecorder(copy.deepcopy(masked), detach=True) as recorder:
        recorder.model(images)  # the batch's keep-sets, from the masked model
        union = {n: keep.any(dim=0) for n, keep in recorder.active_outputs().items()}
    reference, _ = _step(masked, images, targets)
    terms, _ = _step(narrow, images, targets, narrowing)
    assert torch.allclose(terms["loss"], reference["loss"], rtol=1e-10)
    for (param_name, a), b in zip(masked.named_parameters(), narrow.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-8, atol=1e-10), f"{name}: {param_name}'s gradient differs"
    norm_of = {n: c for c, n in narrowing.plan.norms.items()}
    for norm_name, norm in _norms(masked).items():
        other = _norms(narrow)[norm_name]
        computed = union[norm_of[norm_name]] if norm_name in norm_of else torch.ones_like(norm.running_mean, dtype=bool)
        for stat in ("running_mean", "running_var"):
            ours, theirs = getattr(other, stat), getattr(norm, stat)
            assert torch.allclose(ours[computed], theirs[computed], rtol=1e-10, atol=1e-12), f"{norm_name}.{stat}"
            assert torch.equal(ours[~computed], start[f"{norm_name}.{stat}"][~computed]), f"{norm_name}.{stat}"
        assert norm.num_batches_tracked == other.num_batches_tracked
    assert {n: type(m) for n, m in narrow.named_modules()} == classes  # restored on exit
    assert set(narrow.state_dict()) == keys
    assert all(g.narrow_input is None and g.narrow_output is None for g in gates_of(narrow).values())


def test_narrow_layers_compute_only_the_batch_union_and_leave_other_statistics_alone():
    model = _gated("resnet18")
    before = copy.deepcopy(model)
    narrowing = NarrowTraining(model, SHAPE)
    with narrowing:
        model(torch.randn(4, *SHAPE, dtype=torch.float64))
        conv_name = next(iter(narrowing.plan.consumers))
        conv = model.get_submodule(conv_name)
        norm = model.get_submodule(narrowing.plan.norms[conv_name])
        assert isinstance(conv, ComputesKeptChannels) and isinstance(norm, NormalisesKeptChannels)
        channels = conv.kept_outputs.channels
        gate = gates_of(model).by_name()[conv_name]
        assert channels is not None and len(channels) < conv.out_channels
    idle = torch.ones(conv.out_channels, dtype=torch.bool)
    idle[channels] = False
    start = before.get_submodule(narrowing.plan.norms[conv_name])
    assert torch.equal(norm.running_mean[idle], start.running_mean[idle])
    assert gate.narrow_output is None


def test_similarity_features_are_zero_where_no_image_of_the_batch_keeps_the_channel():
    masked = _gated("resnet18")
    narrow = copy.deepcopy(masked)
    images, targets = torch.randn(6, *SHAPE, dtype=torch.float64), torch.randint(0, 5, (6,))
    _, reference = _step(masked, images, targets, lambda_sim=0.1)
    narrowing = NarrowTraining(narrow, SHAPE)
    _, features = _step(narrow, images, targets, narrowing, lambda_sim=0.1)
    skipped = 0
    for conv_name in narrowing.plan.consumers:
        computed = features[conv_name].abs().sum(0) != 0
        assert torch.allclose(features[conv_name][:, computed], reference[conv_name][:, computed], rtol=1e-10)
        skipped += int((~computed).sum())
    assert skipped > 0


def test_without_thresholds_every_channel_is_computed():
    model = _gated("resnet18")
    gates_of(model).reset_thresholds()
    narrowing = NarrowTraining(model, SHAPE)
    with narrowing:
        model(torch.randn(2, *SHAPE, dtype=torch.float64))
        assert all(model.get_submodule(c).kept_outputs.channels is None for c in narrowing.plan.consumers)


def _robust_gates(model: nn.Module) -> None:
    """Image-independent saliencies of 0.5 or 1.5 and thresholds of 1: decisions that no rounding
    (bf16 included) can flip."""
    gates = gates_of(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in gates.values():
            gate.fc2.weight.zero_()
            kept = torch.rand(gate.out_channels, generator=generator) < 0.5
            gate.fc2.bias.copy_(torch.where(kept, 1.5, 0.5))
    gates.set_thresholds({name: 1.0 for name in gates.by_name()})


def _gradients(model: nn.Module, images, targets, narrow: bool, autocast: bool) -> torch.Tensor:
    model = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _step(model, images, targets, NarrowTraining(model, SHAPE) if narrow else None)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_narrow_training_in_channels_last_matches_masked_training():
    model = _gated("resnet18").float().to(memory_format=torch.channels_last)
    _robust_gates(model)
    images = torch.randn(6, *SHAPE).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 5, (6,))
    masked = _gradients(model, images, targets, narrow=False, autocast=False)
    narrow = _gradients(model, images, targets, narrow=True, autocast=False)
    assert float((narrow - masked).norm() / masked.norm()) < 1e-4  # float32 rounding


def test_narrow_training_under_bf16_autocast_is_as_close_to_float32_as_masked_training():
    """bf16 moves the gradients of this random network far from float32's (about half their norm);
    narrow training must not move them further than masked training does."""
    model = _gated("resnet18").float()
    _robust_gates(model)
    images, targets = torch.randn(6, *SHAPE), torch.randint(0, 5, (6,))
    exact = _gradients(model, images, targets, narrow=False, autocast=False)
    masked = _gradients(model, images, targets, narrow=False, autocast=True)
    narrow = _gradients(model, images, targets, narrow=True, autocast=True)
    masked_error = float((masked - exact).norm() / exact.norm())
    assert float((narrow - exact).norm() / exact.norm()) <= 1.25 * masked_error + 0.01

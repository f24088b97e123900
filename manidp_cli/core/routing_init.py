"""A per-image start for the gates, fitted to how strongly each channel responds to each image.

Gates start with fc2's weights at zero: every image gets the same saliencies, so the first
thresholds cut the same channels for every image, and a short fine-tune barely teaches them to
route (docs/results.md: 1.4-1.6% of the channels change decision between images after 18,000
images). ``fit_gates_to_responses`` gives each gate a per-image part before training: on calibration
images it fits fc1 and fc2's weights (fc2's bias, the static start, stays) so that

    saliency_k(x) ~ b_k * (1 + strength * clip(r_k(x) - 1, -1, 1)),

with b_k the gate's constant start and r_k(x) = |GAP of channel k's normalised output on x| over its
mean on the calibration images, divided by the mean of r over the image's channels (an image
shifts saliency between channels rather than up or down as a whole). A channel that responds
weakly to an image, relative to the others, then falls below that layer's cut first for that
image. The masked network's function changes by that per-image scaling (|change| <= strength per
channel), which the fine-tune has to absorb.

Measured (docs/results.md): with 18,000 fine-tuning images it makes 72-93% of the channels routed
and costs 0.3 to 1.0 point of top-1 against the constant start, so it is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from manidp_cli.core.gating import SaliencyGate, gates_of
from manidp_cli.core.modes import eval_mode
from manidp_cli.core.recorder import GateRecorder

FIT_STEPS = 300
FIT_LR = 1e-2


@dataclass(frozen=True)
class RoutingFit:
    """How well each gate's per-image part predicts its target: R^2 on the calibration images."""

    explained_variance: dict[str, float]

    @property
    def mean_explained_variance(self) -> float:
        values = list(self.explained_variance.values())
        return sum(values) / len(values) if values else float("nan")


def _responses(model: nn.Module, gate: SaliencyGate, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled inputs ``gate`` sees (N x C_in) and its channels' pooled responses (N x C)."""
    pooled: list[torch.Tensor] = []
    responses: list[torch.Tensor] = []
    handle = gate.register_forward_pre_hook(lambda module, args: pooled.append(args[0].detach().mean(dim=(2, 3))))
    try:
        with eval_mode(model), torch.no_grad(), GateRecorder(model, features=True, detach=True) as recorder:
            for images in batches:
                model(images)
                responses.append(recorder.features[gate.name].abs())
    finally:
        handle.remove()
    return torch.cat(pooled), torch.cat(responses)


def _execution_order(model: nn.Module, images: torch.Tensor) -> list[SaliencyGate]:
    with eval_mode(model), torch.no_grad(), GateRecorder(model, detach=True) as recorder:
        model(images)
    gates = gates_of(model).by_name()
    return [gates[name] for name in recorder.saliency]


def routing_target(responses: torch.Tensor, start: torch.Tensor, strength: float) -> torch.Tensor:
    """What fc2's weights should add to the constant start ``start`` (C) for each image (N x C)."""
    relative = responses / responses.mean(dim=0).clamp(min=1e-12)
    # over the image's own mean: which channels this image needs more than others, not how much it
    # needs overall (absolute responses gave weakly responding, hard images fewer FLOPs: docs/results.md)
    relative = relative / relative.mean(dim=1, keepdim=True).clamp(min=1e-12)
    return start * strength * (relative - 1).clamp(-1.0, 1.0)


def _per_image_part(gate: SaliencyGate, inputs: torch.Tensor) -> torch.Tensor:
    """fc2(relu(fc1(inputs))) without fc2's bias: what the gate adds to its constant start."""
    return nn.functional.linear(torch.relu(gate.fc1(inputs)), gate.fc2.weight)


def _fit_gate(gate: SaliencyGate, inputs: torch.Tensor, target: torch.Tensor) -> float:
    """Fit fc1 and fc2's weights; returns R^2. A fit that explains nothing (R^2 <= 0: its hidden
    units died, or the responses carry no signal the pooled input predicts) is undone: that gate keeps
    its constant start."""
    start = (gate.fc1.weight.detach().clone(), gate.fc2.weight.detach().clone())
    weights = [gate.fc1.weight, gate.fc2.weight]
    optimizer = torch.optim.Adam(weights, lr=FIT_LR)
    with torch.enable_grad():
        for _ in range(FIT_STEPS):
            optimizer.zero_grad(set_to_none=True)
            loss = (_per_image_part(gate, inputs) - target).pow(2).mean()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        residual = (_per_image_part(gate, inputs) - target).pow(2).sum()
        total = (target - target.mean(dim=0)).pow(2).sum().clamp(min=1e-12)
        explained = float(1 - residual / total)
        if not explained > 0:
            gate.fc1.weight.copy_(start[0])
            gate.fc2.weight.copy_(start[1])
    return explained


def fit_gates_to_responses(model: nn.Module, batches, strength: float) -> RoutingFit:
    """Fit every output gate's weights on ``batches`` (images) as the module docstring says, one gate
    after another in the order the network runs them, each on the inputs that the gates fitted before
    it produce; input gates keep their constant start. ``strength`` 0 leaves the gates as they are."""
    if strength <= 0:
        return RoutingFit({})
    batches = list(batches)
    explained = {}
    for gate in _execution_order(model, batches[0][:1]):
        if gate.side != "output":
            continue
        inputs, responses = _responses(model, gate, batches)
        start = gate.activate(gate.fc2.bias.detach())
        explained[gate.name] = _fit_gate(gate, inputs, routing_target(responses, start, strength))
    return RoutingFit(explained)

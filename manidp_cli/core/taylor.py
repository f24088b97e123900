"""Data-driven channel importance: the first-order Taylor estimate of what switching a channel off
costs the loss, measured on labelled images.

A gate's mask m_k multiplies channel k's normalised output y_k, so at m = 1 the loss changes by about
|dL/dm_k| = |sum over positions of y_k * dL/dy_k| when the channel is switched off (Molchanov et al.,
"Pruning Convolutional Neural Networks for Resource Efficient Inference", 2017). The per-image value is
averaged over the images, so a channel that matters a lot to a few images is not ranked below one
that matters a little to all of them. Unlike a filter's L1 norm it sees the data and what follows the
channel; ``gates.init: taylor`` starts the gates from it.

Example::

    importance = taylor_importance(model, ["bn1", "layer1.0.bn1"], [(images, labels)])
    importance["bn1"].shape  # (C,)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from manidp_cli.core.modes import eval_mode
from manidp_cli.errors import ModelError


def taylor_importance(
    model: nn.Module, module_names: Sequence[str], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Mean over images of |dL/dm_k| for each output channel k of each named module (a normalisation
    layer, or any module whose output is N x C x ...), L the image's cross-entropy, with the model in
    eval mode (its running statistics, as it runs after pruning). The model's parameters and their
    gradients are left unchanged."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_hook(_keep_output(outputs, name)) for name in module_names]
    totals = {name: torch.zeros((), dtype=torch.float64) for name in module_names}
    images = 0
    try:
        with eval_mode(model):
            for x, y in batches:
                outputs.clear()
                loss = F.cross_entropy(model(x), y, reduction="sum")
                missing = [name for name in module_names if name not in outputs]
                if missing:
                    raise ModelError(f"{missing[0]!r} did not run in the forward pass: no Taylor importance for it")
                grads = torch.autograd.grad(loss, [outputs[name] for name in module_names], allow_unused=True)
                for name, grad in zip(module_names, grads):
                    totals[name] = totals[name] + _per_image_change(outputs[name], grad).sum(0)
                images += len(x)
    finally:
        for handle in handles:
            handle.remove()
    if images == 0:
        raise ModelError("Taylor importance needs at least one image")
    return {name: (total / images).float() for name, total in totals.items()}


def _keep_output(outputs: dict[str, torch.Tensor], name: str):
    def hook(module, args, output):
        if not output.requires_grad:
            raise ModelError(f"{name!r}'s output needs a gradient for Taylor importance (parameters frozen?)")
        outputs[name] = output
        # the model reads a copy: an in-place op after the module (a residual block's `x += shortcut`)
        # must not change the values and gradient taken here
        return output.clone()

    return hook


def _per_image_change(output: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """|sum over positions of y * dL/dy| per image and channel (N x C), float64."""
    if grad is None:  # the output does not reach the loss: switching its channels off changes nothing
        return torch.zeros(output.shape[:2], dtype=torch.float64)
    return (output.detach().double() * grad.double()).flatten(2).sum(2).abs()

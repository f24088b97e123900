"""Checks shared by the executor tests: the dynamic executor against the masked model, decision by
decision.

The executor computes its numbers differently from the masked model (BatchNorm folded, narrow
convolutions, other kernels on other CPUs), so a comparison of outputs alone depends on the CPU: a
decision close to a tie can go either way, and then the outputs differ by far more than rounding.
``check_execution`` therefore checks three things that hold on every CPU:

1. given the masked model's decisions (forced layer by layer), the executor's output equals the
   masked model's up to rounding;
2. each layer's own saliencies equal the masked model's up to rounding, and its own decision is
   exactly the gate's rule applied to them (``SaliencyGate.decide``);
3. where its own decision differs, the masked model's margin is within what that rounding can move
   (a flip of a codebook entry needs margin <= 2 * sum |d pi|, of a free-mask channel |d pi_j|).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from manidp_cli.execute import decision_flip_bounds, reference_run, run_with_decisions
from manidp_cli.gating import gates_of

OUTPUT_TOLERANCE = 1e-4  # float32 rounding through a deep network, outputs of unit scale
SALIENCY_TOLERANCE = 1e-4  # relative to the layer's largest saliency


@dataclass
class ExecutionCheck:
    decisions: int
    disagreements: int
    max_output_difference: float


def check_execution(model: nn.Module, fast: nn.Module, images: torch.Tensor) -> ExecutionCheck:
    """Assert 1-3 above for ``images`` (one image, or a batch) run through ``fast`` at once."""
    gates = gates_of(model).by_conv()
    reference = reference_run(model, images)
    output, own = run_with_decisions(fast, images, forced=reference.decisions)
    difference = float((output - reference.logits).abs().max())
    assert difference <= OUTPUT_TOLERANCE, f"outputs differ by {difference:.2e} given equal decisions"
    assert set(own) == set(reference.decisions), "a gated layer did not decide"
    bounds = decision_flip_bounds(fast, reference, gates)
    disagreements = 0
    for name, expected in reference.decisions.items():
        layer = fast.get_submodule(name)
        saliency, reference_saliency = layer.last_saliency.double(), reference.saliency[name].double()
        drift = float((saliency - reference_saliency).abs().max())
        scale = 1.0 + float(reference_saliency.abs().max())
        assert drift <= SALIENCY_TOLERANCE * scale, f"{name}: saliencies differ by {drift:.2e}"
        assert torch.equal(own[name], gates[name].decide(layer.last_saliency)), f"{name}: not the gate's rule"
        differs = (own[name] != expected).reshape(len(expected), -1).any(dim=1)
        margins = reference.margins[name]
        assert bool((margins[differs] <= bounds[name][differs]).all()), (
            f"{name}: decided otherwise than the masked model with margins {margins[differs].tolist()} "
            f"above what rounding can move ({bounds[name][differs].tolist()})"
        )
        disagreements += int(differs.sum())
    decisions = len(reference.decisions) * images.shape[0]
    return ExecutionCheck(decisions, disagreements, difference)

"""Calibration: thresholds whose measured FLOPs meet a target, also between the levels that one
common remain rate reaches."""

import pytest
import timm
import torch
from torch import nn

from manidp_cli.core.calibration import MAX_LAYER_SHIFT, THRESHOLD_TOLERANCE, calibrate_thresholds, mean_saliency
from manidp_cli.core.flops import count_flops, measure_flops
from manidp_cli.core.gating import insert_gates
from manidp_cli.core.losses import ManiDPLoss
from manidp_cli.core.schedule import FeedbackThresholds, kept_count, search_remain_rate, thresholds_for_remain_rate
from manidp_cli.training.objectives import ManiDPObjective

SHAPE = (3, 32, 32)


class _StaticGates:
    """resnet18 whose gates give every image the same saliencies (distinct per channel): the FLOPs of
    a common remain rate are a staircase whose steps come where every layer's kept count moves at
    once (r = j / 64 for widths 64 to 512), as with gates that route few channels per image."""

    def __init__(self):
        self.model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
        self.gates = insert_gates(self.model, input_shape=SHAPE)
        generator = torch.Generator().manual_seed(0)
        for gate in self.gates.values():
            nn.init.zeros_(gate.fc2.weight)
            gate.set_initial_saliency(0.5 + torch.rand(gate.out_channels, generator=generator))
        self.batches = [torch.randn(4, *SHAPE, generator=generator)]
        self.table = count_flops(self.model, SHAPE)
        self.means = mean_saliency(self.model, self.batches)

    def measured(self) -> float:
        return measure_flops(self.model, self.table, self.batches).mean_ratio

    def flops_at(self, rate: float) -> float:
        self.gates.set_thresholds(thresholds_for_remain_rate(self.means, rate))
        return self.measured()

    def calibrate(self, target: float):
        return calibrate_thresholds(self.model, self.table, self.means, self.batches, target, steps=16)

    def kept(self) -> dict[str, int]:
        """Per gated layer, how many channels the thresholds in force keep (the same for every image)."""
        return {name: int((self.means[name] >= gate.threshold).sum()) for name, gate in self.gates.by_name().items()}


@pytest.fixture(scope="module")
def static_gates():
    return _StaticGates()


def test_single_layers_move_when_no_common_rate_meets_the_target(static_gates):
    setup = static_gates
    # every level: kept counts change only at multiples of 1 / 512
    levels = sorted({round(setup.flops_at((k + 0.5) / 512), 6) for k in range(40, 200)})
    gap, low, high = max(((b - a) / (a + b), a, b) for a, b in zip(levels, levels[1:]))
    target = (low + high) / 2
    assert high - low > 4 * THRESHOLD_TOLERANCE * target  # no common rate comes within the tolerance
    common = search_remain_rate(setup.flops_at, target, steps=16)
    assert abs(common.flops_ratio - target) > 2 * THRESHOLD_TOLERANCE * target
    refined = setup.calibrate(target)
    measured = setup.measured()
    assert measured == pytest.approx(refined.flops_ratio)  # the moved thresholds are the ones in force
    assert abs(measured - target) <= THRESHOLD_TOLERANCE * target, (low, high, target, measured)
    assert refined.evaluations > common.evaluations
    # no layer moved by more than a channel: one unbounded move had cut a layer from 21% to 2%
    kept = setup.kept()
    moved = 0
    for name, mean in setup.means.items():
        common_kept = kept_count(refined.remain_rate, mean.numel())
        assert abs(kept[name] - common_kept) <= MAX_LAYER_SHIFT, name
        moved += kept[name] != common_kept
    assert moved >= 1


def test_a_target_that_a_common_rate_meets_moves_no_layer(static_gates):
    setup = static_gates
    target = setup.flops_at(0.4)
    common = search_remain_rate(setup.flops_at, target, steps=16)
    refined = setup.calibrate(target)
    assert refined == common
    assert setup.measured() == pytest.approx(target, rel=THRESHOLD_TOLERANCE)


def test_the_last_calibration_keeps_the_share_each_layer_trained_with(static_gates):
    """Feedback mode: the final thresholds come from the saliencies the network ended training with
    (the controller's moving averages), not from the epoch's means, which hold its first steps: here
    one layer's gates fell by 1 during the epoch, and thresholds from the epoch's means would keep
    none of its channels."""
    setup = static_gates
    target, rate = setup.flops_at(0.3), 0.3
    feedback = FeedbackThresholds(target, ramp_steps=0, every=1, rate=rate, means=dict(setup.means))
    objective = ManiDPObjective(
        setup.gates,
        setup.table,
        ManiDPLoss(),
        target=target,
        epochs=2,
        hold_epochs=1,
        training_batches=lambda: [],
        calibration_batches=setup.batches,
        search_steps=16,
        feedback=feedback,
    )
    drifted = "layer3.0.conv1"
    stale = {name: mean + (1.0 if name == drifted else 0.0) for name, mean in setup.means.items()}
    objective.saliency_sums = {name: 10 * mean.double() for name, mean in stale.items()}
    objective.saliency_count = 10
    objective.end_epoch(setup.model, epoch=1)
    kept = setup.kept()
    assert kept[drifted] == kept_count(rate, setup.means[drifted].numel())
    assert setup.measured() == pytest.approx(target, rel=THRESHOLD_TOLERANCE)
    # the epoch's means would have closed that layer: its threshold above every saliency it has
    assert thresholds_for_remain_rate(stale, rate)[drifted] > float(setup.means[drifted].max())

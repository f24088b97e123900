"""Calibration: thresholds whose measured FLOPs meet a target, also between the levels that one
common remain rate reaches."""

import pytest
import timm
import torch
from torch import nn

from manidp_cli.core.calibration import THRESHOLD_TOLERANCE, calibrate_thresholds, mean_saliency
from manidp_cli.core.flops import count_flops, measure_flops
from manidp_cli.core.gating import insert_gates
from manidp_cli.core.schedule import search_remain_rate, thresholds_for_remain_rate

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


def test_a_target_that_a_common_rate_meets_moves_no_layer(static_gates):
    setup = static_gates
    target = setup.flops_at(0.4)
    common = search_remain_rate(setup.flops_at, target, steps=16)
    refined = setup.calibrate(target)
    assert refined == common
    assert setup.measured() == pytest.approx(target, rel=THRESHOLD_TOLERANCE)

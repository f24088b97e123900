import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from manidp_cli.core.schedule import (
    cost_weighted_scales,
    flops_target,
    search_remain_rate,
    thresholds_for_remain_rate,
)


def test_flops_target_runs_a_cosine_from_one_to_final_and_holds():
    targets = [flops_target(e, 6, 0.45, hold_epochs=2) for e in range(6)]
    assert targets[0] == 1.0
    assert targets[4] == targets[5] == pytest.approx(0.45)
    assert all(a > b for a, b in zip(targets[:5], targets[1:5]))
    assert targets[2] == pytest.approx(0.45 + 0.55 * 0.5)  # cosine midpoint at half the ramp


@given(st.integers(1, 30), st.floats(0.05, 0.95), st.integers(0, 5))
def test_flops_target_stays_between_final_and_one(epochs, final, hold):
    values = [flops_target(e, epochs, final, hold) for e in range(epochs)]
    assert all(final - 1e-12 <= v <= 1.0 for v in values)
    assert values == sorted(values, reverse=True)


def test_thresholds_for_remain_rate():
    means = {"a": torch.tensor([0.1, 0.4, 0.3, 0.2]), "b": torch.tensor([5.0, 1.0])}
    assert thresholds_for_remain_rate(means, 0.5) == pytest.approx({"a": 0.3, "b": 5.0})
    assert thresholds_for_remain_rate(means, 1.0) == pytest.approx({"a": 0.1, "b": 1.0})
    assert thresholds_for_remain_rate(means, 0.0) == pytest.approx({"a": 0.4, "b": 5.0})  # keep >= 1
    # beyond 1 the threshold moves from the smallest mean down to 0
    assert thresholds_for_remain_rate(means, 1.5) == pytest.approx({"a": 0.05, "b": 0.5})
    assert thresholds_for_remain_rate(means, 2.0) == pytest.approx({"a": 0.0, "b": 0.0})


def test_layer_scales_set_each_layers_own_rate():
    means = {"a": torch.tensor([0.1, 0.4, 0.3, 0.2]), "b": torch.tensor([5.0, 1.0])}
    # a at 0.5 * 0.5 keeps its top channel; b at 0.5 * 3 = 1.5 continues below its smallest mean
    assert thresholds_for_remain_rate(means, 0.5, {"a": 0.5, "b": 3.0}) == pytest.approx({"a": 0.4, "b": 0.5})
    assert thresholds_for_remain_rate(means, 0.5, {"a": 1.0}) == thresholds_for_remain_rate(means, 0.5)


def test_cost_weighted_scales_give_costlier_layers_smaller_shares():
    flops = {"cheap": 100.0, "middle": 400.0, "dear": 1600.0}
    assert cost_weighted_scales(flops, 0.0) == {"cheap": 1.0, "middle": 1.0, "dear": 1.0}
    scales = cost_weighted_scales(flops, 0.5)
    assert scales == pytest.approx({"cheap": 2.0, "middle": 1.0, "dear": 0.5})  # around the geometric mean
    assert cost_weighted_scales(flops, 1.0)["dear"] == pytest.approx(0.25)


def test_search_finds_the_rate_of_a_monotone_measure():
    measure = lambda r: 0.1 + 0.4 * r  # noqa: E731 - FLOPs ratio linear in the rate
    found = search_remain_rate(measure, target=0.3, steps=30, tolerance=1e-4)
    assert found.remain_rate == pytest.approx(0.5, abs=1e-3)
    assert found.flops_ratio == pytest.approx(0.3, rel=1e-4)
    above_one = search_remain_rate(lambda r: r / 2, target=0.8, steps=30, tolerance=1e-4)
    assert above_one.remain_rate == pytest.approx(1.6, abs=1e-3)


def test_search_returns_the_closest_when_the_target_is_out_of_reach():
    found = search_remain_rate(lambda r: 0.5, target=0.2, steps=5)
    assert found.flops_ratio == 0.5 and found.evaluations == 3  # a flat stretch: the bracket's end, then stop


def _square_law(r: float) -> float:
    """FLOPs like a gated network's: an ungated floor plus gated work growing with the rate squared."""
    return 0.12 + 0.88 * min(r, 1.0) ** 2 / (1 + 0.2 * min(r, 1.0))


@pytest.mark.parametrize("target", [0.15, 0.3, 0.45, 0.6, 0.8])
def test_search_spends_few_measurements_on_a_square_law(target):
    found = search_remain_rate(_square_law, target)
    assert abs(found.flops_ratio - target) <= 0.002 * target
    assert found.evaluations <= 6  # plain bisection over [0, 2] needs about 9 at this tolerance


def test_search_stops_on_a_flat_stretch_and_starts_where_asked():
    steps = lambda r: round(_square_law(r) * 20) / 20  # noqa: E731 - FLOPs move in steps of 0.05
    found = search_remain_rate(steps, target=0.33)
    assert found.flops_ratio == pytest.approx(0.35) and found.evaluations < 24  # stopped by the bracket
    out_of_reach = search_remain_rate(_square_law, target=0.9)  # the top rate keeps 0.853
    assert out_of_reach.flops_ratio == pytest.approx(_square_law(1.0)) and out_of_reach.evaluations <= 4
    asked = []
    search_remain_rate(lambda r: asked.append(r) or _square_law(r), target=0.3, start=0.42)
    assert asked[0] == 0.42

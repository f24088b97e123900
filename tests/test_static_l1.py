"""The static peer (Torch-Pruning's L1 network at a FLOPs target), the CPU record, and bench's advice."""

from __future__ import annotations

import copy
import sys

import pytest
import timm
import torch

from manidp_cli.analysis.bench import VariantTiming, recommendation
from manidp_cli.analysis.machine import cpu_info
from manidp_cli.core.flops import count_flops
from manidp_cli.errors import ManidpError, TargetError
from manidp_cli.runtime.static_l1 import StaticCriterion, stage_channels, static_l1

SHAPE = (1, 32, 32)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1).eval()


@pytest.mark.parametrize("target", [0.45, 0.3])
def test_static_l1_meets_its_target_and_removes_residual_channels(resnet, target):
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    baseline = static_l1(resnet, target, SHAPE)
    measured = count_flops(baseline.model, SHAPE).total_flops / count_flops(resnet, SHAPE).total_flops
    assert measured == pytest.approx(baseline.flops_ratio)
    assert abs(baseline.flops_ratio - target) / target < 0.02
    # unlike manidp's own slimming, the residual stream (stem, every block's last conv) is narrower
    assert baseline.model.conv1.out_channels < 64 and baseline.model.layer1[0].conv2.out_channels < 64
    assert baseline.model.fc.out_features == 10  # the classifier keeps its classes
    assert baseline.model(torch.randn(2, *SHAPE)).shape == (2, 10)
    assert all(torch.equal(v, before[k]) for k, v in resnet.state_dict().items())  # the input is left alone


def test_inner_only_keeps_the_residual_streams_whole_and_narrows_the_blocks_inner_widths(resnet):
    baseline = static_l1(resnet, 0.3, SHAPE, inner_only=True)
    model = baseline.model
    assert abs(baseline.flops_ratio - 0.3) / 0.3 < 0.02
    dense_widths = {n: m.out_channels for n, m in resnet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    inner = {n for n in widths if n.endswith(".conv1") and n.startswith("layer")}  # read by conv2 alone
    assert all(widths[n] == dense_widths[n] for n in widths if n not in inner)  # stem, conv2s, shortcuts
    assert all(widths[n] < dense_widths[n] for n in inner)
    assert model(torch.randn(2, *SHAPE)).shape == (2, 10)


def test_stage_channels_name_the_dense_channels_each_slimmed_stage_keeps(resnet):
    """The stem reads the unpruned input, so right after pruning its output is the dense stem's at
    the kept channels, exactly; every stage's channel list is as wide as its slimmed output."""
    baseline = static_l1(resnet, 0.45, SHAPE)
    names = ["act1", "layer1", "layer4"]
    channels = stage_channels(resnet, baseline.pruning_ratio, SHAPE, names)
    outputs, handles = {}, []
    for model, tag in ((resnet, "dense"), (baseline.model, "slim")):
        for name in names:
            handles.append(
                model.get_submodule(name).register_forward_hook(
                    lambda m, a, out, key=(tag, name): outputs.__setitem__(key, out)
                )
            )
        model(torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1)))
    for handle in handles:  # the dense model is shared with the other tests
        handle.remove()
    assert [len(c) for c in channels] == [outputs["slim", name].shape[1] for name in names]
    assert all(len(c) < outputs["dense", name].shape[1] for c, name in zip(channels, names))
    torch.testing.assert_close(outputs["slim", "act1"], outputs["dense", "act1"][:, channels[0]])
    assert torch.equal(channels[1], channels[1].sort().values)  # Torch-Pruning keeps the channel order


def test_static_l1_refuses_a_target_outside_0_1(resnet):
    with pytest.raises(TargetError, match="between 0 and 1.*got 1.2"):
        static_l1(resnet, 1.2, SHAPE)


def test_a_missing_torch_pruning_names_the_extra(resnet, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import fails as if not installed
    with pytest.raises(ManidpError, match=r"pip install 'manidp\[bench\]'"):
        static_l1(resnet, 0.45, SHAPE)


def test_cpu_info_reads_the_model_and_the_kernel_relevant_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Example Xeon\nflags\t\t: fpu sse avx avx2 fma avx512f amx_tile amx_bf16\n"
        "processor\t: 1\nmodel name\t: Example Xeon\nflags\t\t: fpu\n"
    )
    info = cpu_info(cpuinfo)
    assert info.model == "Example Xeon"
    assert info.isa_flags == ("avx", "avx2", "fma", "avx512f", "amx_tile", "amx_bf16")
    assert info.to_dict()["isa_flags"] == list(info.isa_flags) and info.torch_capability
    assert cpu_info(tmp_path / "missing").isa_flags == ()  # not Linux: flags unknown, no error


def _timing(ms: float, layout: str = "nchw") -> VariantTiming:
    return VariantTiming(layout, ms, ms, 1.0, None, latency_ratio=ms / 10.0)


@pytest.mark.parametrize(
    ("fastest", "advice"),
    [
        ("torch_pruning_channels_last", "use a static model: Torch-Pruning"),
        ("static", "use the static export"),
        ("dynamic", "run the export dynamically with manidp's executor (dynamic"),
        ("dense", "run the dense model: no pruned variant beats it at 32 px"),
    ],
)
def test_bench_recommends_the_fastest_variant(fastest, advice):
    names = ["dense", "dense_channels_last", "masked", "dynamic", "static", "torch_pruning_channels_last"]
    measured = {name: _timing(5.0 if name == fastest else 10.0) for name in names}
    assert recommendation(measured, SHAPE).startswith(advice)
    # how an in-memory static export was built replaces the advice for "static", and only that
    built = "use a static export (manidp export-static --min-keep-rate 0.5)"
    expected = built if fastest == "static" else advice
    assert recommendation(measured, SHAPE, static_advice=built).startswith(expected)


def _dense_rows_kept(dense: torch.Tensor, slim: torch.Tensor) -> list[int]:
    """Which of ``dense``'s output rows ``slim`` kept (rows are copied unchanged, in order)."""
    return [next(i for i in range(len(dense)) if torch.equal(dense[i], row)) for row in slim]


def test_the_taylor_criterion_keeps_the_channels_with_the_largest_weight_times_gradient(resnet):
    """Only layer1.0.conv1's weights have a gradient, growing with the channel number: its inner group
    (conv1, bn1, conv2's inputs) then ranks channel k by k times its filter's L1 norm."""
    gradients = {name: torch.zeros_like(p) for name, p in resnet.named_parameters()}
    weight = resnet.layer1[0].conv1.weight
    gradients["layer1.0.conv1.weight"] = torch.arange(64.0)[:, None, None, None].expand_as(weight).clone()
    criterion = StaticCriterion("taylor", gradients)
    slim = static_l1(resnet, 0.5, SHAPE, inner_only=True, criterion=criterion).model
    kept = _dense_rows_kept(weight, slim.layer1[0].conv1.weight)
    score = torch.arange(64.0) * weight.detach().abs().flatten(1).sum(1)
    assert kept == sorted(score.topk(len(kept)).indices.tolist())
    assert 0 < len(kept) < 64 and all(p.grad is None for p in slim.parameters())
    assert all(p.grad is None for p in resnet.parameters())


def test_the_bn_scale_criterion_keeps_the_channels_with_the_largest_gamma(resnet):
    model = copy.deepcopy(resnet)
    with torch.no_grad():
        model.layer1[0].bn1.weight.copy_(torch.randperm(64, generator=torch.Generator().manual_seed(0)) + 1.0)
    slim = static_l1(model, 0.5, SHAPE, inner_only=True, criterion=StaticCriterion("bn_scale")).model
    kept = _dense_rows_kept(model.layer1[0].conv1.weight, slim.layer1[0].conv1.weight)
    assert kept == sorted(model.layer1[0].bn1.weight.detach().topk(len(kept)).indices.tolist())


def test_measured_gradients_are_the_mean_cross_entropys_in_eval_mode(resnet):
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, *SHAPE, generator=generator), torch.randint(0, 10, (5,), generator=generator)
    criterion = StaticCriterion.measure("taylor", resnet, [(x[:2], y[:2]), (x[2:], y[2:])])
    model = copy.deepcopy(resnet).eval()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(criterion.gradients[name], p.grad, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in resnet.parameters())  # the measured model's gradients untouched
    assert StaticCriterion.measure("l1", resnet, None) == StaticCriterion("l1")
    with pytest.raises(ManidpError, match="labelled images"):
        StaticCriterion.measure("taylor", resnet, None)

import pytest
import timm
import torch
from helpers import FAMILIES, randomize_norms
from torch import nn

from manidp_cli.config import GatePolicy, Recipe
from manidp_cli.core.flops import count_flops, decided_flops
from manidp_cli.core.gating import GATE_PREFIX, gates_of, insert_gates, select_convs
from manidp_cli.core.recorder import GateRecorder
from manidp_cli.core.taylor import taylor_importance
from manidp_cli.errors import ModelError

INPUT = (3, 64, 64)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_contract(name):
    """Per family: exact equality at insertion, clean state-dict keys, thresholds prune per image."""
    dense = timm.create_model(name, pretrained=False, num_classes=10).eval()
    randomize_norms(dense)
    images = torch.randn(3, *INPUT)
    with torch.no_grad():
        expected = dense(images)
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}

    gates = insert_gates(dense)
    assert len(gates) > 0
    with torch.no_grad():
        got = dense(images)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)

    fresh = timm.create_model(name, pretrained=False, num_classes=10)
    insert_gates(fresh)
    missing, unexpected = fresh.load_state_dict(dense_state, strict=False)
    assert unexpected == []
    assert missing and all(key.startswith(GATE_PREFIX + ".") for key in missing)
    assert set(missing) == {k for k in fresh.state_dict() if k.startswith(GATE_PREFIX + ".")}

    # Random gate parameters give each image its own saliencies, all near 1 as in a trained
    # network; a threshold at the median prunes about half of the channels.
    for gate in gates.values():
        nn.init.normal_(gate.fc2.weight, std=0.01)
        nn.init.uniform_(gate.fc2.bias, 0.5, 1.5)
    with torch.no_grad(), GateRecorder(dense, detach=True) as rec:
        dense(images)
        medians = {n: float(s.median()) for n, s in rec.saliency.items()}
        gates.set_thresholds(medians)
        pruned = dense(images)
        kept = rec.active_outputs()
    assert set(kept) == set(gates.by_name())
    fractions = torch.stack([k.float().mean() for k in kept.values()])
    assert 0.2 < float(fractions.mean()) < 0.8
    assert (pruned - expected).abs().max() > 1e-3 * expected.abs().max()


def test_default_policy_on_resnet18():
    model = timm.create_model("resnet18", pretrained=False)
    gates = insert_gates(model, input_shape=(3, 32, 32))
    names = set(gates.by_name())
    assert "conv1" not in names
    assert not any("downsample" in n for n in names)
    assert len(names) == 16
    gate = gates.by_name()["layer1.0.conv1"]
    assert gate.fc1.out_features == 64  # r = 1 below 80 output channels
    assert gates.by_name()["layer2.0.conv1"].fc1.out_features == 64  # 128 / r=2
    assert float(gate.threshold) == float("-inf")
    assert gates_of(model) is gates


def test_policy_include_exclude_and_depthwise():
    model = timm.create_model("resnet18", pretrained=False)
    policy = GatePolicy(include=("layer1.*", "layer2.*"), exclude=("*.conv2",))
    names = set(insert_gates(model, policy, input_shape=(3, 32, 32)).by_name())
    assert names == {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.1.conv1"}

    def gated(depthwise):
        policy = GatePolicy(depthwise=depthwise)
        return insert_gates(timm.create_model("mobilenetv2_050"), policy, input_shape=(3, 32, 32))

    own, followed, skipped = gated("gate"), gated("follow"), gated("skip")
    assert "blocks.1.0.conv_dw" in own.by_name() and "blocks.1.0.conv_dw" not in skipped.by_name()
    assert set(skipped.by_name()) < set(followed.by_name()) < set(own.by_name())
    # a depthwise convolution that a gated expansion feeds follows it; the first block's reads the
    # ungated stem and keeps a gate of its own
    assert followed.followers()["blocks.1.0.conv_dw"] == "blocks.1.0.conv_pw"
    assert "blocks.0.0.conv_dw" in followed.by_name() and "blocks.0.0.conv_dw" not in followed.followers()
    assert len(followed.followers()) + len(followed) == len(own)
    assert not own.followers() and not skipped.followers()


def test_follow_draws_nothing_more_on_a_network_without_depthwise_convolutions():
    """The follower search traces the network on a random probe only where a depthwise convolution
    is selected: a ResNet's gates start from the same random weights as before it existed."""

    def first_layers(depthwise):
        torch.manual_seed(0)
        gates = insert_gates(timm.create_model("resnet18"), GatePolicy(depthwise=depthwise), input_shape=(3, 32, 32))
        return [gate.fc1.weight for gate in gates.values()]

    assert all(torch.equal(a, b) for a, b in zip(first_layers("follow"), first_layers("gate")))


@pytest.mark.parametrize("name", ["mobilenetv2_050", "efficientnet_b0", "mobilenetv3_small_050", "resnet50"])
def test_max_cost_narrows_exactly_the_gates_over_it(name):
    """At 32 px a gate can cost more than the convolutions it decides (mobilenetv2_050's head: 1.13 of
    them at reduction 8). With ``max_cost`` each gate's two layers cost at most that share of the
    FLOPs it decides, as fvcore counts both; a gate under it keeps the reduction's width."""
    shape, cap = (1, 32, 32), 0.03
    wide = insert_gates(timm.create_model(name, num_classes=10, in_chans=1), GatePolicy(reduction=8), shape)
    model = timm.create_model(name, num_classes=10, in_chans=1)
    gates = insert_gates(model, GatePolicy(reduction=8, max_cost=cap), shape)
    table = count_flops(model, shape)
    decided = decided_flops(table)
    gate_flops = {layer.name.split(".", 1)[1]: layer.dense_flops for layer in table.layers if layer.kind == "gate"}
    narrowed = 0
    for key, gate in gates.items():
        hidden, width = gate.fc1.out_features, wide[key].fc1.out_features
        layers = hidden * (gate.fc1.in_features + gate.fc2.out_features)
        pooling = gate_flops[key] - layers  # the gate's global pooling: one FLOP per input value
        assert pooling > 0 and pooling % gate.fc1.in_features == 0
        assert layers <= cap * decided[gate.conv_name] or hidden == 1
        # the widest gate that fits: one unit more would break the cap, or the reduction's width is kept
        more = (hidden + 1) * (gate.fc1.in_features + gate.fc2.out_features)
        assert hidden == width or more > cap * decided[gate.conv_name]
        narrowed += hidden < width
    assert narrowed > 0


def test_max_cost_leaves_resnet18_at_32px_as_it_was():
    """resnet18's gates cost at most 0.03 of what they decide at 32 px: the default recipe's cap
    changes none of them, and they start from the same random weights."""

    def first_layers(max_cost):
        torch.manual_seed(0)
        policy = Recipe().gates.model_copy(update={"max_cost": max_cost})
        gates = insert_gates(timm.create_model("resnet18", num_classes=10, in_chans=1), policy, (1, 32, 32))
        return [gate.fc1.weight for gate in gates.values()]

    assert Recipe().gates.max_cost is not None
    assert all(torch.equal(a, b) for a, b in zip(first_layers(None), first_layers(Recipe().gates.max_cost)))


@pytest.mark.parametrize("name", ["mobilenetv2_050", "efficientnet_b0", "mobilenetv3_small_100"])
def test_a_depthwise_follower_computes_exactly_its_producers_channels(name):
    """Per image, the follower's masked output is zero exactly where the producer's gate switched a
    channel off (its BatchNorm's bias no longer leaks into the next convolution), and at insertion the
    network is unchanged."""
    model = timm.create_model(name, pretrained=False, num_classes=10).eval().double()  # float64: see above
    randomize_norms(model)
    images = torch.randn(3, *INPUT, dtype=torch.float64)
    with torch.no_grad():
        expected = model(images)
    gates = insert_gates(model, GatePolicy(init="l1_norm"), input_shape=INPUT)
    followers = gates.followers()
    assert followers
    with torch.no_grad():
        assert torch.allclose(model(images), expected, atol=1e-5, rtol=0)
        for gate in gates.values():
            gate.fc2.weight.normal_(0, 0.3)  # saliencies that differ per image
        with GateRecorder(model, detach=True) as rec:
            model(images)
        gates.set_thresholds({n: float(s.median()) for n, s in rec.saliency.items()})
    leaders = gates.by_name()
    outputs = {}
    hooks = [
        model.get_submodule(leaders[leader].follower_site).register_forward_hook(
            lambda module, args, output, name=follower: outputs.__setitem__(name, output.clone())
        )
        for follower, leader in followers.items()
        if leaders[leader].follower_site_kind == "output"
    ] + [
        model.get_submodule(leaders[leader].follower_site).register_forward_pre_hook(
            lambda module, args, name=follower: outputs.__setitem__(name, args[0].clone())  # the act is in place
        )
        for follower, leader in followers.items()
        if leaders[leader].follower_site_kind == "input"
    ]
    with torch.no_grad(), GateRecorder(model, detach=True) as rec:
        model(images)
    for hook in hooks:
        hook.remove()
    for follower, leader in followers.items():
        computed = outputs[follower].abs().amax(dim=(2, 3)) != 0
        assert torch.equal(computed, rec.active_outputs()[leader]), follower


def test_policy_rejects_unknown_keys():
    with pytest.raises(ValueError, match="exclud"):
        GatePolicy(excludes=("x",))


def test_mask_goes_before_a_fused_activation():
    model = timm.create_model("efficientnet_b0", pretrained=False)
    gate = insert_gates(model, input_shape=(3, 32, 32)).by_name()["blocks.1.0.conv_pw"]
    assert gate.mask_site == "blocks.1.0.bn1.act" and gate.mask_site_kind == "input"


def test_no_gateable_convolution_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ModelError, match="found 1 convolutions, 0 followed by a normalisation"):
        insert_gates(model, input_shape=(3, 8, 8))


def test_unrunnable_probe_is_a_clear_error():
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(ModelError, match="could not run ResNet on a 1x5x32x32 input"):
        insert_gates(model, input_shape=(5, 32, 32))


def test_gates_twice_is_an_error():
    model = timm.create_model("resnet18", pretrained=False)
    insert_gates(model, input_shape=(3, 32, 32))
    with pytest.raises(ModelError, match="already has gates"):
        insert_gates(model, input_shape=(3, 32, 32))


def test_saliency_formula_and_mask():
    model = timm.create_model("resnet18", pretrained=False)
    gate = insert_gates(model, input_shape=(3, 32, 32)).by_name()["layer1.0.conv1"]
    nn.init.normal_(gate.fc2.weight)
    x = torch.randn(2, 64, 8, 8)
    hand = torch.relu(gate.fc2(torch.relu(gate.fc1(x.mean((2, 3)))))).clamp(max=1000.0)
    assert torch.allclose(gate(x), hand)
    gate.threshold.fill_(0.5)
    s = torch.tensor([[0.2, 0.5, 3.0]])
    assert gate.mask(s).tolist() == [[0.0, 0.5, 3.0]]


@pytest.mark.parametrize("name", FAMILIES)
def test_importance_init_keeps_the_function_and_ranks_channels_by_importance(name):
    """gates.init l1_norm / bn_scale: outputs unchanged at insertion (within 1e-5; in float64, so that
    float32 rounding of logits of size ~10 does not hide a real change), and every image's saliencies
    are the channels' static importance, constant per channel."""
    model = timm.create_model(name, pretrained=False, num_classes=10).eval().double()
    randomize_norms(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
    images = torch.randn(2, *INPUT, dtype=torch.float64)
    with torch.no_grad():
        expected = model(images)
    kind = "bn_scale" if name in ("resnet50", "efficientnet_b0", "ghostnet_100") else "l1_norm"
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    l1 = {n: m.weight.detach().abs().flatten(1).sum(1) for n, m in convs.items()}
    l1_in = {f"{n}:in": m.weight.detach().abs().sum(dim=(0, 2, 3)) for n, m in convs.items() if m.groups == 1}
    # input gates too: their convolution's weights absorb the initial saliency
    policy = GatePolicy(init=kind, init_strength=1.0, activation="softplus", inputs=True)
    gates = insert_gates(model, policy, input_shape=INPUT)
    assert len(gates) > 0
    with torch.no_grad(), GateRecorder(model, detach=True) as rec:
        got = model(images)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), float((got - expected).abs().max())
    for name, saliency in rec.saliency.items():
        assert torch.allclose(saliency[0], saliency[1])  # constant per channel at insertion
        if name in l1_in:
            expected_scale = (l1_in[name] / l1_in[name].mean()).clamp(min=1e-2)
            assert torch.allclose(saliency[0], expected_scale, rtol=1e-4, atol=1e-5)
        elif kind == "l1_norm":
            expected_scale = (l1[name] / l1[name].mean()).clamp(min=1e-2)
            assert torch.allclose(saliency[0], expected_scale, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_taylor_init_keeps_the_function_and_starts_each_channel_at_its_measured_importance(name):
    """gates.init taylor: the importance is measured on the calibration images before any gate is
    attached; outputs unchanged at insertion, saliency b = importance over the layer's mean."""
    model = timm.create_model(name, pretrained=False, num_classes=10).eval().double()
    randomize_norms(model)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, *INPUT, generator=generator, dtype=torch.float64)
    calibration = [(images, torch.randint(0, 10, (4,), generator=generator))]
    with torch.no_grad():
        expected = model(images)
    selected = select_convs(model, GatePolicy(), INPUT)
    measured = taylor_importance(model, sorted(set(selected.values())), calibration)
    gates = insert_gates(
        model, GatePolicy(init="taylor", init_strength=1.0), input_shape=INPUT, calibration=calibration
    )
    with torch.no_grad(), GateRecorder(model, detach=True) as rec:
        got = model(images)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), float((got - expected).abs().max())
    checked = 0
    for gate in gates.values():
        if gate.conv_name not in selected:  # a depthwise follower keeps its producer's channels
            continue
        importance = measured[selected[gate.conv_name]].double()
        assert torch.allclose(rec.saliency[gate.name][0], (importance / importance.mean()).clamp(min=1e-2), rtol=1e-4)
        checked += 1
    assert checked > 5


def test_taylor_init_without_calibration_images_is_an_error():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(ModelError, match="gates.init: taylor measures importance on labelled images"):
        insert_gates(model, GatePolicy(init="taylor"), input_shape=INPUT)

import pytest
import timm
import torch
from helpers import FAMILIES, make_activations_positive, randomize_norms
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from manidp_cli.config import GatePolicy
from manidp_cli.core.flops import (
    CostTable,
    LayerCost,
    closed_gates_flops,
    conv_dynamic_flops,
    count_flops,
    decided_flops,
    measure_flops,
)
from manidp_cli.core.gating import insert_gates
from manidp_cli.core.recorder import GateRecorder


@pytest.fixture(scope="module")
def resnet18():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    make_activations_positive(model)
    gates = insert_gates(model, input_shape=(3, 64, 64))
    return model, gates, count_flops(model, (3, 64, 64))


def test_dense_costs_match_a_hand_count(resnet18):
    model, gates, table = resnet18
    layers = {layer.name: layer for layer in table.layers}
    # 64px input -> stride-2 stem -> max-pool -> 16x16; 3x3 conv 64 -> 64
    assert layers["layer1.0.conv1"].dense_flops == 3 * 3 * 16 * 16 * 64 * 64
    assert layers["conv1"].dense_flops == 7 * 7 * 32 * 32 * 3 * 64
    assert layers["fc"].dense_flops == 512 * 10
    # a gate: pooling of its input + fc1 (64 -> 64) + fc2 (64 -> 64)
    assert layers["manidp_gates.layer1_0_conv1"].dense_flops == 64 * 16 * 16 + 64 * 64 + 64 * 64
    plain = count_flops(timm.create_model("resnet18", pretrained=False, num_classes=10), (3, 64, 64))
    assert table.dense_flops == plain.total_flops
    assert table.gate_flops > 0 and table.total_flops == table.dense_flops + table.gate_flops


def test_unpruned_dynamic_flops_equal_dense_plus_gates(resnet18):
    model, gates, table = resnet18
    gates.reset_thresholds()
    stats = measure_flops(model, table, [torch.randn(3, 3, 64, 64)])
    assert stats.per_image == [float(table.total_flops)] * 3
    assert stats.mean_ratio == pytest.approx(1 + table.gate_flops / table.dense_flops)


def test_halving_one_layer_halves_it_and_the_next_layers_inputs(resnet18):
    model, gates, table = resnet18
    gate = gates.by_name()["layer1.0.conv1"]
    original_bias = gate.fc2.bias.detach().clone()
    with torch.no_grad():
        gate.fc2.bias.copy_(torch.tensor([1.0, 0.5] * 32))  # saliency = bias (zero weights)
    gates.set_thresholds({"layer1.0.conv1": 0.75})
    try:
        stats = measure_flops(model, table, [torch.randn(2, 3, 64, 64)])
    finally:
        gates.reset_thresholds()
        with torch.no_grad():
            gate.fc2.bias.copy_(original_bias)
    layers = {layer.name: layer for layer in stats.layers}
    dense = 3 * 3 * 16 * 16 * 64 * 64
    assert layers["layer1.0.conv1"].dynamic_flops == dense / 2
    assert layers["layer1.0.conv1"].keep_ratio_out == 0.5
    assert layers["layer1.0.conv2"].keep_ratio_in == 0.5
    assert layers["layer1.0.conv2"].dynamic_flops == dense / 2
    assert layers["layer1.1.conv1"].dynamic_flops == dense  # the residual add refills the channels
    assert stats.mean_flops == table.total_flops - dense
    assert stats.channel_keep_frequency["layer1.0.conv1"][:4] == [1.0, 0.0, 1.0, 0.0]


def test_a_gate_decides_its_convolution_and_the_inputs_it_feeds(resnet18):
    model, gates, table = resnet18
    decided = decided_flops(table)
    conv = 3 * 3 * 16 * 16 * 64 * 64
    assert decided["layer1.0.conv1"] == 2 * conv  # its outputs, and conv2's inputs
    assert decided["layer1.0.conv2"] == conv  # the residual add: nothing downstream follows its mask
    assert set(decided) == set(gates.by_name())


def test_a_followed_depthwise_block_counts_the_producers_channels_three_times():
    """depthwise: follow. An inverted-residual block's expansion gate decides its own outputs, the
    depthwise convolution's channels and the projection's inputs: per image each costs its dense
    FLOPs times the share of the expansion's channels kept (the projection's outputs by its own gate)."""
    model = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=10).eval()
    randomize_norms(model)
    gates = insert_gates(model, GatePolicy(depthwise="follow"), input_shape=(3, 64, 64))
    table = count_flops(model, (3, 64, 64))
    layers = {layer.name: layer for layer in table.convs()}
    expansion, depthwise, projection = (f"blocks.1.1.conv_{kind}" for kind in ("pw", "dw", "pwl"))
    assert layers[depthwise].input_producer == layers[projection].input_producer == expansion
    assert not layers[depthwise].gated and layers[expansion].gated and layers[projection].gated
    assert decided_flops(table)[expansion] == sum(layers[n].dense_flops for n in (expansion, depthwise, projection))
    with torch.no_grad():
        for gate in gates.values():  # saliencies that differ by channel and a little by image
            gate.fc2.weight.normal_(0, 0.01)
            gate.fc2.bias.uniform_(0.5, 1.5)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), GateRecorder(model, detach=True) as rec:
        model(images)
    gates.set_thresholds({n: float(s.median()) for n, s in rec.saliency.items()})
    stats = measure_flops(model, table, [images])
    with torch.no_grad(), GateRecorder(model, detach=True) as rec:
        model(images)
    kept = rec.active_outputs()[expansion].double().mean(1).mean()
    kept_out = rec.active_outputs()[projection].double().mean(1).mean()
    measured = {layer.name: layer.dynamic_flops for layer in stats.layers}
    assert measured[expansion] == pytest.approx(layers[expansion].dense_flops * kept)
    assert measured[depthwise] == pytest.approx(layers[depthwise].dense_flops * kept)
    # each image's kept inputs times its kept outputs
    per_image = rec.active_outputs()[expansion].double().mean(1) * rec.active_outputs()[projection].double().mean(1)
    assert measured[projection] == pytest.approx(layers[projection].dense_flops * float(per_image.mean()))
    assert 0.2 < float(kept) < 0.8 and 0.2 < float(kept_out) < 0.8


def test_closed_gates_cost_what_the_network_measures_with_every_gate_closed(resnet18):
    model, gates, table = resnet18
    gates.set_thresholds({name: 1e9 for name in gates.by_name()})  # above every saliency
    try:
        stats = measure_flops(model, table, [torch.randn(2, 3, 64, 64)])
    finally:
        gates.reset_thresholds()
    decided = [layer for layer in table.convs() if layer.gated or layer.input_producer is not None]
    assert closed_gates_flops(table) == table.total_flops - sum(layer.dense_flops for layer in decided)
    assert stats.per_image == [closed_gates_flops(table)] * 2
    layers = {layer.name: layer for layer in table.layers}
    # the stem and the downsampling shortcuts are not gated; the gates' own cost stays
    assert closed_gates_flops(table) >= layers["conv1"].dense_flops + table.gate_flops


def test_cost_table_round_trips_through_a_dict(resnet18):
    table = resnet18[2]
    assert CostTable.from_dict(table.to_dict()) == table


@settings(max_examples=60, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 4, 8]),
    data=st.data(),
)
def test_grouped_conv_cost_counts_active_pairs_per_group(groups, data):
    c_in, c_out, batch = 8, 16, 2
    layer = LayerCost("c", "conv", "Conv2d", 1000 * c_in * c_out // groups, c_in, c_out, groups)
    bits = st.lists(st.booleans(), min_size=c_in, max_size=c_in)
    active_in = torch.tensor([data.draw(bits) for _ in range(batch)])
    out_bits = st.lists(st.booleans(), min_size=c_out, max_size=c_out)
    active_out = torch.tensor([data.draw(out_bits) for _ in range(batch)])
    got = conv_dynamic_flops(layer, active_in, active_out, batch)
    for i in range(batch):
        # brute force: each (input, output) channel pair in the same group costs 1000 FLOPs
        pairs = sum(
            1
            for a in range(c_in)
            for b in range(c_out)
            if active_in[i, a] and active_out[i, b] and a // (c_in // groups) == b // (c_out // groups)
        )
        assert float(got[i]) == pytest.approx(1000 * pairs)
    full = conv_dynamic_flops(layer, None, None, batch)
    assert full.tolist() == [float(layer.dense_flops)] * batch


@pytest.mark.parametrize("name", FAMILIES)
def test_unpruned_gated_network_measures_exactly_dense_plus_gates(name):
    """Channels that a ReLU zeroes are computed (no gate switched them off): with every gate open
    each image costs exactly the dense FLOPs plus the gates' own, on every family."""
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    randomize_norms(model)  # realistic activations: many channels are entirely zero after ReLU
    insert_gates(model, GatePolicy(inputs=True), input_shape=(3, 64, 64))  # output and input gates
    table = count_flops(model, (3, 64, 64))
    stats = measure_flops(model, table, [torch.randn(2, 3, 64, 64)])
    assert stats.per_image == [float(table.total_flops)] * 2
    assert stats.mean_ratio == pytest.approx(1 + table.gate_flops / table.dense_flops, rel=1e-12)
    assert all(layer.keep_ratio_in == 1.0 and layer.keep_ratio_out == 1.0 for layer in stats.layers)


class _ReluZeroes(nn.Module):
    """stem -> conv1 (gated) -> conv2 (gated) -> head, with conv1's BatchNorm shifting its first
    four channels so far down that the ReLU zeroes them for every image."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)
        with torch.no_grad():
            self.bn1.bias[:4] = -1e4

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(self.stem(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_channels_a_relu_zeroes_count_as_computed():
    model = _ReluZeroes().eval()
    gates = insert_gates(model, input_shape=(3, 8, 8))
    assert set(gates.by_name()) == {"conv1", "conv2"}
    table = count_flops(model, (3, 8, 8))
    assert {layer.name: layer.input_producer for layer in table.convs()} == {
        "stem.0": None,
        "conv1": None,
        "conv2": "conv1",
    }
    images = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        hidden = torch.relu(model.bn1(model.conv1(model.stem(images))))
    assert (hidden[:, :4] == 0).all()  # zero for every image, yet no gate switched them off
    stats = measure_flops(model, table, [images])
    assert stats.per_image == [float(table.total_flops)] * 4
    # a gate that switches off conv1's channels 4..7 removes them from conv2's inputs as well
    conv2_dense = {layer.name: layer for layer in table.convs()}["conv2"].dense_flops
    gate = gates.by_name()["conv1"]
    with torch.no_grad():
        gate.fc2.bias.copy_(torch.tensor([1.0] * 4 + [0.5] * 4))  # saliency = bias (zero weights)
    gates.set_thresholds({"conv1": 0.75})
    stats = measure_flops(model, table, [images])
    layers = {layer.name: layer for layer in stats.layers}
    assert layers["conv1"].keep_ratio_out == 0.5 and layers["conv2"].keep_ratio_in == 0.5
    assert layers["conv2"].dynamic_flops == conv2_dense / 2


def test_an_input_gate_skips_its_convolutions_inputs_and_nothing_else():
    """resnet18's layer1.0.conv1 reads the residual stream: its input gate switching off half of the
    stream's channels halves that convolution's FLOPs; the shortcut and the next block still read all."""
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    gates = insert_gates(model, GatePolicy(inputs=True), input_shape=(3, 32, 32))
    table = count_flops(model, (3, 32, 32))
    producers = {layer.name: layer.input_producer for layer in table.convs()}
    assert producers["layer1.0.conv1"] == "layer1.0.conv1:in"
    assert producers["layer1.0.conv2"] == "layer1.0.conv1"
    assert producers["conv1"] is None and producers["layer2.0.downsample.0"] is None
    assert "conv1:in" not in gates.by_name()  # the stem reads the image
    gate = gates.by_name()["layer1.0.conv1:in"]
    with torch.no_grad():
        gate.fc2.bias.copy_(torch.tensor([1.0] * 32 + [0.5] * 32))  # saliency = bias (zero weights)
    gates.set_thresholds({"layer1.0.conv1:in": 0.75})
    stats = measure_flops(model, table, [torch.randn(2, 3, 32, 32)])
    layers = {layer.name: layer for layer in stats.layers}
    dense = {layer.name: layer.dense_flops for layer in table.convs()}
    assert layers["layer1.0.conv1"].keep_ratio_in == 0.5
    assert layers["layer1.0.conv1"].dynamic_flops == dense["layer1.0.conv1"] / 2
    assert all(layers[n].dynamic_flops == dense[n] for n in dense if n != "layer1.0.conv1")
    assert stats.per_image[0] == table.total_flops - dense["layer1.0.conv1"] / 2


def test_routed_channel_share_counts_the_channels_whose_decision_depends_on_the_image():
    from manidp_cli.core.flops import FlopsStats

    stats = FlopsStats(10, 0, [5.0], [], {"a": [0.0, 1.0, 0.5, 0.01], "b": [0.99, 0.3, 1.0, 0.0]})
    assert stats.routed_channel_share() == 2 / 8  # 0.5 and 0.3; 0.01 and 0.99 are within the band
    assert stats.to_dict()["routed_channel_share"] == 2 / 8
    assert FlopsStats(10, 0, [10.0], []).routed_channel_share() is None  # no gates

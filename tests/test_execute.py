"""Dynamic execution equals the masked model; static slimming and bench produce what they promise."""

import pytest
import timm
import torch
from helpers import check_execution, randomize_norms
from torch import nn

from manidp_cli.config import GatePolicy
from manidp_cli.core.gating import insert_gates
from manidp_cli.core.recorder import GateRecorder
from manidp_cli.runtime import execute
from manidp_cli.runtime.channels import ScattersOutput
from manidp_cli.runtime.decisions import reference_run
from manidp_cli.runtime.execute import DynamicConv, FollowingConv, dynamic_model, fold_batchnorm, folded_model

FAMILIES = [
    "resnet18",
    "resnet50",
    "mobilenetv2_050",
    "efficientnet_b0",
    "tf_efficientnet_lite0",
    "regnetx_002",
    "ghostnet_100",
    "densenet121",
    "resnext26ts",
    "mobilenetv3_small_100",
    "vgg11_bn",
]
NARROW_CHAINS = {"resnet18": 8, "resnet50": 32, "mobilenetv2_050": 19, "vgg11_bn": 6}  # producer convs


def _pruned(name: str, shape=(3, 64, 64)):
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    randomize_norms(model)
    gates = insert_gates(model, input_shape=shape)
    for gate in gates.values():
        nn.init.normal_(gate.fc2.weight, std=0.01)
        nn.init.uniform_(gate.fc2.bias, 0.5, 1.5)
    # running statistics of random images through the gated network keep activations in range
    # (saliencies scale every layer's output; fixed statistics let that compound to inf in deep
    # networks, which would leave NaN saliencies)
    for norm in model.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.reset_running_stats()
            norm.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(8, *shape, generator=torch.Generator().manual_seed(99)))
    model.eval()
    with torch.no_grad(), GateRecorder(model, detach=True) as rec:
        model(torch.randn(4, *shape))
    gates.set_thresholds({n: float(s.median()) for n, s in rec.saliency.items()})
    assert all(torch.isfinite(torch.tensor(list(gates.thresholds().values()))))
    return model, gates


def test_fold_batchnorm():
    conv, norm = nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    weight, bias = fold_batchnorm(conv, norm)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(nn.functional.conv2d(x, weight, bias), norm(conv(x)), atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_dynamic_execution_equals_the_masked_model(name):
    model, gates = _pruned(name)
    dynamic = dynamic_model(model, (3, 64, 64))
    masked = folded_model(model, (3, 64, 64))
    if name in NARROW_CHAINS:  # conv -> act (-> pool) -> conv chains hand over narrow tensors
        producers = [m for m in dynamic.modules() if isinstance(m, (DynamicConv, FollowingConv)) and m.narrow_output]
        assert len(producers) == NARROW_CHAINS[name]
    decisions = disagreements = 0
    for seed in range(3):
        image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad(), GateRecorder(model, detach=True) as rec:
            model(image)
        kept = [float(k.float().mean()) for k in rec.active_outputs().values()]
        assert 0.1 < sum(kept) / len(kept) < 0.9  # the gates really prune
        check = check_execution(model, dynamic, image)
        decisions, disagreements = decisions + check.decisions, disagreements + check.disagreements
    check = check_execution(model, dynamic, torch.randn(3, 3, 64, 64))  # batches: masked path
    decisions, disagreements = decisions + check.decisions, disagreements + check.disagreements
    assert disagreements <= 0.02 * decisions  # near-ties are rare, so the checks have teeth
    # The folded masked model has no decisions to force: its outputs are compared on the images
    # where its decisions equal the masked model's (near-ties aside, that is every image).
    compared = 0
    for seed in range(7, 10):
        image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        reference, folded = reference_run(model, image), reference_run(masked, image)
        if all(torch.equal(folded.decisions[n], d) for n, d in reference.decisions.items()):
            assert (folded.logits - reference.logits).abs().max() <= 1e-4
            compared += 1
    assert compared >= 2


def test_static_slimming_removes_never_kept_channels(tmp_path):
    from manidp_cli.runtime.slimming import mask_statistics, save_static, slim

    model, gates = _pruned("resnet18")
    gate = gates.by_name()["layer1.0.conv1"]
    with torch.no_grad():
        gate.fc2.bias[:16] = -1.0  # saliency 0: these channels are never kept
    batches = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    frequency, mean_mask = mask_statistics(model, batches)
    assert float(frequency["layer1.0.conv1"][:16].max()) == 0.0
    result = slim(model, frequency, mean_mask, 0.0, (3, 64, 64))
    slimmed = result.model
    assert result.removed["layer1.0.conv1"] >= 16
    assert (
        slimmed.layer1[0].conv1.out_channels
        == slimmed.layer1[0].conv2.in_channels
        == 64 - result.removed["layer1.0.conv1"]
    )
    # conv2 feeds the residual addition: it computes its kept channels, its BatchNorm puts them back
    conv2, norm2 = slimmed.layer1[0].conv2, slimmed.layer1[0].bn2
    assert conv2.out_channels == norm2.num_features == 64 - result.removed["layer1.0.conv2"] < 64
    assert isinstance(norm2, ScattersOutput) and norm2.full_width == 64
    assert result.scattered["layer1.0.bn2"] == norm2.output_channels.tolist()
    assert not hasattr(slimmed, "manidp_gates")
    files = save_static(tmp_path, result, (3, 64, 64), {"model": "resnet18"}, {})
    loaded = torch.export.load(str(files.files[0])).module()
    assert files.program_batch == "any from 1 to 4096"
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = slimmed(image)
        assert torch.allclose(loaded(image), expected, atol=1e-5)
        for layout in (torch.contiguous_format, torch.channels_last):  # folded: the scatter stays
            folded = folded_model(slimmed, (3, 64, 64)).to(memory_format=layout)
            assert torch.allclose(folded(image.to(memory_format=layout)), expected, atol=1e-4)


def test_bench_measures_every_variant():
    from manidp_cli.analysis.bench import bench_models

    model, _ = _pruned("resnet18", (3, 32, 32))
    dense = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    result = bench_models(model, dense, (3, 32, 32), runs=3, warmup=1, batch_size=4)
    assert set(result.variants) == {"dense", "dense_channels_last", "masked", "dynamic", "dynamic_channels_last"}
    assert result.variants[result.reference].latency_ratio == 1.0
    for timing in result.variants.values():
        assert timing.latency_ms_median > 0 and timing.throughput_images_per_s > 0
        assert timing.latency_ms_p90 >= timing.latency_ms_median
    assert "dynamic execution" in result.verdict
    as_json = result.to_dict()  # what `manidp bench --json` prints
    assert as_json["variants"][result.best_dynamic]["throughput_per_image_loop"] > 0
    assert "model" not in as_json and "tuned_entries" not in as_json["variants"]["dense"]


def test_input_gated_model_runs_folded_and_dynamic_with_the_masked_models_outputs():
    """Input gates (``GatePolicy.inputs``) stay hooks on the folded and dynamic convolutions: they
    mask the same input channels (in float64, so that no decision is a near-tie)."""
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    randomize_norms(model)
    model.double()
    gates = insert_gates(model, GatePolicy(inputs=True), input_shape=(3, 64, 64))
    for gate in gates.values():
        nn.init.normal_(gate.fc2.weight, std=0.01)
        nn.init.uniform_(gate.fc2.bias, 0.5, 1.5)
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad(), GateRecorder(model, detach=True) as rec:
        model(images)
    # halfway between the two middle saliencies: no image's saliency is the threshold itself
    middle = {n: s.flatten().sort().values[s.numel() // 2 - 1 : s.numel() // 2 + 1] for n, s in rec.saliency.items()}
    gates.set_thresholds({n: float(pair.mean()) for n, pair in middle.items()})
    with torch.no_grad(), GateRecorder(model, detach=True) as rec:
        expected = model(images)
    kept = rec.active_outputs()["layer2.0.conv1:in"].double().mean()
    assert 0.1 < kept < 0.9  # the input gates really mask
    masked, dynamic = folded_model(model, (3, 64, 64)), dynamic_model(model, (3, 64, 64))
    with torch.no_grad():
        assert (masked(images) - expected).abs().max() < 1e-9
        for i in range(len(images)):
            assert (dynamic(images[i : i + 1]) - expected[i : i + 1]).abs().max() < 1e-9
    # in float32, decision by decision (input gates decide, and take forced decisions, too)
    model.float()
    check = check_execution(model, dynamic_model(model, (3, 64, 64)), images[:1].float())
    assert check.decisions == len(gates)


def test_slimming_is_exact_when_every_mask_is_the_same_for_every_image():
    """With fc2's weights zero each gate's mask is one constant per channel: folding the mean masks
    (output gates into BatchNorm, input gates into the weights that read each channel) then gives
    the gated model's function exactly."""
    from manidp_cli.runtime.slimming import mask_statistics, slim

    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval().double()
    randomize_norms(model)
    gates = insert_gates(model, GatePolicy(inputs=True, init="l1_norm"), input_shape=(3, 32, 32))
    batches = [torch.randn(4, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad(), GateRecorder(model, detach=True) as rec:
        model(batches[0])
    middle = {n: s[0].sort().values[s.shape[1] // 2 - 1 : s.shape[1] // 2 + 1] for n, s in rec.saliency.items()}
    gates.set_thresholds({n: float(pair.mean()) for n, pair in middle.items()})
    frequency, mean_mask = mask_statistics(model, batches)
    assert 0.3 < float(frequency["layer2.0.conv1:in"].mean()) < 0.7
    result = slim(model, frequency, mean_mask, 0.0, (3, 32, 32))
    assert "layer4.1.bn2" in result.scattered  # residual-feeding layers are narrowed too
    with torch.no_grad():
        assert (result.model(batches[1]) - model(batches[1])).abs().max() < 1e-9
        assert (folded_model(result.model, (3, 32, 32))(batches[1]) - model(batches[1])).abs().max() < 1e-9


@pytest.mark.parametrize(
    ("name", "scatters"),
    [("mobilenetv3_small_100", True), ("efficientnet_b0", True), ("regnetx_002", True), ("densenet121", False)],
)
def test_slimming_other_families_is_exact_and_narrows_what_keeps_its_place(name, scatters):
    """Depthwise convolutions (gated ones stay whole), concatenations, squeeze-excite and fused
    activations downstream: a layer narrowed and scattered back, or left whole, keeps the gated
    model's function. densenet's gated convolutions each feed one convolution: nothing to scatter."""
    from manidp_cli.runtime.slimming import mask_statistics, slim

    model = timm.create_model(name, pretrained=False, num_classes=10).eval().double()
    randomize_norms(model)
    gates = insert_gates(model, GatePolicy(init="l1_norm"), input_shape=(3, 32, 32))
    batches = [torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad(), GateRecorder(model, detach=True) as rec:
        model(batches[0])
    gates.set_thresholds({n: float(s[0].median()) for n, s in rec.saliency.items()})
    frequency, mean_mask = mask_statistics(model, batches)
    result = slim(model, frequency, mean_mask, 0.0, (3, 32, 32))
    assert result.removed and bool(result.scattered) == scatters
    with torch.no_grad():
        expected = model(batches[1])
        assert (result.model(batches[1]) - expected).abs().max() < 1e-9
        assert (folded_model(result.model, (3, 32, 32))(batches[1]) - expected).abs().max() < 1e-9


def test_a_batch_computes_only_the_channels_its_images_keep():
    """Gates that agree across images (a trained default's) leave a narrow union per layer: the batch
    path runs that union, and equals the masked model."""
    model, gates = _pruned("resnet18", (3, 32, 32))
    for gate in gates.values():
        nn.init.zeros_(gate.fc2.weight)  # the same decisions for every image: the union is one keep-set
    dynamic = dynamic_model(model, (3, 32, 32))
    masked_calls = []
    for layer in (m for m in dynamic.modules() if isinstance(m, DynamicConv)):
        original = layer.conv.forward  # the full-width masked path
        layer.conv.forward = lambda x, original=original: masked_calls.append(x.shape) or original(x)
    batch = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(dynamic(batch), folded_model(model, (3, 32, 32))(batch), atol=1e-4)
    assert masked_calls == []  # every gated layer ran its union, none the full-width masked convolution


def test_single_images_reuse_gathered_weights_only_for_the_same_decision():
    """A layer keeps the weights it gathered for its last few decisions: an image that repeats one
    reuses them, one that differs gathers its own, and outputs equal the masked model's either way."""
    model, _ = _pruned("resnet18", (3, 32, 32))
    dynamic = dynamic_model(model, (3, 32, 32))
    images = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    layers = [m for m in dynamic.modules() if isinstance(m, DynamicConv)]
    for image in (*images, images[0], images[1], *images):  # repeats hit, new decisions miss
        check_execution(model, dynamic, image)
        assert all(len(layer._recent) <= execute.RECENT_WEIGHTS for layer in layers)
    first = {id(layer): dict(layer._recent) for layer in layers}
    assert all(first.values())  # every gated layer gathered (and kept) its weights
    check_execution(model, dynamic, images[2])  # the same decisions as the last call: nothing gathered
    assert all(
        any(kept is seen for seen in first[id(layer)].values()) for layer in layers for kept in layer._recent.values()
    )
    dynamic.to(memory_format=torch.channels_last)  # weights relaid: gathered copies are stale
    assert all(not layer._recent for layer in layers)
    check_execution(model, dynamic, images[0].contiguous(memory_format=torch.channels_last))
    with torch.no_grad():  # weights changed in place (a state dict loaded): gathered copies are stale too
        for layer in layers:
            layer.weight.mul_(2)
        before = dynamic(images[0])
        for layer in layers:
            layer.weight.div_(2)
        assert not torch.allclose(dynamic(images[0]), before)

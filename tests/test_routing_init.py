import timm
import torch
from helpers import randomize_norms

from manidp_cli.config import GatePolicy
from manidp_cli.core.gating import gates_of, insert_gates
from manidp_cli.core.recorder import GateRecorder
from manidp_cli.core.routing_init import fit_gates_to_responses, routing_target
from manidp_cli.data import load_embedded

INPUT = (1, 32, 32)


def _gated(seed: int = 0):
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1).eval()
    randomize_norms(model)
    insert_gates(model, GatePolicy(init="l1_norm", init_strength=0.3, reduction=4), input_shape=INPUT)
    return model


def _saliencies(model, images):
    with torch.no_grad(), GateRecorder(model, detach=True) as recorder:
        model(images)
    return dict(recorder.saliency)


def test_target_shifts_saliency_between_channels_within_an_image():
    responses = torch.tensor([[0.0, 1.0], [2.0, 1.0], [1.0, 1.0], [5.0, 1.0]])
    start = torch.tensor([2.0, 0.5])
    target = routing_target(responses, start, 0.25)
    # relative responses (over each channel's mean, then each image's mean), minus 1, clipped to [-1, 1]
    deviation = torch.tensor([[-1.0, 1.0], [0.0, 0.0], [-1 / 3, 1 / 3], [3 / 7, -3 / 7]])
    assert torch.allclose(target, 0.25 * start * deviation)
    assert target.abs().max() <= 0.25 * start.max()


def test_an_image_that_responds_more_overall_gets_no_more_saliency():
    profile = torch.tensor([1.0, 3.0, 0.5])
    responses = torch.tensor([[0.2], [1.0], [4.0]]) * profile  # the same channels, scaled per image
    assert torch.allclose(routing_target(responses, torch.ones(3), 0.3), torch.zeros(3, 3), atol=1e-6)


def test_fit_gives_each_image_its_own_saliencies_and_keeps_the_static_start():
    model = _gated()
    data = load_embedded()  # real images: channels respond differently to each
    images = [x for x, _ in data.train.batches(32, limit=128)]
    held_out = next(iter(data.eval.batches(16)))[0]
    before = _saliencies(model, held_out)
    biases = {name: gate.fc2.bias.detach().clone() for name, gate in gates_of(model).by_name().items()}
    assert all(float(s.std(dim=0).max()) == 0 for s in before.values())  # constant start

    fit = fit_gates_to_responses(model, images, strength=0.3)

    after = _saliencies(model, held_out)
    explained = fit.explained_variance
    assert set(explained) == set(before)
    assert sum(r2 > 0.5 for r2 in explained.values()) >= len(explained) // 2, explained
    for name, gate in gates_of(model).by_name().items():
        assert torch.equal(gate.fc2.bias, biases[name])
        if explained[name] > 0:
            assert float(after[name].std(dim=0).mean()) > 0
        else:  # a fit that explains nothing is undone: the constant start
            assert torch.equal(after[name], before[name]), name
    # on the images it was fitted to, each saliency is at most `strength` away from its start, up to the fit's error
    fitted = _saliencies(model, images[0])
    for name, start in _saliencies(_gated(), images[0]).items():
        relative = (fitted[name] - start).abs() / start
        assert float(relative.mean()) < 0.3, name


def test_zero_strength_leaves_the_gates_alone():
    model = _gated()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fit_gates_to_responses(model, [torch.randn(8, *INPUT)], strength=0.0).explained_variance == {}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_pruning_run_fits_once_and_keeps_the_fit_through_resume(tiny_fashion, dense_weights, tmp_path):
    from helpers import prune_tiny

    from manidp_cli.io import load_pruned

    overrides = {"gates": {"routing_init": 0.2}}
    stopped = prune_tiny(
        tmp_path, tiny_fashion, weights=dense_weights, overrides=overrides, on_step=lambda info: info.epoch == 1
    )
    assert stopped.interrupted
    assert not prune_tiny(tmp_path, tiny_fashion, resume=True).interrupted
    _, info = load_pruned(tmp_path)
    # fitted by the first process, before its first step; the resumed one read it from the checkpoint
    fitted = info.metadata["routing_fit_r2"]
    assert set(fitted) == set(info.metadata["gated_layers"])
    assert all(r2 <= 1 for r2 in fitted.values()) and any(r2 > 0 for r2 in fitted.values())

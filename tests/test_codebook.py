"""Codebooks of keep-sets: the build, the gate's snapping, training with them and gather-free execution."""

import pytest
import timm
import torch
from helpers import PAPER_PROCEDURE, check_execution, prune_tiny
from test_execute import _pruned as pruned_with_random_gates
from torch import nn

from manidp_cli.config import CodebookConfig, load_recipe
from manidp_cli.core.calibration import CODEBOOK_WIDTH_TOLERANCE, fit_codebook_widths
from manidp_cli.core.codebook import build_codebook, build_codebooks, install_codebooks, learn_codebook, learn_codebooks
from manidp_cli.core.flops import count_flops, measure_flops
from manidp_cli.core.gating import SaliencyGate, gates_of, insert_gates
from manidp_cli.core.schedule import search_remain_rate
from manidp_cli.errors import ManidpError, RecipeError
from manidp_cli.runtime import execute
from manidp_cli.runtime.decisions import run_with_decisions
from manidp_cli.runtime.execute import DynamicConv, dynamic_model, pin_entry_kernels, tune_entries


def _total_score(excess: torch.Tensor, codebook: torch.Tensor) -> float:
    return float((excess @ codebook.t()).max(1).values.sum())


def test_build_recovers_two_clear_groups_of_images():
    generator = torch.Generator().manual_seed(0)
    first = torch.tensor([1.0] * 8 + [-1.0] * 8)
    second = -first
    excess = torch.cat(
        [
            first + 0.1 * torch.randn(20, 16, generator=generator),
            second + 0.1 * torch.randn(30, 16, generator=generator),
        ]
    )
    codebook = build_codebook(excess, entries=2, channel_multiple=1)
    assert codebook.shape == (2, 16)
    assert {tuple(row.tolist()) for row in codebook} == {
        tuple((first > 0).float().tolist()),
        tuple((second > 0).float().tolist()),
    }


def test_more_entries_never_score_less_and_widths_are_multiples():
    generator = torch.Generator().manual_seed(1)
    excess = torch.randn(200, 64, generator=generator) + torch.linspace(-1, 1, 64)
    scores = []
    for entries in (1, 2, 4, 8):
        codebook = build_codebook(excess, entries=entries, channel_multiple=1)
        assert codebook.shape[0] <= entries
        scores.append(_total_score(excess, codebook))
    assert scores == sorted(scores) and scores[-1] > scores[0]
    rounded = build_codebook(excess, entries=4, channel_multiple=16)
    assert all(int(width) % 16 == 0 and width > 0 for width in rounded.sum(1))


def test_a_width_scale_widens_an_entry_by_rank_and_keeps_its_members():
    generator = torch.Generator().manual_seed(2)
    excess = torch.randn(100, 128, generator=generator) + torch.linspace(-1.5, 0.5, 128)
    learned = learn_codebook(excess, entries=1)
    members = learned.entries[0].bool()
    width = int(members.sum())
    for scale, multiple in ((1.0, 1), (1.5, 1), (0.5, 1), (1.3, 16), (0.7, 16)):
        (row,) = learned.rounded(multiple, width_scale=scale).bool()
        expected = max(multiple, round(width * scale / multiple) * multiple)
        assert int(row.sum()) == min(expected, 128), (scale, multiple)
        inner, outer = (row, members) if scale < 1 else (members, row)
        assert bool((outer | ~inner).all()), "a narrower entry keeps a subset of the wider one"
    assert torch.equal(learned.rounded(16), build_codebook(excess, entries=1, channel_multiple=16))


class _WidthFit:
    """resnet18 with random gates and codebooks learned (16-channel multiples), not installed yet."""

    def __init__(self, shape, entries):
        self.model, _ = pruned_with_random_gates("resnet18", shape)
        self.batches = [torch.randn(8, *shape, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        self.table = count_flops(self.model, shape)
        self.learned = learn_codebooks(self.model, self.batches, CodebookConfig(entries=entries, channel_multiple=16))

    def flops_at(self, width_scale: float) -> float:
        install_codebooks(self.model, self.learned, 16, width_scale)
        return self.measured()

    def measured(self) -> float:
        return measure_flops(self.model, self.table, self.batches).mean_ratio

    def fit(self, target: float):
        return fit_codebook_widths(self.model, self.table, self.learned, 16, self.batches, target)


@pytest.mark.parametrize("scale", [0.85, 1.15])
def test_fitted_widths_meet_a_flops_target_that_rounding_alone_misses(scale):
    setup = _WidthFit((3, 64, 64), entries=4)
    flops_at = setup.flops_at
    # widths move in steps of 16 channels, so the target is a level some scale reaches, far from the
    # rounded widths' level
    rounded, target = flops_at(1.0), flops_at(scale)
    assert abs(target - rounded) > 0.05 * target
    fit = setup.fit(target)
    measured = setup.measured()
    assert measured == pytest.approx(fit.flops_ratio)  # the fitted codebooks are the ones in force
    assert abs(measured - target) <= CODEBOOK_WIDTH_TOLERANCE * target, (rounded, target, measured)


def test_single_layers_move_when_no_common_width_scale_meets_the_target():
    """Between two FLOPs levels a common scale reaches (every layer's rounding moves at once), the
    fit moves single layers by one channel multiple until it meets the target."""
    setup = _WidthFit((3, 32, 32), entries=2)
    flops_at = setup.flops_at
    levels = sorted({round(flops_at(0.6 + 0.01 * i), 6) for i in range(81)})
    gap, low, high = max((b - a, a, b) for a, b in zip(levels, levels[1:]))
    target = (low + high) / 2
    assert gap > 4 * CODEBOOK_WIDTH_TOLERANCE * target  # no common scale comes within the tolerance
    common = search_remain_rate(flops_at, target, steps=12, tolerance=CODEBOOK_WIDTH_TOLERANCE, start=1.0)
    assert abs(common.flops_ratio - target) > CODEBOOK_WIDTH_TOLERANCE * target
    fit = setup.fit(target)
    measured = setup.measured()
    assert measured == pytest.approx(fit.flops_ratio)  # the nudged codebooks are the ones in force
    assert abs(measured - target) <= CODEBOOK_WIDTH_TOLERANCE * target, (low, high, target, measured)
    assert fit.evaluations > common.evaluations


def test_a_shift_moves_every_entry_by_whole_multiples_within_the_layer():
    generator = torch.Generator().manual_seed(4)
    learned = learn_codebook(torch.randn(60, 64, generator=generator), entries=2)
    widths = learned.rounded(16).sum(1)
    assert torch.equal(learned.rounded(16, shift=1).sum(1), (widths + 16).clamp(max=64))
    assert torch.equal(learned.rounded(16, shift=-9).sum(1), torch.full_like(widths, 16))


def _gate(channels=6):
    gate = SaliencyGate("conv", "norm", "output", 4, channels, channels, 1000.0)
    gate.threshold.fill_(0.5)
    return gate


def test_gate_snaps_to_the_entry_with_the_largest_excess():
    gate = _gate()
    gate.codebook = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.float32)
    saliency = torch.tensor(
        [
            [0.9, 0.8, 0.6, 0.1, 0.0, 0.0],  # entry 0: 0.7 vs 0.6 - 1.9
            [0.0, 0.0, 0.9, 0.9, 0.9, 0.6],
        ]
    )  # entry 1: 1.3 vs -1.0
    assert gate.entry(saliency).tolist() == [0, 1]
    assert torch.equal(gate.keep(saliency), gate.codebook[[0, 1]] > 0)
    assert torch.equal(gate.mask(saliency), saliency * gate.codebook[[0, 1]])
    gate.threshold.fill_(float("-inf"))  # no thresholds yet: free masks
    assert not gate.snaps and torch.equal(gate.mask(saliency), saliency)


def test_a_codebook_survives_the_state_dict_into_a_fresh_gate():
    gate = _gate()
    gate.codebook = torch.tensor([[1, 0, 1, 0, 1, 0]], dtype=torch.float32)
    fresh = _gate()
    assert fresh.codebook.shape == (0, 6)
    fresh.load_state_dict(gate.state_dict())
    assert torch.equal(fresh.codebook, gate.codebook)


def test_recipe_rejects_codebook_epochs_beyond_the_hold():
    with pytest.raises(RecipeError, match=r"codebook.epochs \(2\) must be at most schedule.hold_epochs \(1\)"):
        load_recipe(None, {"codebook": {"entries": 4, "epochs": 2}})
    with pytest.raises(RecipeError, match="unknown key 'codebook.size'"):
        load_recipe(None, {"codebook": {"size": 4}})


def test_codebooks_need_thresholds():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    insert_gates(model, input_shape=(3, 32, 32))
    with pytest.raises(ManidpError, match="before thresholds are set"):
        build_codebooks(model, [torch.randn(2, 3, 32, 32)], CodebookConfig(entries=4))


def _snapped(name, shape=(3, 64, 64), entries=4):
    model, gates = pruned_with_random_gates(name, shape)  # thresholds at the median saliency
    for gate in gates.values():  # saliencies that differ more between images than the shared ones
        nn.init.normal_(gate.fc2.weight, std=0.05)
    batches = [torch.randn(8, *shape, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    sizes = build_codebooks(model, batches, CodebookConfig(entries=entries))
    assert all(1 <= k <= entries for k in sizes.values()) and max(sizes.values()) > 1
    return model


CODEBOOK_FAMILIES = ["resnet18", "resnet50", "mobilenetv2_050", "efficientnet_b0", "regnetx_002", "densenet121"]


def _in_layout(tensor, channels_last):
    return tensor.contiguous(memory_format=torch.channels_last) if channels_last else tensor


def _images(seeds, channels_last, shape=(3, 64, 64)):
    return [
        _in_layout(torch.randn(1, *shape, generator=torch.Generator().manual_seed(s)), channels_last) for s in seeds
    ]


@pytest.mark.parametrize("name", CODEBOOK_FAMILIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gather_free_execution_decides_and_computes_as_the_snapped_model(name, channels_last):
    model = _snapped(name)
    fast = dynamic_model(model, (3, 64, 64))
    convs = [m for m in fast.modules() if isinstance(m, DynamicConv)]
    assert any(m.entry_rows for m in convs)
    if name in ("resnet18", "resnet50"):  # narrow chains use weights packed per entry pair
        assert any(m.packed_inputs for m in convs)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    chosen, decisions, disagreements = set(), 0, 0
    for image in _images(range(10, 14), channels_last):  # single images: packed entries
        check = check_execution(model, fast, image)
        decisions, disagreements = decisions + check.decisions, disagreements + check.disagreements
        chosen.add(tuple(m.last_entry for m in convs if m.entry_rows))
    batch = _in_layout(torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(20)), channels_last)
    check = check_execution(model, fast, batch)  # batches: grouped by entry
    decisions, disagreements = decisions + check.decisions, disagreements + check.disagreements
    assert len(chosen) > 1  # images choose different sub-networks
    assert disagreements <= 0.02 * decisions  # near-ties are rare, so the check above has teeth


def test_a_forced_decision_is_taken_and_the_own_one_recorded():
    model = _snapped("resnet18")
    fast = dynamic_model(model, (3, 64, 64))
    image = _images([5], False)[0]
    _, own = run_with_decisions(fast, image)
    layer = next(name for name, m in fast.named_modules() if isinstance(m, DynamicConv) and len(m.entry_rows) > 1)
    other = (own[layer] + 1) % len(fast.get_submodule(layer).entry_rows)
    run_with_decisions(fast, image, forced={layer: other})
    assert fast.get_submodule(layer).last_entry == int(other)  # taken
    assert torch.equal(fast.get_submodule(layer).last_decision, own[layer])  # its own still recorded
    with pytest.raises(ValueError, match="forced decision of shape"):
        run_with_decisions(fast, image, forced={layer: torch.zeros(2, dtype=torch.long)})


def test_entry_scores_are_the_same_numbers_for_a_batch_and_for_each_image():
    gate = _gate(channels=64)
    generator = torch.Generator().manual_seed(3)
    gate.codebook = (torch.rand(8, 64, generator=generator) > 0.5).float()
    saliency = torch.rand(32, 64, generator=generator) + 0.5
    batch = gate.entry(saliency)
    assert batch.tolist() == [int(gate.entry(row[None])) for row in saliency]
    # a near-tie decided the same way whatever the summation order: reversed channels, same scores
    order = torch.arange(63, -1, -1)
    gate.codebook = gate.codebook[:, order]
    assert gate.entry(saliency[:, order]).tolist() == batch.tolist()


def test_a_producer_entry_of_every_channel_still_selects_the_packed_weights():
    model = _snapped("resnet18")
    gate = gates_of(model).by_name()["layer1.0.conv1"]
    half = torch.zeros(gate.out_channels)
    half[::2] = 1
    gate.codebook = torch.stack([torch.ones(gate.out_channels), half])
    gate.threshold.fill_(0.0)  # every excess >= 0: the all-channel entry wins for every image
    fast = dynamic_model(model, (3, 64, 64))
    check_execution(model, fast, torch.randn(1, 3, 64, 64))
    assert fast.get_submodule("layer1.0.conv1").last_entry == 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_codebook_layer_after_a_free_mask_producer_gathers_its_entry_to_the_narrow_input(channels_last):
    model = _snapped("resnet18")
    producer = gates_of(model).by_name()["layer1.0.conv1"]
    producer.codebook = torch.zeros(0, producer.out_channels)  # free masks again: its output is narrow per image
    fast = dynamic_model(model, (3, 64, 64))
    consumer = fast.get_submodule("layer1.0.conv2")
    assert consumer.entry_rows and not consumer.packed_inputs and fast.get_submodule("layer1.0.conv1").narrow_output
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    for image in _images(range(30, 33), channels_last):
        consumer.last_entry = None
        check_execution(model, fast, image)
        assert consumer.last_entry is not None


@pytest.mark.parametrize("fit_widths", [True, False])
def test_prune_with_a_codebook_trains_snapped_and_exports_it(tiny_fashion, dense_weights, tmp_path, fit_widths):
    from manidp_cli.data import load_data
    from manidp_cli.io import load_pruned

    result = prune_tiny(
        tmp_path / "cb",
        tiny_fashion,
        weights=dense_weights,
        # the paper's start (saliency 1 everywhere, free per-image gates after one epoch) makes images
        # differ enough in 2 tiny epochs for several entries; importance init starts them alike
        overrides={"codebook": {"entries": 3, "channel_multiple": 4, "fit_widths": fit_widths}, **PAPER_PROCEDURE},
    )
    assert result.history[0]["codebook_entries"] > 1 and "codebook_entries" not in result.history[1]
    assert ("codebook_width_scale" in result.history[0]) == fit_widths
    assert abs(result.after.flops.mean_ratio - 0.5) < 0.1
    model, _ = load_pruned(tmp_path / "cb")
    gates = gates_of(model).by_name()
    assert all(g.snaps and 1 <= g.codebook.shape[0] <= 3 for g in gates.values())
    assert all(int(w) % 4 == 0 or int(w) == g.out_channels for g in gates.values() for w in g.codebook.sum(1))
    fast = dynamic_model(model, (1, 32, 32))
    images, _ = next(load_data(tiny_fashion).eval.batches(8))
    for image in images:
        check_execution(model, fast, image[None])
    check_execution(model, fast, images)


def test_a_run_interrupted_while_training_snapped_resumes_to_identical_weights(tiny_fashion, dense_weights, tmp_path):
    from safetensors.torch import load_file

    codebook = {"codebook": {"entries": 3, "channel_multiple": 4}}
    prune_tiny(tmp_path / "straight", tiny_fashion, weights=dense_weights, overrides=codebook)
    interrupted = prune_tiny(
        tmp_path / "resumed",
        tiny_fashion,
        weights=dense_weights,
        overrides=codebook,
        on_step=lambda info: info.epoch == 1 and info.step == 1,
    )
    assert interrupted.interrupted
    prune_tiny(tmp_path / "resumed", tiny_fashion, resume=True)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert any(k.endswith(".codebook") and v.shape[0] > 0 for k, v in b.items())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("channels_last", [False, True])
def test_entry_tuning_pads_with_zero_rows_or_calls_onednn_and_keeps_the_outputs(monkeypatch, channels_last):
    model = _snapped("resnet18")
    fast = dynamic_model(model, (3, 64, 64))
    images = [torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(40 + i)) for i in range(3)]
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
        images = [image.contiguous(memory_format=torch.channels_last) for image in images]

    # "measured": the widest candidate is fastest, and oneDNN wins among equal widths
    def widest_then_onednn(run, candidates):
        return {c: (run(c), -c[0] - 0.5 * (c[1] == "onednn"))[1] for c in candidates}

    monkeypatch.setattr(execute, "_time_candidates", widest_then_onednn)
    tuned = tune_entries(fast, images[:1])
    assert tuned and any(m.narrow_output for name, m in fast.named_modules() if name in tuned)
    for name, entries in tuned.items():
        conv = fast.get_submodule(name)
        for key, choice in entries.items():
            width = len(conv.entry_rows[int(key.split("_")[1])])
            assert choice["own_width"] == width and choice["kernel"] == "onednn"
            if choice["width"] > width:
                assert choice["width"] <= min(conv.out_channels, width + 64) and choice["width"] % 16 == 0
                assert conv._buffers[f"padded_weight_{key}"][width:].abs().sum() == 0
    assert any(choice["width"] > choice["own_width"] for entries in tuned.values() for choice in entries.values())
    for image in images:
        check_execution(model, fast, image)
    # a new tuning starts over: when the entry's own convolution is fastest nothing changes
    monkeypatch.setattr(
        execute, "_time_candidates", lambda run, candidates: {c: c[0] + (c[1] == "onednn") for c in candidates}
    )
    assert tune_entries(fast, images[:1]) == {}
    assert not any(key.startswith("padded_") for m in fast.modules() for key in m._buffers)


KERNEL_CHOICES = [("default", 0), ("onednn", 0), ("default", 64), ("onednn", 64)]


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_kernel_the_tuner_can_pick_computes_the_same_decisions_and_outputs(name, channels_last):
    model = _snapped(name)
    fast = dynamic_model(model, (3, 64, 64))
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    layers = [m for m in fast.modules() if isinstance(m, DynamicConv) and m.entry_rows]
    images = _images(range(50, 52), channels_last)
    for kernel, extra in KERNEL_CHOICES:  # forced one at a time, every entry of every layer
        assert pin_entry_kernels(fast, kernel, extra) > 0
        widths = [w.shape[0] for m in layers for row in m._entries for w, *_ in row]
        own = [len(rows) for m in layers for _ in m._entries for rows in m.entry_rows]
        assert (widths == own) == (extra == 0)
        assert all(
            ((p, k) in m._onednn) == (kernel == "onednn")
            for m in layers
            for p in range(len(m._entries))
            for k in range(len(m.entry_rows))
        )
        for image in images:
            check_execution(model, fast, image)


def test_a_batch_whose_images_share_an_entry_runs_that_entry_alone():
    """A trained default's codebooks collapse to one entry in most layers: a batch then runs the
    union of its entries (that one) with narrow hand-overs, not one convolution per entry."""
    model = _snapped("resnet18")
    for gate in gates_of(model).values():
        gate.codebook = gate.codebook[:1].clone()  # one keep-set per layer, about half the channels
    fast = dynamic_model(model, (3, 64, 64))
    calls = []
    for layer in (m for m in fast.modules() if isinstance(m, DynamicConv)):
        layer._run_grouped = lambda x, saliency: calls.append("grouped")
        original = layer.conv.forward
        layer.conv.forward = lambda x, original=original: calls.append("masked") or original(x)
    batch = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(21))
    check = check_execution(model, fast, batch)
    assert check.disagreements <= 0.02 * check.decisions
    assert calls == []

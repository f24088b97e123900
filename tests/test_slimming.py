"""A static export as a deployable folder: timm's config.json, manidp.json, the slimmed network at
timm's shapes (plain timm loads it and computes the same function) and its narrower weights."""

import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models._hub import load_model_config_from_path

from manidp_cli.api import export_static
from manidp_cli.errors import WeightsError
from manidp_cli.runtime.slimming import SCATTERED, load_static

MATCH = 1e-5  # float32 rounding: the zero channels only change the order of the sums


@pytest.fixture(scope="module")
def static_export(pruned, tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "static"
    export_static(pruned.out_dir, out, min_keep_rate=0.3, calibration_images=64)
    return out


@pytest.fixture(scope="module")
def reference(static_export):
    """The slimmed network's outputs on a few images, from its torch.export program."""
    images = torch.randn(5, 1, 32, 32)
    program = torch.export.load(str(static_export / "model.pt2")).module()  # our own, trusted file
    with torch.no_grad():
        return images, program(images)


def close(model, reference):
    images, expected = reference
    with torch.no_grad():
        difference = float((model.eval()(images) - expected).abs().max())
    assert difference <= MATCH, f"outputs differ by {difference:.2e}"


def test_manidp_json_holds_manidp_config_json_timms(static_export):
    metadata = json.loads((static_export / "manidp.json").read_text())
    assert metadata["model"] == "test_resnet" and metadata["model_kwargs"] == {"num_classes": 10, "in_chans": 1}
    assert sum(metadata["channels_removed"].values()) > 0 and metadata["program_batch"] == "any from 1 to 4096"
    assert metadata["onnx"] is None and metadata["timm_load"].startswith("timm.create_model('local-dir:")
    assert metadata[SCATTERED], "no residual-feeding layer was narrowed: the round trips would not test it"
    config = json.loads((static_export / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
    assert not {"channels_removed", "accuracy", "model", "input_shape"} & set(config)
    assert config["pretrained_cfg"]["input_size"] == [1, 32, 32] and config["model_args"]["in_chans"] == 1
    _, name, model_args = load_model_config_from_path(static_export)
    assert name == "test_resnet" and model_args["num_classes"] == 10


def test_plain_timm_loads_the_slimmed_network_at_its_own_shapes(pruned, static_export, reference):
    state = load_file(str(static_export / "model.safetensors"))
    dense = timm.create_model("test_resnet", num_classes=10, in_chans=1).state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in dense.items()}
    slim = load_file(str(static_export / "model_slim.safetensors"))
    narrowed = [key for key in slim if slim[key].shape != state[key].shape]
    assert narrowed, "nothing was removed: the test would prove nothing"
    gated = load_file(str(pruned.out_dir / "model.safetensors"))
    for key in narrowed:  # removed channels are exactly zero, except BatchNorm's running_var (one)
        assert int((state[key] != 0).sum()) <= slim[key].numel() or key.endswith("running_var"), key
        if state[key].dim() == 4:  # a convolution's kept weights stay in their places, unchanged
            kept = state[key] != 0
            assert torch.equal(state[key][kept], gated[key][kept]), key
    close(timm.create_model(f"local-dir:{static_export}", pretrained=True), reference)
    # the overlay must name num_classes too: else timm drops the classifier of "another" class count
    overlay = dict(file=str(static_export / "model.safetensors"), num_classes=10, input_size=(1, 32, 32))
    close(
        timm.create_model("test_resnet", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=10, in_chans=1),
        reference,
    )
    rebuilt, _ = load_static(static_export)  # the narrower network manidp runs
    close(rebuilt, reference)


def test_static_exports_of_the_older_layout_still_load(static_export, reference, tmp_path):
    """Before manidp.json, config.json held manidp's fields and model.safetensors the narrower weights."""
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(static_export / "model.pt2", old / "model.pt2")
    shutil.copy(static_export / "manidp.json", old / "config.json")
    shutil.copy(static_export / "model_slim.safetensors", old / "model.safetensors")
    rebuilt, config = load_static(old)
    assert config["input_shape"] == (1, 32, 32)
    close(rebuilt, reference)


@pytest.mark.parametrize("damage", ["shorter", "out_of_range", "not_a_norm"])
def test_channel_places_that_do_not_fit_the_weights_are_refused(static_export, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(static_export, copy)
    metadata = json.loads((copy / "manidp.json").read_text())
    name, places = next(iter(metadata[SCATTERED].items()))
    metadata[SCATTERED] = {
        "shorter": {name: places[:-1]},
        "out_of_range": {name: [*places[:-1], 10_000]},
        "not_a_norm": {"fc": places},
    }[damage]
    (copy / "manidp.json").write_text(json.dumps(metadata))
    with pytest.raises(WeightsError, match="scatters"):
        load_static(copy)

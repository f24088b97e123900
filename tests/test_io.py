"""Exports as timm and the Hugging Face hub see them: config.json in timm's layout beside the weights,
and a gated export that plain timm refuses instead of loading it without its gates."""

import json
import shutil
import subprocess
import sys

import pytest
import timm
import torch
from helpers import CLI_ENV
from timm.models._hub import load_model_config_from_path

from manidp_cli.errors import ModelError, WeightsError
from manidp_cli.io import GATED_ARCHITECTURE, load_pruned
from manidp_cli.models.factory import create_model

# what timm's save_for_hf writes at the top of config.json; nothing of manidp's own may be there
TIMM_KEYS = {
    "architecture",
    "num_classes",
    "num_features",
    "global_pool",
    "label_names",
    "model_args",
    "pretrained_cfg",
}
FASHION_MNIST = {"input_size": [1, 32, 32], "mean": [0.286], "std": [0.353], "crop_pct": 1.0}


def config_of(folder):
    return json.loads((folder / "config.json").read_text())


def same_outputs(a, b, shape=(1, 32, 32)):
    images = torch.randn(4, *shape)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(images), b.eval()(images), rtol=0, atol=1e-6)


def test_a_dense_export_is_a_timm_model_folder(dense_weights):
    folder = dense_weights.parent
    config = config_of(folder)
    assert set(config) <= TIMM_KEYS and config["architecture"] == "test_resnet"
    assert config["num_classes"] == 10 and config["num_features"] == 96
    assert config["model_args"]["in_chans"] == 1 and config["label_names"][0] == "T-shirt/top"
    assert FASHION_MNIST.items() <= config["pretrained_cfg"].items()
    assert "tag" not in config["pretrained_cfg"]  # the in1k weights' tag does not describe these
    pretrained_cfg, name, model_args = load_model_config_from_path(folder)  # timm's own reader
    assert name == "test_resnet" and model_args["in_chans"] == 1 and tuple(pretrained_cfg["input_size"]) == (1, 32, 32)
    ours, _ = load_pruned(folder)
    same_outputs(timm.create_model(f"local-dir:{folder}", pretrained=True), ours)
    # and manidp starts from it like from any timm folder
    same_outputs(create_model(f"local-dir:{folder}", num_classes=10, in_chans=1, pretrained=True), ours)


def test_a_gated_export_is_refused_by_plain_timm(pruned):
    config = config_of(pruned.out_dir)
    assert set(config) <= TIMM_KEYS and config["architecture"] == GATED_ARCHITECTURE
    args = config["model_args"]
    assert args["base_architecture"] == "test_resnet" and args["in_chans"] == 1 and args["num_classes"] == 10
    assert args["gated_layers"] == load_pruned(pruned.out_dir)[1].metadata["gated_layers"]
    assert FASHION_MNIST.items() <= config["pretrained_cfg"].items()
    code = f"import timm\ntimm.create_model('local-dir:{pruned.out_dir}', pretrained=True)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CLI_ENV, timeout=300)
    assert proc.returncode == 1 and "Unknown model (manidp_gated)" in proc.stderr, proc.stderr


def test_with_manidp_timm_builds_the_gated_model(pruned):
    ours, _ = load_pruned(pruned.out_dir)
    model = timm.create_model(f"local-dir:{pruned.out_dir}", pretrained=True)
    assert model.state_dict().keys() == ours.state_dict().keys()  # the gates and thresholds loaded strictly
    same_outputs(model, ours)


def test_a_gated_export_is_no_starting_point(pruned):
    with pytest.raises(ModelError, match="is a gated manidp export"):
        create_model(f"local-dir:{pruned.out_dir}", num_classes=10, in_chans=1, pretrained=True)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda a: a.pop("gate_policy"), "lack gate_policy"),
        (lambda a: a.update(checkpoint_path="/etc/passwd"), "unknown"),
        (lambda a: a.update(num_classes=10**9), "num_classes must be between"),
        (lambda a: a.update(base_architecture="hf-hub:acme/model"), "must be a timm model name"),
        (lambda a: a.update(gated_layers=["layer1.0.conv1"]), "no longer selects"),
    ],
)
def test_config_model_args_are_checked_like_metadata(pruned, tmp_path, edit, message):
    folder = tmp_path / "export"
    shutil.copytree(pruned.out_dir, folder)
    config = config_of(folder)
    edit(config["model_args"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=message):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


def test_the_gated_architecture_alone_says_where_it_comes_from():
    with pytest.raises(WeightsError, match="config.json of a gated manidp export"):
        timm.create_model(GATED_ARCHITECTURE)

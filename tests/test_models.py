import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save, save_file

from manidp_cli.errors import ModelError, WeightsError
from manidp_cli.models.factory import create_model, read_state_dict

ROOT = Path(__file__).resolve().parent.parent


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelError, match=r"unknown model 'resnet343'; did you mean .*resnet34"):
        create_model("resnet343", num_classes=10, in_chans=3)


def _fake_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """A Hugging Face cache folder in huggingface_hub's layout holding ``files`` of ``repo`` at main."""
    commit = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def _in_fresh_process(code: str, cache: Path) -> subprocess.CompletedProcess:
    """huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE once, at import: a fresh interpreter."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def _resnet18_bytes(seed: int, num_classes: int = 1000) -> tuple[bytes, torch.Tensor]:
    torch.manual_seed(seed)
    state = timm.create_model("resnet18", pretrained=False, num_classes=num_classes).state_dict()
    state = {k: v.contiguous() for k, v in state.items()}
    return save(state), state["layer1.0.conv1.weight"]


LOAD = """
import torch, sys
from manidp_cli.models.factory import create_model
model = create_model({name!r}, num_classes=10, in_chans=3, pretrained=True)
torch.save(model.layer1[0].conv1.weight.detach().clone(), {out!r})
"""


def test_offline_without_cached_weights_fails_fast_with_a_hint(tmp_path):
    started = time.perf_counter()
    done = _in_fresh_process(LOAD.format(name="resnet18", out=str(tmp_path / "w.pt")), tmp_path / "empty-cache")
    assert done.returncode != 0
    assert "HF_HUB_OFFLINE is set and they are not in the Hugging Face cache" in done.stderr
    assert "pass a local file with --weights" in done.stderr
    assert time.perf_counter() - started < 30  # an interpreter start and timm's import; no network wait


def test_pretrained_weights_come_from_the_hugging_face_cache_offline(tmp_path):
    """No socket probe: with HF_HUB_OFFLINE set, timm's weights already in the cache are used."""
    data, expected = _resnet18_bytes(seed=3)
    repo = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    _fake_hub_cache(tmp_path / "cache", repo, {"model.safetensors": data})
    done = _in_fresh_process(LOAD.format(name="resnet18", out=str(tmp_path / "w.pt")), tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=True), expected)


def test_hf_hub_and_local_dir_model_names(tmp_path):
    data, expected = _resnet18_bytes(seed=4)
    pretrained_cfg = {"classifier": "fc", "first_conv": "conv1", "input_size": [3, 224, 224]}
    config = json.dumps({"architecture": "resnet18", "num_classes": 1000, "pretrained_cfg": pretrained_cfg}).encode()
    _fake_hub_cache(tmp_path / "cache", "acme/fashion-resnet", {"config.json": config, "model.safetensors": data})
    load = LOAD.format(name="hf-hub:acme/fashion-resnet", out=str(tmp_path / "hub.pt"))
    done = _in_fresh_process(load, tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "hub.pt", weights_only=True), expected)
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "config.json").write_bytes(config)
    (folder / "model.safetensors").write_bytes(data)
    model = create_model(f"local-dir:{folder}", num_classes=10, in_chans=3, pretrained=True)
    assert torch.equal(model.layer1[0].conv1.weight, expected)
    with pytest.raises(ModelError, match="is incomplete: use hf-hub:ORG/REPO"):
        create_model("hf-hub:no-slash", num_classes=10, in_chans=3)
    with pytest.raises(ModelError, match="cannot build local-dir:.*nowhere: Config file not found"):
        create_model(f"local-dir:{tmp_path / 'nowhere'}", num_classes=10, in_chans=3)


def test_timm_train_checkpoints_and_torch_formats(tmp_path):
    """What timm's train.py writes (``model_best.pth.tar``: state_dict, state_dict_ema, an
    argparse.Namespace) loads with weights_only=True, EMA weights first; DDP prefixes and .bin work."""
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", pretrained=False, num_classes=10).state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in plain.items()}
    checkpoint = {
        "epoch": 7,
        "arch": "resnet18",
        "state_dict": {f"module.{k}": v for k, v in plain.items()},
        "state_dict_ema": ema,
        "optimizer": {"state": {}, "param_groups": []},
        "args": argparse.Namespace(lr=0.1, model="resnet18"),
    }
    torch.save(checkpoint, tmp_path / "model_best.pth.tar")
    state = read_state_dict(tmp_path / "model_best.pth.tar")
    assert torch.equal(state["layer1.0.conv1.weight"], ema["layer1.0.conv1.weight"])
    model = create_model("resnet18", num_classes=10, in_chans=3, weights=tmp_path / "model_best.pth.tar")
    assert torch.equal(model.fc.weight, ema["fc.weight"])
    del checkpoint["state_dict_ema"]
    torch.save(checkpoint, tmp_path / "last.pth.tar")
    assert torch.equal(read_state_dict(tmp_path / "last.pth.tar")["fc.weight"], plain["fc.weight"])
    torch.save(plain, tmp_path / "pytorch_model.bin")
    assert torch.equal(read_state_dict(tmp_path / "pytorch_model.bin")["fc.weight"], plain["fc.weight"])
    torch.save({"model_state_dict": plain, "epoch": 1}, tmp_path / "other.pt")
    assert torch.equal(read_state_dict(tmp_path / "other.pt")["fc.weight"], plain["fc.weight"])


def test_safetensors_and_torch_files_load_and_adapt(tmp_path):
    source = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    state = source.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model = create_model("resnet18", num_classes=10, in_chans=1, weights=tmp_path / name)
        # the stem is summed over RGB (timm's adapt_input_conv), the classifier is fresh
        expected_stem = state["conv1.weight"].sum(dim=1, keepdim=True)
        assert torch.allclose(model.conv1.weight, expected_stem, atol=1e-6)
        assert model.fc.weight.shape == (10, 512)
        assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_a_model_folder_gives_its_weights_file(tmp_path):
    """--weights DIR: a manidp export, timm's local-dir or a hub snapshot folder reads its weights file."""
    state = timm.create_model("resnet18", pretrained=False, num_classes=10).state_dict()
    folder = tmp_path / "export"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    model = create_model("resnet18", num_classes=10, in_chans=3, weights=folder)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(WeightsError, match=r"holds none of model.safetensors, pytorch_model.bin"):
        read_state_dict(tmp_path)


def test_weights_that_do_not_fit_name_the_key(tmp_path):
    other = timm.create_model("resnet34", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "r34.safetensors"))
    with pytest.raises(WeightsError, match=r"does not fit ResNet: unexpected key 'layer1\.2\."):
        create_model("resnet18", num_classes=1000, in_chans=3, weights=tmp_path / "r34.safetensors")
    small = timm.create_model("resnet18", pretrained=False).state_dict()
    small["layer1.0.conv1.weight"] = torch.zeros(8, 64, 3, 3)
    save_file({k: v.contiguous() for k, v in small.items()}, str(tmp_path / "bad.safetensors"))
    # narrower than the architecture, as a slimmed start would be, but its consumer is not narrowed
    with pytest.raises(
        WeightsError,
        match=r"'layer1.0.conv1.weight' of shape \(8, 64, 3, 3\) where the model has \(64, 64, 3, 3\).*does not run",
    ):
        create_model("resnet18", num_classes=1000, in_chans=3, weights=tmp_path / "bad.safetensors")
    del small["layer1.0.conv1.weight"]
    save_file({k: v.contiguous() for k, v in small.items()}, str(tmp_path / "short.safetensors"))
    with pytest.raises(WeightsError, match=r"missing key 'layer1.0.conv1.weight'"):
        create_model("resnet18", num_classes=1000, in_chans=3, weights=tmp_path / "short.safetensors")


def test_unreadable_and_pickled_files_are_refused(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read weights"):
        read_state_dict(tmp_path / "junk.safetensors")
    torch.save({"w": object()}, tmp_path / "pickled.pt")  # needs unpickling: refused
    with pytest.raises(WeightsError, match="cannot read weights"):
        read_state_dict(tmp_path / "pickled.pt")
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("depth, millions", [(20, 0.27), (32, 0.46), (56, 0.85), (110, 1.73)])
def test_cifar_resnets_are_registered_with_the_published_sizes(depth, millions):
    model = create_model(f"cifar_resnet{depth}", num_classes=10, in_chans=3)
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e6, 2) == millions
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet_gates_both_convolutions_of_every_block():
    from manidp_cli.core.gating import insert_gates

    model = create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = model(images)
    gates = insert_gates(model, input_shape=(1, 32, 32))
    assert len(gates) == 18 and "conv1" not in gates.by_name()  # 9 blocks x 2, stem skipped
    with torch.no_grad():
        assert torch.allclose(model(images), expected, atol=1e-5)

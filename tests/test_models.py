import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from manidp_cli.errors import ModelError, WeightsError
from manidp_cli.models.factory import create_model, hub_reachable, read_state_dict


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelError, match=r"unknown model 'resnet343'; did you mean .*resnet34"):
        create_model("resnet343", num_classes=10, in_chans=3)


def test_offline_hub_fails_fast_with_a_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    assert not hub_reachable()
    with pytest.raises(WeightsError, match="pass a local file with --weights"):
        create_model("resnet18", num_classes=10, in_chans=3, pretrained=True)
    assert time.perf_counter() - started < 2


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


def test_weights_that_do_not_fit_name_the_key(tmp_path):
    other = timm.create_model("resnet34", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "r34.safetensors"))
    with pytest.raises(WeightsError, match=r"does not fit ResNet: unexpected key 'layer1\.2\."):
        create_model("resnet18", num_classes=1000, in_chans=3, weights=tmp_path / "r34.safetensors")
    small = timm.create_model("resnet18", pretrained=False).state_dict()
    small["layer1.0.conv1.weight"] = torch.zeros(8, 64, 3, 3)
    save_file({k: v.contiguous() for k, v in small.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(
        WeightsError, match=r"'layer1.0.conv1.weight' has shape \(8, 64, 3, 3\), the model needs \(64, 64, 3, 3\)"
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
    assert len(gates) == 18 and "conv1" not in gates.by_conv()  # 9 blocks x 2, stem skipped
    with torch.no_grad():
        assert torch.allclose(model(images), expected, atol=1e-5)

import timm
import torch

from manidp_cli.core.gating import insert_gates
from manidp_cli.core.recorder import GateRecorder


def _model():
    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    gates = insert_gates(model, input_shape=(3, 32, 32))
    return model, gates


def test_records_saliency_and_features_and_removes_hooks():
    model, gates = _model()
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    with GateRecorder(model, features=True) as rec:
        logits = model(images)
    assert logits.shape == (2, 4)  # forward still returns logits only
    assert set(rec.saliency) == set(gates.by_name()) == set(rec.features)
    assert rec.saliency["layer3.0.conv1"].shape == (2, 256)
    assert rec.features["layer3.0.conv1"].shape == (2, 256)
    assert rec.saliency["layer1.0.conv1"].requires_grad
    rec.saliency.clear()
    model(images)
    assert rec.saliency == {}  # hooks are gone after the with-block


def test_features_are_taken_before_masking():
    model, gates = _model()
    model.eval()
    gates.set_thresholds({"layer1.0.conv1": 2.0})  # saliency is 1 everywhere: prune everything
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), GateRecorder(model, features=True) as rec:
        model(images)
    assert rec.features["layer1.0.conv1"].abs().sum() > 0
    assert not rec.active_outputs()["layer1.0.conv1"].any()

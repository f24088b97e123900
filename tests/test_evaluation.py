import json

import pytest
import torch
from helpers import prune_tiny, write_cifar

from manidp_cli.analysis.evaluation import evaluate, gram_correlation, pearson, spearman
from manidp_cli.api.evaluate import evaluate_dense, evaluate_export
from manidp_cli.core.flops import count_flops
from manidp_cli.core.gating import SaliencyGate
from manidp_cli.data import load_data
from manidp_cli.errors import DataError
from manidp_cli.io import load_pruned


def test_spearman_by_hand():
    assert spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 400.0])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # ties get average ranks: x ranks (1, 2.5, 2.5, 4), y ranks (1, 2, 3, 4)
    x = torch.tensor([1.0, 5.0, 5.0, 9.0])
    y = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, y) == pytest.approx(pearson(torch.tensor([1, 2.5, 2.5, 4]), y))
    assert pearson(torch.ones(3), y[:3]) is None  # undefined, not NaN: JSON has no NaN


def test_gram_correlation():
    features = torch.randn(6, 5)
    assert gram_correlation(features, features * 2) == pytest.approx(1.0)
    assert abs(gram_correlation(features, torch.randn(6, 5))) < 1.0


@pytest.fixture(scope="module")
def routed(tiny_fashion, dense_weights, tmp_path_factory):
    """A tiny prune whose images get different FLOPs: gates fitted to vary per image before training
    (the shared tiny prune's 64 test images may all get the same sub-network)."""
    out = tmp_path_factory.mktemp("routed")
    return prune_tiny(out, tiny_fashion, weights=dense_weights, overrides={"gates": {"routing_init": 0.3}})


def test_evaluate_export_reports_accuracy_flops_and_signature(routed):
    typed = evaluate_export(routed.out_dir, batch_size=16)
    assert typed.pruned and typed.flops.ratio("mean") == pytest.approx(routed.after.flops.mean_ratio)
    result = typed.to_dict()  # what `manidp eval --json` prints
    assert result["data"]["from"] == "the export's metadata" and result["data"]["spec"].startswith("fashion-mnist:")
    assert result["images"] == 64 and result["top1"] == pytest.approx(routed.after.top1)
    flops = result["flops"]
    assert flops["mean_ratio"] == pytest.approx(routed.after.flops.mean_ratio)
    assert flops["min"] <= flops["p10"] <= flops["median"] <= flops["p90"] <= flops["max"]
    assert flops["min"] < flops["max"]  # images differ, so the signature is defined
    assert flops["mean_gflops"] == pytest.approx(flops["mean"] / 1e9)
    signature = result["signature"]
    assert -1 <= signature["spearman_loss_flops"] <= 1 and -1 <= signature["gram_correlation"] <= 1
    assert signature["gram_batches"] == 4
    json.dumps(result)  # JSON-serialisable
    limited = evaluate_export(routed.out_dir, limit=10)
    assert limited.images == 10


def test_evaluate_dense_baseline(dense_weights, tiny_fashion):
    result = evaluate_dense("test_resnet", dense_weights, tiny_fashion).to_dict()
    assert result["pruned"] is False and result["flops"]["mean_ratio"] == 1.0 and result["images"] == 64


def test_mismatched_data_is_a_clear_error(pruned, tmp_path):
    folder = tmp_path / "cifar"
    write_cifar(folder, [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"], 1, 2, 10)
    with pytest.raises(DataError, match=r"gives \(3, 32, 32\) images, the export expects \(1, 32, 32\)"):
        evaluate_export(pruned.out_dir, data=f"cifar10:{folder}")


def test_signature_is_undefined_when_every_image_gets_the_same_flops(pruned, tiny_fashion):
    """A model whose gates keep the same channels for every image (here: none) has no complexity
    correlation to report: None, which JSON writes as null, rather than NaN, which it cannot."""
    model, _ = load_pruned(pruned.out_dir)
    for gate in model.modules():
        if isinstance(gate, SaliencyGate):
            gate.threshold.fill_(float("inf"))
    data = load_data(tiny_fashion, "test_resnet")
    result = evaluate(model, data.eval, 16, table=count_flops(model, data.input_shape), signature_batches=2)
    assert len(set(result.flops.per_image)) == 1
    assert result.signature.spearman_loss_flops is None and result.signature.gram_batches == 2
    json.dumps(result.signature.to_dict(), allow_nan=False)

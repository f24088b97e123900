import os

# Tests never touch the network: timm and huggingface_hub must fail fast instead of downloading.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import prune_tiny, write_fashion_mnist_idx  # noqa: E402

from manidp_cli.api.jobs import prepare, run  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_fashion(tmp_path_factory):
    """A 'fashion-mnist:DIR' spec with 160 training and 64 test images from the embedded subset."""
    from manidp_cli.data import load_embedded

    data = load_embedded()
    directory = tmp_path_factory.mktemp("tiny-fashion")
    train, test = data.train, data.eval
    crop = lambda t: t[:, 0, 2:30, 2:30].numpy()  # noqa: E731 - undo the 32 px padding
    write_fashion_mnist_idx(directory, crop(train.images[:160]), train.labels[:160].numpy(), "train")
    write_fashion_mnist_idx(directory, crop(test.images[:64]), test.labels[:64].numpy(), "t10k")
    return f"fashion-mnist:{directory}"


@pytest.fixture(scope="session")
def dense_weights(tiny_fashion, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    job = prepare("train", "test_resnet", overrides={"epochs": 1, "batch_size": 32, "data": tiny_fashion}, out_dir=out)
    result = run(job)
    assert not result.interrupted
    return out / "model.safetensors"


@pytest.fixture(scope="session")
def pruned(tiny_fashion, dense_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned")
    return prune_tiny(out, tiny_fashion, weights=dense_weights)

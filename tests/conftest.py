import os

# Tests never touch the network: timm and huggingface_hub must fail fast instead of downloading.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_activations_positive(model: torch.nn.Module) -> None:
    """Give every BatchNorm a small scale and a positive shift so that no channel is ever entirely
    zero: then every input channel of every convolution is active, whatever the weights."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.constant_(module.weight, 0.01)
            torch.nn.init.constant_(module.bias, 1.0)


def randomize_norms(model: torch.nn.Module) -> None:
    """timm zero-initialises the last BatchNorm of residual branches, which makes a fresh network
    ignore those branches (and hence their gates); random affine parameters bring them back."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)


def write_fashion_mnist_idx(directory, images, labels, split: str) -> None:
    """Write images (N x 28 x 28 uint8) and labels as gzipped IDX files, the Fashion-MNIST format."""
    import gzip
    import struct

    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(directory / f"{split}-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">IIII", 2051, len(images), 28, 28) + np.asarray(images, dtype=np.uint8).tobytes())
    with gzip.open(directory / f"{split}-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">II", 2049, len(labels)) + np.asarray(labels, dtype=np.uint8).tobytes())


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

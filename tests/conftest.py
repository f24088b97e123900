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


def write_cifar(directory, names, label_bytes: int, count: int, classes: int):
    """Random CIFAR binary files: each record is label byte(s) then 3072 pixel bytes."""
    import numpy as np

    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names:
        labels = rng.integers(0, classes, size=(count, label_bytes), dtype=np.uint8)
        pixels = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        np.concatenate([labels, pixels], axis=1).tofile(directory / name)


TINY_PRUNE = {"epochs": 2, "batch_size": 32, "eval_batch_size": 64, "target_flops": 0.5,
              "schedule": {"calibration_images": 64, "search_steps": 12}}


def prune_tiny(out, data: str, resume: bool = False, overrides=None, **extra):
    """A 2-epoch prune of timm's 'test_resnet' on the tiny Fashion-MNIST folder."""
    from manidp_cli.pipeline import prepare, run

    job = prepare("prune", "test_resnet", overrides={**TINY_PRUNE, "data": data, **(overrides or {})}, out_dir=out,
                  weights=extra.pop("weights", None), resume=resume)
    return run(job, **extra)


@pytest.fixture(scope="session")
def dense_weights(tiny_fashion, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    from manidp_cli.pipeline import prepare, run

    job = prepare("train", "test_resnet", overrides={"epochs": 1, "batch_size": 32, "data": tiny_fashion}, out_dir=out)
    result = run(job)
    assert not result.interrupted
    return out / "model.safetensors"


@pytest.fixture(scope="session")
def pruned(tiny_fashion, dense_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned")
    return prune_tiny(out, tiny_fashion, weights=dense_weights)



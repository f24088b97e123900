import numpy as np
import pytest
import torch
from helpers import write_cifar, write_image_folder

from manidp_cli.data import FASHION_MNIST_DIR, LoaderSettings, folder_data_config, load_data
from manidp_cli.errors import DataError


def test_embedded_subset_is_stratified_and_padded():
    data = load_data("embedded")
    assert (len(data.train), len(data.eval), data.num_classes, data.input_shape) == (5000, 1000, 10, (1, 32, 32))
    assert torch.bincount(data.train.labels).tolist() == [500] * 10
    assert torch.bincount(data.eval.labels).tolist() == [100] * 10
    assert data.train.images[:, :, :2].max() == 0  # zero padding 28 -> 32


def test_epoch_batches_are_a_function_of_seed_and_epoch():
    data = load_data("embedded")
    first = [y for _, y in data.train.batches(64, shuffle=True, augment=True, seed=1, epoch=3, limit=256)]
    again = list(data.train.batches(64, shuffle=True, augment=True, seed=1, epoch=3, limit=256))
    other = [y for _, y in data.train.batches(64, shuffle=True, augment=True, seed=1, epoch=4, limit=256)]
    assert all(torch.equal(a, b) for a, (_, b) in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    skipped = list(data.train.batches(64, shuffle=True, augment=True, seed=1, epoch=3, skip=2, limit=256))
    assert len(skipped) == 2
    assert torch.equal(skipped[0][0], again[2][0]) and torch.equal(skipped[1][1], again[3][1])
    x, _ = again[0]
    assert x.dtype == torch.float32 and x.shape == (64, 1, 32, 32)


def test_full_fashion_mnist_from_the_debian_package():
    # .ci/run installs Debian's dataset-fashion-mnist; the README's install notes say so too.
    assert FASHION_MNIST_DIR.is_dir(), "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"
    data = load_data("fashion-mnist")
    assert (len(data.train), len(data.eval), data.input_shape) == (60000, 10000, (1, 32, 32))


def test_fashion_mnist_from_a_folder(tiny_fashion):
    data = load_data(tiny_fashion)
    assert (len(data.train), len(data.eval)) == (160, 64)
    reference = load_data("embedded")
    assert torch.equal(data.train.images, reference.train.images[:160])


def test_cifar10_and_cifar100_binary(tmp_path):
    write_cifar(
        tmp_path / "c10" / "cifar-10-batches-bin",
        [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"],
        1,
        4,
        10,
    )
    (tmp_path / "c10" / "cifar-10-batches-bin" / "batches.meta.txt").write_text(
        "\n".join(f"class{i}" for i in range(10)) + "\n"
    )
    data = load_data(f"cifar10:{tmp_path / 'c10'}")
    assert (len(data.train), len(data.eval), data.input_shape, data.classes[3]) == (20, 4, (3, 32, 32), "class3")
    raw = np.fromfile(tmp_path / "c10" / "cifar-10-batches-bin" / "data_batch_1.bin", dtype=np.uint8)
    assert int(data.train.labels[0]) == raw[0]
    assert torch.equal(data.train.images[0].flatten(), torch.from_numpy(raw[1:3073].copy()))

    write_cifar(tmp_path / "c100", ["train.bin", "test.bin"], 2, 6, 100)
    data = load_data(f"cifar100:{tmp_path / 'c100'}")
    assert (len(data.train), data.num_classes) == (6, 100)
    raw = np.fromfile(tmp_path / "c100" / "train.bin", dtype=np.uint8)
    assert int(data.train.labels[0]) == raw[1]  # the fine label


def test_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(folder / f"{i}.png")
    data = load_data(f"imagefolder:{tmp_path}", model_name="resnet18", loader=LoaderSettings(workers=0))
    assert data.classes == ["cat", "dog"] and data.input_shape == (3, 224, 224)
    x, y = next(iter(data.train.batches(4, shuffle=True, augment=True)))
    assert x.shape == (4, 3, 224, 224) and y.shape == (4,)
    assert load_data(str(tmp_path)).num_classes == 2


@pytest.mark.parametrize(
    "spec, message",
    [
        ("mnist", "unknown data specification 'mnist'; valid forms: embedded"),
        ("cifar10", "cifar10 needs a folder"),
        ("cifar10:/no/such/dir", "data folder /no/such/dir does not exist"),
        ("imagefolder:/no/such/dir", "data folder /no/such/dir does not exist"),
        ("/no/such/dir", "data folder /no/such/dir does not exist"),
        ("fashion-mnist:/no/such/dir", "Fashion-MNIST file /no/such/dir/train-images-idx3-ubyte.gz not found"),
    ],
)
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_data(spec)


def test_image_folder_without_val(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="has no val/, validation/, valid/, eval/, evaluation/, test/ subfolder"):
        load_data(f"imagefolder:{tmp_path}")


def test_image_folder_split_names_as_timm_accepts_them(tmp_path):
    from PIL import Image

    for split in ("train", "validation"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "0.png")
    data = load_data(f"imagefolder:{tmp_path}", model_name="resnet18")
    assert data.classes == ["cat", "dog"] and "2 train / 2 validation" in data.description


def test_limit_takes_a_fresh_random_subset_each_epoch():
    data = load_data("embedded")
    first = torch.cat([y for _, y in data.train.batches(100, shuffle=True, seed=0, epoch=0, limit=300)])
    second = torch.cat([y for _, y in data.train.batches(100, shuffle=True, seed=0, epoch=1, limit=300)])
    assert len(first) == len(second) == 300 and not torch.equal(first, second)
    assert data.train.num_batches(100, limit=300) == 3


def test_image_folder_lists_each_folder_once(tmp_path, monkeypatch):
    import collections
    import os

    write_image_folder(tmp_path)
    listed = collections.Counter()
    scandir = os.scandir

    def counting_scandir(path="."):
        listed[os.path.realpath(path)] += 1
        return scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)  # os.walk lists folders through it too
    data = load_data(str(tmp_path), model_name="test_resnet", loader=LoaderSettings(workers=0))
    folders = [str(tmp_path / split / name) for split in ("train", "val") for name in ("", "cat", "dog")]
    assert sorted(listed) == sorted(os.path.realpath(f) for f in folders)
    assert set(listed.values()) == {1}, listed  # each split used to be scanned twice (once per transform)
    assert (len(data.train), len(data.eval)) == (6, 6)


def test_image_folder_takes_timm_data_config_from_the_pretrained_cfg(tmp_path):
    write_image_folder(tmp_path)
    # test_resnet's pretrained_cfg: 160 px, bilinear, mean = std = 0.5; resnet18's: 224 px, bicubic
    config = folder_data_config("test_resnet")
    assert (config["input_size"], config["interpolation"], config["mean"]) == ((3, 160, 160), "bilinear", (0.5,) * 3)
    resized = folder_data_config("test_resnet", (48, 48))
    assert resized == {**config, "input_size": (3, 48, 48)}  # interpolation, mean, std, crop_pct kept
    assert folder_data_config(None)["input_size"] == (3, 224, 224)  # no model to ask: timm's default
    data = load_data(str(tmp_path), model_name="test_resnet", loader=LoaderSettings(workers=0))
    assert data.input_shape == (3, 160, 160) and "160 px, bilinear" in data.description
    data = load_data(str(tmp_path), model_name="test_resnet", image_size=48, loader=LoaderSettings(workers=0))
    x, _ = next(iter(data.eval.batches(4)))
    assert data.input_shape == (3, 48, 48) and x.shape == (4, 3, 48, 48)
    x, _ = next(iter(data.train.batches(4, shuffle=True, augment=True)))
    assert x.shape == (4, 3, 48, 48)


def test_img_size_resizes_in_memory_data_and_keeps_its_default():
    data = load_data("embedded")
    assert data.input_shape == (1, 32, 32)
    resized = load_data("embedded", image_size=48)
    assert resized.input_shape == (1, 48, 48) and "resized to 48 px" in resized.description
    x, y = next(iter(resized.train.batches(8, shuffle=True, augment=True, seed=1)))
    assert x.shape == (8, 1, 48, 48)
    _, native_y = next(iter(data.train.batches(8, shuffle=True, augment=True, seed=1)))
    assert torch.equal(y, native_y)  # the same images, in the same order
    assert load_data("embedded", image_size=(32, 32)).eval.size is None  # the native size: no resizing
    with pytest.raises(DataError, match="image size must be 8 to 4096 px per side, got 4"):
        load_data("embedded", image_size=4)


def test_worker_processes_load_the_same_batches(tmp_path):
    write_image_folder(tmp_path, images=5)
    spec = str(tmp_path)
    serial = load_data(spec, model_name="test_resnet", image_size=32, loader=LoaderSettings(workers=0))
    parallel = load_data(spec, model_name="test_resnet", image_size=32, loader=LoaderSettings(workers=2))
    for epoch in (0, 1):  # the second pass reuses the first one's worker processes
        one = list(serial.train.batches(3, shuffle=True, seed=4, epoch=epoch))
        two = list(parallel.train.batches(3, shuffle=True, seed=4, epoch=epoch))
        assert len(one) == len(two) == 4
        for (x1, y1), (x2, y2) in zip(one, two):
            assert torch.equal(y1, y2) and torch.equal(x1, x2)
    loader, _ = parallel.train._idle[(False, 3)]
    assert loader.num_workers == 2 and loader.persistent_workers and not loader.pin_memory
    assert LoaderSettings.for_device(2, torch.device("cuda")).pin_memory


def test_a_pass_inside_another_gets_its_own_loader(tmp_path):
    write_image_folder(tmp_path, images=4)
    data = load_data(str(tmp_path), model_name="test_resnet", image_size=32, loader=LoaderSettings(workers=1))
    outer = data.eval.batches(2)
    first = next(outer)
    inner = [y for _, y in data.eval.batches(2)]  # the same kind of pass, while the outer one is open
    rest = [y for _, y in outer]
    assert torch.equal(torch.cat([first[1], *rest]), torch.cat(inner))

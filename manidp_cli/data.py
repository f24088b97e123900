"""Image data from local sources only: nothing is ever downloaded.

``load_data(spec)`` understands:

- ``embedded`` (default): a stratified Fashion-MNIST subset shipped inside the package
  (5,000 train / 1,000 test, 28 x 28 padded to 32 x 32, 1 channel);
- ``fashion-mnist`` or ``fashion-mnist:DIR``: the full Fashion-MNIST from Debian's
  ``dataset-fashion-mnist`` package (or IDX files in DIR);
- ``cifar10:DIR`` / ``cifar100:DIR``: CIFAR in its binary (non-pickle) distribution format;
- ``imagefolder:DIR`` or just ``DIR``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or
  ``validation/``, ``test/`` and timm's other split names: ``FOLDER_SPLITS``) read with timm's
  transforms for the model's pretrained configuration.

Batches come from ``ImageSet.batches(...)``; the order and augmentation of a training epoch are a
pure function of (seed, epoch), which is what makes an interrupted run resumable exactly.

Example::

    data = load_data("embedded")
    for images, labels in data.train.batches(64, shuffle=True, augment=True, seed=0, epoch=0):
        ...
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from manidp_cli.errors import DataError
from manidp_cli.inputs import capped, exception_text, exists, is_dir

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
EMBEDDED_FILE = "fashion_mnist_subset.npz"
SPEC_FORMS = "embedded, fashion-mnist[:DIR], cifar10:DIR, cifar100:DIR, imagefolder:DIR or DIR"

DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# Per-channel statistics of the training sets, used to normalise inputs.
_FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
_CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def _epoch_order(
    size: int, shuffle: bool, generator: torch.Generator, limit: int | None, shard: tuple[int, int]
) -> torch.Tensor:
    """The images of one epoch for one rank: a permutation (or the first ones), cut to ``limit``,
    trimmed to a multiple of the world size (every rank must take the same number of steps) and
    dealt out round-robin."""
    count = size if limit is None else min(limit, size)
    order = torch.randperm(size, generator=generator)[:count] if shuffle else torch.arange(count)
    rank, world = shard
    if world > 1:
        order = order[: count // world * world][rank::world]
    return order


def _count(size: int, limit: int | None, shard: tuple[int, int]) -> int:
    count = size if limit is None else min(limit, size)
    return count // shard[1] if shard[1] > 1 else count


class ImageSet(Protocol):
    """One split: knows its size and yields normalised (images, labels) batches."""

    def __len__(self) -> int: ...

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        epoch: int = 0,
        skip: int = 0,
        limit: int | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def num_batches(self, batch_size: int, limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> int: ...


@dataclass
class TensorImages:
    """An in-memory split: uint8 images N x C x H x W and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 4  # random-crop padding for augmentation
    flip: bool = True

    def __len__(self) -> int:
        return self.images.shape[0]

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def _augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        padded = torch.nn.functional.pad(images, (self.pad,) * 4)
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        out = torch.empty_like(images)
        for i in range(n):
            dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
            crop = padded[i, :, dy : dy + h, dx : dx + w]
            out[i] = crop.flip(-1) if flips[i] else crop
        return out

    def batches(self, batch_size, *, shuffle=False, augment=False, seed=0, epoch=0, skip=0, limit=None, shard=(0, 1)):
        generator = _epoch_generator(seed, epoch)
        order = _epoch_order(len(self), shuffle, generator, limit, shard)
        starts = range(0, len(order), batch_size)
        for index, start in enumerate(starts):
            chosen = order[start : start + batch_size]
            images = self.images[chosen]
            if augment:
                # drawn even for skipped batches so that later batches see the same randomness
                images = self._augment(images, generator)
            if index < skip:
                continue
            yield self._normalise(images), self.labels[chosen]

    def num_batches(self, batch_size: int, limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> int:
        return math.ceil(_count(len(self), limit, shard) / batch_size)


class FolderImages:
    """An ImageFolder split read with timm's transforms (training or evaluation ones)."""

    def __init__(self, root: Path, train_transform, eval_transform, workers: int = 2):
        from torchvision.datasets import ImageFolder

        self.root = root
        self.train_set = ImageFolder(str(root), transform=train_transform, loader=_load_image)
        self.eval_set = ImageFolder(str(root), transform=eval_transform, loader=_load_image)
        self.workers = workers

    @property
    def classes(self) -> list[str]:
        return self.train_set.classes

    def __len__(self) -> int:
        return len(self.train_set)

    def num_batches(self, batch_size: int, limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> int:
        return math.ceil(_count(len(self), limit, shard) / batch_size)

    def batches(self, batch_size, *, shuffle=False, augment=False, seed=0, epoch=0, skip=0, limit=None, shard=(0, 1)):
        order = _epoch_order(len(self), shuffle, _epoch_generator(seed, epoch), limit, shard)
        # timm's random transforms draw from Python's RNG in the workers: exact resume is not
        # guaranteed for folders, only the order of images.
        order = order[skip * batch_size :].tolist()
        loader = torch.utils.data.DataLoader(
            self.train_set if augment else self.eval_set,
            batch_size=batch_size,
            sampler=order,
            num_workers=self.workers,
        )
        try:
            yield from loader
        except DataError as exc:  # from a worker, its message is the worker's whole traceback
            raise DataError(_last_error_line(exc)) from None


def _load_image(path: str):
    """torchvision's loader, naming the file when it is not a readable image (PIL raises OSError,
    SyntaxError or ValueError for broken files, often without the name)."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except Exception as exc:
        raise DataError(f"cannot read image {capped(path)}: {exception_text(exc)}") from None


def _last_error_line(exc: DataError) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    last = lines[-1].strip() if lines else type(exc).__name__
    return last.split("DataError: ", 1)[-1]


@dataclass
class ImageData:
    """A train/eval pair plus what a model must be built for."""

    spec: str
    description: str
    train: ImageSet
    eval: ImageSet
    classes: list[str]
    in_chans: int
    image_size: tuple[int, int]
    # the evaluation preprocessing in timm's data-config form (input_size, interpolation, mean, std,
    # crop_pct, crop_mode): what an export's config.json tells timm and the hub
    data_config: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, *self.image_size)


def _tensor_data_config(in_chans: int, size: int, stats) -> dict[str, Any]:
    """In-memory images are already at ``size``: no resize, no crop, only the normalisation."""
    mean, std = stats
    return {
        "input_size": (in_chans, size, size),
        "interpolation": "bilinear",
        "mean": mean,
        "std": std,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


def _pad_to_32(images: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(images, copy=True)).unsqueeze(1)
    return torch.nn.functional.pad(tensor, (2, 2, 2, 2))


def _fashion_mnist(train_x, train_y, test_x, test_y, spec, description) -> ImageData:
    mean, std = _FASHION_MNIST_STATS
    train = TensorImages(_pad_to_32(train_x), torch.from_numpy(train_y.astype(np.int64)), mean, std, pad=2)
    test = TensorImages(_pad_to_32(test_x), torch.from_numpy(test_y.astype(np.int64)), mean, std, pad=2)
    config = _tensor_data_config(1, 32, _FASHION_MNIST_STATS)
    return ImageData(spec, description, train, test, list(FASHION_MNIST_CLASSES), 1, (32, 32), config)


def load_embedded() -> ImageData:
    """The stratified Fashion-MNIST subset shipped with manidp."""
    with (resources.files("manidp_cli") / "assets" / EMBEDDED_FILE).open("rb") as handle:
        arrays = dict(np.load(handle))
    return _fashion_mnist(
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        "embedded",
        f"embedded Fashion-MNIST subset ({len(arrays['x_train'])} train / {len(arrays['x_test'])} test"
        f", 32 px, 1 channel)",
    )


IDX_IMAGES, IDX_LABELS = 2051, 2049  # magic numbers of IDX image and label files


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """An IDX array (big-endian header: magic, then ``dims`` sizes), checked against its header."""
    header_size = 4 * (1 + dims)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(header_size)
            if len(header) < header_size:
                raise DataError(f"{path} is not an IDX file: {len(header)} bytes, shorter than its header")
            found, *shape = struct.unpack(f">{1 + dims}I", header)
            if found != magic:
                raise DataError(
                    f"{path} is not an IDX {'image' if dims == 3 else 'label'} file"
                    f" (magic number {found}, expected {magic})"
                )
            size = math.prod(shape)
            body = handle.read(size + 1)  # one byte more tells a file longer than its header says
    except (OSError, EOFError, zlib.error) as exc:  # not gzip, truncated gzip, unreadable
        raise DataError(f"cannot read Fashion-MNIST file {path}: {exception_text(exc)}") from None
    if len(body) != size:
        raise DataError(
            f"{path}: its header announces {' x '.join(map(str, shape))} bytes of data, the file holds {len(body)}"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def read_fashion_mnist(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 28 x 28 uint8) and labels from IDX files, ``split`` being 'train' or 't10k'."""

    def find(name: str) -> Path:
        for path in (directory / name, directory / name.removesuffix(".gz")):
            if exists(path, "Fashion-MNIST file"):
                return path
        raise DataError(
            f"Fashion-MNIST file {capped(directory / name)} not found "
            "(install Debian's dataset-fashion-mnist, or pass fashion-mnist:DIR)"
        )

    images = _read_idx(find(f"{split}-images-idx3-ubyte.gz"), IDX_IMAGES, 3)
    labels = _read_idx(find(f"{split}-labels-idx1-ubyte.gz"), IDX_LABELS, 1)
    if images.shape[1:] != (28, 28):
        raise DataError(
            f"Fashion-MNIST {split} images in {directory} are {images.shape[1]} x {images.shape[2]}, not 28 x 28"
        )
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split} in {directory}: {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise DataError(f"Fashion-MNIST {split} in {directory} holds no images")
    _check_labels(labels, len(FASHION_MNIST_CLASSES), f"Fashion-MNIST {split} labels in {directory}")
    return images, labels


def _check_labels(labels: np.ndarray, classes: int, where: str) -> None:
    """Labels outside the classes would fail deep inside the loss (or index past the classifier)."""
    if labels.size and int(labels.max()) >= classes:
        raise DataError(
            f"{where}: label {int(labels.max())} found, but there are {classes} classes (0 to {classes - 1})"
        )


def load_fashion_mnist(directory: Path = FASHION_MNIST_DIR) -> ImageData:
    train_x, train_y = read_fashion_mnist(directory, "train")
    test_x, test_y = read_fashion_mnist(directory, "t10k")
    spec = "fashion-mnist" if directory == FASHION_MNIST_DIR else f"fashion-mnist:{directory}"
    return _fashion_mnist(
        train_x,
        train_y,
        test_x,
        test_y,
        spec,
        f"Fashion-MNIST from {directory} ({len(train_x)} train / {len(test_x)} test, 32 px, 1 channel)",
    )


def _read_cifar_records(paths: list[Path], label_bytes: int, classes_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    record = label_bytes + 3072
    chunks = []
    for path in paths:
        try:
            raw = np.fromfile(path, dtype=np.uint8)
        except OSError as exc:
            raise DataError(f"cannot read CIFAR file {path}: {exc.strerror or exception_text(exc)}") from None
        if raw.size % record or raw.size == 0:
            raise DataError(f"{path} is not a CIFAR binary file ({raw.size} bytes, records are {record})")
        chunks.append(raw.reshape(-1, record))
        _check_labels(chunks[-1][:, label_bytes - 1], classes_count, f"CIFAR-{classes_count} file {path}")
    rows = np.concatenate(chunks)
    labels = torch.from_numpy(rows[:, label_bytes - 1].astype(np.int64))  # CIFAR-100: fine label
    images = torch.from_numpy(np.ascontiguousarray(rows[:, label_bytes:])).view(-1, 3, 32, 32)
    return images, labels


def load_cifar(directory: Path, classes_count: int) -> ImageData:
    """CIFAR-10 (``data_batch_*.bin``) or CIFAR-100 (``train.bin``) binary distribution."""
    if classes_count == 10:
        folders = [directory, directory / "cifar-10-batches-bin"]
        train_names, test_names, meta, label_bytes = (
            [f"data_batch_{i}.bin" for i in range(1, 6)],
            ["test_batch.bin"],
            "batches.meta.txt",
            1,
        )
    else:
        folders = [directory, directory / "cifar-100-binary"]
        train_names, test_names, meta, label_bytes = ["train.bin"], ["test.bin"], "fine_label_names.txt", 2
    folder = next((f for f in folders if all((f / n).exists() for n in train_names + test_names)), None)
    if folder is None:
        raise DataError(
            f"no CIFAR-{classes_count} binary files ({', '.join(train_names + test_names)}) in "
            f"{' or '.join(map(str, folders))}"
        )
    train_images, train_labels = _read_cifar_records([folder / n for n in train_names], label_bytes, classes_count)
    test_images, test_labels = _read_cifar_records([folder / n for n in test_names], label_bytes, classes_count)
    meta_path = folder / meta
    names = []
    if meta_path.is_file():  # class names are a nicety: an unreadable file only loses them
        text = meta_path.read_bytes().decode("utf-8", errors="replace")
        names = [capped(line.strip(), 100) for line in text.splitlines() if line.strip()]
    classes = names if len(names) == classes_count else [str(i) for i in range(classes_count)]
    mean, std = _CIFAR_STATS
    return ImageData(
        f"cifar{classes_count}:{directory}",
        f"CIFAR-{classes_count} from {folder} ({len(train_labels)} train / {len(test_labels)} test, 32 px)",
        TensorImages(train_images, train_labels, mean, std),
        TensorImages(test_images, test_labels, mean, std),
        classes,
        3,
        (32, 32),
        _tensor_data_config(3, 32, _CIFAR_STATS),
    )


# the split folder names timm's ImageFolder datasets accept, in the order they are looked for
FOLDER_SPLITS = {"train": ("train", "training"), "val": ("val", "validation", "valid", "eval", "evaluation", "test")}


def load_image_folder(directory: Path, model_name: str | None, workers: int = 2) -> ImageData:
    """``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or another of ``FOLDER_SPLITS``' names) with
    timm's transforms for ``model_name``."""
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg

    splits = {}
    for split, names in FOLDER_SPLITS.items():
        path = next((directory / name for name in names if is_dir(directory / name, "image folder")), None)
        if path is None:
            raise DataError(
                f"image folder {directory} has no {'/, '.join(names)}/ subfolder "
                f"(expected {directory}/{names[0]}/<class>/*.jpg)"
            )
        splits[split] = path
    cfg = get_pretrained_cfg(model_name) if model_name else None
    if cfg is not None:
        config = resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    else:  # no model to ask: ImageNet's usual 224 px evaluation
        config = resolve_data_config({"input_size": (3, 224, 224)})
    train_tf = create_transform(**config, is_training=True)
    eval_tf = create_transform(**config, is_training=False)
    try:
        train = FolderImages(splits["train"], train_tf, eval_tf, workers)
        val = FolderImages(splits["val"], train_tf, eval_tf, workers)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"cannot read image folder {directory}: {exc}") from exc
    if train.classes != val.classes:
        raise DataError(f"{directory}: {splits['train'].name}/ and {splits['val'].name}/ have different class folders")
    if len(train.classes) < 2:  # one class trains to "top-1 1.0" and learns nothing
        raise DataError(
            f"image folder {directory} has {len(train.classes)} class folder ({capped(train.classes[0])})"
            f"; classification needs at least 2"
        )
    _, h, w = config["input_size"]
    return ImageData(
        f"imagefolder:{directory}",
        f"image folder {directory} ({len(train)} {splits['train'].name} / {len(val)} {splits['val'].name}, {h} px)",
        train,
        val,
        train.classes,
        3,
        (h, w),
        {key: config[key] for key in DATA_CONFIG_KEYS if key in config},
    )


def load_data(spec: str = "embedded", model_name: str | None = None) -> ImageData:
    """Parse a data specification (see the module docstring) and load it."""
    kind, _, arg = spec.partition(":")
    if spec == "embedded":
        return load_embedded()
    if kind == "fashion-mnist":
        return load_fashion_mnist(Path(arg) if arg else FASHION_MNIST_DIR)
    if kind in ("cifar10", "cifar100"):
        if not arg:
            raise DataError(f"{kind} needs a folder: --data {kind}:DIR")
        directory = Path(arg).expanduser()
        if not is_dir(directory, "data folder"):
            raise DataError(f"data folder {capped(directory)} does not exist")
        return load_cifar(directory, 10 if kind == "cifar10" else 100)
    if kind == "imagefolder" or (not arg and is_dir(Path(spec), "data folder")):
        directory = Path(arg if kind == "imagefolder" else spec).expanduser()
        if not is_dir(directory, "data folder"):
            raise DataError(f"data folder {capped(directory)} does not exist")
        return load_image_folder(directory, model_name)
    if "/" in spec or spec.startswith("."):
        raise DataError(f"data folder {capped(spec)} does not exist")
    raise DataError(f"unknown data specification {capped(repr(spec))}; valid forms: {SPEC_FORMS}")

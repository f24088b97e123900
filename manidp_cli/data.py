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

``image_size`` (timm's ``--img-size``) sets the side of the images: image folders otherwise take it,
with the interpolation, mean, std and crop_pct, from the model's ``pretrained_cfg`` as timm's
``resolve_data_config`` does; in-memory data keeps its native size unless given one. ``loader``
(``LoaderSettings``) says how many worker processes read an image folder.

Example::

    data = load_data("embedded")
    for images, labels in data.train.batches(64, shuffle=True, augment=True, seed=0, epoch=0):
        ...
"""

from __future__ import annotations

import contextlib
import gzip
import math
import struct
import zlib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from manidp_cli.errors import DataError
from manidp_cli.inputs import DEFAULT_WORKERS, IMAGE_SIZE_RANGE, capped, exception_text, exists, is_dir

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


@dataclass(frozen=True)
class LoaderSettings:
    """How an image folder's batches are read: ``workers`` processes decode and transform images
    (0: the main process does), kept alive between passes; ``pin_memory`` for quicker copies to a
    CUDA device. In-memory data ignores both: its batches are slices of a tensor, which a worker
    would only copy between processes."""

    workers: int = DEFAULT_WORKERS
    pin_memory: bool = False

    @classmethod
    def for_device(cls, workers: int, device: torch.device) -> LoaderSettings:
        return cls(workers, pin_memory=device.type == "cuda")


@dataclass
class TensorImages:
    """An in-memory split: uint8 images N x C x H x W and int64 labels, resized per batch to
    ``size`` when one is given."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 4  # random-crop padding for augmentation
    flip: bool = True
    size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        normalised = (images.float() / 255.0 - mean) / std
        if self.size is None or tuple(images.shape[-2:]) == self.size:
            return normalised
        # resized per batch, not once: the whole of Fashion-MNIST at 224 px would take 3 GB. The
        # normalisation is affine per channel, so resizing after it gives the same images.
        return torch.nn.functional.interpolate(
            normalised, size=self.size, mode="bilinear", align_corners=False, antialias=True
        )

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


class _Transformed(torch.utils.data.Dataset):
    """A split's scanned (path, class index) samples read through one transform."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        return self.transform(_load_image(path)), target


class _PassOrder(torch.utils.data.Sampler):
    """The image indices of the current pass, set before each one: a DataLoader keeps its sampler,
    so one loader (and its persistent workers) serves every epoch in its own order."""

    def __init__(self):
        self.order: list[int] = []

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class FolderImages:
    """An ImageFolder split, scanned once, read with timm's training or evaluation transforms."""

    def __init__(
        self,
        root: Path,
        classes: list[str],
        samples: list[tuple[str, int]],
        train_transform: Callable,
        eval_transform: Callable,
        loader: LoaderSettings = LoaderSettings(),
    ):
        self.root = root
        self.classes = classes
        self.train_set = _Transformed(samples, train_transform)
        self.eval_set = _Transformed(samples, eval_transform)
        self.loader = loader
        # (augment, batch size) -> a DataLoader not being iterated now, kept for its workers
        self._idle: dict[tuple[bool, int], tuple[torch.utils.data.DataLoader, _PassOrder]] = {}

    def __len__(self) -> int:
        return len(self.train_set)

    def num_batches(self, batch_size: int, limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> int:
        return math.ceil(_count(len(self), limit, shard) / batch_size)

    def _new_loader(self, augment: bool, batch_size: int) -> tuple[torch.utils.data.DataLoader, _PassOrder]:
        order = _PassOrder()
        loader = torch.utils.data.DataLoader(
            self.train_set if augment else self.eval_set,
            batch_size=batch_size,
            sampler=order,
            num_workers=self.loader.workers,
            pin_memory=self.loader.pin_memory,
            persistent_workers=self.loader.workers > 0,  # starting workers every epoch costs seconds
        )
        return loader, order

    @contextlib.contextmanager
    def _loader_for(self, augment: bool, batch_size: int):
        """A loader of its own for one pass: the idle one of this kind, or a new one when that is
        in use (a pass inside another pass must not reset the outer one's iterator)."""
        key = (augment, batch_size)
        loader = self._idle.pop(key, None) or self._new_loader(augment, batch_size)
        try:
            yield loader
        finally:
            self._idle[key] = loader

    def batches(self, batch_size, *, shuffle=False, augment=False, seed=0, epoch=0, skip=0, limit=None, shard=(0, 1)):
        order = _epoch_order(len(self), shuffle, _epoch_generator(seed, epoch), limit, shard)
        # timm's random transforms draw from Python's RNG in the workers: exact resume is not
        # guaranteed for folders, only the order of images.
        with self._loader_for(augment, batch_size) as (loader, sampler):
            sampler.order = order[skip * batch_size :].tolist()
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


def folder_data_config(model_name: str | None, image_size: tuple[int, int] | None = None) -> dict:
    """timm's data configuration for ``model_name``, as timm's train.py resolves it: input size,
    interpolation, mean, std and crop_pct from the model's ``pretrained_cfg``, the size replaced by
    ``image_size`` when given. A model timm does not know (``hf-hub:``, ``local-dir:``) gets timm's
    defaults (224 px, bicubic, ImageNet mean and std): its configuration is not read from the hub."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name) if model_name else None
    size = image_size or (None if cfg is not None else (224, 224))
    args = {"input_size": (3, *size)} if size else {}  # folders are read as RGB
    return resolve_data_config(args, pretrained_cfg=cfg.to_dict() if cfg is not None else None)


def _split_folders(directory: Path) -> dict[str, Path]:
    splits = {}
    for split, names in FOLDER_SPLITS.items():
        path = next((directory / name for name in names if is_dir(directory / name, "image folder")), None)
        if path is None:
            raise DataError(
                f"image folder {directory} has no {'/, '.join(names)}/ subfolder "
                f"(expected {directory}/{names[0]}/<class>/*.jpg)"
            )
        splits[split] = path
    return splits


def _scan(split: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The class folders and (image, class index) samples of one split, in torchvision's order; each
    folder is listed once (a second ImageFolder per transform used to walk every split twice)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_index = find_classes(str(split))
        return classes, make_dataset(str(split), class_to_index, IMG_EXTENSIONS)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"cannot read image folder {split.parent}: {exc}") from exc


def load_image_folder(
    directory: Path,
    model_name: str | None,
    image_size: tuple[int, int] | None = None,
    loader: LoaderSettings = LoaderSettings(),
) -> ImageData:
    """``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or another of ``FOLDER_SPLITS``' names) with
    timm's transforms for ``model_name`` (``folder_data_config``)."""
    from timm.data import create_transform

    splits = _split_folders(directory)
    config = folder_data_config(model_name, image_size)
    transforms = create_transform(**config, is_training=True), create_transform(**config, is_training=False)
    (train_classes, train_samples), (val_classes, val_samples) = _scan(splits["train"]), _scan(splits["val"])
    if train_classes != val_classes:
        raise DataError(f"{directory}: {splits['train'].name}/ and {splits['val'].name}/ have different class folders")
    if len(train_classes) < 2:  # one class trains to "top-1 1.0" and learns nothing
        raise DataError(
            f"image folder {directory} has {len(train_classes)} class folder ({capped(train_classes[0])})"
            f"; classification needs at least 2"
        )
    train = FolderImages(splits["train"], train_classes, train_samples, *transforms, loader)
    val = FolderImages(splits["val"], val_classes, val_samples, *transforms, loader)
    _, h, w = config["input_size"]
    return ImageData(
        f"imagefolder:{directory}",
        f"image folder {directory} ({len(train)} {splits['train'].name} / {len(val)} {splits['val'].name}, "
        f"{h} px, {config['interpolation']})",
        train,
        val,
        train_classes,
        3,
        (h, w),
        {key: config[key] for key in DATA_CONFIG_KEYS if key in config},
    )


def _image_size(value: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """``value`` as (height, width), checked against ``IMAGE_SIZE_RANGE``."""
    if value is None:
        return None
    size = (value, value) if isinstance(value, int) else tuple(value)
    low, high = IMAGE_SIZE_RANGE
    if len(size) != 2 or not all(isinstance(v, int) and low <= v <= high for v in size):
        raise DataError(f"image size must be {low} to {high} px per side, got {capped(value)}")
    return size


def _resized(data: ImageData, size: tuple[int, int] | None) -> ImageData:
    """In-memory ``data`` whose batches come at ``size`` (None: its native size)."""
    if size is None or size == data.image_size:
        return data
    return replace(
        data,
        description=f"{data.description}, resized to {size[0]} px" + (f" x {size[1]}" if size[1] != size[0] else ""),
        train=replace(data.train, size=size),
        eval=replace(data.eval, size=size),
        image_size=size,
        # resized with bilinear interpolation (TensorImages._normalise)
        data_config={**data.data_config, "input_size": (data.in_chans, *size), "interpolation": "bilinear"},
    )


def _folder_spec(spec: str) -> Path | None:
    """The folder of an ``imagefolder:DIR`` or ``DIR`` specification; None for the other forms."""
    kind, _, arg = spec.partition(":")
    if spec == "embedded" or kind in ("fashion-mnist", "cifar10", "cifar100"):
        return None
    if kind == "imagefolder" or (not arg and is_dir(Path(spec), "data folder")):
        directory = Path(arg if kind == "imagefolder" else spec).expanduser()
        if not is_dir(directory, "data folder"):
            raise DataError(f"data folder {capped(directory)} does not exist")
        return directory
    return None


def _load_in_memory(spec: str) -> ImageData:
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
    if "/" in spec or spec.startswith("."):
        raise DataError(f"data folder {capped(spec)} does not exist")
    raise DataError(f"unknown data specification {capped(repr(spec))}; valid forms: {SPEC_FORMS}")


def load_data(
    spec: str = "embedded",
    model_name: str | None = None,
    *,
    image_size: int | tuple[int, int] | None = None,
    loader: LoaderSettings = LoaderSettings(),
) -> ImageData:
    """Parse a data specification (see the module docstring) and load it, at ``image_size`` (one side,
    or height and width) when given."""
    size = _image_size(image_size)
    folder = _folder_spec(spec)
    if folder is not None:
        return load_image_folder(folder, model_name, size, loader)
    return _resized(_load_in_memory(spec), size)

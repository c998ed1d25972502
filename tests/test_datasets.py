"""CIFAR-10, SVHN and ImageNet through the real loaders and the real CLI, on tiny synthetic files.

None of the three can be downloaded here, so the fixtures write a few seeded images in each
dataset's real on-disk format, the one torchvision reads:

- CIFAR-10: ``cifar-10-batches-py/`` holding the python pickles ``data_batch_1`` .. ``_5`` and
  ``test_batch`` (dicts with ``data``, (N, 3072) uint8 as R, G and B planes, and ``labels``) and
  ``batches.meta``;
- SVHN: ``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB v5) with ``X`` (32, 32, 3, N) uint8
  and ``y`` (N, 1), the digit 0 stored as label 10;
- ImageNet: the folder torchvision.datasets.ImageNet leaves after extracting the archives,
  ``meta.bin`` beside ``train/<wnid>/`` and ``val/<wnid>/`` image folders. The images are PNG,
  so the expected pixels are exact, plus one JPEG of another size for the resize path. Each
  class folder of ``train/`` holds the held-out val images plus a few for the train split.

torchvision checks every CIFAR-10 and SVHN file against the MD5 of the real download, which no
synthetic file can match: the autouse ``_skip_md5`` fixture keeps torchvision's existence check
and drops only the checksum. The rest (unpickling, the .mat reader, the 10 -> 0 relabelling,
the ImageFolder walk, resize and crop) is torchvision's own code.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from releq_tvm.bits import format_bits
from releq_tvm.cli import main
from releq_tvm.config import DEFAULTS
from releq_tvm.data import IMAGENET_HELD_OUT_PER_CLASS, TensorDataset, load_dataset
from releq_tvm.errors import ReleqError
from releq_tvm.networks import create_network, get_network_spec, layer_table
from releq_tvm.train import evaluate, finetune_bits, load_model

#: data.py's documented val split of CIFAR-10 and SVHN: the last 5,000 training images.
HELD_OUT = 5000
N_TRAIN = 40  # training images left for the train split
N_TEST = 20

IMAGENET_WNIDS = ("n01440764", "n01443537")  # tench, goldfish: two real ImageNet class ids
IMAGENET_TRAIN_PER_CLASS = 2  # training images per class left for the train split


@dataclass
class WrittenDataset:
    """A synthetic dataset on disk and, per split, what the loader must return for it.

    ``splits[split]`` is (images uint8 (N, C, H, W) as the loader should see them, labels as
    stored on disk); None for an image whose expected pixels are not known exactly (the JPEG).
    """

    root: Path
    splits: dict[str, tuple[list[np.ndarray | None], np.ndarray]]


def _as_float(images: list[np.ndarray]) -> torch.Tensor:
    """What ``ToTensor`` makes of uint8 CHW pixels: float32 in [0, 1]."""
    return torch.from_numpy(np.stack(images)).float().div(255)


def write_cifar10(root: Path, seed: int, n_train: int = N_TRAIN + HELD_OUT, n_test: int = N_TEST) -> WrittenDataset:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = rng.integers(0, 256, (n_train + n_test, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, n_train + n_test)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    bounds = [*np.linspace(0, n_train, 6).astype(int).tolist(), n_train + n_test]  # five training batches, then test
    for name, lo, hi in zip(names, bounds[:-1], bounds[1:]):
        batch = {
            "batch_label": name,
            "labels": labels[lo:hi].tolist(),
            "data": images[lo:hi].reshape(hi - lo, 3 * 32 * 32),
            "filenames": [f"synthetic_{i:05d}.png" for i in range(lo, hi)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))  # the real files are Python 2 pickles
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {"label_names": classes, "num_cases_per_batch": bounds[1], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    cut = n_train - HELD_OUT
    return WrittenDataset(
        root,
        {
            "train": (list(images[:cut]), labels[:cut]),
            "val": (list(images[cut:n_train]), labels[cut:n_train]),
            "test": (list(images[n_train:]), labels[n_train:]),
        },
    )


def write_svhn(root: Path, seed: int) -> WrittenDataset:
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    splits = {}
    for name, n in (("train", N_TRAIN + HELD_OUT), ("test", N_TEST)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # (rows, cols, RGB, image), as SVHN stores it
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0] = y[-1] = 10  # the digit 0 in every split (train, val, test), stored as 10
        savemat(root / f"{name}_32x32.mat", {"X": x, "y": y})
        images, labels = list(x.transpose(3, 2, 0, 1)), y[:, 0]
        if name == "test":
            splits["test"] = (images, labels)
        else:
            splits["train"] = (images[:N_TRAIN], labels[:N_TRAIN])
            splits["val"] = (images[N_TRAIN:], labels[N_TRAIN:])
    return WrittenDataset(root, splits)


def write_imagenet(root: Path, seed: int, train_per_class: int = IMAGENET_TRAIN_PER_CLASS) -> WrittenDataset:
    """Two classes: train/ holds ``train_per_class`` + the held-out count of 256x256 PNGs each plus
    one 320x240 JPEG in the last class; val/ one PNG each.

    A 256x256 image passes ``Resize(256)`` unchanged, so the expected pixels are its centre 224x224.
    The expected splits follow data.py's documented rule: ``val`` is the last
    ``IMAGENET_HELD_OUT_PER_CLASS`` images (file-name order) of every class of train/, rank by rank
    across the classes; ``train`` the rest of train/; ``test`` the val/ folder.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    per_class_images: dict[str, list[list[np.ndarray | None]]] = {}
    for split, per_class in (("train", train_per_class + IMAGENET_HELD_OUT_PER_CLASS), ("val", 1)):
        per_class_images[split] = []
        for wnid in IMAGENET_WNIDS:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            images = []
            for i in range(per_class):
                pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i:02d}.png")
                images.append(pixels[16:240, 16:240].transpose(2, 0, 1))
            per_class_images[split].append(images)
    # "_99.JPEG" sorts after the PNGs of the last class, so it is the last image of that class
    pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "train" / IMAGENET_WNIDS[-1] / f"{IMAGENET_WNIDS[-1]}_99.JPEG", quality=95)
    per_class_images["train"][-1].append(None)
    wnid_to_classes = {"n01440764": ("tench", "Tinca tinca"), "n01443537": ("goldfish", "Carassius auratus")}
    torch.save((wnid_to_classes, list(IMAGENET_WNIDS)), root / "meta.bin")

    def split(picked: list[tuple[int, np.ndarray | None]]) -> tuple[list[np.ndarray | None], np.ndarray]:
        return [image for _, image in picked], np.array([label for label, _ in picked])

    held = IMAGENET_HELD_OUT_PER_CLASS
    train = per_class_images["train"]
    return WrittenDataset(
        root,
        {
            "train": split([(label, image) for label, images in enumerate(train) for image in images[:-held]]),
            "val": split([(label, images[-held + rank]) for rank in range(held) for label, images in enumerate(train)]),
            "test": split([(label, image) for label, images in enumerate(per_class_images["val"]) for image in images]),
        },
    )


@pytest.fixture(autouse=True)
def _skip_md5(monkeypatch):
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", exists)


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> WrittenDataset:
    return write_cifar10(tmp_path_factory.mktemp("cifar10"), seed=10)


@pytest.fixture(scope="module")
def svhn(tmp_path_factory) -> WrittenDataset:
    return write_svhn(tmp_path_factory.mktemp("data") / "svhn", seed=11)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> WrittenDataset:
    return write_imagenet(tmp_path_factory.mktemp("data") / "imagenet", seed=12)


def _expected_labels(dataset: str, stored: np.ndarray) -> torch.Tensor:
    labels = np.where(stored == 10, 0, stored) if dataset == "svhn" else stored  # torchvision's SVHN mapping
    return torch.as_tensor(labels, dtype=torch.int64)


# ---------------------------------------------------------------- the loaders


@pytest.mark.parametrize("dataset", ["cifar10", "svhn"])
def test_cifar10_and_svhn_loaders_return_the_written_pixels_labels_and_splits(dataset, request):
    written = request.getfixturevalue(dataset)
    sizes = {}
    for split in ("train", "val", "test"):
        loaded = load_dataset(dataset, split, written.root)
        images, stored = written.splits[split]
        assert loaded.images.dtype == torch.float32 and loaded.labels.dtype == torch.int64
        assert loaded.images.shape == (len(images), 3, 32, 32)
        assert torch.equal(loaded.images, _as_float(images))
        assert torch.equal(loaded.labels, _expected_labels(dataset, stored))
        sizes[split] = len(loaded)
    assert sizes == {"train": N_TRAIN, "val": HELD_OUT, "test": N_TEST}


def test_svhn_label_10_is_the_digit_0(svhn):
    for split in ("train", "test"):
        stored = svhn.splits[split][1]
        labels = load_dataset("svhn", split, svhn.root).labels
        assert labels.min() >= 0 and labels.max() <= 9
        assert (stored == 10).sum() >= 1
        assert torch.equal(labels == 0, torch.from_numpy(stored == 10))


@pytest.mark.parametrize("dataset", ["cifar10", "svhn"])
def test_limit_takes_the_first_images_of_the_split(dataset, request):
    written = request.getfixturevalue(dataset)
    loaded = load_dataset(dataset, "val", written.root, limit=3)
    images, stored = written.splits["val"]
    assert torch.equal(loaded.images, _as_float(images[:3]))
    assert torch.equal(loaded.labels, _expected_labels(dataset, stored[:3]))


def test_imagenet_loader_centre_crops_to_224_in_class_folder_order(imagenet):
    for split in ("train", "val", "test"):
        loaded = load_dataset("imagenet", split, imagenet.root)
        images, labels = imagenet.splits[split]
        assert loaded.images.shape == (len(images), 3, 224, 224)
        assert torch.equal(loaded.labels, torch.from_numpy(labels))
        for got, want in zip(loaded.images, images):
            if want is None:  # the 320x240 JPEG: resized to 341x256, then cropped
                assert got.shape == (3, 224, 224) and 0 <= got.min() and got.max() <= 1
            else:
                assert torch.equal(got, _as_float([want])[0])


def test_imagenet_val_is_held_out_of_train_and_test_is_the_official_val_folder(imagenet):
    """The search's reward (val) and the reported accuracy (test) never see the same image."""
    loaded = {split: load_dataset("imagenet", split, imagenet.root) for split in ("train", "val", "test")}
    n_classes = len(IMAGENET_WNIDS)
    assert {split: len(ds) for split, ds in loaded.items()} == {
        "train": n_classes * IMAGENET_TRAIN_PER_CLASS + 1,  # the last class has one image more: the JPEG
        "val": n_classes * IMAGENET_HELD_OUT_PER_CLASS,
        "test": n_classes,  # one image per class in val/
    }
    # every class in every split, and val rank by rank: its first n_classes images are one per class
    assert all(set(ds.labels.tolist()) == set(range(n_classes)) for ds in loaded.values())
    assert loaded["val"].labels.tolist() == list(range(n_classes)) * IMAGENET_HELD_OUT_PER_CLASS
    assert load_dataset("imagenet", "val", imagenet.root, limit=n_classes).labels.tolist() == list(range(n_classes))
    # disjoint: no image of one split in another (the seeded random images are all distinct)
    flat = {split: [image.flatten() for image in ds.images] for split, ds in loaded.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not any(torch.equal(x, y) for x in flat[a] for y in flat[b]), (a, b)
    # together, train and val are the whole train/ folder
    assert len(loaded["train"]) + len(loaded["val"]) == len(list((imagenet.root / "train").rglob("*.*")))


def test_imagenet_class_without_enough_training_images_is_a_one_line_error(tmp_path):
    written = write_imagenet(tmp_path / "imagenet", seed=14, train_per_class=0)
    for split in ("train", "val"):
        with pytest.raises(ReleqError, match=f"holds {IMAGENET_HELD_OUT_PER_CLASS} images or fewer in n01440764, "
                                             f"but the last {IMAGENET_HELD_OUT_PER_CLASS} of every class are held out as the val split"):
            load_dataset("imagenet", split, written.root)
    assert len(load_dataset("imagenet", "test", written.root)) == len(IMAGENET_WNIDS)


def test_training_files_shorter_than_the_val_split_are_a_one_line_error(tmp_path):
    written = write_cifar10(tmp_path / "data", seed=13, n_train=30, n_test=5)
    for split in ("train", "val"):
        with pytest.raises(ReleqError, match="hold 30 images, but the last 5000 are held out as the val split"):
            load_dataset("cifar10", split, written.root)
    assert len(load_dataset("cifar10", "test", written.root)) == 5
    args = ["train", "simplenet", "--steps", "1", "--data-dir", str(written.root), "-o", str(tmp_path / "m.pt")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith("error: the cifar10 training files under ")


# ---------------------------------------------------------------- train, eval, finetune through the CLI


def run_ok(*args) -> list[str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output.splitlines()


def accuracy_of(network: str, checkpoint: Path, images: list[np.ndarray], stored: np.ndarray, dataset: str) -> float:
    """Top-1 of the saved model on the pixels as written, without the loader."""
    model = load_model(network, str(checkpoint))
    return evaluate(model, TensorDataset(_as_float(images), _expected_labels(dataset, stored)))


# network, its dataset, train batch size. mobilenet_v1 stands for ImageNet: its whole case takes ~2-3 s
# here; alexnet trains as fast (~2 s a step at batch 2) but `finetune` spends ~20 s quantizing its
# 61M weights and every checkpoint is 240 MB.
CLI_CASES = [("simplenet", "cifar10", 8), ("svhn10", "svhn", 8), ("mobilenet_v1", "imagenet", 2)]


@pytest.mark.parametrize(("network", "dataset", "batch_size"), CLI_CASES)
def test_train_eval_finetune_through_the_cli(network, dataset, batch_size, request, tmp_path):
    written = request.getfixturevalue(dataset)
    data_dir = written.root
    checkpoint = tmp_path / f"{network}.pt"

    out = run_ok("train", network, "--steps", 2, "--batch-size", batch_size, "--data-dir", data_dir, "-o", checkpoint)
    test_acc = accuracy_of(network, checkpoint, *written.splits["test"], dataset)
    assert [re.fullmatch(r"(step \d/2)  loss \d+\.\d{4}  \d+s", line)[1] for line in out[:-1]] == ["step 1/2", "step 2/2"]
    assert out[-1] == f"{network}: test accuracy {test_acc:.2f}%  -> {checkpoint}"
    assert json.loads(checkpoint.with_suffix(".json").read_text())["test_accuracy"] == test_acc

    assert run_ok("eval", network, "--checkpoint", checkpoint, "--data-dir", data_dir) == [
        f"{network} full precision: {test_acc:.2f}% (test)"
    ]

    bits = [8] * len(layer_table(network))
    out = run_ok("finetune", network, "--bits", "8", "--steps", 1, "--checkpoint", checkpoint, "--data-dir", data_dir)
    # the same fine-tune by hand, on the train split the loader returned (checked pixel-exact above)
    model = load_model(network, str(checkpoint))
    train = load_dataset(dataset, "train", data_dir)
    finetune_bits(model, bits, get_network_spec(network).input_shape, train, 1, lr=DEFAULTS.finetune.learning_rate, seed=0)
    quant_acc = evaluate(model, load_dataset(dataset, "test", data_dir))
    assert out == [
        f"{network} full precision: {test_acc:.2f}%",
        f"{network} bits {format_bits(bits)} after 1 fine-tune steps: {quant_acc:.2f}% ({quant_acc - test_acc:+.2f} pp)",
    ]


def test_train_is_seeded(cifar10, tmp_path):
    outs = [
        run_ok("train", "simplenet", "--steps", 2, "--batch-size", 8, "--data-dir", cifar10.root, "-o", tmp_path / f"{i}.pt")
        for i in range(2)
    ]
    first, second = (torch.load(tmp_path / f"{i}.pt", weights_only=True) for i in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    losses = [[line.split("  ")[1] for line in out[:-1]] for out in outs]
    assert losses[0] == losses[1] and len(losses[0]) == 2


# ---------------------------------------------------------------- a folder missing a required file


def _without(written: WrittenDataset, missing: str, dst: Path) -> Path:
    """``dst`` holding links to every file of ``written`` but ``missing`` (a file or folder)."""
    for path in sorted(written.root.rglob("*")):
        rel = path.relative_to(written.root)
        if rel == Path(missing) or Path(missing) in rel.parents or path.is_dir():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).symlink_to(path)
    return dst


MISSING_CASES = [
    ("cifar10", "train", "simplenet", "cifar-10-batches-py/data_batch_3", "Dataset not found or corrupted"),
    ("cifar10", "eval", "simplenet", "cifar-10-batches-py/batches.meta", "Dataset metadata file not found"),
    ("svhn", "train", "svhn10", "train_32x32.mat", "Dataset not found or corrupted"),
    ("svhn", "eval", "svhn10", "test_32x32.mat", "Dataset not found or corrupted"),
    ("imagenet", "eval", "mobilenet_v1", "meta.bin", "The archive ILSVRC2012_devkit_t12.tar.gz is not present"),
    ("imagenet", "train", "mobilenet_v1", "train", "The archive ILSVRC2012_img_train.tar is not present"),
    ("imagenet", "eval", "mobilenet_v1", "val", "The archive ILSVRC2012_img_val.tar is not present"),
]


@pytest.mark.parametrize(("dataset", "command", "network", "missing", "reason"), MISSING_CASES)
def test_a_missing_file_is_a_one_line_error(dataset, command, network, missing, reason, request, tmp_path):
    data_dir = _without(request.getfixturevalue(dataset), missing, tmp_path / "data")
    checkpoint = tmp_path / "model.pt"
    torch.save(create_network(network).state_dict(), checkpoint)
    args = [command, network, "--data-dir", data_dir]
    args += ["--steps", 1, "-o", tmp_path / "out.pt"] if command == "train" else ["--checkpoint", checkpoint]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (line,) = result.output.splitlines()
    assert line.startswith(f"error: {dataset} files not found under {data_dir} ({reason}")
    assert line.endswith("); download them there with torchvision on a machine with internet")
    assert not (tmp_path / "out.pt").exists()

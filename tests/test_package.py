"""The installed distribution: subpackages mapped from kernels/ and networks/, a seeded trainer."""

import importlib
import subprocess
import sys
from pathlib import Path

import torch

from releq_tvm.data import load_dataset
from releq_tvm.networks import create_network
from releq_tvm.train import evaluate, finetune_bits, train_steps

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_and_networks_install_as_subpackages(tmp_path):
    for name, folder in (("releq_tvm.kernels", "kernels"), ("releq_tvm.networks", "networks")):
        module = importlib.import_module(name)
        assert Path(module.__file__).resolve().parent == ROOT / folder
    # Outside the source tree (cwd not on sys.path) the install exposes only releq_tvm.*: the
    # plain names would collide with unrelated packages called kernels / networks.
    probe = (
        "import importlib.util as u, releq_tvm.kernels, releq_tvm.networks;"
        "print(u.find_spec('kernels') is None, u.find_spec('networks') is None)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_shipped_checkpoint_loads_through_package_data():
    model = create_network("lenet", pretrained=True)
    # the checkpoint scores 99.18 % on the full test split; 2,000 images leave room for sampling
    assert evaluate(model, load_dataset("mnist", "test", limit=2000)) >= 98.5


def test_training_is_seeded_and_deterministic():
    data = load_dataset("mnist", "train", limit=512)
    runs = []
    for _ in range(2):
        model = create_network("lenet", seed=1)
        train_steps(model, data, steps=5, lr=1e-3, batch_size=64, seed=7)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])
    other = create_network("lenet", seed=1)
    train_steps(other, data, steps=5, lr=1e-3, batch_size=64, seed=8)
    assert not torch.equal(runs[0], torch.cat([p.detach().flatten() for p in other.parameters()]))


def test_finetune_keeps_quantized_levels():
    data = load_dataset("mnist", "train", limit=256)
    model = create_network("lenet", pretrained=True)
    finetune_bits(model, (8, 2, 2, 3, 2), (1, 28, 28), data, steps=3, batch_size=64)
    # after fine-tuning the forward still sees 2-bit weights in conv2: at most {-s, 0, s}
    assert len(torch.unique(model[3].weight)) <= 3
    assert len(torch.unique(model[9].weight)) <= 7  # 3 bits: 7 levels

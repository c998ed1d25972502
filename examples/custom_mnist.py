"""Bring your own model, from Python: a small CNN that is not in the registry, trained briefly on
MNIST, searched with ReLeQ, compiled with TVM at the bits it chose and simulated on Stripes.

    .venv/bin/python examples/custom_mnist.py                       # about a minute on 2 cores
    .venv/bin/python examples/custom_mnist.py --episodes 60 --long-steps 1000 --measure

Everything it writes goes under --out (default runs/examples/custom_mnist): the search run
(config.json, episodes.csv, best.json, finetuned.pt) and the compiled folder (net.so, manifest.json).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import releq_tvm
from releq_tvm.data import load_dataset

INPUT_SHAPE = (1, 28, 28)  # MNIST: one channel, 28 x 28 pixels in [0, 1]


class DigitsCNN(nn.Module):
    """Two conv-ReLU-pool blocks and one dense layer: 3 weight layers, 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5)  # 28 -> 24, pooled to 12
        self.conv2 = nn.Conv2d(8, 16, 5)  # 12 -> 8, pooled to 4
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def train_briefly(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int) -> nn.Module:
    """Plain Adam on shuffled batches of 128: the model as a user brings it, trained their way."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(images), (128,), generator=generator)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=400, help="Adam steps of the float training.")
    parser.add_argument("--episodes", type=int, default=60, help="Search episode budget (it stops earlier once converged).")
    parser.add_argument("--short-steps", type=int, default=40, help="Fine-tune steps per configuration the search scores.")
    parser.add_argument("--long-steps", type=int, default=300, help="Fine-tune steps of the chosen bits (0: skip).")
    parser.add_argument("--val-images", type=int, default=1000, help="Val images the search's reward is measured on.")
    parser.add_argument("--cost", choices=["stripes", "none", "cpu"], default="stripes",
                        help="The search's cost: Stripes cycles, the SQ formula, or this CPU's measured latency.")
    parser.add_argument("--measure", action="store_true", help="Also time the compiled network on this CPU.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/examples/custom_mnist"))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train, val, test = (load_dataset("mnist", split) for split in ("train", "val", "test"))
    model = train_briefly(DigitsCNN(), train.images, train.labels, args.train_steps, args.seed)

    found = releq_tvm.search(
        model, train, val, test, input_shape=INPUT_SHAPE, name="digitscnn", run_dir=args.out / "search",
        overwrite=True, episodes=args.episodes, measure=args.cost, short_steps=args.short_steps,
        long_steps=args.long_steps, val_images=args.val_images, seed=args.seed, echo=print,
    )
    built = releq_tvm.compile(
        model, found.w_bits, input_shape=INPUT_SHAPE, name="digitscnn", out_dir=args.out / "build",
        checkpoint=found.model_file, calibration=train.images[:256], measure=args.measure, progress=print,
    )
    stripes = releq_tvm.simulate(model, found.w_bits, input_shape=INPUT_SHAPE, name="digitscnn")

    bits = ",".join(map(str, found.w_bits))
    converged = f"converged at episode {found.converged_episode}" if found.converged_episode else "not converged"
    accuracy = "not scored" if found.accuracy is None else (
        f"{found.accuracy:.2f}% {found.accuracy_split} (float {found.full_precision_accuracy:.2f}%)")
    print(f"search:   bits {bits}, {accuracy}, cost {found.cost_ratio:.3f} of 8-bit, {converged} "
          f"-> {found.best_json}")
    print(f"compile:  kernels {','.join(built.layer_kernels)} -> {built.out_dir} ({', '.join(p.name for p in built.files)})"
          + (f"; {built.measured_ms:.4f} ms measured, {built.predicted_ms:.4f} ms predicted"
             if built.measured_ms is not None else ""))
    print(f"simulate: {stripes.cycles} cycles vs {stripes.cycles_8bit} at 8 bits on Stripes, "
          f"{stripes.speedup:.2f}x faster, {stripes.energy_reduction:.2f}x less energy")


if __name__ == "__main__":
    main()

"""Defaults in one place: the numbers of METHOD.md sections 2-4 and the paths releq-tvm writes to."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

#: Bitwidths the agent may pick (METHOD.md section 3, flexible action space).
DEFAULT_ACTION_SET: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
#: Highest bitwidth: every layer starts here, and it is the reference build of every speedup.
BITS_MAX = 8
#: Activation bits of the integer backends unless a layer says otherwise.
DEFAULT_ACT_BITS = 8
#: Memory-access energy over MAC energy in the cost-weighted State of Quantization.
E_MEM_OVER_E_MAC = 120.0


@dataclass(frozen=True)
class RewardConfig:
    """Asymmetric reward constants (METHOD.md section 3)."""

    a: float = 0.2
    b: float = 0.4
    th: float = 0.4


@dataclass(frozen=True)
class PPOConfig:
    """RecurrentPPO hyperparameters (METHOD.md section 3)."""

    learning_rate: float = 1e-4
    gae_lambda: float = 0.99
    gamma: float = 0.9
    n_epochs: int = 3
    clip_range: float = 0.1
    policy_layers: tuple[int, ...] = (128, 128)
    value_layers: tuple[int, ...] = (128, 64)
    lstm_hidden_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class FinetuneConfig:
    """Short (reward) and long (final) fine-tune budgets, in optimiser steps."""

    short_steps: int = 200
    long_steps: int = 3000
    batch_size: int = 128
    # 3e-3 measured best for LeNet-5 at 8,2,2,3,2 over 1000 steps (1e-3: 97.55 %, 3e-3: 98.19 %, 1e-2: 97.97 %)
    learning_rate: float = 3e-3
    seed: int = 0


@dataclass(frozen=True)
class Defaults:
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


DEFAULTS = Defaults()


def cache_dir() -> Path:
    """Where measured latency tables and accuracy caches live (``RELEQ_TVM_CACHE`` overrides)."""
    root = os.environ.get("RELEQ_TVM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "releq-tvm"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path

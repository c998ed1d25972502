"""The ReLeQ environment: one episode walks the weight layers first to last, one bitwidth per step.

State (METHOD.md section 3, every entry normalised to [0, 1], the last two clipped to [0, 2]):

====  ==========================================================================
 0    layer index / (L - 1)
 1    input channels          log(1 + x) / log(1 + max over layers)
 2    output channels         log(1 + x) / log(1 + max)
 3    kernel area (kh * kw)   x / max
 4    stride                  x / max
 5    input feature-map area  log(1 + x) / log(1 + max)
 6    number of weights       log(1 + x) / log(1 + max)
 7    MACs                    log(1 + x) / log(1 + max)
 8    std of the layer's float weights, x / max
 9    the layer's current bitwidth (before this action) / 8
10    the previous decision's bitwidth / 8 (0 at the first step)
11    State of Quantization: the cost backend's ratio to 8 bits (SQ for ``--measure none``)
12    State of Relative Accuracy: acc / acc_full_precision (the last measured one)
13    (hardware-aware mode only) 1 for an activation decision, 0 for a weight decision
====  ==========================================================================

The network keeps its bits between episodes: all layers start at 8 bits when the env is
built, and at step l of an episode the layers after l still hold the bits of the previous
episode (their "current bitwidth"). ``reset`` never changes them; ``reset(options={"w_bits":
..., "a_bits": ..., "sa": ...})`` sets them explicitly (used by ``--resume``).

Accuracy: ``finetune="per-step"`` measures it (short fine-tune, val split) after every action
and rewards every step; ``"per-episode"`` measures it once, for the final bits, and rewards the
last step only (earlier steps get 0 and keep the previous SA in their state).

With ``latency_target`` the final bits of every episode are corrected (reverse layer order,
activations then weights, one level at a time) until the cost ratio fits; the corrected
configuration is what is measured, rewarded and carried into the next episode.

In hardware-aware mode (``act_action_set`` given) an episode has 2L steps: layer l's weight
bits, then the bits of the activations entering layer l. The action index i of ``Discrete(n)``
(n = the larger set) maps to ``set[i * len(set) // n]`` of the decision's kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import get_args

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from releq_tvm.config import BITS_MAX, DEFAULT_ACTION_SET
from releq_tvm.search.config import FinetuneMode
from releq_tvm.search.cost import CostBackend, correct_to_target
from releq_tvm.search.reward import state_of_quantization

Bits = tuple[int, ...]

#: Names of the observation entries, in order (the hardware-aware flag last).
OBSERVATION_FEATURES: tuple[str, ...] = (
    "layer_index", "in_channels", "out_channels", "kernel", "stride", "in_size",
    "n_weights", "macs", "weight_std", "current_bits", "previous_bits", "sq_or_cost", "sa",
)
#: Upper bound of the State of Quantization / cost entry and of the SA entry (both clipped there).
DYNAMIC_HIGH = 2.0


@dataclass
class EpisodeOutcome:
    """What one finished episode chose and scored (read by the search loop after ``done``)."""

    w_bits: Bits
    a_bits: Bits | None
    proposed_w_bits: Bits
    proposed_a_bits: Bits | None
    corrections: int
    accuracy: float  # percent, val subset after the short fine-tune
    sa: float
    cost: float  # backend ratio to 8 bits (SQ for --measure none)
    sq: float  # the SQ formula, always, for comparison
    reward: float  # reward of the final configuration
    episode_return: float  # sum of the step rewards
    lookups: int  # accuracy lookups this episode
    hits: int  # of which answered by the cache


def static_features(table, weight_std: Sequence[float]) -> np.ndarray:
    """The (L, 9) static part of the state, each column scaled to [0, 1] over the layers."""

    def log_norm(values):
        v = np.log1p(np.asarray(values, dtype=np.float64))
        top = v.max()
        return v / top if top > 0 else np.zeros_like(v)

    def lin_norm(values):
        v = np.asarray(values, dtype=np.float64)
        top = v.max()
        return v / top if top > 0 else np.zeros_like(v)

    n = len(table)
    cols = [
        np.arange(n) / max(n - 1, 1),
        log_norm([r.in_channels for r in table]),
        log_norm([r.out_channels for r in table]),
        lin_norm([r.kernel[0] * r.kernel[1] for r in table]),
        lin_norm([r.stride[0] for r in table]),
        log_norm([r.in_size[0] * r.in_size[1] for r in table]),
        log_norm([r.n_weights for r in table]),
        log_norm([r.macs for r in table]),
        lin_norm(weight_std),
    ]
    return np.clip(np.stack(cols, axis=1), 0.0, 1.0).astype(np.float32)


class ReleqEnv(gym.Env):
    """Gymnasium env of the ReLeQ search (see the module docstring for state, reward and modes).

    ``oracle.accuracy(w_bits, a_bits) -> percent`` and ``oracle.full_precision`` give accuracy;
    ``cost.ratio(w_bits, a_bits)`` the cost ratio; ``reward_fn(sa, cost, acc_o_fraction)`` the
    reward (see :func:`releq_tvm.search.reward.make_reward`).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        table,
        weight_std: Sequence[float],
        oracle,
        cost: CostBackend,
        reward_fn: Callable[[float, float, float], float],
        action_set: Sequence[int] = DEFAULT_ACTION_SET,
        act_action_set: Sequence[int] | None = None,
        finetune: FinetuneMode = "per-episode",
        latency_target: float | None = None,
        sq_form: str = "cost",
    ):
        super().__init__()
        self._init_args = dict(
            table=table, weight_std=weight_std, oracle=oracle, cost=cost, reward_fn=reward_fn, action_set=action_set,
            act_action_set=act_action_set, finetune=finetune, latency_target=latency_target, sq_form=sq_form,
        )
        if finetune not in get_args(FinetuneMode):
            raise ValueError(f"finetune must be one of {', '.join(get_args(FinetuneMode))}, got {finetune!r}")
        self.table = list(table)
        self.n_layers = len(self.table)
        self.oracle, self.cost, self.reward_fn = oracle, cost, reward_fn
        self.action_set = tuple(sorted(int(b) for b in action_set))
        self.act_action_set = None if act_action_set is None else tuple(sorted(int(b) for b in act_action_set))
        self.finetune, self.latency_target, self.sq_form = finetune, latency_target, sq_form
        self.static = static_features(self.table, weight_std)

        kinds = ("w", "a") if self.act_action_set else ("w",)
        #: (layer, kind) of every step of an episode, in order.
        self.schedule: list[tuple[int, str]] = [(layer, k) for layer in range(self.n_layers) for k in kinds]
        n_actions = max(len(self.action_set), len(self.act_action_set or ()))
        self.action_space = spaces.Discrete(n_actions)
        n_obs = self.static.shape[1] + 4 + (1 if self.act_action_set else 0)
        high = np.ones(n_obs, dtype=np.float32)
        high[self.static.shape[1] + 2 : self.static.shape[1] + 4] = DYNAMIC_HIGH
        self.observation_space = spaces.Box(low=np.zeros(n_obs, dtype=np.float32), high=high, dtype=np.float32)

        # The network's state, carried across episodes: every layer starts at 8 bits.
        self.w_bits: list[int] = [BITS_MAX] * self.n_layers
        self.a_bits: list[int] | None = [BITS_MAX] * self.n_layers if self.act_action_set else None
        self.sa = 1.0
        self.accuracy_pct = float(oracle.full_precision)
        self.last_episode: EpisodeOutcome | None = None
        self._t = 0
        self._prev_bits = 0
        self._begin_episode()

    # -- helpers ---------------------------------------------------------------------------
    @property
    def episode_length(self) -> int:
        return len(self.schedule)

    def values_for(self, kind: str) -> tuple[int, ...]:
        return self.act_action_set if kind == "a" else self.action_set

    def action_to_bits(self, action: int, kind: str) -> int:
        """Bitwidth picked by action index ``action`` for a ``kind`` ("w" or "a") decision."""
        values = self.values_for(kind)
        return values[int(action) * len(values) // self.action_space.n]

    def _config(self) -> tuple[Bits, Bits | None]:
        return tuple(self.w_bits), None if self.a_bits is None else tuple(self.a_bits)

    def _cost(self) -> float:
        return float(self.cost.ratio(*self._config()))

    def _observation(self) -> np.ndarray:
        layer, kind = self.schedule[self._t % self.episode_length]
        current = (self.a_bits if kind == "a" else self.w_bits)[layer]
        dyn = [
            current / BITS_MAX,
            self._prev_bits / BITS_MAX,
            min(max(self._cost(), 0.0), DYNAMIC_HIGH),
            min(max(self.sa, 0.0), DYNAMIC_HIGH),
        ]
        if self.act_action_set:
            dyn.append(1.0 if kind == "a" else 0.0)
        obs = np.concatenate([self.static[layer], np.asarray(dyn, dtype=np.float32)])
        return np.clip(obs, self.observation_space.low, self.observation_space.high).astype(np.float32)

    def _begin_episode(self) -> None:
        self._t = 0
        self._prev_bits = 0
        self._return = 0.0
        self._lookups = self._hits = 0
        self._proposed: tuple[Bits, Bits | None] | None = None

    def _measure(self) -> tuple[float, float]:
        """Accuracy (percent) and SA of the current configuration; counts cache use."""
        acc = float(self.oracle.accuracy(*self._config()))
        self._lookups += 1
        self._hits += int(bool(self.oracle.last_hit))
        self.accuracy_pct = acc
        self.sa = acc / float(self.oracle.full_precision)
        return acc, self.sa

    def state_dict(self) -> dict:
        """The network state carried across episodes (for checkpoints)."""
        return {
            "w_bits": list(self.w_bits),
            "a_bits": None if self.a_bits is None else list(self.a_bits),
            "sa": self.sa,
            "accuracy_pct": self.accuracy_pct,
        }

    def load_state_dict(self, state: dict) -> None:
        self.w_bits = [int(b) for b in state["w_bits"]]
        if self.a_bits is not None and state.get("a_bits") is not None:
            self.a_bits = [int(b) for b in state["a_bits"]]
        self.sa = float(state["sa"])
        self.accuracy_pct = float(state["accuracy_pct"])
        self._begin_episode()

    # -- gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        if options.get("w_bits") is not None:
            self.w_bits = [int(b) for b in options["w_bits"]]
        if options.get("a_bits") is not None and self.a_bits is not None:
            self.a_bits = [int(b) for b in options["a_bits"]]
        if options.get("sa") is not None:
            self.sa = float(options["sa"])
            self.accuracy_pct = self.sa * float(self.oracle.full_precision)
        self._begin_episode()
        return self._observation(), {}

    def _outcome_of(self, action):
        """What :meth:`step` does with ``action`` to the network's bits, without doing it:
        (layer, kind, bits picked, w_bits, a_bits after any latency-target correction, the
        proposed configuration before it (None before the last step), corrections, terminated)."""
        layer, kind = self.schedule[self._t]
        bits = self.action_to_bits(int(action), kind)
        w_bits = list(self.w_bits)
        a_bits = None if self.a_bits is None else list(self.a_bits)
        (a_bits if kind == "a" else w_bits)[layer] = bits
        terminated = self._t + 1 == self.episode_length
        proposed, corrections = None, 0
        if terminated:
            proposed = (tuple(w_bits), None if a_bits is None else tuple(a_bits))
            if self.latency_target is not None:
                w, a, _, corrections = correct_to_target(
                    w_bits, a_bits, self.cost.ratio, self.latency_target, self.action_set, self.act_action_set
                )
                w_bits, a_bits = list(w), None if a is None else list(a)
        return layer, kind, bits, w_bits, a_bits, proposed, corrections, terminated

    def config_to_measure(self, action) -> tuple[Bits, Bits | None] | None:
        """The configuration whose accuracy ``step(action)`` will ask the oracle for (None: none),
        so parallel environments can have their accuracies evaluated together first."""
        _, _, _, w_bits, a_bits, _, _, terminated = self._outcome_of(action)
        if not (terminated or self.finetune == "per-step"):
            return None
        return tuple(w_bits), None if a_bits is None else tuple(a_bits)

    def fresh_copy(self) -> ReleqEnv:
        """Another environment over the same network, oracle, cost and reward, at 8 bits (parallel episodes)."""
        return ReleqEnv(**self._init_args)

    def step(self, action):
        layer, kind, bits, w_bits, a_bits, proposed, corrections, terminated = self._outcome_of(action)
        self.w_bits, self.a_bits = w_bits, a_bits
        self._prev_bits = bits
        self._t += 1
        if terminated:
            self._proposed = proposed

        reward = 0.0
        if terminated or self.finetune == "per-step":
            _, sa = self._measure()
            reward = float(self.reward_fn(sa, self._cost(), float(self.oracle.full_precision) / 100.0))
        self._return += reward

        w, a = self._config()
        info = {"layer": layer, "kind": kind, "bits": bits, "w_bits": w, "a_bits": a, "sa": self.sa, "cost": self._cost()}
        if terminated:
            self.last_episode = EpisodeOutcome(
                w_bits=w,
                a_bits=a,
                proposed_w_bits=self._proposed[0],
                proposed_a_bits=self._proposed[1],
                corrections=corrections,
                accuracy=self.accuracy_pct,
                sa=self.sa,
                cost=self._cost(),
                sq=state_of_quantization(self.table, w, form=self.sq_form),
                reward=reward,
                episode_return=self._return,
                lookups=self._lookups,
                hits=self._hits,
            )
            info["corrections"] = corrections
            # The terminal observation is the first state of the next pass over the layers.
            self._t, self._prev_bits = 0, 0
            obs = self._observation()
            self._t = self.episode_length
        else:
            obs = self._observation()
        return obs, reward, terminated, False, info

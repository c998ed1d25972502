"""Every setting of one search run, in one dataclass (CleanRL-style), written to config.json.

Numbers of METHOD.md (reward constants, PPO hyperparameters, fine-tune budgets) come from
:data:`releq_tvm.config.DEFAULTS`; the ones here are the search's own (episode budget,
convergence test, the size of the val subset the reward is measured on).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from releq_tvm.config import DEFAULT_ACTION_SET, DEFAULTS


@dataclass
class SearchConfig:
    """One ReLeQ search. Units: steps are optimiser steps, accuracies are percent, ratios are x / 8-bit."""

    network: str
    #: Cost backend: ``none`` (SQ formula), ``cpu`` (measured TVM latency), ``stripes`` (simulator).
    measure: str = "none"
    #: Stripes metric when ``measure == "stripes"``: ``cycles`` or ``energy``.
    metric: str = "cycles"
    #: What ``measure == "cpu"`` prices: ``auto`` (what compile ships: per layer the faster of
    #: bit-serial and int8, over the int8 build) or ``bitserial`` (bit-serial over bit-serial at 8
    #: bits, the paper's comparison; what the results/ search runs of 2026-12-02 used).
    cpu_kernels: str = "auto"
    #: ``asymmetric`` (default), ``sa_over_sq``, ``sa_minus_sq``, ``hardware`` (METHOD.md section 4).
    reward: str = "asymmetric"
    reward_a: float = DEFAULTS.reward.a
    reward_b: float = DEFAULTS.reward.b
    reward_th: float = DEFAULTS.reward.th
    #: Accuracy the search may give away, in percentage points of val accuracy after the SHORT
    #: fine-tune. The asymmetric reward's cut-off becomes th = max(reward_th, 1 - max_loss / the
    #: full-precision val accuracy), so a configuration that loses more scores -1. Why: with
    #: METHOD.md's th = 0.4 a configuration losing 10 % of its accuracy still keeps 95 % of its
    #: reward, so nothing but th protects accuracy on networks less forgiving than LeNet-5. Why
    #: 1.0 for a 0.3 pp target: the long fine-tune recovers most of what the short one leaves
    #: (measured on LeNet-5: all 2 bits -0.80 pp short -> +0.06 pp long; all 1 bit -2.25 -> -0.10),
    #: and the short fine-tune alone costs the 8-bit model 0.2 pp. None: METHOD.md's th alone.
    max_loss: float | None = 1.0
    #: Accuracy limit (percent, absolute) of the hardware reward; None: its 10*acc_q form.
    acc_limit: float | None = None
    #: ``cost`` (energy-weighted) or ``plain`` State of Quantization for ``measure == "none"``.
    sq_form: str = "cost"
    #: Weight bitwidths the agent picks from.
    action_set: tuple[int, ...] = DEFAULT_ACTION_SET
    #: Search activation bits too (hardware-aware mode); their bitwidths.
    search_activations: bool = False
    act_action_set: tuple[int, ...] = (2, 4, 8)
    #: Correct each episode's bits (reverse layer order) until cost ratio <= target; None: off.
    latency_target: float | None = None
    #: Keep the weight-std entry of the state (False zeroes it: the ablation of METHOD.md section 4).
    weight_std_in_state: bool = True

    #: ``finetune`` (short fine-tune + val accuracy) or ``none`` (cost only, SA = 1).
    accuracy: str = "finetune"
    #: ``per-episode`` (one short fine-tune of the final bits) or ``per-step`` (after each action).
    finetune: str = "per-episode"
    #: Short fine-tune per evaluated configuration. Half the shared default: at ~29 ms of CPU per
    #: LeNet-5 step a miss costs ~3 s, which keeps a LeNet search near 20 minutes on 2 cores.
    short_steps: int = 100
    long_steps: int = DEFAULTS.finetune.long_steps
    #: Short fine-tune learning rate. Lower than the shared default (3e-3, tuned to rescue 2-bit
    #: configurations over 1000 steps): measured over 100 steps on LeNet-5, 3e-3 costs the 8-bit
    #: model 0.35 pp of val accuracy (more than the 0.3 pp target) while 1e-3 costs 0.2 pp.
    finetune_lr: float = 1e-3
    #: Learning rates of the LONG fine-tune; the best on the val subset is reported.
    long_lrs: tuple[float, ...] = (DEFAULTS.finetune.learning_rate, 3e-4)
    finetune_batch_size: int = DEFAULTS.finetune.batch_size
    #: Images of the val split the reward's accuracy is measured on (the first N, fixed).
    val_images: int = 2000
    #: Cap on the train images used for fine-tuning (None: the whole train split).
    train_images: int | None = None
    #: Train images used to calibrate activation ranges (hardware-aware mode).
    calibration_images: int = 512
    #: Skip the long fine-tune at the end (the reported accuracy is then the short one).
    long_finetune: bool = True

    #: Training episodes (upper bound: the search stops earlier once converged).
    episodes: int = 400
    #: Deterministic (argmax) episodes after training that read off the solution.
    final_episodes: int = 3
    #: Converged when the greedy bits stayed the same for this many training episodes ...
    converge_window: int = 40
    #: ... and the policy put at least this probability on them at every step, on average.
    converge_prob: float = 0.6
    stop_on_convergence: bool = True

    ppo_learning_rate: float = DEFAULTS.ppo.learning_rate
    ppo_gamma: float = DEFAULTS.ppo.gamma
    ppo_gae_lambda: float = DEFAULTS.ppo.gae_lambda
    ppo_n_epochs: int = DEFAULTS.ppo.n_epochs
    ppo_clip_range: float = DEFAULTS.ppo.clip_range
    ppo_ent_coef: float = 0.0
    #: SB3 normalises advantages over each update's batch by default. Off here: a batch is ONE
    #: episode whose only reward comes at its last step, so every step's advantage is about
    #: gamma^(L-1-t) * (R - mean R); subtracting the batch mean leaves only the gamma^k ramp,
    #: which tells the FIRST layers that a good episode was bad. Measured on LeNet-5, --measure
    #: cpu, seed 0: with it on, the greedy bits wandered (4,4,4,4,4 at p = 0.40, then back to
    #: 0.27 by episode 314); off, they settled on 2,2,2,2,2 from episode 150 on.
    ppo_normalize_advantage: bool = False
    policy_layers: tuple[int, ...] = DEFAULTS.ppo.policy_layers
    value_layers: tuple[int, ...] = DEFAULTS.ppo.value_layers
    lstm_hidden_size: int = DEFAULTS.ppo.lstm_hidden_size
    seed: int = DEFAULTS.ppo.seed

    checkpoint: str | None = None
    data_dir: str | None = None
    #: accuracy cache store file (None: <cache dir>/cache.sqlite, the one store shared by every run).
    cache_path: str | None = None
    run_dir: str | None = None
    #: torch intra-op threads (None: torch's default). One by default: the agent's LSTM and a
    #: LeNet-sized fine-tune gain little from a second thread and, on a shared 2-core machine,
    #: lose up to 10x to thread synchronisation (measured); raise it for large networks.
    threads: int | None = 1
    #: Save the agent every this many episodes (1: a kill loses at most the episode in flight).
    checkpoint_every: int = 1

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SearchConfig":
        """Rebuild from config.json (tuples come back as lists; unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs.setdefault("cpu_kernels", "bitserial")  # runs written before auto existed priced bit-serial
        for name in ("action_set", "act_action_set", "policy_layers", "value_layers", "long_lrs"):
            if name in kwargs and kwargs[name] is not None:
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)

    def default_run_dir(self) -> str:
        return f"runs/search/{self.network}-{self.measure}-{self.reward}"

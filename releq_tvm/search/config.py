"""Every setting of one search run, in one dataclass (CleanRL-style), written to config.json.

The dataclass is also the command line: each field carries its help, option name and range
(:func:`releq_tvm.config_fields.setting`), ``releq-tvm search`` generates its options from them,
and :meth:`SearchConfig.validate` checks every instance, however it was made. Numbers of
METHOD.md (reward constants, PPO hyperparameters, fine-tune budgets) come from
:data:`releq_tvm.config.DEFAULTS`; the ones here are the search's own (episode budget,
convergence test, the size of the val subset the reward is measured on).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

from releq_tvm.bits import parse_action_set
from releq_tvm.config import DEFAULT_ACTION_SET, DEFAULTS
from releq_tvm.config_fields import check_network_or_model, check_rpc_options, check_settings, setting
from releq_tvm.errors import ReleqError
from releq_tvm.search.cost import CpuKernels, Measure, StripesMetric, check_remote_measure
from releq_tvm.search.reward import RewardName, SqForm

AccuracyMode = Literal["finetune", "none"]
FinetuneMode = Literal["per-episode", "per-step"]
#: Settings a resumed run takes anew when given (how fast it runs, not what it means): the Ray
#: workers, the environments per update and the cluster. (``--episodes`` too: a new budget.)
RESUME_SETTINGS = ("workers", "envs", "ray_address")


@dataclass
class SearchConfig:
    """One ReLeQ search. Units: steps are optimiser steps, accuracies are percent, ratios are x / 8-bit."""

    network: str | None = setting(
        None, cli=False,
        help="Registered network to search (`releq-tvm networks`); with --model, the name its model is registered under.",
    )  # the NET argument
    # The user's own model and data (issue 14). config.json records them, so --resume loads the same ones.
    model: str | None = setting(
        None, metavar="SOURCE",
        help="Your own model instead of NET: a .onnx file, a .pt2 file (torch.export.save) or an entry point "
             "package.module:function returning an nn.Module; its name is the file's stem or the function's.",
    )
    input_shape: tuple[int, ...] | None = setting(
        None, min=1, metavar="C,H,W",
        help="Input shape of a --model that does not state one (an entry point; an ONNX file with free axes).",
    )
    data: str | None = setting(
        None, metavar="SPEC",
        help="Images to fine-tune on (train), score the reward on (val) and report on (test, if present): "
             "imagefolder:DIR, npz:FILE or a dataset name (mnist, cifar10, svhn, imagenet). Default: the network's "
             "own dataset; a --model has none, so without --data it searches with --accuracy none only.",
    )
    measure: Measure = setting(
        "none", help="Cost in state and reward: SQ formula, measured TVM CPU latency ratio, or Stripes simulator ratio."
    )
    metric: StripesMetric = setting("cycles", help="Stripes ratio of --measure stripes: cycles (1/speedup) or energy.")
    # auto is what compile ships (per layer the fastest of bit-serial, int8 and lut, over the int8
    # build); bitserial is the paper's comparison and what the results/ search runs of 2026-12-02 used.
    cpu_kernels: CpuKernels = setting(
        "auto",
        help="--measure cpu prices the auto build (per layer the fastest of bit-serial, int8 and lut, over int8) "
             "or pure bit-serial over bit-serial at 8 bits.",
    )
    reward: RewardName = setting(
        "asymmetric", help="asymmetric, sa_over_sq, sa_minus_sq (METHOD.md section 3) or hardware (section 4)."
    )
    reward_a: float = setting(DEFAULTS.reward.a, help="Asymmetric reward: cost exponent a.")
    reward_b: float = setting(DEFAULTS.reward.b, help="Asymmetric reward: accuracy exponent b.")
    reward_th: float = setting(DEFAULTS.reward.th, help="Asymmetric reward: SA below th scores -1.")
    # Why: with METHOD.md's th = 0.4 a configuration losing 10 % of its accuracy still keeps 95 %
    # of its reward, so nothing but th protects accuracy on networks less forgiving than LeNet-5.
    # Why 1.0 for a 0.3 pp target: the long fine-tune recovers most of what the short one leaves
    # (measured on LeNet-5: all 2 bits -0.80 pp short -> +0.06 pp long; all 1 bit -2.25 -> -0.10),
    # and the short fine-tune alone costs the 8-bit model 0.2 pp. None: METHOD.md's th alone.
    max_loss: float | None = setting(
        1.0, min=0,
        help="Val accuracy (pp, after the short fine-tune) the asymmetric reward lets go: th becomes "
             "max(th, 1 - max_loss / full precision), so a configuration that loses more scores -1. "
             "100 leaves METHOD.md's th alone.",
    )
    acc_limit: float | None = setting(
        None, min=0, max=100, help="Accuracy limit (percent, absolute) of --reward hardware (default: its 10*acc_q form)."
    )
    sq_form: SqForm = setting(
        "cost", help="State of Quantization for --measure none: energy-weighted or sum(bits)/(8L)."
    )
    action_set: tuple[int, ...] = setting(
        DEFAULT_ACTION_SET, min=1, max=8, parse=parse_action_set, metavar="BITS",
        help="Weight bitwidths the agent picks from, e.g. 1-8 or 2,4,8.",
    )
    search_activations: bool = setting(False, help="Hardware-aware mode: search activation bits too.")
    # 1 and 2 because that is where a CPU pays: a w x a bit-serial layer costs w*a bit planes and
    # beats this host's int8 kernel only below w*a ~ 2-4 (results/kernels.csv); 4 and 8 keep the
    # accurate end. Four values map onto the 8 action indices evenly (2 each), so the initial
    # policy favours none of them.
    act_action_set: tuple[int, ...] = setting(
        (1, 2, 4, 8), min=1, max=8, parse=parse_action_set, metavar="BITS",
        help="Activation bitwidths with --search-activations (the input of each layer; entry 1 is the image).",
    )
    latency_target: float | None = setting(
        None, min=0, max=1, min_open=True,
        help="Cost ratio to 8 bits each episode's bits are corrected to (reverse layer order; default: off).",
    )
    # False zeroes the weight-std entry of the state: the ablation of METHOD.md section 4.
    weight_std_in_state: bool = setting(
        True, cli="--no-weight-std", help="Leave the weight std out of the state (ablation)."
    )

    accuracy: AccuracyMode = setting(
        "finetune", help="finetune: short fine-tune + val accuracy; none: score cost only (SA = 1), "
                         "for networks whose data is not here."
    )
    finetune: FinetuneMode = setting(
        "per-episode", help="Short fine-tune once per episode (final bits) or after every action (and reward every step)."
    )
    # Half the shared default: at ~29 ms of CPU per LeNet-5 step a miss costs ~3 s, which keeps
    # a LeNet search near 20 minutes on 2 cores.
    short_steps: int = setting(100, min=0, help="Short fine-tune steps per evaluated configuration.")
    long_steps: int = setting(
        DEFAULTS.finetune.long_steps, min=0, help="Fine-tune steps of the chosen bits after the search (0: skip)."
    )
    # Lower than the shared default (3e-3, tuned to rescue 2-bit configurations over 1000 steps):
    # measured over 100 steps on LeNet-5, 3e-3 costs the 8-bit model 0.35 pp of val accuracy
    # (more than the 0.3 pp target) while 1e-3 costs 0.2 pp.
    finetune_lr: float = setting(1e-3, min=0, min_open=True, help="Short fine-tune learning rate.")
    long_lrs: tuple[float, ...] = setting(
        (DEFAULTS.finetune.learning_rate, 3e-4), min=0, min_open=True,
        help="Learning rates of the long fine-tune; the best on the val subset is reported.",
    )
    finetune_batch_size: int = setting(DEFAULTS.finetune.batch_size, min=1, help="Fine-tune batch size.")
    val_images: int = setting(
        2000, min=1, help="Val images the reward's accuracy is measured on (the first N, fixed)."
    )
    train_images: int | None = setting(
        None, min=1, help="Cap on the train images used for fine-tuning (default: the whole train split)."
    )
    calibration_images: int = setting(
        512, min=1, help="Train images that calibrate activation ranges (hardware-aware mode)."
    )
    long_finetune: bool = setting(
        True, cli=False, help="Run the long fine-tune at the end (else the reported accuracy is the short one)."
    )  # the command line sets it from --long-steps (0: skip)

    episodes: int = setting(400, min=1, help="Training episodes (the search stops earlier once converged).")
    final_episodes: int = setting(3, min=1, help="Deterministic (argmax) episodes after training that read off the solution.")
    converge_window: int = setting(
        40, min=1, help="Converged when the greedy bits stayed the same for this many training episodes ..."
    )
    converge_prob: float = setting(
        0.6, min=0, max=1, help="... and the policy put at least this probability on them at every step, on average."
    )
    stop_on_convergence: bool = setting(
        True, cli="--no-early-stop", help="Spend the whole episode budget even after convergence."
    )

    ppo_learning_rate: float = setting(
        DEFAULTS.ppo.learning_rate, min=0, min_open=True, help="PPO Adam step size (METHOD.md: 1e-4)."
    )
    ppo_gamma: float = setting(DEFAULTS.ppo.gamma, min=0, max=1, help="PPO discount (METHOD.md: 0.9).")
    ppo_gae_lambda: float = setting(DEFAULTS.ppo.gae_lambda, min=0, max=1, help="PPO GAE parameter (METHOD.md: 0.99).")
    ppo_n_epochs: int = setting(DEFAULTS.ppo.n_epochs, min=1, help="PPO epochs per update (METHOD.md: 3).")
    ppo_clip_range: float = setting(
        DEFAULTS.ppo.clip_range, min=0, max=1, min_open=True, cli=("--ppo-clip-range", "--clip-range"),
        help="PPO clip range (METHOD.md: 0.1; the clip ablation uses 0.2 and 0.3).",
    )
    ppo_ent_coef: float = setting(0.0, min=0, help="PPO entropy bonus (METHOD.md names none).")
    # SB3 normalises advantages over each update's batch by default. Off here: a batch is ONE
    # episode whose only reward comes at its last step, so every step's advantage is about
    # gamma^(L-1-t) * (R - mean R); subtracting the batch mean leaves only the gamma^k ramp,
    # which tells the FIRST layers that a good episode was bad. Measured on LeNet-5, --measure
    # cpu, seed 0: with it on, the greedy bits wandered (4,4,4,4,4 at p = 0.40, then back to
    # 0.27 by episode 314); off, they settled on 2,2,2,2,2 from episode 150 on.
    ppo_normalize_advantage: bool = setting(
        False, help="Normalise advantages over each update's batch (SB3's default; off: a batch is one episode, "
                    "and normalising it tells the first layers that a good episode was bad)."
    )
    policy_layers: tuple[int, ...] = setting(
        DEFAULTS.ppo.policy_layers, min=1, help="Hidden units of the policy head after the LSTM (METHOD.md: 128,128)."
    )
    value_layers: tuple[int, ...] = setting(
        DEFAULTS.ppo.value_layers, min=1, help="Hidden units of the value head after the LSTM (METHOD.md: 128,64)."
    )
    lstm_hidden_size: int = setting(DEFAULTS.ppo.lstm_hidden_size, min=1, help="Hidden units of the agent's LSTM.")
    seed: int = setting(DEFAULTS.ppo.seed, min=0, help="Seed of the agent and of every fine-tune.")

    # --checkpoint and --data-dir are spelled once for every command, in releq_tvm.cli_options.
    checkpoint: str | None = setting(None, cli=False, help="Float model state_dict (None: the shipped one).")
    data_dir: str | None = setting(None, cli=False, help="Folder with the torchvision dataset files.")
    cache_path: str | None = setting(
        None, cli="--cache", path="file",
        help="Accuracy cache store file (default: <cache dir>/cache.sqlite, shared by all runs).",
    )
    run_dir: str | None = setting(
        None, path="dir", help="Where the run's files go (default runs/search/<net>-<measure>-<reward>)."
    )
    # One thread by default: the agent's LSTM and a LeNet-sized fine-tune gain little from a
    # second one and, on a shared 2-core machine, lose up to 10x to thread synchronisation
    # (measured); raise it for large networks.
    threads: int | None = setting(1, min=1, help="torch intra-op threads.")
    checkpoint_every: int = setting(
        1, min=1, help="Save the agent every this many episodes (1: a kill loses at most the episode in flight)."
    )

    # Scale-out (issue 15). workers and envs change how fast a run goes, not what it means, so
    # --resume takes them anew (any N); with workers 1 and envs 1 no Ray starts and a run is the
    # single-process search, episode for episode.
    workers: int = setting(
        1, min=1,
        help="Accuracy evaluations at once: N single-threaded Ray workers (needs the `distributed` extra; 1: no Ray).",
    )
    envs: int | None = setting(
        None, min=1,
        help="Environments stepping together: each policy update sees this many episodes (default: --workers).",
    )
    ray_address: str | None = setting(
        None, metavar="ADDR", help="Join this Ray cluster (e.g. 10.0.0.5:6379 or auto) instead of starting a local Ray.",
    )
    rpc: str | None = setting(
        None, metavar="HOST:PORT", help="--measure cpu: time the latency table on a TVM RPC server instead of this process.",
    )
    rpc_tracker: str | None = setting(
        None, metavar="HOST:PORT",
        help="--measure cpu: time the latency table on a device a TVM RPC tracker hands out (with --rpc-key).",
    )
    rpc_key: str | None = setting(None, metavar="KEY", help="Device key to ask the --rpc-tracker for.")

    def __post_init__(self) -> None:
        if self.model is not None and self.network is None:
            from releq_tvm.networks.user_model import model_name

            self.network = model_name(self.model)  # the name the search registers the model under
        self.validate()

    def validate(self) -> None:
        """Raise a one-line :class:`ReleqError` for a value outside its choices or range, or for
        settings that cannot work together."""
        check_settings(self)
        check_network_or_model(self.network, self.model, self.input_shape)
        if self.model is not None:
            from releq_tvm.networks.user_model import model_name

            if self.network != model_name(self.model):
                raise ReleqError(f"pass NET or --model, not both (got {self.network} and --model {self.model})")
        if self.input_shape is not None and len(self.input_shape) != 3:
            raise ReleqError("--input-shape must be C,H,W with three positive integers such as 3,32,32; got "
                             + ",".join(str(s) for s in self.input_shape))
        check_rpc_options(self.rpc, self.rpc_tracker, self.rpc_key)
        check_remote_measure(self.measure, self.rpc, self.rpc_tracker)
        if self.search_activations and self.measure == "none":
            raise ReleqError(
                "--search-activations needs a hardware cost (--measure cpu or stripes): "
                "the SQ formula of --measure none has no activation term"
            )

    @property
    def n_envs(self) -> int:
        """Environments stepping together (``envs``, default ``workers``)."""
        return self.envs if self.envs is not None else self.workers

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SearchConfig":
        """Rebuild from config.json (tuples come back as lists; unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs.setdefault("cpu_kernels", "bitserial")  # runs written before auto existed priced bit-serial
        for name in ("action_set", "act_action_set", "policy_layers", "value_layers", "long_lrs", "input_shape"):
            if name in kwargs and kwargs[name] is not None:
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)

    def default_run_dir(self) -> str:
        return f"runs/search/{self.network}-{self.measure}-{self.reward}"

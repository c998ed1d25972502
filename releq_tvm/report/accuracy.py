"""Accuracies the report prints, measured (never typed) and cached so a rerun costs nothing.

Two protocols, both documented in the CSVs that use them:

* **final accuracy** (``bitwidths.csv``): the float model's top-1 on the *test* split, and the
  model quantized to the chosen bits (weights, and activations where the row has activation
  bits) and fine-tuned for ``finetune_steps`` steps (``DEFAULTS.finetune``: the long fine-tune,
  learning rate, batch, seed), then on *test*;
* **Pareto points** (``pareto_<net>.csv``): the quantized model on a fixed subset of the *val*
  split (its first ``val_images`` images), by default *without* fine-tuning: hundreds to
  thousands of points at a few tens of milliseconds each, where the long fine-tune costs
  minutes per point. ``pareto_finetune_steps`` > 0 gives every point that many fine-tune steps
  first (a much better picture of what a bit vector can reach at ~0.1 s per step on a busy CPU).

A user's own model (``--model``, or a search run of one) keeps its own weights and is scored on
its ``--data`` (or the data its search run used), whose digest joins every cache key.

Models: the shipped checkpoint, or ``--checkpoint NET=FILE``. An MNIST network with neither
(``lenet4``) is trained here, seeded, with the recipe of the shipped LeNet-5 checkpoint, and
cached under ``cache_dir()/report/``. Other datasets need ``--data-dir`` and a checkpoint;
without them the accuracy cells stay empty and the reason is written next to them.

Results are cached in the one cache store (:mod:`releq_tvm.store`, namespace
``report/accuracy``), keyed by the model's weight digest (:func:`releq_tvm.train.model_hash`) and
every protocol number, so a changed checkpoint or protocol is never served stale. The old
``report/accuracy.json`` is not read: its accuracies are measured again.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from releq_tvm.config import DEFAULTS, cache_dir
from releq_tvm.config_fields import check_settings, setting
from releq_tvm.errors import ReleqError
from releq_tvm.io import atomic_write_bytes
from releq_tvm.store import Store, open_store

#: Recipe of the shipped LeNet-5 checkpoint (networks/checkpoints/lenet.json), reused for
#: MNIST networks that ship none.
TRAIN_STEPS = 4000
TRAIN_LR = 2e-3
TRAIN_BATCH = 128


def checkpoint_pair(text: str) -> tuple[str, str]:
    """``"NET=FILE"`` -> (NET, FILE): one ``--checkpoint`` of the report."""
    net, sep, path = text.partition("=")
    if not sep or not net.strip() or not path.strip():
        raise ReleqError(f"--checkpoint needs NET=FILE such as simplenet=runs/simplenet/model.pt; got {text!r}")
    return net.strip(), path.strip()


@dataclass(frozen=True)
class AccuracyConfig:
    """Where data and models come from and the protocols' numbers (steps are optimiser steps).

    Its command-line fields are options of ``releq-tvm report`` (:class:`releq_tvm.report.build.ReportOptions`).
    """

    # --data-dir is spelled once for every command, in releq_tvm.cli_options
    data_dir: str | None = setting(None, cli=False, help="Folder with the torchvision dataset files.")
    checkpoints: Mapping[str, str] = setting(
        default_factory=dict, cli="--checkpoint", multiple=True, parse=checkpoint_pair, metavar="NET=FILE",
        help="Trained float model of NET (repeatable).",
    )
    train_missing: bool = setting(
        True, cli="--no-train", help="Do not train MNIST networks that ship no checkpoint (lenet4): leave their accuracy empty."
    )
    finetune_steps: int = setting(
        DEFAULTS.finetune.long_steps, min=0, help="Fine-tune steps before the quantized accuracy of bitwidths.csv."
    )
    finetune_lr: float = DEFAULTS.finetune.learning_rate
    finetune_batch: int = DEFAULTS.finetune.batch_size
    seed: int = DEFAULTS.finetune.seed
    val_images: int = setting(2000, min=1, help="Val images each Pareto point is scored on (the first N of the val split).")
    pareto_finetune_steps: int = setting(
        0, min=0, help="Fine-tune steps before each Pareto point's accuracy (0: none; ~0.1 s per step and point)."
    )

    def __post_init__(self) -> None:
        check_settings(self)


def calibration_images() -> int:
    """Train images (the first ones) that start the activation clipping levels: the search's number."""
    from releq_tvm.search.config import SearchConfig

    return SearchConfig.calibration_images


class AccuracyOracle:
    """Measured accuracies (percent) of the registered networks, cached on disk.

    ``cache_path``: a folder for this oracle's store (``cache.sqlite``) and trained checkpoints;
    None: the shared store and ``cache_dir()/report/``. ``model_data``: the ``--data`` spec of each
    user's model (registered networks use their own dataset).
    """

    NAMESPACE = "report/accuracy"

    def __init__(
        self,
        config: AccuracyConfig = AccuracyConfig(),
        cache_path: str | Path | None = None,
        progress: Callable[[str], None] | None = None,
        model_data: Mapping[str, str] | None = None,
    ):
        self.config = config
        self.model_data = dict(model_data or {})
        self.root = Path(cache_path) if cache_path is not None else cache_dir() / "report"
        self.store = Store(self.root / "cache.sqlite") if cache_path is not None else open_store()
        self.progress = progress or (lambda msg: None)
        self._cache: dict[str, float] = {k: float(v) for k, v in self.store.items(self.NAMESPACE).items()}
        self._unsaved: dict[str, float] = {}
        self._models: dict[str, tuple[object, str, str]] = {}
        self._data: dict[tuple[str, str], object] = {}
        self._data_keys: dict[tuple[str, ...], str] = {}

    # -- cache --------------------------------------------------------------------------------
    def _store(self, key: str, value: float) -> None:
        self._cache[key] = value
        self.store.put(self.NAMESPACE, key, value)

    def _remember(self, key: str, value: float) -> None:
        """Keep ``value`` now, write it with the next :meth:`flush` (cheap points, written in batches)."""
        self._cache[key] = self._unsaved[key] = value

    def flush(self) -> None:
        """Write the values kept by :meth:`_remember` (one transaction)."""
        self.store.put_many(self.NAMESPACE, self._unsaved)
        self._unsaved = {}

    # -- what is available --------------------------------------------------------------------
    def missing_reason(self, network: str) -> str | None:
        """Why ``network`` gets no accuracy here (None: it does)."""
        from releq_tvm.networks import checkpoint_path, get_network_spec

        spec = get_network_spec(network)
        if spec.source is not None:  # a user's model: its own weights, and the images given for it
            if network not in self.model_data:
                from releq_tvm.data import DATA_FORMS

                return f"no data for {network} here: pass --data with {DATA_FORMS}"
            return None
        if spec.dataset != "mnist" and self.config.data_dir is None:
            return f"no {spec.dataset} data here: pass --data-dir DIR (and --checkpoint {network}=FILE)"
        has_model = network in self.config.checkpoints or checkpoint_path(network) is not None
        if not has_model and not (spec.dataset == "mnist" and self.config.train_missing):
            return f"no trained checkpoint of {network}: pass --checkpoint {network}=FILE (see `releq-tvm train`)"
        return None

    def data(self, network: str, split: str):
        from releq_tvm.data import load_dataset, load_model_data
        from releq_tvm.networks import get_network_spec

        spec = get_network_spec(network)
        source = self.model_data.get(network) if spec.source is not None else spec.dataset
        key = (source, split)
        if key not in self._data:
            if spec.source is not None:
                self._data[key] = load_model_data(source, split, spec.input_shape, spec.num_classes, self.config.data_dir)
            else:
                self._data[key] = load_dataset(source, split, self.config.data_dir)
        return self._data[key]

    def data_key(self, network: str, *splits: str) -> str:
        """What of the images joins a cache key: nothing for a registered network (its dataset is
        implied), the digest of ``splits`` for a user's model's ``--data``."""
        from releq_tvm.networks import get_network_spec

        if get_network_spec(network).source is None:
            return ""
        key = (network, *splits)
        if key not in self._data_keys:
            from releq_tvm.search.accuracy import data_digest

            self._data_keys[key] = f"|data {data_digest(*(self.data(network, s) for s in splits))}"
        return self._data_keys[key]

    def float_model(self, network: str):
        """(a fresh float copy of the trained model, its digest, where it came from)."""
        import copy

        model, digest, origin = self._entry(network)
        return copy.deepcopy(model), digest, origin

    def _entry(self, network: str):
        if network not in self._models:
            self._models[network] = self._load_float_model(network)
        return self._models[network]

    def model_origin(self, network: str) -> str:
        return self._entry(network)[2]

    def _load_float_model(self, network: str):
        import torch

        from releq_tvm.networks import checkpoint_path, create_network, get_network_spec
        from releq_tvm.train import load_model, model_hash, train_steps

        reason = self.missing_reason(network)
        if reason is not None:
            raise ReleqError(f"{network}: {reason}")
        spec = get_network_spec(network)
        if network in self.config.checkpoints:
            model, origin = load_model(network, self.config.checkpoints[network]), f"checkpoint {self.config.checkpoints[network]}"
        elif spec.source is not None:
            model, origin = load_model(network), f"the weights of {spec.source}"
        elif checkpoint_path(network) is not None:
            model, origin = load_model(network), f"shipped checkpoint networks/checkpoints/{get_network_spec(network).checkpoint}"
        else:
            seed = self.config.seed
            path = self.root / "checkpoints" / f"{network}-steps{TRAIN_STEPS}-lr{TRAIN_LR:g}-seed{seed}.pt"
            model = create_network(network, seed=seed)
            if path.is_file():
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            else:
                self.progress(f"accuracy: training {network} in-process ({TRAIN_STEPS} steps, no checkpoint ships)")
                torch.manual_seed(seed)
                train_steps(model, self.data(network, "train"), TRAIN_STEPS, lr=TRAIN_LR, batch_size=TRAIN_BATCH, seed=seed)
                buf = io.BytesIO()
                torch.save(model.state_dict(), buf)
                atomic_write_bytes(path, buf.getvalue())
            origin = (
                f"trained by the report: {TRAIN_STEPS} Adam steps, lr {TRAIN_LR:g}, batch {TRAIN_BATCH}, seed {seed} "
                f"(as `releq-tvm train {network} --steps {TRAIN_STEPS} --lr {TRAIN_LR:g} --seed {seed}`)"
            )
        model.eval()
        return model, model_hash(model), origin

    # -- the two protocols --------------------------------------------------------------------
    def full_precision(self, network: str) -> float:
        """Top-1 (%) of the float model on the test split."""
        from releq_tvm.train import evaluate

        model, digest, _ = self._entry(network)
        key = f"{network}|{digest}{self.data_key(network, 'test')}|fp32|test"
        if key not in self._cache:
            self._store(key, evaluate(model, self.data(network, "test")))
        return self._cache[key]

    def _finetuned_key(self, network: str, bits: Sequence[int], a_bits: Sequence[int] | None = None) -> str:
        c = self.config
        digest = self._entry(network)[1]
        from releq_tvm.quant.quantizers import QUANTIZER_VERSION

        act = "" if a_bits is None else f"|act {','.join(map(str, a_bits))} calibration {calibration_images()}"
        return (f"{network}|{digest}{self.data_key(network, 'train', 'test')}|{QUANTIZER_VERSION}|bits {','.join(map(str, bits))}{act}"
                f"|finetune {c.finetune_steps} lr {c.finetune_lr:g} batch {c.finetune_batch} seed {c.seed}|test")

    def finetuned(self, network: str, bits: Sequence[int], a_bits: Sequence[int] | None = None) -> float:
        """Top-1 (%) on test after quantizing to ``bits`` and ``finetune_steps`` fine-tune steps.

        With ``a_bits`` every weight layer's input is quantized too, its clipping level calibrated
        on the first :func:`calibration_images` train images (as the search does) and trained
        with the weights; without, activations stay in float.
        """
        from releq_tvm.networks import get_network_spec
        from releq_tvm.train import evaluate, finetune_bits

        c = self.config
        bits_text = ",".join(map(str, bits)) + ("" if a_bits is None else f" a {','.join(map(str, a_bits))}")
        key = self._finetuned_key(network, bits, a_bits)
        if key not in self._cache:
            model, _, _ = self.float_model(network)
            train = self.data(network, "train")
            calibration = None if a_bits is None else train.images[:calibration_images()]
            self.progress(f"accuracy: fine-tuning {network} at {bits_text} for {c.finetune_steps} steps")
            finetune_bits(model, bits, get_network_spec(network).input_shape, train, c.finetune_steps,
                          lr=c.finetune_lr, batch_size=c.finetune_batch, seed=c.seed, act_bits=a_bits,
                          calibration=calibration)
            self._store(key, evaluate(model, self.data(network, "test")))
        return self._cache[key]

    def cached_finetuned(self, network: str, bits: Sequence[int], a_bits: Sequence[int] | None = None) -> float | None:
        """:meth:`finetuned` if it is already in the cache, else None (never fine-tunes)."""
        return self._cache.get(self._finetuned_key(network, bits, a_bits))

    def pareto_scorer(self, network: str) -> ParetoScorer:
        """``score(bits)``: top-1 (%) on the first ``val_images`` val images after
        ``pareto_finetune_steps`` fine-tune steps (0: none)."""
        from releq_tvm.data import TensorDataset
        from releq_tvm.networks import get_network_spec

        model, digest, _ = self.float_model(network)
        val = self.data(network, "val")
        n = min(self.config.val_images, len(val))
        subset = TensorDataset(val.images[:n], val.labels[:n])
        return ParetoScorer(self, network, model, digest, subset, get_network_spec(network).input_shape)


class ParetoScorer:
    """Accuracy (%) of one network at given bits on a fixed val subset, cached per bit vector.

    Without fine-tuning, quantization is re-applied in place on one model copy (no copy per
    point); with ``pareto_finetune_steps`` every point starts from a fresh copy of the float
    model. New results are written to the cache file every 100 points and on :meth:`flush`.
    """

    def __init__(self, oracle: AccuracyOracle, network: str, model, digest: str, subset, input_shape):
        self.oracle, self.network, self.model, self.digest = oracle, network, model, digest
        self.subset, self.input_shape = subset, input_shape
        self.images = len(subset)
        self.finetune_steps = oracle.config.pareto_finetune_steps
        self.data_key = oracle.data_key(network, "val", *(("train",) if self.finetune_steps else ()))
        self._new = 0

    @property
    def protocol(self) -> str:
        c = self.oracle.config
        if self.finetune_steps == 0:
            return f"no fine-tune, first {self.images} val images"
        return (f"{self.finetune_steps} fine-tune steps (lr {c.finetune_lr:g}, batch {c.finetune_batch}, seed {c.seed}), "
                f"first {self.images} val images")

    def __call__(self, bits: Sequence[int]) -> float:
        import copy

        from releq_tvm.quant import apply_bits
        from releq_tvm.train import evaluate, finetune_bits

        c = self.oracle.config
        key = f"{self.network}|{self.digest}{self.data_key}|bits {','.join(map(str, bits))}|{self.protocol}"
        value = self.oracle._cache.get(key)
        if value is None:
            if self.finetune_steps == 0:
                model = apply_bits(self.model, bits, self.input_shape)
            else:
                model = finetune_bits(copy.deepcopy(self.model), bits, self.input_shape,
                                      self.oracle.data(self.network, "train"), self.finetune_steps,
                                      lr=c.finetune_lr, batch_size=c.finetune_batch, seed=c.seed)
            value = evaluate(model, self.subset)
            self.oracle._remember(key, value)
            self._new += 1
            if self._new % 100 == 0:  # a long enumeration survives an interruption
                self.oracle.flush()
        return value

    def flush(self) -> None:
        if self._new:
            self.oracle.flush()
            self._new = 0

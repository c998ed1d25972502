"""Accuracy for the reward: short fine-tune of the quantized model, accuracy on a held-out split, cached.

The State of Relative Accuracy of a configuration is ``accuracy(bits) / full_precision`` where
``accuracy(bits)`` is the top-1 accuracy (percent) on a fixed subset of the *val* split after a
SHORT fine-tune (``short_steps`` Adam steps on the train split) of the float model quantized to
``bits``. The test split is never used by the search; only :func:`long_finetune`, after the
search, reports test accuracy.

Every result is stored in the one cache store (:mod:`releq_tvm.store`) keyed by the
configuration and by everything that changes the number (network, checkpoint hash, fine-tune
settings, val subset), so a configuration is fine-tuned once per settings, across episodes, runs
and search methods. Each insert is its own committed transaction, so a killed run loses at most
the evaluation in flight, and runs sharing the file never lose each other's results.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from releq_tvm.quant.apply import calibrate_input_ranges
from releq_tvm.quant.quantizers import ACT_QUANTIZER_VERSION, QUANTIZER_VERSION
from releq_tvm.store import Store, open_store

Bits = tuple[int, ...]


def _bits_text(bits: Sequence[int] | None) -> str:
    return "" if bits is None else ",".join(str(int(b)) for b in bits)


class AccuracyCache:
    """On-disk accuracy per (settings, weight bits, activation bits), in the one cache store.

    ``path``: the store file (None: ``cache_dir()/cache.sqlite``, shared by every run). Settings
    live in the namespace ``accuracy/settings`` (for humans reading the file), the accuracies of
    one settings key in ``accuracy/<key>``, keyed by ``w <bits>|a <bits>``. Accuracy files of the
    old format (``accuracy.sqlite``) are not read: their configurations are fine-tuned again.
    With activation bits the key ends in the activation quantizer's version
    (``w <bits>|a <bits>|pact-1``, :data:`ACT_QUANTIZER_VERSION`).
    """

    SETTINGS = "accuracy/settings"

    def __init__(self, path: str | Path | None = None):
        # a path of its own gets its own connection (closed by close()); the default store is shared
        self._owned = path is not None
        self.store = Store(path) if path is not None else open_store()
        self.path = self.store.path

    @staticmethod
    def settings_key(settings: dict) -> str:
        """Stable 16-hex-digit key of a settings dict (sorted JSON)."""
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def register(self, settings: dict) -> str:
        """Store ``settings`` (for humans reading the file) and return its key."""
        key = self.settings_key(settings)
        if self.store.get(self.SETTINGS, key) is None:
            self.store.put(self.SETTINGS, key, settings)
        return key

    @staticmethod
    def _entry_key(w_bits: Sequence[int], a_bits: Sequence[int] | None) -> str:
        # the activation quantizer is named only where activations are quantized, so a new one
        # re-measures those configurations and keeps every weights-only accuracy
        if a_bits is None:
            return f"w {_bits_text(w_bits)}|a "
        return f"w {_bits_text(w_bits)}|a {_bits_text(a_bits)}|{ACT_QUANTIZER_VERSION}"

    def get(self, key: str, w_bits: Sequence[int], a_bits: Sequence[int] | None = None) -> float | None:
        entry = self.store.get(f"accuracy/{key}", self._entry_key(w_bits, a_bits))
        return None if entry is None else float(entry["accuracy"])

    def put(self, key: str, w_bits: Sequence[int], a_bits: Sequence[int] | None, accuracy: float, seconds: float) -> None:
        entry = {"accuracy": float(accuracy), "seconds": float(seconds), "created": time.time()}
        self.store.put(f"accuracy/{key}", self._entry_key(w_bits, a_bits), entry)

    def count(self, key: str | None = None) -> int:
        """Accuracies stored under settings ``key`` (None: under every settings key)."""
        if key is not None:
            return self.store.count(f"accuracy/{key}")
        return sum(self.store.count(ns) for ns in self.store.namespaces("accuracy/") if ns != self.SETTINGS)

    def close(self) -> None:
        if self._owned:
            self.store.close()


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that changes a cached accuracy besides the bits (keys the cache)."""

    network: str
    model_hash: str
    short_steps: int
    learning_rate: float
    batch_size: int
    seed: int
    val_images: int
    train_images: int | None
    calibration_images: int
    quantizer: str = QUANTIZER_VERSION
    #: None: the network's registered dataset (its name implies the images); else the images'
    #: :func:`data_digest`, so other data never reads accuracies measured on these.
    data: str | None = None

    def cache_fields(self) -> dict:
        """What keys the cache: every field, ``data`` only when set (the registered datasets keep
        the keys of the runs made before it existed)."""
        fields = asdict(self)
        if fields["data"] is None:
            del fields["data"]
        return fields


def data_digest(*splits) -> str:
    """sha256 (first 16 hex digits) of datasets' images and labels, in order: the identity of
    data that is not a registered dataset (``--data``, in-memory images) in the cache key."""
    digest = hashlib.sha256()
    for split in splits:
        for tensor in (split.images, split.labels):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{t.dtype} {tuple(t.shape)}".encode())
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


class FinetunedAccuracy:
    """``--accuracy finetune``: short fine-tune + val accuracy per configuration, cached on disk.

    ``accuracy(w_bits, a_bits)`` returns percent; ``full_precision`` is the float model on the
    same val subset. ``lookups``, ``hits`` and ``last_hit`` count cache use; ``seconds`` is the
    time spent fine-tuning and evaluating misses.
    """

    scores_accuracy = True

    def __init__(self, model: nn.Module, input_shape, train, val, settings: FinetuneSettings, cache: AccuracyCache):
        self.model = copy.deepcopy(model).eval()
        self.input_shape = tuple(input_shape)
        self.train, self.val = train, val
        self.settings = settings
        self.cache = cache
        self.key = cache.register(settings.cache_fields())
        self.lookups = self.hits = 0
        self.last_hit = False
        self.seconds = 0.0
        self._ranges: tuple[list[float], list[bool]] | None = None
        self._fresh: dict[tuple[Bits, Bits | None], float] = {}  # evaluated by prefetch, not yet asked for
        self._jobs: dict[bool, ShortFinetune] = {}  # see short_finetune
        fp = cache.get(self.key, (), None)  # the float reference is cached under the empty bit vector
        if fp is None:
            from releq_tvm.train import evaluate

            start = time.perf_counter()
            fp = evaluate(self.model, val)
            cache.put(self.key, (), None, fp, time.perf_counter() - start)
        self.full_precision = float(fp)

    def _input_ranges(self) -> tuple[list[float], list[bool]]:
        """Initial clipping level of each layer's input quantizer, and whether it is learned."""
        if self._ranges is None:
            n = self.settings.calibration_images
            self._ranges = calibrate_input_ranges(self.model, self.input_shape, self.train.images[:n])
        return self._ranges

    def accuracy(self, w_bits: Sequence[int], a_bits: Sequence[int] | None = None) -> float:
        """Val accuracy (percent) of the model at ``w_bits`` (and ``a_bits``) after the short fine-tune."""
        self.lookups += 1
        fresh = self._fresh.pop((tuple(w_bits), None if a_bits is None else tuple(a_bits)), None)
        if fresh is not None:  # evaluated just now by prefetch: the miss it was
            self.last_hit = False
            return fresh
        cached = self.cache.get(self.key, w_bits, a_bits)
        self.last_hit = cached is not None
        if cached is not None:
            self.hits += 1
            return cached
        start = time.perf_counter()
        acc = self._finetune_and_evaluate(w_bits, a_bits)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.cache.put(self.key, w_bits, a_bits, acc, seconds)
        return acc

    def quantized_model(self, w_bits: Sequence[int], a_bits: Sequence[int] | None = None) -> nn.Module:
        """A fresh copy of the float model at ``w_bits`` (and ``a_bits``): see :meth:`ShortFinetune.quantized_model`."""
        return self.short_finetune(a_bits is not None).quantized_model(w_bits, a_bits)

    def short_finetune(self, activations: bool) -> ShortFinetune:
        """What a cache miss runs, as a picklable value (a Ray worker runs it as this process would);
        ``activations``: the configurations quantize activations (their quantizers' start levels
        are calibrated here, once). One object per kind, so it is shipped to Ray workers once."""
        if activations not in self._jobs:
            self._jobs[activations] = ShortFinetune(self.model, self.input_shape, self.train, self.val, self.settings,
                                                    self._input_ranges() if activations else None)
        return self._jobs[activations]

    def _finetune_and_evaluate(self, w_bits, a_bits) -> float:
        return self.short_finetune(a_bits is not None).accuracy(w_bits, a_bits)

    def prefetch(self, configs: Sequence[tuple[Bits, Bits | None]], evaluate_many) -> int:
        """Evaluate together the configurations of ``configs`` that are neither cached nor repeated
        (parallel episodes reach several at once); returns how many were evaluated.

        ``evaluate_many(job, configs) -> [(accuracy, seconds), ...]`` runs :class:`ShortFinetune`
        ``job`` on each (e.g. on Ray workers, :class:`releq_tvm.search.parallel.RayEvaluator`).
        This process alone writes the cache. The next :meth:`accuracy` of each one answers from
        memory and counts as the miss it was; a configuration two environments reached answers
        the second from the cache, as a hit: nothing is trained twice.
        """
        todo: list[tuple[Bits, Bits | None]] = []
        for w_bits, a_bits in configs:
            config = (tuple(w_bits), None if a_bits is None else tuple(a_bits))
            if config in todo or config in self._fresh or self.cache.get(self.key, *config) is not None:
                continue
            todo.append(config)
        if not todo:
            return 0
        job = self.short_finetune(todo[0][1] is not None)
        for config, (acc, seconds) in zip(todo, evaluate_many(job, todo), strict=True):
            self.cache.put(self.key, *config, acc, seconds)
            self.seconds += seconds
            self._fresh[config] = float(acc)
        return len(todo)


@dataclass(frozen=True)
class ShortFinetune:
    """The short fine-tune of one configuration and its val accuracy: what a cache miss costs.

    Everything it needs besides the bits, as one picklable value; seeded, so it gives the same
    accuracy in this process or on a Ray worker. ``ranges``: the start clipping level of each
    layer's input quantizer and whether it is learned (None: weights only).
    """

    model: nn.Module
    input_shape: tuple[int, ...]
    train: object
    val: object
    settings: FinetuneSettings
    ranges: tuple[list[float], list[bool]] | None = None

    def quantized_model(self, w_bits: Sequence[int], a_bits: Sequence[int] | None = None) -> nn.Module:
        """A fresh copy of the float model with ``w_bits`` (and input quantizers for ``a_bits``) applied.

        The input quantizers (:class:`releq_tvm.quant.PactActivation`) start from the calibrated
        ranges and are children of the model, so a fine-tune trains their clipping levels.
        """
        from releq_tvm.quant import apply_act_bits, apply_bits

        model = copy.deepcopy(self.model)
        apply_bits(model, list(w_bits), self.input_shape)
        if a_bits is not None:
            if self.ranges is None:
                raise ValueError("activation bits need the calibrated ranges (ShortFinetune.ranges)")
            apply_act_bits(model, list(a_bits), self.input_shape, *self.ranges)
        return model

    def accuracy(self, w_bits: Sequence[int], a_bits: Sequence[int] | None = None) -> float:
        """Val accuracy (percent) after ``settings.short_steps`` Adam steps on the train split."""
        from releq_tvm.train import evaluate, train_steps

        s = self.settings
        model = self.quantized_model(w_bits, a_bits)
        train_steps(model, self.train, s.short_steps, lr=s.learning_rate, batch_size=s.batch_size, seed=s.seed)
        return float(evaluate(model, self.val))


class NoAccuracy:
    """``--accuracy none``: every configuration scores the full-precision accuracy (SA = 1).

    The search then optimises cost alone; the run says so in its log and config.json. Used for
    networks whose dataset is not on this machine, and for fast tests.
    """

    scores_accuracy = False
    full_precision = 100.0

    def __init__(self) -> None:
        self.lookups = self.hits = 0
        self.last_hit = True
        self.seconds = 0.0

    def accuracy(self, w_bits: Sequence[int], a_bits: Sequence[int] | None = None) -> float:
        self.lookups += 1
        self.hits += 1
        return self.full_precision

    def prefetch(self, configs, evaluate_many) -> int:
        """Nothing to evaluate ahead: every configuration scores the same."""
        return 0


def long_finetune(
    oracle: FinetunedAccuracy,
    w_bits: Sequence[int],
    a_bits: Sequence[int] | None,
    test,
    steps: int,
    learning_rates: Sequence[float],
    batch_size: int,
    seed: int,
) -> tuple[dict, nn.Module]:
    """The LONG fine-tune of the chosen configuration: test accuracies in percent, and the model.

    One fine-tune per learning rate in ``learning_rates``; the one with the best accuracy on
    the search's val subset is reported and returned (fake-quantized, with its learned
    activation clipping levels: :func:`releq_tvm.train.save_finetuned` writes it for a build).
    The test split only measures, it never selects.
    Why several: the best rate depends on the bits (measured on LeNet-5, 3000 steps: all
    1-bit 98.16 % at 1e-3 but 98.58 % at 3e-4; 8,2,2,3,2 did best at 3e-3).
    """
    from releq_tvm.train import evaluate, train_steps

    start = time.perf_counter()
    fp = evaluate(oracle.model, test)
    tried = []
    before = None
    chosen = chosen_model = None
    for lr in learning_rates:
        model = oracle.quantized_model(w_bits, a_bits)
        if before is None:
            before = evaluate(model, test)
        train_steps(model, oracle.train, steps, lr=float(lr), batch_size=batch_size, seed=seed)
        tried.append({"learning_rate": float(lr), "val_accuracy": round(evaluate(model, oracle.val), 4),
                      "test_accuracy": round(evaluate(model, test), 4)})
        if chosen is None or tried[-1]["val_accuracy"] > chosen["val_accuracy"]:  # the first best, as max() picks
            chosen, chosen_model = tried[-1], model  # one model alive at a time, not one per rate
    result = {
        "steps": int(steps),
        "learning_rate": chosen["learning_rate"],
        "learning_rates_tried": tried,
        "test_accuracy_full_precision": round(fp, 4),
        "test_accuracy_quantized_no_finetune": round(before, 4),
        "test_accuracy_quantized": chosen["test_accuracy"],
        "loss_pp": round(fp - chosen["test_accuracy"], 4),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return result, chosen_model

"""The Python API (``releq_tvm.search``, ``compile``, ``simulate``): typed results that agree with the
command line, the integer model and the simulator; one-line :class:`ReleqError` for bad input.

The models are defined here only; each test leaves the registry as it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import releq_tvm
from releq_tvm.api import CompileResult, SearchResult, SimulateResult
from releq_tvm.cli import main
from releq_tvm.errors import ReleqError
from releq_tvm.networks import get_network_spec, layer_table, registry

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 10, 10)
BITS, ACT_BITS = (8, 3, 2), (8, 5, 4)


class TinyNet(nn.Module):
    """conv-BN-ReLU, max pool, conv-ReLU, dense: 3 weight layers, 4 classes."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.fc = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(torch.relu(self.conv2(x)), 1))


def tiny_net() -> TinyNet:
    """TinyNet with seeded weights and non-trivial batch-norm statistics, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyNet()
        model.bn1.weight.data.uniform_(0.5, 1.5)
        model.bn1.bias.data.normal_(0, 0.1)
        model.bn1.running_mean.normal_(0, 0.1)
        model.bn1.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(autouse=True)
def registry_as_it_was(monkeypatch):
    """A model registered by a test is gone after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_TABLE_CACHE", dict(registry._TABLE_CACHE))


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# the package face


def test_import_is_cheap_and_the_api_is_exported_lazily():
    probe = textwrap.dedent("""
        import sys
        import releq_tvm
        heavy = [m for m in ("torch", "tvm", "releq_tvm.api", "releq_tvm.sim") if m in sys.modules]
        result = releq_tvm.SimulateResult
        print(heavy, result.__module__, "torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "releq_tvm.api", "False"]


def test_the_search_and_compile_subpackages_stay_callable_as_the_api():
    import releq_tvm.compile.artifact  # noqa: F401  (binds the subpackage to releq_tvm.compile)
    import releq_tvm.search.run  # noqa: F401

    from releq_tvm.compile import load_compiled

    assert releq_tvm.compile.load_compiled is load_compiled
    assert releq_tvm.simulate("lenet4").cycles == 2414  # the hand-computed total of tests/test_sim.py
    with pytest.raises(ReleqError, match="unknown network 'lenet7'"):
        releq_tvm.compile("lenet7", 8)
    with pytest.raises(ReleqError, match="unknown network 'lenet7'"):
        releq_tvm.search("lenet7")


# ---------------------------------------------------------------------------------------------
# compile: the API, the command line and the integer model agree bit for bit


def test_compile_of_a_module_is_bit_exact_and_matches_the_cli(tmp_path, monkeypatch):
    from releq_tvm.compile import integer_forward, load_compiled, quantize_network

    built = releq_tvm.compile(tiny_net(), BITS, ",".join(map(str, ACT_BITS)), input_shape=SHAPE, name="tinyapi",
                              out_dir=tmp_path / "api", kernels="bitserial", measure=False)
    assert isinstance(built, CompileResult)
    assert (built.network, built.out_dir, built.w_bits, built.a_bits) == ("tinyapi", tmp_path / "api", BITS, ACT_BITS)
    assert built.layer_kernels == ("bitserial",) * 3 and built.kernels == "bitserial"
    assert all(path.is_file() for path in built.files)
    assert built.measurement is None and built.measured_ms is None and built.predicted_ms is None
    assert get_network_spec("tinyapi").num_classes == 4

    levels = load_compiled(built.out_dir).quantize_input(images(6, seed=1))
    api_out = load_compiled(built.out_dir).run_levels(levels)
    assert api_out.shape == (6, 4)
    np.testing.assert_array_equal(api_out, integer_forward(quantize_network("tinyapi", BITS, ACT_BITS), levels))

    # the same weights through `releq-tvm compile --model package.module:function`
    (tmp_path / "tiny_models_api.py").write_text("MODEL = None\n\ndef tiny_cli():\n    return MODEL\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import tiny_models_api

    monkeypatch.setattr(tiny_models_api, "MODEL", tiny_net())
    result = CliRunner().invoke(main, ["compile", "--model", "tiny_models_api:tiny_cli", "--input-shape", "1,10,10",
                                       "--bits", "8,3,2", "--act-bits", "8,5,4", "--kernels", "bitserial",
                                       "--no-measure", "--json", "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert (report["network"], report["w_bits"], report["a_bits"]) == ("tiny_cli", "8,3,2", "8,5,4")
    assert report["layer_kernels"] == list(built.layer_kernels) and report["frac_bits"] == built.frac_bits
    np.testing.assert_array_equal(load_compiled(tmp_path / "cli").run_levels(levels), api_out)


# ---------------------------------------------------------------------------------------------
# simulate: the simulator's own numbers


def test_simulate_gives_the_simulators_cycles():
    from releq_tvm.sim import StripesConfig, StripesSimulator

    # lenet4 at its published 2,2,3,2 (hand-computed in tests/test_sim.py): 2414 cycles vs 9456 at
    # 8 bits; with fully connected layers bit-parallel 2332
    result = releq_tvm.simulate("lenet4")
    assert isinstance(result, SimulateResult)
    assert (result.w_bits, result.a_bits) == ((2, 2, 3, 2), (8, 8, 8, 8))
    assert (result.cycles, result.cycles_8bit, result.alternative.cycles) == (2414, 9456, 2332)
    assert result.speedup == pytest.approx(9456 / 2414)
    assert [layer.cycles for layer in result.layers] == [1800, 400, 150, 64]

    simulated = releq_tvm.simulate(tiny_net(), 4, [8, 2, 2], input_shape=SHAPE, name="tinyapi", method="closed")
    direct = StripesSimulator(StripesConfig()).simulate(layer_table(tiny_net(), SHAPE), (4, 4, 4), (8, 2, 2),
                                                        method="closed")
    assert (simulated.cycles, simulated.cycles_8bit) == (direct.cycles, direct.cycles_8bit)
    assert simulated.energy_reduction == pytest.approx(direct.energy_reduction)
    assert simulated.cycles_8bit == 2 * simulated.cycles  # weights serial, no stalls: 8 bits over 4


# ---------------------------------------------------------------------------------------------
# search: a typed result read from the run's best.json


def test_search_on_cost_only_is_seeded_and_typed(tmp_path):
    runs = [releq_tvm.search(tiny_net(), input_shape=SHAPE, name="tinyapi", accuracy="none", episodes=3,
                             final_episodes=1, run_dir=tmp_path / f"run{i}", seed=3) for i in range(2)]
    found = runs[0]
    assert isinstance(found, SearchResult) and found.run_dir == tmp_path / "run0"
    best = json.loads(found.best_json.read_text())
    assert found.w_bits == tuple(best["solution"]["w_bits"]) and len(found.w_bits) == 3
    assert (found.accuracy, found.accuracy_split, found.a_bits, found.model_file) == (None, None, None, None)
    assert found.training_episodes == 3 and found.cost_ratio == best["solution"]["cost_ratio"]
    assert (runs[1].w_bits, runs[1].reward) == (found.w_bits, found.reward)  # same seed, same search


def labels_with_accuracy(model: nn.Module, x: torch.Tensor, right: int) -> torch.Tensor:
    """Labels ``model`` gets right on exactly the first ``right`` images: its full-precision accuracy is known."""
    with torch.no_grad():
        predicted = model(x).argmax(1)
    return torch.where(torch.arange(len(x)) < right, predicted, (predicted + 1) % 4)


def test_search_on_in_memory_data_long_fine_tunes_on_test(tmp_path):
    model = tiny_net()
    x_test = images(10, seed=4)
    train = (images(32, seed=2), torch.arange(32) % 4)
    val = (images(12, seed=3), torch.arange(12) % 4)
    found = releq_tvm.search(model, train, val, (x_test, labels_with_accuracy(model, x_test, right=7)),
                             input_shape=SHAPE, name="tinyapi", episodes=2, final_episodes=1, short_steps=2,
                             long_steps=2, long_lrs=(1e-3,), finetune_batch_size=8, run_dir=tmp_path / "run")
    best = json.loads(found.best_json.read_text())
    long = best["long_finetune"]
    assert found.accuracy_split == "test" and found.full_precision_accuracy == 70.0
    # run_search did the long fine-tune, so config.json describes the run; the images key the cache
    from releq_tvm.data import TensorDataset
    from releq_tvm.search.accuracy import data_digest

    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["long_finetune"] is True and saved["config"]["model"] is None
    assert saved["data"] == {"source": "in memory", "digest": data_digest(TensorDataset(*train), TensorDataset(*val))}
    assert found.accuracy == long["test_accuracy_quantized"]
    assert found.model_file == tmp_path / "run" / "finetuned.pt" and found.model_file.is_file()
    # the fine-tuned file builds at the chosen bits
    from releq_tvm.compile import quantize_network

    assert quantize_network("tinyapi", None, checkpoint=str(found.model_file)).w_bits == found.w_bits


# ---------------------------------------------------------------------------------------------
# bad input: one line, ReleqError


def _sigmoid_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).eval()


@pytest.mark.parametrize("call, fragment", [
    (lambda: releq_tvm.simulate("lenet7"), "unknown network 'lenet7'; choose one of: "),
    (lambda: releq_tvm.simulate("lenet4", "2,2"), "--bits has 2 values but lenet4 has 4 weight layers"),
    (lambda: releq_tvm.simulate("lenet4", input_shape=SHAPE), "input_shape goes with an nn.Module"),
    (lambda: releq_tvm.simulate("lenet4", mode="both"), "mode must be one of"),
    (lambda: releq_tvm.simulate(tiny_net()), "pass input_shape=(C, H, W)"),
    (lambda: releq_tvm.simulate(tiny_net(), input_shape=(3, 10, 10)), "input shape 3,10,10 does not fit"),
    (lambda: releq_tvm.simulate(tiny_net(), input_shape=SHAPE, name="lenet"), "lenet is a registered network's name"),
    (lambda: releq_tvm.simulate(_sigmoid_net(), 4, input_shape=SHAPE), "cannot compile"),
    (lambda: releq_tvm.simulate(42), "model must be a network name, an nn.Module"),
    (lambda: releq_tvm.simulate("absent/model.onnx"), "absent/model.onnx does not exist"),
    (lambda: releq_tvm.compile(tiny_net(), input_shape=SHAPE), "has no published bitwidths"),
    (lambda: releq_tvm.compile("lenet4", 8, kernels="fast"), "kernels must be auto, bitserial or int8"),
    (lambda: releq_tvm.search("lenet4", episode=3), "unknown search setting 'episode'"),
    (lambda: releq_tvm.search("lenet4", measure="gpu"), "--measure must be one of"),
    (lambda: releq_tvm.search(tiny_net(), input_shape=SHAPE), "pass train= and val="),
    (lambda: releq_tvm.search(tiny_net(), (images(4, 0), torch.zeros(4)), input_shape=SHAPE), "pass both train and val"),
    (lambda: releq_tvm.search(tiny_net(), (images(4, 0), torch.zeros(4)), (images(4, 1), torch.full((4,), 9)),
                              input_shape=SHAPE), "labels run from 9 to 9, but the model has 4 classes"),
])
def test_bad_input_is_a_one_line_releq_error(call, fragment):
    with pytest.raises(ReleqError) as caught:
        call()
    message = str(caught.value)
    assert fragment in message and "\n" not in message, message


# ---------------------------------------------------------------------------------------------
# the worked example of the README


@pytest.mark.slow
def test_the_custom_mnist_example_runs_end_to_end(tmp_path):
    command = [sys.executable, str(ROOT / "examples" / "custom_mnist.py"), "--train-steps", "150", "--episodes", "4",
               "--short-steps", "10", "--long-steps", "20", "--val-images", "500", "--out", str(tmp_path)]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split(":", 1)[0]: line for line in out.stdout.splitlines() if line.startswith(("search:", "compile:",
                                                                                               "simulate:"))}
    best = json.loads((tmp_path / "search" / "best.json").read_text())
    bits = ",".join(map(str, best["solution"]["w_bits"]))
    assert f"bits {bits}, " in lines["search"] and "% test (float " in lines["search"]
    assert (tmp_path / "search" / "finetuned.pt").is_file() and best["long_finetune"]["steps"] == 20
    assert str(tmp_path / "build") in lines["compile"] and (tmp_path / "build" / "net.so").is_file()
    assert " cycles vs " in lines["simulate"]

"""Your own model (``--model``): an ONNX file, a torch.export program and an entry point are
registered under their own names and go through compile (bit-exact) and simulate; a bad file, an
unsupported operator, a wrong entry point or shape is one line with exit code 2.

The models are defined here only, never in the registry; each test leaves the registry as it was.
"""

from __future__ import annotations

import json
import textwrap
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from releq_tvm.cli import main
from releq_tvm.compile import integer_forward, load_compiled, quantize_network
from releq_tvm.compile.graph import extract_graph
from releq_tvm.networks import ModelSourceError, create_network, get_network_spec, layer_table, register_user_model
from releq_tvm.networks import registry

SHAPE = (3, 12, 12)
BITS, ACT_BITS = (8, 4, 2, 3), (8, 5, 6, 4)


class SmallCNN(nn.Module):
    """conv-BN-ReLU, a conv-BN with a residual add, max pool, global average pool, dense: 4 weight layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.body(x) + x)
        x = self.pool(torch.relu(self.down(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


def small_cnn() -> nn.Module:
    """SmallCNN with seeded weights and non-trivial batch-norm statistics, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SmallCNN()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def export_onnx(model: nn.Module, path, shape=SHAPE) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros((1, *shape)),), str(path), dynamo=False)


@pytest.fixture(autouse=True)
def registry_as_it_was(monkeypatch):
    """A user model registered by a test is gone after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_TABLE_CACHE", dict(registry._TABLE_CACHE))


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "smallcnn.onnx"
    export_onnx(small_cnn(), path)
    return path


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# ONNX: registered under the file's name, compiled bit-exact, simulated


def test_onnx_model_is_registered_under_its_file_name(onnx_file):
    spec = register_user_model(str(onnx_file))
    assert (spec.name, spec.input_shape, spec.num_classes, spec.dataset) == ("smallcnn", SHAPE, 5, None)
    assert [(row.kind, row.in_channels, row.out_channels, row.stride) for row in layer_table("smallcnn")] == [
        ("conv", 3, 8, (1, 1)), ("conv", 8, 8, (1, 1)), ("conv", 8, 16, (2, 2)), ("dense", 16, 5, (1, 1))]
    x = images(4, seed=1)
    with torch.no_grad():
        np.testing.assert_allclose(create_network("smallcnn", pretrained=True)(x), small_cnn()(x), atol=1e-5)
    # the exporter folded batch norm into the convolutions; the lowering reads a residual add and both pools
    kinds = [op.kind for op in extract_graph(create_network("smallcnn"), SHAPE, "smallcnn").ops]
    assert kinds.count("add") == 1 and kinds.count("maxpool") == 1 and kinds.count("avgpool") == 1


def test_onnx_model_compiles_bit_exact_through_the_cli(onnx_file, tmp_path):
    out = tmp_path / "build"
    result = run("compile", "--model", onnx_file, "--bits", ",".join(map(str, BITS)),
                 "--act-bits", ",".join(map(str, ACT_BITS)), "--no-measure", "--json", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["network"] == "smallcnn" and report["w_bits"] == "8,4,2,3" and report["a_bits"] == "8,5,6,4"
    assert report["weights"] == "shipped checkpoint smallcnn.onnx"
    compiled = load_compiled(out)
    net = quantize_network("smallcnn", BITS, ACT_BITS)  # the same calibration (seeded noise) as the command's
    levels = compiled.quantize_input(images(5, seed=2))
    outputs = compiled.run_levels(levels)
    assert outputs.shape == (5, 5)
    np.testing.assert_array_equal(outputs, integer_forward(net, levels))


def test_onnx_model_simulates_through_the_cli(onnx_file):
    result = run("simulate", "--model", onnx_file, "--bits", "8,4,2,3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["network"] == "smallcnn" and report["w_bits"] == [8, 4, 2, 3]
    layers = report["layers"]
    assert [layer["layer"] for layer in layers] == [row.name for row in layer_table("smallcnn")]
    # weights-serial: a convolution's cycles scale with its weight bits (no stalls at this size)
    assert [layer["speedup"] for layer in layers if layer["kind"] == "conv"] == [1.0, 2.0, 4.0]
    assert all(layer["cycles_8bit"] == layer["cycles"] * 8 // layer["w_bits"] for layer in layers[:3])


# ---------------------------------------------------------------------------------------------
# torch.export programs and entry points


@pytest.mark.parametrize("core_aten", [False, True], ids=["export", "run_decompositions"])
def test_pt2_model_keeps_module_names_and_its_batch_norms(tmp_path, core_aten):
    model = small_cnn()
    path = tmp_path / "exported.pt2"
    program = torch.export.export(model, (torch.zeros((1, *SHAPE)),))
    torch.export.save(program.run_decompositions() if core_aten else program, str(path))
    spec = register_user_model(str(path))
    assert (spec.name, spec.input_shape, spec.num_classes) == ("exported", SHAPE, 5)
    assert [row.name for row in layer_table("exported")] == ["stem_0", "body_0", "down", "fc"]
    loaded = create_network("exported")
    x = images(3, seed=3)  # a batch of 3: the export's guard on batch size 1 is gone
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    graph = extract_graph(loaded, SHAPE, "exported")
    assert graph.batch_norms == ("stem_1", "body_1", None, None)


def test_entry_point_model_needs_an_input_shape_and_simulates(tmp_path, monkeypatch):
    (tmp_path / "my_models_14.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny():
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 7))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelSourceError, match="--input-shape C,H,W"):
        register_user_model("my_models_14:tiny")
    result = run("simulate", "--model", "my_models_14:tiny", "--input-shape", "1,8,8", "--bits", "2,4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["network"] == "tiny" and [layer["kind"] for layer in report["layers"]] == ["conv", "dense"]
    assert get_network_spec("tiny").num_classes == 7 and get_network_spec("tiny").input_shape == (1, 8, 8)


# ---------------------------------------------------------------------------------------------
# one-line errors, before any work


def test_unsupported_operator_names_it_and_its_node(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 10 * 10, 2)).eval()
    path = tmp_path / "sig.onnx"
    export_onnx(model, path)
    assert_one_line_error(run("compile", "--model", path, "--bits", "8", "-o", tmp_path / "out"),
                          "sig: cannot compile", "'Sigmoid'", "at m_1_sigmoid")  # ONNX node /1/Sigmoid
    assert not (tmp_path / "out").exists()
    exported = tmp_path / "sig.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros((1, *SHAPE)),)), str(exported))
    assert_one_line_error(run("simulate", "--model", exported, "--bits", "8"), "aten.sigmoid", "at sigmoid")


def test_onnx_operator_without_a_torch_conversion_names_it_and_its_node(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Shrink", ["x"], ["y"], name="head/shrink")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
    path = tmp_path / "shrinky.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert_one_line_error(run("simulate", "--model", path), "unsupported operator Shrink at node head/shrink")


def test_truncated_and_corrupt_files(onnx_file, tmp_path):
    truncated = tmp_path / "half.onnx"
    truncated.write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 2])
    assert_one_line_error(run("simulate", "--model", truncated, "--bits", "8"), "half.onnx is not a valid ONNX model")
    corrupt = tmp_path / "noise.pt2"
    corrupt.write_bytes(bytes(range(256)) * 8)
    assert_one_line_error(run("simulate", "--model", corrupt, "--bits", "8"),
                          "noise.pt2 is not a readable torch.export program")
    assert_one_line_error(run("simulate", "--model", tmp_path / "absent.onnx"), "absent.onnx does not exist")
    assert_one_line_error(run("simulate", "--model", tmp_path / "model.h5"), "expected a .onnx file")


@pytest.mark.parametrize("source, fragment", [
    ("no_such_package_14.models:net", "cannot import no_such_package_14.models"),
    ("json:no_such_function", "json has no no_such_function"),
    ("json:__doc__", "__doc__ is not a function"),
    ("json:dumps", "calling dumps() failed"),
])
def test_wrong_entry_points(source, fragment):
    assert_one_line_error(run("simulate", "--model", source, "--input-shape", "1,8,8", "--bits", "8"), fragment)


def test_input_shapes_that_do_not_fit(onnx_file, tmp_path, monkeypatch):
    assert_one_line_error(run("simulate", "--model", onnx_file, "--input-shape", "3,16,16"),
                          "--input-shape 3,16,16 disagrees", "whose input is 3,12,12")
    (tmp_path / "my_models_14b.py").write_text("from torch import nn\n\ndef rgb():\n    return nn.Conv2d(3, 4, 3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert_one_line_error(run("simulate", "--model", "my_models_14b:rgb", "--input-shape", "1,8,8"),
                          "input shape 1,8,8 does not fit my_models_14b:rgb")
    assert_one_line_error(run("simulate", "--model", "my_models_14b:rgb", "--input-shape", "3,8,8"),
                          "must return logits (N, classes)", "(1, 4, 6, 6)")
    assert_one_line_error(run("simulate", "--model", "my_models_14b:rgb", "--input-shape", "3,8"), "C,H,W")


def test_model_and_net_together_or_a_registered_name(onnx_file, tmp_path):
    assert_one_line_error(run("simulate", "lenet", "--model", onnx_file), "not both")
    assert_one_line_error(run("simulate"), "pass NET", "--model")
    assert_one_line_error(run("simulate", "lenet", "--input-shape", "1,28,28"), "--input-shape goes with --model")
    clash = tmp_path / "lenet.onnx"
    clash.write_bytes(onnx_file.read_bytes())
    assert_one_line_error(run("simulate", "--model", clash), "would be named lenet", "rename the file")
    assert get_network_spec("lenet").source is None


def test_accuracy_commands_say_a_model_has_no_data(onnx_file):
    assert_one_line_error(run("eval", "--model", onnx_file), "accuracy needs the model's data")
    assert_one_line_error(run("compile", "--model", onnx_file), "smallcnn has no published bitwidths", "4 values")

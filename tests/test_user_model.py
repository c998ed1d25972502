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
    assert_one_line_error(run("eval", "--model", onnx_file), "accuracy needs the model's data", "pass --data",
                          "imagefolder:DIR, npz:FILE", "compile and simulate smallcnn need none")
    assert_one_line_error(run("finetune", "--model", onnx_file, "--bits", "8"), "pass --data")
    assert_one_line_error(run("compile", "--model", onnx_file), "smallcnn has no published bitwidths", "4 values")


# ---------------------------------------------------------------------------------------------
# data for a user model: --data npz:FILE | imagefolder:DIR | a dataset name


def labels_with_accuracy(model: nn.Module, x: torch.Tensor, right: int) -> np.ndarray:
    """Labels that ``model`` gets right on exactly the first ``right`` images of ``x``: its own
    prediction there, the next class after it elsewhere. The accuracy is known by hand."""
    with torch.no_grad():
        predicted = model(x).argmax(1).numpy()
    return np.where(np.arange(len(x)) < right, predicted, (predicted + 1) % 5).astype(np.int64)


def write_npz(path, **overrides) -> dict[str, np.ndarray]:
    """A small npz for SmallCNN (3, 12, 12; 5 classes): x_train uint8 (N, H, W, C), x_val and x_test
    float (N, C, H, W), each with labels of a known accuracy (val: 3 of 8 right, test: 7 of 10)."""
    rng = np.random.default_rng(14)
    model = small_cnn()
    x_val = rng.random((8, *SHAPE), dtype=np.float32)
    x_test = rng.random((10, *SHAPE), dtype=np.float32)
    arrays = {
        "x_train": rng.integers(0, 256, (16, 12, 12, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 5, 16),
        "x_val": x_val, "y_val": labels_with_accuracy(model, torch.from_numpy(x_val), right=3),
        "x_test": x_test, "y_test": labels_with_accuracy(model, torch.from_numpy(x_test), right=7),
    }
    arrays.update(overrides)
    np.savez(path, **{name: value for name, value in arrays.items() if value is not None})
    return arrays


def test_npz_data_reads_both_layouts_and_scales(tmp_path):
    from releq_tvm.data import load_model_data

    arrays = write_npz(tmp_path / "d.npz")
    train = load_model_data(f"npz:{tmp_path / 'd.npz'}", "train", SHAPE, 5, limit=4)
    # uint8 (N, H, W, C) -> float (N, C, H, W) / 255
    expected = torch.from_numpy(arrays["x_train"][:4].transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert train.images.dtype == torch.float32 and torch.equal(train.images, expected)
    assert train.labels.tolist() == arrays["y_train"][:4].tolist()
    test = load_model_data(f"npz:{tmp_path / 'd.npz'}", "test", SHAPE, 5)
    assert torch.equal(test.images, torch.from_numpy(arrays["x_test"])) and len(test) == 10


def test_eval_with_npz_data_reports_the_accuracy(onnx_file, tmp_path):
    write_npz(tmp_path / "d.npz")
    data = f"npz:{tmp_path / 'd.npz'}"
    result = run("eval", "--model", onnx_file, "--data", data)
    assert result.exit_code == 0, result.output
    assert result.output == "smallcnn full precision: 70.00% (test)\n"
    result = run("eval", "--model", onnx_file, "--data", data, "--split", "val")
    assert result.output == "smallcnn full precision: 37.50% (val)\n", result.output
    # activation ranges calibrated on the train split (uint8, (N, H, W, C))
    result = run("eval", "--model", onnx_file, "--data", data, "--bits", "8", "--act-bits", "8")
    assert result.exit_code == 0 and result.output.startswith("smallcnn bits 8,8,8,8, activations 8,8,8,8: "), result.output


def write_image_folder(root, sizes=None) -> None:
    """root/train with 5 class folders c0..c4 (3 images each), root/val with c1 and c3 only (2 each),
    root/test with all 5 (1 each); seeded 12x12 RGB PNGs, and one 16x14 image in train/c0."""
    from PIL import Image

    rng = np.random.default_rng(7)
    layout = {"train": {f"c{k}": 3 for k in range(5)}, "val": {"c1": 2, "c3": 2}, "test": {f"c{k}": 1 for k in range(5)}}
    for split, classes in layout.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                width, height = (16, 14) if (split, name, i) == ("train", "c0", 2) else (12, 12)
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_image_folder_labels_by_train_classes_class_by_class(tmp_path):
    from PIL import Image

    from releq_tvm.data import load_model_data

    write_image_folder(tmp_path / "imgs")
    source = f"imagefolder:{tmp_path / 'imgs'}"
    val = load_model_data(source, "val", SHAPE, 5)
    # val/ holds c1 and c3 only: their labels are train/'s indices 1 and 3, in rank order c1, c3, c1, c3
    assert val.labels.tolist() == [1, 3, 1, 3]
    pixels = np.asarray(Image.open(tmp_path / "imgs" / "val" / "c3" / "0.png"))
    assert torch.equal(val.images[1], torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32) / 255))
    train = load_model_data(source, "train", SHAPE, 5, limit=5)  # one image of every class: a balanced subset
    assert train.labels.tolist() == [0, 1, 2, 3, 4] and train.images.shape == (5, *SHAPE)
    full = load_model_data(source, "train", SHAPE, 5)
    assert full.images.shape == (15, *SHAPE) and 0.0 <= full.images.min() and full.images.max() <= 1.0  # 16x14 cropped


def test_finetune_with_image_folder_data_reports_the_accuracy(onnx_file, tmp_path):
    from releq_tvm.data import load_model_data
    from releq_tvm.train import evaluate

    write_image_folder(tmp_path / "imgs")
    source = f"imagefolder:{tmp_path / 'imgs'}"
    result = run("finetune", "--model", onnx_file, "--data", source, "--bits", "8,4,4,8", "--steps", "3")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    expected = evaluate(small_cnn(), load_model_data(source, "test", SHAPE, 5))
    assert lines[0] == f"smallcnn full precision: {expected:.2f}%"
    assert lines[1].startswith("smallcnn bits 8,4,4,8 after 3 fine-tune steps: ") and lines[1].endswith(" pp)")
    result = run("finetune", "--model", onnx_file, "--data", source, "--bits", "8", "--act-bits", "8",
                 "--steps", "3", "--split", "val")
    assert result.exit_code == 0 and "after 3 fine-tune steps on val: " in result.output, result.output


def test_entry_point_model_with_a_dataset_by_name(tmp_path, monkeypatch):
    (tmp_path / "my_models_14c.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def digits():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(1, 2, 5, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 10))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run("eval", "--model", "my_models_14c:digits", "--input-shape", "1,28,28", "--data", "mnist", "--split", "val")
    assert result.exit_code == 0 and result.output.startswith("digits full precision: "), result.output
    assert result.output.endswith("% (val)\n")


@pytest.mark.parametrize("spec, fragment", [
    ("imagefolder:{tmp}/absent", "no such folder"),
    ("imagefolder:{tmp}/no_val", "has no val/ folder"),
    ("imagefolder:{tmp}/empty_train", "train/ holds no images"),
    ("npz:{tmp}/absent.npz", "absent.npz: no such file"),
    ("npz:{tmp}/not_npz.npz", "is not a readable numpy .npz file"),
    ("npz:{tmp}/no_val.npz", "lacks x_val, y_val"),
    ("npz:{tmp}/no_test.npz", "has no test split (x_test, y_test); add it, or evaluate on --split val"),
    ("npz:{tmp}/wrong_shape.npz", "x_test has shape (10, 3, 8, 8), but the model takes images 3,12,12"),
    ("npz:{tmp}/big_labels.npz", "labels run from 0 to 7, but the model has 5 classes (0..4)"),
    ("npz:{tmp}/float_labels.npz", "y_test must be 10 integer class indices"),
    ("npz:{tmp}/bright.npz", "float images must lie in [0, 1]"),
    ("mnist", "its images are 1,28,28, the model takes 3,12,12"),
    ("csv:{tmp}/d.csv", "expected imagefolder:DIR, npz:FILE or a dataset name"),
])
def test_bad_data_is_one_line(tmp_path, spec, fragment):
    from releq_tvm.data import load_model_data
    from releq_tvm.errors import ReleqError

    (tmp_path / "no_val" / "train" / "c0").mkdir(parents=True)
    (tmp_path / "empty_train" / "train").mkdir(parents=True)
    (tmp_path / "empty_train" / "val").mkdir()
    (tmp_path / "not_npz.npz").write_bytes(b"not a zip file")
    write_npz(tmp_path / "no_val.npz", x_val=None, y_val=None)
    write_npz(tmp_path / "no_test.npz", x_test=None, y_test=None)
    write_npz(tmp_path / "wrong_shape.npz", x_test=np.zeros((10, 3, 8, 8), dtype=np.float32))
    write_npz(tmp_path / "big_labels.npz", y_test=np.arange(10) % 8)
    write_npz(tmp_path / "float_labels.npz", y_test=np.zeros(10))
    write_npz(tmp_path / "bright.npz", x_test=np.full((10, *SHAPE), 2.0, dtype=np.float32))
    with pytest.raises(ReleqError) as caught:
        load_model_data(spec.format(tmp=tmp_path), "test", SHAPE, 5)
    assert fragment in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_bad_data_on_the_command_line_is_one_line_with_exit_code_2(onnx_file, tmp_path):
    write_npz(tmp_path / "no_test.npz", x_test=None, y_test=None)
    assert_one_line_error(run("eval", "--model", onnx_file, "--data", f"npz:{tmp_path / 'no_test.npz'}"),
                          "has no test split")
    assert_one_line_error(run("finetune", "--model", onnx_file, "--bits", "8", "--data", f"imagefolder:{tmp_path}"),
                          "has no train/ folder")


# =============================================================================================
# the operator set: ReLU6 and concat compile bit-exact; any other operator is one line naming it


BRANCHY_MODULE = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Branchy(nn.Module):
        '''ReLU6 written four ways, a channel concat of two branches, grouped and depthwise convs,
        functional pools: 5 weight layers.'''

        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
            self.left = nn.Conv2d(8, 4, 1)
            self.right = nn.Conv2d(8, 6, 3, padding=1, groups=2)
            self.depthwise = nn.Conv2d(10, 10, 3, padding=1, groups=10)
            self.fc = nn.Linear(10 * 3 * 3, 5)

        def forward(self, x):
            x = self.stem(x)
            x = torch.cat([F.relu6(self.left(x)), torch.clamp(self.right(x), 0, 6)], dim=1)
            x = F.max_pool2d(F.hardtanh(self.depthwise(x), 0.0, 6.0), 2)
            return self.fc(torch.flatten(F.avg_pool2d(x, 2), 1))


    def branchy():
        torch.manual_seed(14)
        model = Branchy()
        for p in model.parameters():
            p.data.mul_(3)  # activations large enough that every ReLU6 clips some of them
        return model.eval()
""")
BRANCHY_BITS, BRANCHY_ACT_BITS = (8, 4, 3, 2, 5), (8, 4, 6, 3, 4)


@pytest.fixture
def branchy_module(tmp_path, monkeypatch):
    import importlib
    import sys

    (tmp_path / "my_models_14r.py").write_text(BRANCHY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_models_14r", raising=False)  # imported afresh, and gone after the test
    return importlib.import_module("my_models_14r")


def test_relu6_and_concat_compile_bit_exact_against_the_integer_model(branchy_module, tmp_path):
    out = tmp_path / "build"
    result = run("compile", "--model", "my_models_14r:branchy", "--input-shape", "3,12,12", "--kernels", "bitserial",
                 "--bits", ",".join(map(str, BRANCHY_BITS)), "--act-bits", ",".join(map(str, BRANCHY_ACT_BITS)),
                 "--no-measure", "--json", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["weights"] == "weights of my_models_14r:branchy"  # the entry point's own weights, not random ones
    net = quantize_network("branchy", BRANCHY_BITS, BRANCHY_ACT_BITS)
    kinds = [op.kind for op in net.graph.ops]
    assert kinds.count("relu6") == 4 and kinds.count("concat") == 1 and kinds.count("avgpool") == 1
    compiled = load_compiled(out)
    levels = compiled.quantize_input(images(6, seed=4))
    expected, values = integer_forward(net, levels, keep=True)
    np.testing.assert_array_equal(compiled.run_levels(levels), expected)
    # every ReLU6 clipped something: its cap is 6.0 in the fixed-point format, 6 * 2^F
    for op in net.graph.ops:
        if op.kind == "relu6":
            assert values[op.name].max() == 6 << net.frac_bits and values[op.name].min() == 0, op.name
    assert values["cat"].shape == (6, 10, 12, 12)
    np.testing.assert_array_equal(values["cat"][:, 4:], values["clamp"])


def test_relu6_and_concat_read_the_same_from_an_onnx_file(branchy_module, tmp_path):
    path = tmp_path / "branchy_onnx.onnx"
    export_onnx(branchy_module.branchy(), path)  # ReLU6 is exported as Clip(0, 6), torch.cat as Concat
    register_user_model(str(path))
    ops = extract_graph(create_network("branchy_onnx"), SHAPE, "branchy_onnx").ops
    expected = extract_graph(branchy_module.branchy(), SHAPE, "branchy").ops
    assert [(op.kind, op.shape) for op in ops] == [(op.kind, op.shape) for op in expected]


def test_relu6_fuses_into_its_kernel_only_where_the_next_quantizer_clips_at_6(tmp_path):
    from releq_tvm.compile import compile_network
    from releq_tvm.compile.lower import plan_fusion
    from releq_tvm.quant import apply_act_bits

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU6(), nn.Conv2d(6, 6, 3), nn.ReLU6(), nn.Flatten(),
                              nn.Linear(6 * 8 * 8, 4)).eval()
        for p in model.parameters():
            p.data.mul_(12)
    # learned ranges (a fine-tuned model's): 8.0 after the first ReLU6 (its top levels are never
    # reached), 6.0 after the second (a clip at 6 before that quantizer changes nothing)
    apply_act_bits(model, [8, 4, 3], SHAPE, [1.0, 8.0, 6.0], learn=False)
    net = quantize_network("relu6net", (4, 3, 2), model=model, calibration=images(4, seed=5), input_shape=SHAPE)
    plan = plan_fusion(net)
    assert plan["_0"].covers == ("_0",) and plan["_0"].quantize_for is None  # the ReLU6 runs on its own
    assert plan["_2"].covers == ("_2", "_3") and plan["_2"].quantize_for == 2  # fused as ReLU + quantizer
    compiled = compile_network(net, "bitserial", batch=2)
    levels = compiled.quantize_input(images(5, seed=6))
    expected, values = integer_forward(net, levels, keep=True)
    np.testing.assert_array_equal(compiled.run_levels(levels), expected)
    assert values["_1"].max() == 6 << net.frac_bits  # the standalone ReLU6 clipped


@pytest.mark.parametrize("body, operator_name, node", [
    ("self.gelu(self.conv(x))", "'GELU'", "at gelu"),
    ("F.gelu(self.conv(x))", "'torch.nn.functional.gelu'", "at gelu"),
    ("torch.sigmoid(self.conv(x))", "'torch.sigmoid'", "at sigmoid"),
    ("self.conv(x).sigmoid()", "'Tensor.sigmoid'", "at sigmoid"),
    ("self.conv(x) * 2", "'operator.mul'", "at mul"),
    ("self.act(self.conv(x))", "'SiLU'", "at act"),
    ("torch.cat([self.conv(x), self.conv(x)], dim=2)[:, :, :10]", "'torch.cat'", "only the channel dim 1"),
])
def test_unsupported_operators_are_one_line_naming_the_operator_and_node(tmp_path, monkeypatch, body, operator_name,
                                                                         node):
    import sys

    (tmp_path / "my_models_14u.py").write_text(textwrap.dedent(f"""
        import torch
        import torch.nn.functional as F
        from torch import nn


        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)
                self.gelu = nn.GELU()
                self.act = nn.SiLU()
                self.fc = nn.Linear(4 * 10 * 10, 2)

            def forward(self, x):
                return self.fc(torch.flatten({body}, 1))


        def net():
            return Net()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_models_14u", raising=False)  # each case imports its own Net
    result = run("compile", "--model", "my_models_14u:net", "--input-shape", "3,12,12", "--bits", "8",
                 "-o", tmp_path / "out")
    assert_one_line_error(result, "net: cannot compile", operator_name, node)
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.slow
def test_torchvision_resnet18_compiles_and_simulates_at_224(tmp_path):
    source = ("torchvision.models:resnet18", "--input-shape", "3,224,224")  # random weights (weights=None)
    result = run("compile", "--model", *source, "--bits", "4", "--act-bits", "4", "--kernels", "bitserial",
                 "--no-measure", "--json", "-o", tmp_path / "r18")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["network"] == "resnet18" and len(report["layer_kernels"]) == 21
    assert report["weights"] == "weights of torchvision.models:resnet18"
    compiled = load_compiled(tmp_path / "r18")
    logits = compiled.logits(torch.rand((1, 3, 224, 224), generator=torch.Generator().manual_seed(18)))
    assert logits.shape == (1, 1000) and np.isfinite(logits).all()
    result = run("simulate", "--model", *source, "--bits", "4", "--json")
    assert result.exit_code == 0, result.output
    layers = json.loads(result.output)["layers"]
    assert len(layers) == 21 and [layer["kind"] for layer in layers].count("dense") == 1
    assert all(layer["cycles"] > 0 for layer in layers)


# ---------------------------------------------------------------------------------------------
# search --model [--data]: config.json records both, so --resume loads them again


def test_onnx_model_searches_on_cost_only_through_the_cli(onnx_file, tmp_path):
    from releq_tvm.search.cost import SQCost

    run_dir = tmp_path / "run"
    result = run("search", "--model", onnx_file, "--accuracy", "none", "--episodes", "2", "--final-episodes", "1",
                 "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    assert "search smallcnn: 4 layers, 4 steps/episode" in result.output
    best = json.loads((run_dir / "best.json").read_text())
    solution = best["solution"]
    assert best["network"] == "smallcnn" and not best["accuracy_scored"] and best["training_episodes"] == 2
    assert len(solution["w_bits"]) == 4 and solution["accuracy_val"] == 100.0  # SA = 1: cost only
    assert solution["cost_ratio"] == round(SQCost(layer_table("smallcnn")).ratio(solution["w_bits"]), 6)
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["config"]["network"], saved["config"]["model"], saved["data"]) == ("smallcnn", str(onnx_file), None)


def test_search_of_a_model_without_data_says_what_to_pass(onnx_file, tmp_path):
    run_dir = tmp_path / "run"
    assert_one_line_error(run("search", "--model", onnx_file, "--run-dir", run_dir),
                          "the search scores smallcnn's accuracy on data: pass --data with imagefolder:DIR, npz:FILE",
                          "or --accuracy none to search on cost only")
    assert not run_dir.exists()  # before any work
    assert_one_line_error(run("search", "lenet", "--model", onnx_file), "pass NET or --model, not both")
    assert_one_line_error(run("search", "lenet", "--input-shape", "1,28,28"), "--input-shape goes with --model")
    assert_one_line_error(run("search", "--model", onnx_file, "--input-shape", "3,12"), "--input-shape must be C,H,W")
    assert_one_line_error(run("search", "--resume"), "--resume needs the run: pass --run-dir RUN")
    arrays = write_npz(tmp_path / "d.npz")
    write_npz(tmp_path / "d.npz", y_val=labels_with_accuracy(small_cnn(), torch.from_numpy(arrays["x_val"]), right=0))
    assert_one_line_error(run("search", "--model", onnx_file, "--data", f"npz:{tmp_path / 'd.npz'}",
                              "--run-dir", run_dir, "--cache", tmp_path / "cache.sqlite"),
                          "smallcnn gets none of the val images right at full precision")


def test_search_on_npz_data_scores_accuracy_long_fine_tunes_and_resumes(onnx_file, tmp_path, monkeypatch):
    from releq_tvm.data import load_model_data
    from releq_tvm.search.accuracy import AccuracyCache, data_digest

    arrays = write_npz(tmp_path / "d.npz")
    data, run_dir, cache = f"npz:{tmp_path / 'd.npz'}", tmp_path / "run", tmp_path / "cache.sqlite"
    result = run("search", "--model", onnx_file, "--data", data, "--episodes", "2", "--final-episodes", "1",
                 "--short-steps", "2", "--long-steps", "2", "--long-lrs", "1e-3", "--finetune-batch-size", "8",
                 "--run-dir", run_dir, "--cache", cache)
    assert result.exit_code == 0, result.output
    saved = json.loads((run_dir / "config.json").read_text())
    digest = data_digest(load_model_data(data, "train", SHAPE, 5), load_model_data(data, "val", SHAPE, 5))
    assert saved["data"] == {"source": data, "digest": digest}
    assert saved["config"]["data"] == data and saved["config"]["long_finetune"] is True
    # val: 3 of 8 right, test: 7 of 10 (write_npz's labels)
    assert saved["full_precision_val_accuracy"] == 37.5
    best = json.loads((run_dir / "best.json").read_text())
    long = best["long_finetune"]
    assert long["steps"] == 2 and long["test_accuracy_full_precision"] == 70.0 and (run_dir / "finetuned.pt").is_file()
    # the images are in the accuracy cache key: other data never reads these accuracies
    assert [s.get("data") for s in AccuracyCache(cache).store.items(AccuracyCache.SETTINGS).values()] == [digest]

    # a new process knows no smallcnn: --resume registers the run's model and reads its data again
    monkeypatch.setattr(registry, "_REGISTRY", {k: v for k, v in registry._REGISTRY.items() if k != "smallcnn"})
    result = run("search", "--resume", "--run-dir", run_dir, "--episodes", "3")
    assert result.exit_code == 0, result.output
    assert get_network_spec("smallcnn").source == str(onnx_file)
    best = json.loads((run_dir / "best.json").read_text())
    assert best["training_episodes"] == 3 and best["long_finetune"]["test_accuracy_full_precision"] == 70.0
    assert json.loads((run_dir / "config.json").read_text())["resumes"][0]["episodes"] == 3

    # other images under the same --data: the run refuses them
    write_npz(tmp_path / "d.npz", y_val=labels_with_accuracy(small_cnn(), torch.from_numpy(arrays["x_val"]), right=5))
    assert_one_line_error(run("search", "--resume", "--run-dir", run_dir, "--episodes", "4"),
                          "scored accuracy on other images", "resume with the run's images")


# ---------------------------------------------------------------------------------------------
# search-seeds and report of a user's model: a run's config.json registers its model again


def read_rows(path) -> list[dict]:
    """The rows of a report CSV (its ``#`` provenance lines skipped)."""
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def forget_model(monkeypatch, name: str = "smallcnn") -> None:
    """The registry of a new process: it knows no user model of ``name``."""
    monkeypatch.setattr(registry, "_REGISTRY", {k: v for k, v in registry._REGISTRY.items() if k != name})


def test_search_seeds_of_an_onnx_model_on_cost_only(onnx_file, tmp_path):
    from releq_tvm.search.cost import SQCost

    root, out = tmp_path / "seeds", tmp_path / "seeds.csv"
    result = run("search-seeds", "--model", onnx_file, "--accuracy", "none", "--seeds", "2", "--jobs", "1",
                 "--episodes", "2", "--final-episodes", "1", "--root", root, "-o", out)
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert [(r["network"], r["seed"], r["training_episodes"]) for r in rows] == [("smallcnn", "0", "2"), ("smallcnn", "1", "2")]
    sq = SQCost(layer_table("smallcnn"))
    for seed, row in enumerate(rows):
        best = json.loads((root / f"seed{seed}" / "best.json").read_text())
        saved = json.loads((root / f"seed{seed}" / "config.json").read_text())["config"]
        assert (saved["model"], saved["seed"], best["network"]) == (str(onnx_file), seed, "smallcnn")
        bits = best["solution"]["w_bits"]
        assert row["w_bits"] == ",".join(map(str, bits)) and len(bits) == 4
        assert float(row["cost_ratio"]) == round(sq.ratio(bits), 6) and float(row["accuracy_val_pct"]) == 100.0
    assert (tmp_path / "seeds_front.csv").is_file() and (tmp_path / "seeds.png").is_file()


def test_long_front_of_a_model_runs_on_its_data_in_a_new_process(onnx_file, tmp_path, monkeypatch):
    write_npz(tmp_path / "d.npz")
    data, root = f"npz:{tmp_path / 'd.npz'}", tmp_path / "seeds"
    fine_tune = ("--short-steps", "2", "--long-steps", "2", "--long-lrs", "1e-3", "--finetune-batch-size", "8",
                 "--cache", tmp_path / "cache.sqlite")
    result = run("search-seeds", "--model", onnx_file, "--data", data, "--seeds", "1", "--episodes", "2",
                 "--final-episodes", "1", *fine_tune, "--root", root, "-o", tmp_path / "seeds.csv")
    assert result.exit_code == 0, result.output
    forget_model(monkeypatch)
    out = tmp_path / "front.csv"
    result = run("compare-runs", root / "seed0", "--long-front", "2", "-o", out)
    assert result.exit_code == 0, result.output
    front = [r for r in read_rows(tmp_path / "front_front.csv") if r["on_front"] == "True"][:2]
    assert front and all(r["test_acc_long_finetune_pct"] != "" for r in front)
    # the long fine-tune reports on the npz's test split: 7 of its 10 images right at full precision
    assert json.loads((root / "seed0" / "best.json").read_text())["long_finetune"]["test_accuracy_full_precision"] == 70.0
    assert get_network_spec("smallcnn").source == str(onnx_file)


@pytest.fixture
def cost_only_run(onnx_file, tmp_path):
    run_dir = tmp_path / "run"
    result = run("search", "--model", onnx_file, "--accuracy", "none", "--episodes", "2", "--final-episodes", "1",
                 "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    return run_dir, json.loads((run_dir / "best.json").read_text())["solution"]["w_bits"]


def test_report_of_a_search_run_of_a_model_registers_it_from_the_run(cost_only_run, onnx_file, tmp_path, monkeypatch):
    from releq_tvm.sim.run import simulate_network

    run_dir, bits = cost_only_run
    bits_text = ",".join(map(str, bits))
    forget_model(monkeypatch)
    out = tmp_path / "results"
    result = run("report", "--bits-from", run_dir, "--skip-cpu", "--no-accuracy", "--out", out)
    assert result.exit_code == 0, result.output
    assert get_network_spec("smallcnn").source == str(onnx_file)
    (row,) = read_rows(out / "bitwidths.csv")
    assert (row["network"], row["bits_source"], row["w_bits"], row["layers"]) == ("smallcnn", str(run_dir), bits_text, "4")
    assert row["accuracy_note"] == "accuracy not measured (--no-accuracy)"
    rows = read_rows(out / "fig9_stripes.csv")
    assert [r["network"] for r in rows] == ["smallcnn", "GEOMEAN"]
    stripes = simulate_network("smallcnn", bits_text, None, mode="weights", fc_serial=True).result
    assert (rows[0]["w_bits"], int(rows[0]["cycles"]), int(rows[0]["cycles_8bit"])) == (
        bits_text, stripes.cycles, stripes.cycles_8bit)
    assert float(rows[0]["speedup"]) == pytest.approx(stripes.cycles_8bit / stripes.cycles)
    assert (out / "convergence_smallcnn.csv").is_file() and not (out / "fig8_tvm_cpu.csv").exists()


def test_report_of_a_model_scores_accuracy_on_its_data(cost_only_run, tmp_path):
    run_dir, bits = cost_only_run
    write_npz(tmp_path / "d.npz")
    out = tmp_path / "results"
    result = run("report", "--bits-from", run_dir, "--data", f"npz:{tmp_path / 'd.npz'}", "--skip-cpu",
                 "--finetune-steps", "2", "--out", out)
    assert result.exit_code == 0, result.output
    (row,) = read_rows(out / "bitwidths.csv")
    # write_npz's test labels: the float model gets exactly 7 of the 10 test images right
    assert float(row["acc_fp32_test_pct"]) == 70.0 and row["finetune_steps"] == "2"
    assert row["acc_quant_test_pct"] != "" and row["model"] == f"the weights of {get_network_spec('smallcnn').source}"


def test_report_of_a_model_says_what_cannot_work_in_one_line(onnx_file, tmp_path):
    write_npz(tmp_path / "d.npz")
    out = tmp_path / "results"
    assert_one_line_error(run("report", "--model", onnx_file, "--skip-cpu", "--no-accuracy", "--out", out),
                          "smallcnn has no published bitwidths", "--bits-from RUN_DIR")
    assert_one_line_error(run("report", "--networks", "lenet", "--data", f"npz:{tmp_path / 'd.npz'}", "--skip-cpu",
                              "--out", out), "--data goes with your own model")
    assert_one_line_error(run("report", "--networks", "lenet", "--input-shape", "3,12,12", "--out", out),
                          "--input-shape goes with --model")
    assert not out.exists()


def test_search_efficiency_of_a_model_on_its_data(onnx_file, tmp_path):
    write_npz(tmp_path / "d.npz")
    out = tmp_path / "eff.csv"
    result = run("search-efficiency", "--model", onnx_file, "--data", f"npz:{tmp_path / 'd.npz'}", "--short-steps", "2",
                 "--methods", "random,exhaustive", "--exhaustive-set", "2,8", "-o", out)
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert [(r["network"], r["method"], r["configurations"]) for r in rows] == [
        ("smallcnn", "random", "16"), ("smallcnn", "exhaustive", "16")]  # budget: |{2, 8}|^4
    # scored on the npz's 8 val images (a multiple of 12.5 %), not SA = 1 of a cost-only search
    assert all(float(r["accuracy_val"]) * 8 / 100 in range(9) and float(r["accuracy_val"]) < 100 for r in rows)
    assert_one_line_error(run("search-efficiency", "--model", onnx_file, "-o", out), "pass --data with")

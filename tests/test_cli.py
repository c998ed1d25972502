"""Bad input gets one line on stderr, exit code 2, no traceback and no output file."""

import pytest
from click.testing import CliRunner

from releq_tvm.cli import main
from releq_tvm.data import load_dataset


def run(*args):
    result = CliRunner().invoke(main, list(args))
    return result


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") or lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0]


def test_networks_lists_all_nine_with_layer_counts():
    result = run("networks")
    assert result.exit_code == 0
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:10]}
    assert {k: int(v[2]) for k, v in rows.items()} == {
        "lenet": 5, "lenet4": 4, "simplenet": 5, "svhn10": 10, "vgg11": 9,
        "vgg16": 16, "resnet20": 22, "mobilenet_v1": 28, "alexnet": 8,
    }


def test_unknown_network():
    assert_one_line_error(run("eval", "lenet7"), "unknown network 'lenet7'", "lenet4")


def test_wrong_number_of_bits():
    assert_one_line_error(run("eval", "lenet", "--bits", "8,2,2,3"), "4 values", "5 weight layers")


def test_bits_outside_action_set():
    assert_one_line_error(run("eval", "lenet", "--bits", "8,2,0,3,2"), "value 0 is outside the action set")


@pytest.mark.parametrize("command", ["eval", "finetune", "compile", "simulate"])
@pytest.mark.parametrize("text", ["", " ", ","])
def test_empty_bits_is_an_error(command, text):
    assert_one_line_error(run(command, "lenet", "--bits", text), "--bits is empty")


def test_bits_not_integers():
    assert_one_line_error(run("eval", "lenet", "--bits", "8,two,2,3,2"), "comma list of integers")


def test_missing_data_dir(tmp_path):
    assert_one_line_error(run("eval", "simplenet", "--checkpoint", str(tmp_path / "x.pt")), "does not exist")
    assert_one_line_error(
        run("train", "simplenet", "--steps", "1", "-o", str(tmp_path / "m.pt")), "pass --data-dir"
    )
    assert not (tmp_path / "m.pt").exists()
    assert_one_line_error(
        run("train", "vgg11", "--data-dir", str(tmp_path / "nowhere"), "-o", str(tmp_path / "m.pt")),
        "does not exist",
    )
    assert not list(tmp_path.iterdir())


def test_missing_checkpoint():
    assert_one_line_error(run("eval", "vgg16"), "no trained checkpoint ships for vgg16", "releq-tvm train vgg16")


def test_mnist_splits_are_offline_and_disjoint_sizes():
    train, val, test = (load_dataset("mnist", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (50_000, 10_000, 10_000)
    assert tuple(train.images.shape[1:]) == (1, 28, 28)
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) <= 1.0
    assert sorted(set(test.labels.tolist())) == list(range(10))


def test_cifar_without_data_dir_says_what_to_pass():
    from releq_tvm.errors import ReleqError

    with pytest.raises(ReleqError, match="--data-dir"):
        load_dataset("cifar10", "val")

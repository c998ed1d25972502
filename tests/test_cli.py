"""Bad input gets one line on stderr, exit code 2, no traceback and no output file; the options
of `search`, `search-efficiency` and `report` are their settings dataclasses' fields."""

from dataclasses import fields

import pytest
from click.testing import CliRunner

from releq_tvm.cli import main
from releq_tvm.config_cli import option_fields
from releq_tvm.config_fields import choices_of, setting_types
from releq_tvm.data import load_dataset
from releq_tvm.errors import ReleqError
from releq_tvm.report.accuracy import AccuracyConfig
from releq_tvm.report.build import ReportOptions
from releq_tvm.report.cli import report_cmd
from releq_tvm.report.pareto import PARETO_NETWORKS
from releq_tvm.search.cli import search_cmd, search_efficiency_cmd
from releq_tvm.search.config import SearchConfig
from releq_tvm.search.cost import CPU_KERNELS


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
    with pytest.raises(ReleqError, match="--data-dir"):
        load_dataset("cifar10", "val")


# ---------------------------------------------------------------------------------------------
# settings dataclasses -> options
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def captured(monkeypatch):
    """What `search` and `report` would run with: their configs, not a run."""
    seen = {}

    def fake_search(config, resume=False, overwrite=False, echo=None, resume_episodes=None, resume_settings=None):
        seen.update(config=config, resume=resume, overwrite=overwrite, resume_episodes=resume_episodes,
                    resume_settings=resume_settings)

    def fake_report(opts, progress=None):
        seen["opts"] = opts
        return []

    monkeypatch.setattr("releq_tvm.search.run.run_search", fake_search)
    monkeypatch.setattr("releq_tvm.report.build.build_report", fake_report)
    return seen


def test_every_setting_is_an_option():
    params = {p.name for p in search_cmd.params}
    # network is the NET argument; long_finetune follows --long-steps (0: skip)
    assert params - {"resume", "overwrite"} == {f.name for f in fields(SearchConfig)} - {"long_finetune"}
    report = {p.name for p in report_cmd.params}
    options = {f.name for f in fields(ReportOptions) if f.name not in ("accuracy_config", "accuracy_cache", "command",
                                                                        "cpu_measure", "cpu_pareto_cost")}
    accuracy = {f.name for f in fields(AccuracyConfig) if f.name not in ("finetune_lr", "finetune_batch", "seed")}
    assert report == options | accuracy


def test_option_names_of_today_still_work():
    names = {opt for p in search_cmd.params for opt in p.opts}
    assert {"--clip-range", "--short-steps", "--long-steps", "--episodes", "--cache", "--run-dir", "--resume",
            "--overwrite", "--checkpoint", "--data-dir", "--finetune", "--no-weight-std", "--no-early-stop",
            "--search-activations", "--action-set", "--act-action-set", "--max-loss", "--acc-limit"} <= names
    report = {opt for p in report_cmd.params for opt in p.opts}
    assert report == {"--bits-from", "--networks", "--out", "--skip-cpu", "--fresh-cpu", "--cpu-repeats", "--no-accuracy",
                      "--checkpoint", "--no-train", "--finetune-steps", "--val-images", "--pareto-finetune-steps",
                      "--pareto-bits", "--pareto-networks", "--threads", "--data-dir", "--act-bits",
                      "--model", "--input-shape", "--data"}


@pytest.mark.parametrize("name", [f.name for f, tp in option_fields(SearchConfig) if choices_of(tp)])
def test_help_lists_the_literal_choices(name):
    choices = choices_of(setting_types(SearchConfig)[name])
    param = next(p for p in search_cmd.params if p.name == name)
    assert tuple(param.type.choices) == choices
    assert "[" + "|".join(choices) + "]" in run("search", "--help").output


def test_choices_are_the_backends():
    hints = setting_types(SearchConfig)
    assert choices_of(hints["measure"]) == ("none", "cpu", "stripes")
    assert choices_of(hints["cpu_kernels"]) == CPU_KERNELS == ("auto", "bitserial")
    assert choices_of(hints["reward"]) == ("asymmetric", "sa_over_sq", "sa_minus_sq", "hardware")
    assert choices_of(hints["finetune"]) == ("per-episode", "per-step")


def test_defaults_are_the_dataclass_defaults(captured):
    result = run("search", "lenet")
    assert result.exit_code == 0, result.output
    assert captured["config"] == SearchConfig(network="lenet")
    assert captured["resume"] is False and captured["resume_episodes"] is None
    # METHOD.md section 3: Adam step 1e-4, GAE 0.99, discount 0.9, 3 epochs, clip 0.1
    config = captured["config"]
    assert (config.ppo_learning_rate, config.ppo_gae_lambda, config.ppo_gamma, config.ppo_n_epochs, config.ppo_clip_range) == (
        1e-4, 0.99, 0.9, 3, 0.1
    )
    assert (config.policy_layers, config.value_layers, config.lstm_hidden_size, config.seed) == ((128, 128), (128, 64), 64, 0)
    assert config.action_set == (1, 2, 3, 4, 5, 6, 7, 8) and config.long_finetune is True


def test_every_ppo_setting_reaches_the_config(captured):
    result = run(
        "search", "lenet", "--ppo-learning-rate", "3e-4", "--ppo-gamma", "0.95", "--ppo-gae-lambda", "0.9",
        "--ppo-n-epochs", "5", "--clip-range", "0.2", "--ppo-ent-coef", "0.01", "--ppo-normalize-advantage",
        "--policy-layers", "64,32", "--value-layers", "32", "--lstm-hidden-size", "16", "--seed", "7",
    )
    assert result.exit_code == 0, result.output
    c = captured["config"]
    assert (c.ppo_learning_rate, c.ppo_gamma, c.ppo_gae_lambda, c.ppo_n_epochs, c.ppo_clip_range, c.ppo_ent_coef) == (
        3e-4, 0.95, 0.9, 5, 0.2, 0.01
    )
    assert c.ppo_normalize_advantage is True
    assert (c.policy_layers, c.value_layers, c.lstm_hidden_size, c.seed) == ((64, 32), (32,), 16, 7)


def test_flags_bit_sets_and_renamed_fields(captured, tmp_path):
    result = run(
        "search", "lenet", "--no-weight-std", "--no-early-stop", "--long-steps", "0", "--action-set", "2-4",
        "--finetune", "per-step", "--cache", str(tmp_path / "c.sqlite"), "--run-dir", str(tmp_path / "run"),
        "--measure", "stripes", "--search-activations", "--act-action-set", "4,8", "--long-lrs", "1e-3",
    )
    assert result.exit_code == 0, result.output
    c = captured["config"]
    assert (c.weight_std_in_state, c.stop_on_convergence, c.long_steps, c.long_finetune) == (False, False, 0, False)
    assert (c.action_set, c.act_action_set, c.search_activations, c.long_lrs) == ((2, 3, 4), (4, 8), True, (1e-3,))
    assert (c.finetune, c.cache_path, c.run_dir) == ("per-step", str(tmp_path / "c.sqlite"), str(tmp_path / "run"))


def test_resume_takes_episodes_and_names_the_options_it_ignores(captured, tmp_path):
    result = run("search", "lenet", "--resume", "--run-dir", str(tmp_path), "--clip-range", "0.2", "--episodes", "9")
    assert result.exit_code == 0, result.output
    assert captured["resume"] is True and captured["resume_episodes"] == 9
    assert "note: --resume uses the run's saved settings; ignoring ppo_clip_range" in result.output
    result = run("search", "lenet", "--resume", "--run-dir", str(tmp_path))
    assert captured["resume_episodes"] is None and "ignoring" not in result.output
    assert captured["resume_settings"] == {}
    # how fast it runs is taken anew: workers, environments, cluster
    result = run("search", "lenet", "--resume", "--run-dir", str(tmp_path), "--workers", "4", "--envs", "2")
    assert captured["resume_settings"] == {"workers": 4, "envs": 2} and "ignoring" not in result.output


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("search", "lenet", "--measure", "gpu"), ["'--measure'", "'gpu' is not one of 'none', 'cpu', 'stripes'"]),
        (("search", "lenet", "--cpu-kernels", "int8"), ["'--cpu-kernels'", "'auto', 'bitserial'"]),
        (("search", "lenet", "--clip-range", "0"), ["--clip-range", "0<x<=1"]),
        (("search", "lenet", "--ppo-gamma", "1.5"), ["--ppo-gamma", "0<=x<=1"]),
        (("search", "lenet", "--episodes", "0"), ["--episodes", "x>=1"]),
        (("search", "lenet", "--policy-layers", "a,b"), ["--policy-layers", "comma list of int"]),
        (("search", "lenet", "--action-set", "0-9"), ["1..8"]),
        (("search", "lenet", "--search-activations"), ["--measure cpu or stripes"]),
        (("search-efficiency", "lenet", "--reward", "best"), ["'--reward'", "'best' is not one of"]),
        (("report", "--cpu-repeats", "0"), ["--cpu-repeats", "x>=1"]),
        (("report", "--checkpoint", "lenet"), ["NET=FILE"]),
    ],
)
def test_a_bad_value_is_one_line_and_exit_2(captured, args, fragments):
    assert_one_line_error(run(*args), *fragments)
    assert "config" not in captured and "opts" not in captured


def test_the_dataclass_checks_itself_in_one_line():
    with pytest.raises(ReleqError, match=r"^--measure must be one of none, cpu, stripes; got 'gpu'$"):
        SearchConfig(network="lenet", measure="gpu")
    with pytest.raises(ReleqError, match=r"^--ppo-clip-range must be in \(0, 1\]; got 0$"):
        SearchConfig(network="lenet", ppo_clip_range=0.0)
    with pytest.raises(ReleqError, match=r"^every value of --action-set must be in \[1, 8\]; got 9$"):
        SearchConfig(network="lenet", action_set=(2, 9))
    with pytest.raises(ReleqError, match=r"^--val-images must be >= 1; got 0$"):
        AccuracyConfig(val_images=0)
    assert SearchConfig(network="lenet", max_loss=None, latency_target=0.5).latency_target == 0.5


def test_search_efficiency_offers_its_subset(monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_compare(network, budget, methods, exhaustive_set, config, echo):
        seen.update(network=network, config=config, exhaustive_set=exhaustive_set)
        raise Stop

    monkeypatch.setattr("releq_tvm.search.efficiency.compare_search_methods", fake_compare)
    settings = {p.name for p in search_efficiency_cmd.params} - {"network", "budget", "methods", "exhaustive_set", "out",
                                                                  "checkpoint", "data_dir"}
    assert settings == {"measure", "cpu_kernels", "reward", "accuracy", "short_steps", "seed", "threads", "model",
                        "input_shape", "data"}
    result = run("search-efficiency", "lenet", "--accuracy", "none", "--seed", "4", "--short-steps", "20")
    assert isinstance(result.exception, Stop)
    assert seen["config"] == SearchConfig(network="lenet", accuracy="none", seed=4, short_steps=20)
    assert seen["exhaustive_set"] == (2, 4, 8)


def test_report_options_come_from_one_dataclass(captured, tmp_path):
    assert run("report").exit_code == 0
    assert captured["opts"] == ReportOptions()
    result = run(
        "report", "--networks", "lenet,lenet4", "--bits-from", "published", "--bits-from", str(tmp_path), "--skip-cpu",
        "--no-accuracy", "--no-train", "--checkpoint", "lenet4=m.pt", "--finetune-steps", "5", "--val-images", "300",
        "--pareto-networks", "none", "--pareto-bits", "2,8", "--threads", "1", "--data-dir", str(tmp_path),
    )
    assert result.exit_code == 0, result.output
    opts = captured["opts"]
    assert (opts.networks, opts.bits_from) == (("lenet", "lenet4"), ("published", str(tmp_path)))
    assert (opts.skip_cpu, opts.accuracy) == (True, False)
    assert (opts.pareto_networks, opts.pareto_bits, opts.threads) == ((), (2, 8), 1)
    assert opts.accuracy_config == AccuracyConfig(data_dir=str(tmp_path), checkpoints={"lenet4": "m.pt"}, train_missing=False,
                                                  finetune_steps=5, val_images=300)
    run("report", "--networks", "all", "--pareto-networks", "all")
    assert captured["opts"].networks is None and captured["opts"].pareto_networks == PARETO_NETWORKS


def test_the_recorded_report_command_rebuilds_the_same_options(captured, tmp_path):
    from releq_tvm.report.build import canonical_command

    args = ["--networks", "lenet,lenet4", "--bits-from", "published", "--bits-from", str(tmp_path), "--no-accuracy",
            "--no-train", "--checkpoint", "lenet4=m.pt", "--finetune-steps", "5", "--pareto-networks", "none",
            "--pareto-bits", "2,8", "--threads", "1", "--cpu-repeats", "3", "--fresh-cpu", "--data-dir", str(tmp_path)]
    assert run("report", *args).exit_code == 0
    first = captured["opts"]
    command = canonical_command(first)
    assert command.startswith(f"releq-tvm report --bits-from published --bits-from {tmp_path} --networks lenet,lenet4 --out ")
    assert "--pareto-networks none" in command and "--checkpoint lenet4=m.pt" in command and "--no-train" in command
    assert run(*command.split()[1:]).exit_code == 0
    assert captured["opts"] == first
    assert canonical_command(ReportOptions()) == "releq-tvm report --bits-from published --out results"


# ---------------------------------------------------------------------------------------------
# --act-bits: one option, checked like --bits, on every command that quantizes activations
# ---------------------------------------------------------------------------------------------
ACT_BITS_COMMANDS = ["eval", "finetune", "compile", "simulate"]


@pytest.mark.parametrize("command", ACT_BITS_COMMANDS)
@pytest.mark.parametrize(
    "text,fragments",
    [
        ("", ["--act-bits is empty"]),
        (",", ["--act-bits is empty"]),
        ("8,4,4,2", ["--act-bits has 4 values", "5 weight layers"]),
        ("8,4,0,2,4", ["--act-bits value 0 is outside the action set"]),
        ("8,4,9,2,4", ["--act-bits value 9 is outside the action set"]),
        ("8,four,4,2,4", ["--act-bits must be a comma list of integers"]),
    ],
)
def test_bad_act_bits_is_one_line_and_exit_2(command, text, fragments):
    assert_one_line_error(run(command, "lenet", "--bits", "8", "--act-bits", text), *fragments)


def test_act_bits_is_one_shared_option():
    from releq_tvm.cli_options import act_bits_option

    reference = act_bits_option()(lambda act_bits_text: None).__click_params__[0]
    for name in ACT_BITS_COMMANDS:
        (param,) = [p for p in main.get_command(None, name).params if "--act-bits" in p.opts]
        assert (param.name, param.opts, param.default) == (reference.name, reference.opts, None), name


def test_eval_with_act_bits_quantizes_every_layer_input():
    # float weights (99.18 %), every layer input at 2 bits, the image included (levels 0, 1/3,
    # 2/3, 1): measured 97.19 % here
    result = run("eval", "lenet", "--act-bits", "2")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("lenet float weights, activations 2,2,2,2,2: ")
    accuracy = float(result.output.split(": ")[1].split("%")[0])
    assert 96.0 < accuracy < 99.0, accuracy


# ---------------------------------------------------------------------------------------------
# fine-tuned model files: finetune -o FILE, then eval / compile --checkpoint FILE at its bits
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finetuned_file(tmp_path_factory):
    """LeNet-5 fine-tuned 2 steps at w 8,2,2,3,2, a 8,4,4,2,4 and saved by the CLI; and its output."""
    path = tmp_path_factory.mktemp("finetuned") / "lenet-ft.pt"
    result = run("finetune", "lenet", "--bits", "8,2,2,3,2", "--act-bits", "8,4,4,2,4", "--steps", "2", "-o", str(path))
    assert result.exit_code == 0, result.output
    return path, result.output


def test_finetune_saves_a_model_that_eval_reproduces(finetuned_file):
    import torch

    path, output = finetuned_file
    blob = torch.load(path, weights_only=True)
    assert (blob["format"], blob["version"], blob["network"]) == ("releq-tvm fine-tuned model", 1, "lenet")
    assert (blob["w_bits"], blob["a_bits"], blob["act_learned"]) == ([8, 2, 2, 3, 2], [8, 4, 4, 2, 4],
                                                                      [False, True, True, True, True])
    assert "3.act_quantizer.alpha_factor" in blob["state_dict"] and "3.weight" in blob["state_dict"]
    assert blob["about"]["command"].startswith("releq-tvm finetune lenet --bits 8,2,2,3,2 --act-bits 8,4,4,2,4 --steps 2")
    trained = output.splitlines()[1].split(": ")[1].split("%")[0]  # "... after 2 fine-tune steps: 97.12% (...)"
    # no bits given: the file's bits and learned levels, so the fine-tuned accuracy to the digit
    for args in ((), ("--bits", "8,2,2,3,2", "--act-bits", "8,4,4,2,4")):
        result = run("eval", "lenet", "--checkpoint", str(path), *args)
        assert result.exit_code == 0, result.output
        assert result.output == f"lenet bits 8,2,2,3,2, activations 8,4,4,2,4: {trained}% (test)\n"


def test_a_plain_state_dict_checkpoint_still_loads(tmp_path):
    import torch

    from releq_tvm.networks import create_network

    path = tmp_path / "plain.pt"
    torch.save(create_network("lenet", pretrained=True).state_dict(), path)
    result = run("eval", "lenet", "--checkpoint", str(path))
    assert result.exit_code == 0 and result.output == "lenet full precision: 99.18% (test)\n", result.output


def _bad_checkpoint(kind: str, tmp_path, finetuned) -> str:
    import torch

    path = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint\n")
    elif kind == "truncated":
        path.write_bytes(finetuned.read_bytes()[:50_000])
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "other-format":
        torch.save({"format": "releq-tvm fine-tuned model", "version": 99}, path)
    elif kind in ("damaged", "bad-bits"):
        blob = torch.load(finetuned, weights_only=True)
        if kind == "damaged":
            del blob["w_bits"]
        else:
            blob["a_bits"] = [8, 4, 4, 2, 9]
        torch.save(blob, path)
    return str(path)


@pytest.mark.parametrize("command", ["eval", "compile"])
@pytest.mark.parametrize(
    "kind,fragments",
    [
        ("garbage", ["is corrupt or not a model checkpoint", "UnpicklingError", "releq-tvm finetune lenet ... -o FILE"]),
        ("truncated", ["is corrupt or not a model checkpoint"]),
        ("list", ["is not a model checkpoint (a list)"]),
        ("other-format", ["version 99", "this release reads 'releq-tvm fine-tuned model' version 1"]),
        ("damaged", ["is a damaged fine-tuned model file"]),
        ("bad-bits", ["a_bits value 9 is outside the action set"]),
    ],
)
def test_a_corrupt_checkpoint_is_one_line_and_exit_2(command, kind, fragments, tmp_path, finetuned_file):
    path = _bad_checkpoint(kind, tmp_path, finetuned_file[0])
    assert_one_line_error(run(command, "lenet", "--checkpoint", path, *(["--no-measure"] if command == "compile" else [])),
                          f"checkpoint {path}", *fragments)


@pytest.mark.parametrize("command", ["eval", "compile", "simulate"])
@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--bits", "4"], ["--bits 4,4,4,4,4 disagrees with", "fine-tuned at weight bits 8,2,2,3,2", "drop --bits"]),
        (["--act-bits", "8,4,4,4,4"], ["--act-bits 8,4,4,4,4 disagrees with", "activation bits 8,4,4,2,4",
                                       "drop --act-bits"]),
    ],
)
def test_bits_that_disagree_with_the_checkpoint_are_one_line_and_exit_2(command, args, fragments, finetuned_file):
    extra = ["--no-measure"] if command == "compile" else []
    assert_one_line_error(run(command, "lenet", "--checkpoint", str(finetuned_file[0]), *args, *extra), *fragments)


def test_simulate_takes_a_fine_tuned_files_bits(finetuned_file):
    """simulate --checkpoint runs Stripes at the bits the file was fine-tuned at, as if they were given."""
    import json

    from_file = run("simulate", "lenet", "--checkpoint", str(finetuned_file[0]), "--json")
    given = run("simulate", "lenet", "--bits", "8,2,2,3,2", "--act-bits", "8,4,4,2,4", "--json")
    assert from_file.exit_code == 0 and given.exit_code == 0, from_file.output + given.output
    file_result, given_result = json.loads(from_file.output), json.loads(given.output)
    assert (file_result["w_bits"], file_result["a_bits"]) == ([8, 2, 2, 3, 2], [8, 4, 4, 2, 4])
    assert file_result["totals"] == given_result["totals"]
    assert file_result["totals"]["cycles"] < file_result["totals"]["cycles_8bit"]
    assert any("fine-tuned model file" in note for note in file_result["notes"])


def test_a_checkpoint_of_another_network_is_one_line(finetuned_file):
    assert_one_line_error(run("eval", "lenet4", "--checkpoint", str(finetuned_file[0])),
                          "holds a fine-tuned lenet, not lenet4")

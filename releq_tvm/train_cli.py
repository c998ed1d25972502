"""`releq-tvm networks | train | finetune | eval`: the registry and the torch side of quantization."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from releq_tvm.bits import format_bits, parse_bits
from releq_tvm.cli_options import (
    act_bits_option, bits_option, checkpoint_option, data_dir_option, data_option, json_option, network_argument,
    network_or_model, split_option,
)
from releq_tvm.config import DEFAULTS


@click.command("networks")
@json_option
def networks_cmd(as_json: bool) -> None:
    """List the registered networks: dataset, weight layers, MACs, weights, published bits."""
    from releq_tvm.networks import get_network_spec, layer_table, list_networks, total_macs, total_weights

    rows = []
    for name in list_networks():
        spec, table = get_network_spec(name), layer_table(name)
        rows.append(
            {
                "name": name,
                "dataset": spec.dataset,
                "layers": len(table),
                "macs": total_macs(table),
                "weights": total_weights(table),
                "published_bits": format_bits(spec.published_bits) if spec.published_bits else "",
                "note": spec.published_bits_note,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'network':<13} {'dataset':<9} {'layers':>6} {'MMACs':>9} {'weights':>10}  published bits")
    for r in rows:
        click.echo(
            f"{r['name']:<13} {r['dataset']:<9} {r['layers']:>6} {r['macs'] / 1e6:>9.2f} {r['weights']:>10}  {r['published_bits']}"
        )
    for r in rows:
        if r["note"]:
            click.echo(f"note ({r['name']}): {r['note']}")


def _model_data(network: str, data_source: str | None, split: str, data_dir, limit: int | None = None):
    """``split`` of ``--data`` (default: the network's own dataset), checked against the network's
    input shape and classes; a --model without ``--data`` is a one-line error saying what to pass."""
    from releq_tvm.data import DATA_FORMS, load_model_data
    from releq_tvm.errors import ReleqError
    from releq_tvm.networks import get_network_spec

    spec = get_network_spec(network)
    source = data_source or spec.dataset
    if source is None:
        raise ReleqError(f"accuracy needs the model's data: pass --data with {DATA_FORMS}; compile and simulate "
                         f"{network} need none")
    return load_model_data(source, split, spec.input_shape, spec.num_classes, data_dir, limit)


@click.command("train")
@network_argument
@click.option("--steps", type=click.IntRange(1), default=4000, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None, help="Where to write the state_dict (default runs/<net>/model.pt).")
@data_dir_option
def train_cmd(network, steps, lr, batch_size, seed, out, data_dir) -> None:
    """Train NET in full precision and save its checkpoint (with a JSON of how it was made)."""
    import torch

    from releq_tvm.io import atomic_write_bytes, atomic_write_text
    from releq_tvm.networks import create_network
    from releq_tvm.train import evaluate, train_steps

    train, test = _model_data(network, None, "train", data_dir), _model_data(network, None, "test", data_dir)
    torch.manual_seed(seed)
    model = create_network(network, seed=seed)
    every = max(1, steps // 10)
    start = time.time()

    def progress(step, loss):
        if (step + 1) % every == 0:
            click.echo(f"step {step + 1}/{steps}  loss {loss:.4f}  {time.time() - start:.0f}s")

    train_steps(model, train, steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    acc = evaluate(model, test)
    out = Path(out or f"runs/{network}/model.pt")
    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(out, buf.getvalue())
    meta = {
        "network": network,
        "command": f"releq-tvm train {network} --steps {steps} --lr {lr} --batch-size {batch_size} --seed {seed}",
        "test_accuracy": acc,
        "torch": torch.__version__,
        "seconds": round(time.time() - start, 1),
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    click.echo(f"{network}: test accuracy {acc:.2f}%  -> {out}")


def _calibration_images(network: str, data_source: str | None, data_dir, train=None):
    """The train images that start the activation clipping levels: the search's calibration set (the
    first ones of the train split; sliced from ``train`` when it is already loaded)."""
    from releq_tvm.search.config import SearchConfig

    count = SearchConfig.calibration_images
    if train is not None:
        return train.images[:count]
    return _model_data(network, data_source, "train", data_dir, limit=count).images


def _bits_label(bits, act_bits) -> str:
    label = f"bits {format_bits(bits)}" if bits is not None else "float weights"
    return label + (f", activations {format_bits(act_bits)}" if act_bits is not None else "")


@click.command("finetune")
@network_or_model
@bits_option(required=True)
@act_bits_option(help="Activation bits per layer (one value = all layers; default: float activations). Each weight "
                      "layer's input is quantized with a learned clipping level; the first layer's input, the image, "
                      "at the first value with the fixed range [0, 1].")
@click.option("--steps", type=click.IntRange(0), default=DEFAULTS.finetune.short_steps, show_default=True, help="Fine-tune steps (e.g. 200 short, 3000 long).")
@click.option("--lr", type=float, default=DEFAULTS.finetune.learning_rate, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None,
              help="Save the fine-tuned model here: float weights, learned clipping levels and the bits, in one file "
                   "that eval, compile and simulate take as --checkpoint.")
@checkpoint_option
@data_option
@data_dir_option
@split_option
def finetune_cmd(network, bits_text, act_bits_text, steps, lr, seed, out, checkpoint, data_source, data_dir,
                 split) -> None:
    """Quantize NET to --bits (and --act-bits), fine-tune it for --steps, and print float and quantized accuracy.

    With -o FILE the fine-tuned model is saved (releq_tvm.train.save_finetuned: one torch.save dict
    with the float weights, each layer's learned clipping level, the weight and activation bits and
    how it was made); `releq-tvm compile NET --checkpoint FILE` then builds exactly this model.
    """
    from releq_tvm.networks import get_network_spec, layer_table
    from releq_tvm.quant import act_quantizers
    from releq_tvm.train import evaluate, finetune_bits, load_model, save_finetuned

    spec = get_network_spec(network)
    n = len(layer_table(network))
    bits = parse_bits(bits_text, n, network)
    act_bits = parse_bits(act_bits_text, n, network, what="--act-bits") if act_bits_text is not None else None
    model = load_model(network, checkpoint)
    train, test = _model_data(network, data_source, "train", data_dir), _model_data(network, data_source, split, data_dir)
    fp = evaluate(model, test)
    finetune_bits(model, bits, spec.input_shape, train, steps, lr=lr, seed=seed, act_bits=act_bits,
                  calibration=_calibration_images(network, data_source, data_dir, train) if act_bits is not None else None)
    q = evaluate(model, test)
    on = "" if split == "test" else f" on {split}"  # test is the reported split unless asked otherwise
    click.echo(f"{network} full precision{on}: {fp:.2f}%")
    click.echo(f"{network} {_bits_label(bits, act_bits)} after {steps} fine-tune steps{on}: {q:.2f}% ({q - fp:+.2f} pp)")
    if act_bits is not None:
        levels = ", ".join(f"{quantizer.alpha.item():.4g}" for quantizer in act_quantizers(model).values())
        click.echo(f"activation clipping levels (first layer fixed, the rest learned): {levels}")
    if out is not None:
        net = f"--model {spec.source}" if spec.source else network  # as a command line names it
        command = (f"releq-tvm finetune {net} --bits {format_bits(bits)}"
                   + (f" --act-bits {format_bits(act_bits)}" if act_bits is not None else "")
                   + f" --steps {steps} --lr {lr} --seed {seed}" + (f" --checkpoint {checkpoint}" if checkpoint else "")
                   + (f" --data {data_source}" if data_source else "") + (" --split val" if split == "val" else ""))
        about = {"command": command, "steps": steps, "learning_rate": lr, "seed": seed,
                 f"{split}_accuracy_full_precision": fp, f"{split}_accuracy_quantized": q}
        save_finetuned(out, model, network, spec.input_shape, about)
        click.echo(f"fine-tuned model -> {out} (build it: releq-tvm compile {net} --checkpoint {out})")


@click.command("eval")
@network_or_model
@bits_option(help="Weight bits per layer, e.g. 8,2,2,3,2 (one value = all layers; default: float, or the bits a "
                  "fine-tuned --checkpoint was trained at).")
@act_bits_option(help="Activation bits per layer (one value = all layers; default: float activations, or the bits a "
                      "fine-tuned --checkpoint was trained at, with its learned levels). Without learned levels each "
                      "weight layer's input is clipped at a range calibrated on train images; the first layer's input, "
                      "the image, at the first value with the fixed range [0, 1].")
@checkpoint_option
@data_option
@data_dir_option
@split_option
def eval_cmd(network, bits_text, act_bits_text, checkpoint, data_source, data_dir, split) -> None:
    """Accuracy of NET in float, or fake-quantized to --bits / --act-bits without fine-tuning.

    A fine-tuned --checkpoint (`releq-tvm finetune ... -o FILE`) is evaluated at its own bits and
    learned clipping levels; --bits / --act-bits that differ from the file's are an error.
    """
    from releq_tvm.networks import get_network_spec, layer_table
    from releq_tvm.quant import apply_act_bits, apply_bits, calibrate_input_ranges
    from releq_tvm.train import evaluate, read_model_file

    spec = get_network_spec(network)
    n = len(layer_table(network))
    bits = parse_bits(bits_text, n, network) if bits_text is not None else None
    act_bits = parse_bits(act_bits_text, n, network, what="--act-bits") if act_bits_text is not None else None
    loaded = read_model_file(network, checkpoint)
    bits, act_bits = loaded.bits_in_force(bits, act_bits)
    model = loaded.model
    data = _model_data(network, data_source, split, data_dir)
    if act_bits is not None and loaded.a_bits is None:
        # ranges of the float model on train images, as the search and the fine-tunes start from
        ranges, learn = calibrate_input_ranges(model, spec.input_shape, _calibration_images(network, data_source, data_dir))
        apply_act_bits(model, act_bits, spec.input_shape, ranges, learn)
    if bits is not None:
        apply_bits(model, bits, spec.input_shape)
    label = _bits_label(bits, act_bits) if bits is not None or act_bits is not None else "full precision"
    click.echo(f"{network} {label}: {evaluate(model, data):.2f}% ({split})")
